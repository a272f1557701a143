"""Structured outputs: a request's grammar (JSON schema, regex or Lark) becomes a token mask at every sampling step.

The grammar engine is llguidance (chosen over xgrammar; BENCHMARKS.md "Grammar engines" has the comparison on this
CPU): it has no dependencies (xgrammar pulls Triton and a TVM runtime), reads any fast tokenizer's token table, and
takes JSON schemas, regexes and Lark grammars in one API. Its mask costs about 0.1 ms per token here, next to a
decode step of several milliseconds.

Off the critical path: once a step is scheduled, ``start_masks`` hands every constrained sequence's mask to a worker
thread (llguidance drops the GIL while it computes), so masks are computed while the model runs its forward pass;
the sampler then only waits for a mask that is not ready yet (``TokenMatcher.allowed``).

``GrammarCompiler`` is built once per engine, lazily: turning a 50k-token vocabulary into llguidance's token table
takes about half a second, paid by the first constrained request only.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from rtp_mm.errors import InvalidRequest, NotImplementedYetError
from rtp_mm.llm.engine.generate_config import GenerateConfig

logger = logging.getLogger(__name__)
_BITS = torch.arange(32, dtype=torch.int32)


def grammar_source(config: GenerateConfig) -> tuple[str, Any] | None:
    """(kind, spec) of the request's grammar, or None. GenerateConfig validation allows at most one."""
    if config.json_schema is not None:
        return "json_schema", config.json_schema
    if config.regex is not None:
        return "regex", config.regex
    if config.grammar is not None:
        return "grammar", config.grammar
    return None


class TokenMatcher:
    """One sequence's grammar state. Invariant: it has consumed exactly the sequence's generated tokens."""

    def __init__(self, matcher: Any, vocab_size: int, eos_token_ids: frozenset[int]):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos = sorted(t for t in eos_token_ids if t < vocab_size)
        self._words = (vocab_size + 31) // 32
        self._pending: Future | None = None

    def start(self, executor: ThreadPoolExecutor) -> None:
        """Compute the next mask in ``executor`` (no-op when one is being computed already)."""
        if self._pending is None:
            self._pending = executor.submit(self._compute)

    def allowed(self) -> torch.Tensor:
        """bool [vocab]: the tokens the grammar allows next (EOS once it is complete). Never raises: the sampler runs
        for the whole batch, so one sequence's grammar must not fail the step."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else self._compute()

    def _compute(self) -> torch.Tensor:
        bitmask = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        allowed = ((bitmask.unsqueeze(1) >> _BITS) & 1).bool().flatten()[: self._vocab_size]
        if len(allowed) < self._vocab_size:  # ids past the tokenizer's table (padded embeddings) are never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(self._vocab_size - len(allowed))])
        if self._matcher.is_accepting() and self._eos:
            allowed[self._eos] = True  # the request's own EOS tokens end a complete answer
        if not bool(allowed.any()):
            # Only a grammar in an error state gets here; ending the answer beats drawing from an empty set.
            logger.warning("grammar allows no next token (%s): ending the sequence", self._matcher.get_error())
            allowed[self._eos or list(range(self._vocab_size))] = True
        return allowed

    def consume(self, token: int) -> None:
        if self._pending is not None:  # never mutate the matcher while a worker reads it
            self._pending.exception()
            self._pending = None
        if token in self._eos:
            return
        if not self._matcher.consume_token(token):
            logger.warning("token %d left the grammar: %s", token, self._matcher.get_error())

    @property
    def is_complete(self) -> bool:
        """Nothing but EOS can follow: the answer is finished."""
        return self._matcher.is_stopped()


class GrammarCompiler:
    """Compiles requests' grammars against the engine's tokenizer (one per engine)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = eos_token_ids
        self._ll_tokenizer: Any = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="rtp-mm-grammar")

    def matcher(self, config: GenerateConfig, eos_token_ids: frozenset[int]) -> TokenMatcher | None:
        source = grammar_source(config)
        if source is None:
            return None
        import llguidance

        kind, spec = source
        table = self._token_table()
        try:
            if kind == "json_schema":
                # Compact JSON without free whitespace: models cannot pad the answer with endless spaces or newlines.
                options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
                grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec), defaults=options)
            elif kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(spec)
            else:
                grammar = llguidance.LLMatcher.grammar_from_lark(spec)
            matcher = llguidance.LLMatcher(table, grammar, log_level=0)
        except (ValueError, TypeError, RuntimeError) as e:  # the library refuses some inputs by raising
            raise InvalidRequest(f"{kind} is not a valid grammar: {_first_line(e)}") from None
        if matcher.is_error():
            raise InvalidRequest(f"{kind} is not a valid grammar: {_first_line(matcher.get_error())}")
        return TokenMatcher(matcher, self._vocab_size, eos_token_ids)

    def _token_table(self) -> Any:
        if self._ll_tokenizer is None:
            self._ll_tokenizer = _ll_tokenizer(self._tokenizer, self._vocab_size, self._eos_token_ids)
        return self._ll_tokenizer

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _ll_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> Any:
    import llguidance.hf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if tokenizer is None or backend is None:
        kind = type(tokenizer).__name__
        raise NotImplementedYetError(
            f"structured outputs need a fast (tokenizers-library) tokenizer; this model's tokenizer is {kind}"
        )
    eos = sorted(t for t in eos_token_ids if t < vocab_size) or None
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
    except ValueError:  # transformers 5 fast tokenizers are no PreTrainedTokenizerFast subclass: wrap the backend
        return llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)


def _first_line(error: object) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else "unknown error"


def start_masks(requests: list[Any], executor: ThreadPoolExecutor) -> None:
    """Start computing the masks of the constrained sequences among ``requests`` (see the module docstring)."""
    for req in requests:
        if req is not None and req.grammar is not None:
            req.grammar.start(executor)
