"""Speculative decoding's configuration: RTP-LLM's SP_* variables, read by ``config.py`` (the only reader of the
environment) through ``speculative_from_env``.

Two kinds of proposer, chosen by SP_TYPE:
  * ``vanilla`` (RTP-LLM's name; the default when SP_CHECKPOINT_PATH is set): a small draft model (SP_MODEL_TYPE,
    detected from its config.json when unset; SP_CHECKPOINT_PATH; SP_WEIGHT_TYPE, the target's WEIGHT_TYPE when
    unset) with its own paged KV cache;
  * ``prompt_lookup`` (RTP-LLM calls its n-gram proposer ``deterministic``, accepted as the same): no model; the
    tokens that followed the last n-gram of the sequence where it occurred earlier in the prompt or the output
    (copy-heavy work: rewriting, quoting, code edits), n from SP_MAX_TOKEN_MATCH down to SP_MIN_TOKEN_MATCH.

``ModelConfig.gen_num_per_circle`` (GEN_NUM_PER_CIRCLE) is the most tokens proposed, and verified by one target
forward, per step; a step then emits 1 to gen_num_per_circle + 1 tokens. With SP_* set and GEN_NUM_PER_CIRCLE unset
it is 5, RTP-LLM's default for speculative decoding; without speculation a value above 1 is refused at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rtp_mm.config_values import WeightType, check_local_path
from rtp_mm.errors import ConfigError
from rtp_mm.model_types import resolve_model_type

SP_TYPES = ("vanilla", "prompt_lookup")
SP_TYPE_ALIASES = {"deterministic": "prompt_lookup"}  # RTP-LLM's name for its n-gram proposer
SP_VARIABLES = (
    "SP_TYPE",
    "SP_MODEL_TYPE",
    "SP_CHECKPOINT_PATH",
    "SP_WEIGHT_TYPE",
    "SP_MIN_TOKEN_MATCH",
    "SP_MAX_TOKEN_MATCH",
)
DEFAULT_GEN_NUM_PER_CIRCLE = 5  # RTP-LLM's GEN_NUM_PER_CIRCLE default when a speculative model is configured
# n-gram lengths of prompt lookup. RTP-LLM's are 2 and 2; longer matches first are more specific (on the bench's
# prompts 2..4 and 2..2 emitted the same tokens per step).
DEFAULT_MIN_TOKEN_MATCH = 2
DEFAULT_MAX_TOKEN_MATCH = 4


@dataclass(frozen=True)
class SpeculativeConfig:
    """Which proposer speculative decoding uses. Invariants: ``sp_type`` is one of SP_TYPES; ``vanilla`` has an
    existing local ``sp_checkpoint_path``; ``prompt_lookup`` names no draft model and has
    1 <= sp_min_token_match <= sp_max_token_match. Field names are the variables' in lower case, so errors name both."""

    sp_type: str = "vanilla"
    sp_model_type: str = ""  # "" = detected from the draft checkpoint's config.json
    sp_checkpoint_path: str = ""
    sp_weight_type: WeightType | None = None  # None = the target's WEIGHT_TYPE
    sp_min_token_match: int = DEFAULT_MIN_TOKEN_MATCH  # prompt lookup's shortest n-gram
    sp_max_token_match: int = DEFAULT_MAX_TOKEN_MATCH  # ... and its longest, tried first

    def __post_init__(self) -> None:
        sp_type = str(self.sp_type).strip().lower()
        sp_type = SP_TYPE_ALIASES.get(sp_type, sp_type)
        if sp_type not in SP_TYPES:
            accepted = (*SP_TYPES, *SP_TYPE_ALIASES)
            raise ConfigError(f"SP_TYPE={self.sp_type!r} is not a speculative decoding type; accepted: {accepted}")
        object.__setattr__(self, "sp_type", sp_type)
        if sp_type == "prompt_lookup":
            self._check_ngrams()
            named = [name for name in ("sp_model_type", "sp_checkpoint_path", "sp_weight_type") if getattr(self, name)]
            if named:
                raise ConfigError(
                    f"SP_TYPE=prompt_lookup uses no draft model but {', '.join(n.upper() for n in named)} is set; "
                    "unset it, or set SP_TYPE=vanilla to use the draft model"
                )
            return
        if (self.sp_min_token_match, self.sp_max_token_match) != (DEFAULT_MIN_TOKEN_MATCH, DEFAULT_MAX_TOKEN_MATCH):
            raise ConfigError("SP_MIN_TOKEN_MATCH and SP_MAX_TOKEN_MATCH apply to SP_TYPE=prompt_lookup only")
        if not self.sp_checkpoint_path:
            raise ConfigError(
                "SP_TYPE=vanilla (a draft model) needs SP_CHECKPOINT_PATH; accepted: a local checkpoint folder, or "
                "SP_TYPE=prompt_lookup for speculation without a draft model"
            )
        check_local_path(self.sp_checkpoint_path, "SP_CHECKPOINT_PATH")
        if self.sp_model_type:
            resolve_model_type(self.sp_model_type, variable="SP_MODEL_TYPE")
        if self.sp_weight_type is not None:
            object.__setattr__(self, "sp_weight_type", WeightType.parse(self.sp_weight_type, "SP_WEIGHT_TYPE"))

    def _check_ngrams(self) -> None:
        low, high = self.sp_min_token_match, self.sp_max_token_match
        for name, value in (("SP_MIN_TOKEN_MATCH", low), ("SP_MAX_TOKEN_MATCH", high)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if low > high:
            raise ConfigError(f"SP_MIN_TOKEN_MATCH={low} > SP_MAX_TOKEN_MATCH={high}; accepted: min <= max")

    @property
    def uses_draft_model(self) -> bool:
        return self.sp_type == "vanilla"


def speculative_from_env(raw: Callable[[str], str | None]) -> SpeculativeConfig | None:
    """The SP_* variables through ``raw`` (config's reader: stripped value or None); None when none is set."""
    values = {name: raw(name) for name in SP_VARIABLES}
    if not any(values.values()):
        return None
    return SpeculativeConfig(
        sp_type=values["SP_TYPE"] or "vanilla",
        sp_model_type=values["SP_MODEL_TYPE"] or "",
        sp_checkpoint_path=values["SP_CHECKPOINT_PATH"] or "",
        sp_weight_type=values["SP_WEIGHT_TYPE"],
        sp_min_token_match=_integer(values["SP_MIN_TOKEN_MATCH"], "SP_MIN_TOKEN_MATCH", DEFAULT_MIN_TOKEN_MATCH),
        sp_max_token_match=_integer(values["SP_MAX_TOKEN_MATCH"], "SP_MAX_TOKEN_MATCH", DEFAULT_MAX_TOKEN_MATCH),
    )


def _integer(value: str | None, name: str, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer; accepted: an integer >= 1") from None


def default_gen_num_per_circle(raw: Callable[[str], str | None]) -> int:
    """GEN_NUM_PER_CIRCLE when unset: RTP-LLM's 5 with speculative decoding configured, else 1."""
    return DEFAULT_GEN_NUM_PER_CIRCLE if any(raw(name) for name in SP_VARIABLES) else 1


def check_gen_num_per_circle(gen_num_per_circle: int, speculative: SpeculativeConfig | None) -> None:
    """Start-up refuses a GEN_NUM_PER_CIRCLE that would have no effect (RTP-LLM ignores it silently)."""
    if gen_num_per_circle > 1 and speculative is None:
        raise ConfigError(
            f"GEN_NUM_PER_CIRCLE={gen_num_per_circle} takes effect only with speculative decoding, which is not "
            "configured; set SP_TYPE=prompt_lookup, or SP_CHECKPOINT_PATH (a draft model), or unset GEN_NUM_PER_CIRCLE"
        )
