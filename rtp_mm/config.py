"""Configuration: the only module that reads environment variables (and never at import time).

``Settings.from_env()`` parses every variable of the seed's Config.md plus rtp-mm's own server settings into three
frozen dataclasses: ``ModelConfig`` (the seed's ModelConfig, also taken directly by the offline API), ``EngineConfig``
(memory and batching knobs) and ``ServerConfig`` (HTTP). A bad value raises ``ConfigError`` naming the variable, the
value and what is accepted, so a misconfigured server stops at start-up instead of failing on the first request.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from rtp_mm.config_values import WeightType, check_local_path, is_remote
from rtp_mm.errors import ConfigError
from rtp_mm.model_types import resolve_model_type
from rtp_mm.parallel_config import ParallelConfig, parallel_from_env
from rtp_mm.speculative_config import SpeculativeConfig, default_gen_num_per_circle, speculative_from_env

DEFAULT_START_PORT = 8088
DEFAULT_CONCURRENCY_LIMIT = 32
VIT_BACKENDS = ("torch", "onnxruntime", "tensorrt")
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# A browser origin as browsers serialise it (RFC 6454): lower-case scheme://host[:port], no path, no user info.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(?:\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::(\d{1,5}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _path_str(value: Any) -> Any:
    """Let the offline API pass ``pathlib.Path`` objects; anything else is left for ``check_local_path`` to judge."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


@dataclass(frozen=True)
class ModelConfig:
    """The seed's ModelConfig. Immutable; validated on construction.

    Invariants: ``model_type`` is '' (detect from the checkpoint) or a registered MODEL_TYPE name; paths are local and
    exist when set; ``tokenizer_path`` falls back to ``ckpt_path``; ``act_type`` None means "derived from weight_type
    and the device" (see ``resolve_act_type``).
    """

    model_type: str = ""
    ckpt_path: str = ""
    tokenizer_path: str = ""
    weight_type: WeightType = WeightType.FP16
    act_type: WeightType | None = None
    max_seq_len: int = 0  # input + output tokens; 0 = the model's default
    seq_size_per_block: int = 8  # tokens per KV-cache block
    gen_num_per_circle: int = 1  # tokens a step may accept (>1 only with speculative decoding)
    ptuning_path: str | None = None
    lora_infos: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        for name in ("ckpt_path", "tokenizer_path", "ptuning_path"):
            object.__setattr__(self, name, _path_str(getattr(self, name)))
        if self.model_type:
            resolve_model_type(self.model_type, variable="model_type")
        object.__setattr__(self, "weight_type", WeightType.parse(self.weight_type, "weight_type"))
        if self.act_type is not None:
            act = WeightType.parse(self.act_type, "act_type")
            if not act.is_float:
                raise ConfigError(f"act_type={act.value!r} must be a float type: FP16, BF16 or FP32")
            object.__setattr__(self, "act_type", act)
        if self.ckpt_path:
            check_local_path(self.ckpt_path, "ckpt_path")
        if not self.tokenizer_path and self.ckpt_path:
            object.__setattr__(self, "tokenizer_path", self.ckpt_path)
        elif self.tokenizer_path:
            check_local_path(self.tokenizer_path, "tokenizer_path")
        _check_int(self.max_seq_len, "max_seq_len", minimum=0)
        _check_int(self.seq_size_per_block, "seq_size_per_block", minimum=1)
        _check_int(self.gen_num_per_circle, "gen_num_per_circle", minimum=1)
        if self.ptuning_path:
            check_local_path(self.ptuning_path, "ptuning_path")
        if self.lora_infos is not None:
            if isinstance(self.lora_infos, Mapping):
                object.__setattr__(self, "lora_infos", {k: _path_str(v) for k, v in self.lora_infos.items()})
            if not isinstance(self.lora_infos, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.lora_infos.items()
            ):
                raise ConfigError(f"lora_infos={self.lora_infos!r} must map adapter names to local paths")
            for name, path in self.lora_infos.items():
                check_local_path(path, f"lora_infos[{name!r}]")
            object.__setattr__(self, "lora_infos", MappingProxyType(dict(self.lora_infos)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ModelConfig:
        return Settings.from_env(env).model


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_bool(value: Any, name: str) -> None:
    # A string such as "0" would be truthy: flags built in code must be real booleans.
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be a bool; accepted: True or False")


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs of the seed (memory, batching, loading). Invariants: positive limits; -1 means automatic."""

    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT  # in-flight requests (HTTP 409 beyond) = max batch size
    int8_kv_cache: bool = False  # KV stored as int8 + a float scale per (token, kv-head)
    kv_cache_mem_mb: int = -1  # > 0: exactly this much for KV blocks; otherwise sized from free memory
    kv_cache_blocks: int = 0  # > 0: exactly this many KV blocks (RTP-LLM's TEST_BLOCK_NUM); wins over the MiB size
    pre_allocate_op_mem: bool = True  # warm-up forward at the largest budget before sizing the KV cache
    tp_split_emb_and_lmhead: bool = True  # vocab-shard embedding/lm_head under TP (no effect at TP size 1)
    reuse_cache: bool = False  # prefix caching of full KV blocks
    extra_data_path: str = ""  # e.g. llava's CLIP tower folder
    vit_trt: bool = False  # vision encoders run as TensorRT engines (= VIT_BACKEND=tensorrt)
    vit_backend: str = "torch"  # torch | onnxruntime | tensorrt: what runs the vision encoder
    trt_cache_path: str = ""  # engine cache folder; "" = cache_dir() / "trt"
    vit_trt_batch: tuple[int, int, int] = (1, 8, 16)  # TensorRT optimization profile of the batch axis: min, opt, max
    vit_trt_workspace_mb: int = 4096  # TensorRT builder workspace limit
    ft_disable_custom_ar: bool = False  # True only for FT_DISABLE_CUSTOM_AR=1: NCCL/gloo all-reduce only (collectives)
    load_ckpt_num_process: int = 1  # checkpoint loader processes; 0 = automatic
    max_num_batched_tokens: int = 0  # per-step token budget (prefill chunks + decodes); 0 = 512 on CPU, 4096 on CUDA
    device: str = "cpu"
    speculative: SpeculativeConfig | None = None  # SP_*: draft model or prompt lookup (speculative_config.py)
    max_lora_model_size: int = -1  # LoRA adapters loaded at once (LORA_INFO, /update); -1 = no cap, as RTP-LLM
    parallel: ParallelConfig = ParallelConfig()  # TP_SIZE, WORLD_SIZE, RANK ... (parallel_config.py)

    @property
    def step_token_budget(self) -> int:
        """The per-step token budget: a CPU step of 512 tokens keeps decode latency bounded while prefilling."""
        if self.max_num_batched_tokens:
            return self.max_num_batched_tokens
        return 512 if self.device == "cpu" else 4096

    def __post_init__(self) -> None:
        _check_int(self.concurrency_limit, "CONCURRENCY_LIMIT", minimum=1)
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise ConfigError(f"speculative={self.speculative!r} must be a SpeculativeConfig or None")
        if not isinstance(self.parallel, ParallelConfig):
            raise ConfigError(f"parallel={self.parallel!r} must be a ParallelConfig")
        _check_int(self.load_ckpt_num_process, "LOAD_CKPT_NUM_PROCESS", minimum=0)
        _check_int(self.max_lora_model_size, "MAX_LORA_MODEL_SIZE", minimum=-1)
        _check_int(self.max_num_batched_tokens, "MAX_NUM_BATCHED_TOKENS", minimum=0)
        _check_int(self.kv_cache_blocks, "TEST_BLOCK_NUM", minimum=0)
        if isinstance(self.kv_cache_mem_mb, bool) or not isinstance(self.kv_cache_mem_mb, int):
            raise ConfigError(f"KV_CACHE_MEM_MB={self.kv_cache_mem_mb!r} must be an integer")
        flags = ("int8_kv_cache", "pre_allocate_op_mem", "tp_split_emb_and_lmhead", "reuse_cache", "vit_trt")
        for name in (*flags, "ft_disable_custom_ar"):
            _check_bool(getattr(self, name), name.upper())
        if self.vit_backend not in VIT_BACKENDS:
            raise ConfigError(f"VIT_BACKEND={self.vit_backend!r}; accepted: {', '.join(VIT_BACKENDS)}")
        if self.vit_trt and self.vit_backend == "onnxruntime":
            raise ConfigError("VIT_TRT=1 and VIT_BACKEND=onnxruntime contradict each other; set one of them")
        batch = self.vit_trt_batch
        if (
            not isinstance(batch, tuple)
            or len(batch) != 3
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in batch)
            or not 1 <= batch[0] <= batch[1] <= batch[2]
        ):
            raise ConfigError(f"VIT_TRT_BATCH={batch!r} must be three integers min,opt,max with 1 <= min <= opt <= max")
        _check_int(self.vit_trt_workspace_mb, "VIT_TRT_WORKSPACE_MB", minimum=1)
        if self.trt_cache_path and is_remote(str(self.trt_cache_path)):
            raise ConfigError(f"TRT_CACHE_PATH={self.trt_cache_path!r} must be a local folder")

    @property
    def vision_backend(self) -> str:
        """What runs the vision encoder: VIT_TRT=1 means tensorrt."""
        return "tensorrt" if self.vit_trt else self.vit_backend

    def vision_cache_path(self) -> Path:
        return Path(self.trt_cache_path) if self.trt_cache_path else trt_cache_path()


@dataclass(frozen=True)
class ServerConfig:
    """HTTP server settings (rtp-mm's own, documented in the README)."""

    start_port: int = DEFAULT_START_PORT
    host: str = "0.0.0.0"
    api_key: str | None = None
    log_level: str = "WARNING"
    # Request intake (README "HTTP server"): limits answer 4xx; remote URLs and local paths are off unless set.
    max_body_mb: int = 64  # whole request body, JSON or multipart
    image_max_count: int = 8  # images per request
    image_max_mb: int = 16  # bytes of one encoded image
    image_max_pixels: int = 4096 * 4096  # width x height of one image (decompression bombs)
    image_url_hosts: tuple[str, ...] = ()  # hosts whose http(s) images may be fetched; "*" = any public host
    image_local_dir: str = ""  # local image paths are read only from inside this folder
    image_fetch_timeout_s: float = 10.0  # whole fetch of one remote image, redirects included
    shutdown_timeout_s: float = 60.0  # graceful shutdown: how long in-flight requests may still run
    client_timeout_s: float = 60.0  # a request body must arrive within this; idle keep-alive connections close
    cors_allow_origins: tuple[str, ...] = ()  # browser origins that may call the API; ("*",) = any; () = CORS off
    served_model_name: str = ""  # the model id of /v1/models and responses; "" = checkpoint folder name or GGUF stem

    def __post_init__(self) -> None:
        port = self.start_port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"START_PORT={self.start_port!r} must be a port number between 0 and 65535")
        for name in ("max_body_mb", "image_max_count", "image_max_mb", "image_max_pixels"):
            _check_int(getattr(self, name), name.upper(), minimum=1)
        for name in ("image_fetch_timeout_s", "shutdown_timeout_s", "client_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name.upper()}={value!r} must be a number of seconds > 0")
        object.__setattr__(self, "image_url_hosts", tuple(h.strip().lower() for h in self.image_url_hosts))
        if self.image_local_dir:
            check_local_path(self.image_local_dir, "IMAGE_LOCAL_DIR", must_be_dir=True)
        object.__setattr__(self, "cors_allow_origins", _cors_origins(self.cors_allow_origins))
        name = self.served_model_name
        if not isinstance(name, str) or not name.strip().isprintable():
            raise ConfigError(f"SERVED_MODEL_NAME={name!r} must be text without control characters")
        object.__setattr__(self, "served_model_name", name.strip())


def _cors_origins(values: Any) -> tuple[str, ...]:
    """CORS_ALLOW_ORIGINS normalised as browsers send ``Origin`` (lower case, no default port), so that the server
    decides by plain comparison; a typo stops start-up instead of silently blocking a web app."""
    accepted = "'*' alone, or comma-separated origins scheme://host[:port] without a path (not even '/')"
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"CORS_ALLOW_ORIGINS={values!r} must be a tuple of origins; accepted: {accepted}")
    origins = []
    for value in values:
        origin = value.strip().lower()
        match = _ORIGIN.fullmatch(origin)
        port = match.group(1) if match else None
        if origin != "*" and (match is None or (port is not None and not 0 < int(port) <= 65535)):
            raise ConfigError(f"CORS_ALLOW_ORIGINS: {value.strip()!r} is not an origin; accepted: {accepted}")
        scheme = origin.split(":", 1)[0]
        if port is not None and int(port) == _DEFAULT_PORTS.get(scheme):
            origin = origin[: -len(port) - 1]
        origins.append(origin)
    if "*" in origins and len(origins) > 1:
        raise ConfigError(f"CORS_ALLOW_ORIGINS={','.join(values)!r}: '*' allows every origin; accepted: {accepted}")
    return tuple(dict.fromkeys(origins))


@dataclass(frozen=True)
class Settings:
    model: ModelConfig
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        return _EnvParser(os.environ if env is None else env).settings()


class _EnvParser:
    """Reads one environment mapping; every accessor names its variable in errors."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def integer(self, name: str, default: int, minimum: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            bound = f" >= {minimum}" if minimum is not None else ""
            raise ConfigError(f"{name}={value!r} is not an integer; accepted: an integer{bound}") from None
        if minimum is not None and number < minimum:
            raise ConfigError(f"{name}={value!r} is out of range; accepted: an integer >= {minimum}")
        return number

    def flag(self, name: str, default: bool) -> bool:
        """RTP-LLM's ``bool(int(v))`` flags, also taking true/false/yes/no/on/off."""
        value = self.raw(name)
        if value is None:
            return default
        key = value.lower()
        if key in ("1", "true", "yes", "on"):
            return True
        if key in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} is not a flag; accepted: 1/0, true/false, yes/no, on/off")

    def path(self, name: str, must_be_dir: bool = False) -> str:
        value = self.raw(name)
        if value is None:
            return ""
        check_local_path(value, name, must_be_dir=must_be_dir)
        return value

    def batch_profile(self, name: str, default: tuple[int, int, int]) -> tuple[int, int, int]:
        value = self.raw(name)
        if value is None:
            return default
        parts = [p.strip() for p in value.split(",")]
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"{name}={value!r}; accepted: three integers min,opt,max such as 1,8,16")
        return int(parts[0]), int(parts[1]), int(parts[2])

    def log_level(self) -> str:
        value = self.raw("LOG_LEVEL")
        if value is None:
            return "WARNING"
        if value.upper() not in LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL={value!r} is not a log level; accepted: {', '.join(LOG_LEVELS)}")
        return value.upper()

    def lora_infos(self) -> dict[str, str] | None:
        value = self.raw("LORA_INFO")
        if value is None:
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"LORA_INFO={value!r} is not JSON ({e}); accepted: a JSON object name -> path") from e
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise ConfigError(f"LORA_INFO={value!r} must be a JSON object mapping adapter names to paths")
        for name, p in parsed.items():
            check_local_path(p, f"LORA_INFO[{name!r}]")
        return parsed or None

    def model(self) -> ModelConfig:
        model_type = self.raw("MODEL_TYPE") or ""
        if model_type:
            resolve_model_type(model_type)
        ckpt_path = self.path("CHECKPOINT_PATH")
        tokenizer_path = self.path("TOKENIZER_PATH") or ckpt_path
        weight_raw = self.raw("WEIGHT_TYPE")
        if weight_raw is None and self.flag("INT8_MODE", False):
            weight_raw = "INT8"  # RTP-LLM's legacy spelling
        weight_type = WeightType.parse(weight_raw or "FP16", "WEIGHT_TYPE")
        act_raw = self.raw("ACT_TYPE")
        act_type = WeightType.parse(act_raw, "ACT_TYPE") if act_raw else None
        if act_type is not None and not act_type.is_float:
            raise ConfigError(f"ACT_TYPE={act_raw!r} must be a float type; accepted: FP16, BF16, FP32")
        return ModelConfig(
            model_type=model_type,
            ckpt_path=ckpt_path,
            tokenizer_path=tokenizer_path,
            weight_type=weight_type,
            act_type=act_type,
            max_seq_len=self.integer("MAX_SEQ_LEN", 0, minimum=0),
            seq_size_per_block=self.integer("SEQ_SIZE_PER_BLOCK", 8, minimum=1),
            gen_num_per_circle=self.integer("GEN_NUM_PER_CIRCLE", default_gen_num_per_circle(self.raw), minimum=1),
            ptuning_path=self.path("PTUNING_PATH", must_be_dir=True) or None,
            lora_infos=self.lora_infos(),
        )

    def engine(self) -> EngineConfig:
        device = self.raw("DEVICE") or "cpu"
        if device != "cpu" and not device.startswith("cuda"):
            raise ConfigError(f"DEVICE={device!r} is not a device; accepted: cpu, cuda, cuda:N")
        return EngineConfig(
            concurrency_limit=self.integer("CONCURRENCY_LIMIT", DEFAULT_CONCURRENCY_LIMIT, minimum=1),
            int8_kv_cache=self.flag("INT8_KV_CACHE", False),
            kv_cache_mem_mb=self.integer("KV_CACHE_MEM_MB", -1),
            kv_cache_blocks=self.integer("TEST_BLOCK_NUM", 0, minimum=0),
            pre_allocate_op_mem=self.flag("PRE_ALLOCATE_OP_MEM", True),
            tp_split_emb_and_lmhead=self.flag("TP_SPLIT_EMB_AND_LMHEAD", True),
            reuse_cache=self.flag("REUSE_CACHE", False),
            extra_data_path=self.path("EXTRA_DATA_PATH"),
            vit_trt=self.flag("VIT_TRT", False),
            vit_backend=(self.raw("VIT_BACKEND") or "torch").lower(),
            trt_cache_path=self.raw("TRT_CACHE_PATH") or "",
            vit_trt_batch=self.batch_profile("VIT_TRT_BATCH", (1, 8, 16)),
            vit_trt_workspace_mb=self.integer("VIT_TRT_WORKSPACE_MB", 4096, minimum=1),
            # The seed: 1 disables the custom all-reduce, any other value leaves it on (so "2" starts).
            ft_disable_custom_ar=self.raw("FT_DISABLE_CUSTOM_AR") == "1",
            load_ckpt_num_process=self.integer("LOAD_CKPT_NUM_PROCESS", 1, minimum=0),
            max_num_batched_tokens=self.integer("MAX_NUM_BATCHED_TOKENS", 0, minimum=0),
            device=device,
            speculative=speculative_from_env(self.raw),
            max_lora_model_size=self.integer("MAX_LORA_MODEL_SIZE", -1, minimum=-1),
            parallel=parallel_from_env(self.raw, self.integer),
        )

    def server(self) -> ServerConfig:
        return ServerConfig(
            start_port=self.integer("START_PORT", DEFAULT_START_PORT, minimum=0),
            host=self.raw("HOST") or "0.0.0.0",
            api_key=self.raw("API_KEY"),
            log_level=self.log_level(),
            max_body_mb=self.integer("MAX_BODY_MB", 64, minimum=1),
            image_max_count=self.integer("IMAGE_MAX_COUNT", 8, minimum=1),
            image_max_mb=self.integer("IMAGE_MAX_MB", 16, minimum=1),
            image_max_pixels=self.integer("IMAGE_MAX_PIXELS", 4096 * 4096, minimum=1),
            image_url_hosts=tuple(h for h in (self.raw("IMAGE_URL_HOSTS") or "").split(",") if h.strip()),
            image_local_dir=self.path("IMAGE_LOCAL_DIR", must_be_dir=True),
            image_fetch_timeout_s=self.integer("IMAGE_FETCH_TIMEOUT_S", 10, minimum=1),
            shutdown_timeout_s=self.integer("SHUTDOWN_TIMEOUT_S", 60, minimum=1),
            client_timeout_s=self.integer("CLIENT_TIMEOUT_S", 60, minimum=1),
            cors_allow_origins=tuple(o for o in (self.raw("CORS_ALLOW_ORIGINS") or "").split(",") if o.strip()),
            served_model_name=self.raw("SERVED_MODEL_NAME") or "",
        )

    def settings(self) -> Settings:
        # Order matters for the error a user sees first: the model identity, then the rest.
        return Settings(model=self.model(), engine=self.engine(), server=self.server())


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where rtp-mm keeps derived artefacts (converted GGUF tokenizers, later TensorRT engines):
    ``RTP_MM_CACHE_DIR``, else ``$XDG_CACHE_HOME/rtp_mm``, else ``~/.cache/rtp_mm``."""
    env = os.environ if env is None else env
    if env.get("RTP_MM_CACHE_DIR"):
        return Path(env["RTP_MM_CACHE_DIR"])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "rtp_mm"


def trt_cache_path(env: Mapping[str, str] | None = None) -> Path:
    """The vision-engine cache folder: ``TRT_CACHE_PATH``, else ``cache_dir() / "trt"``."""
    env = os.environ if env is None else env
    return Path(env["TRT_CACHE_PATH"]) if env.get("TRT_CACHE_PATH", "").strip() else cache_dir(env) / "trt"


def configure_logging(level: str) -> None:
    """Apply LOG_LEVEL (TRACE maps to DEBUG: Python has no TRACE level)."""
    name = str(level).strip().upper()
    if name not in LOG_LEVELS:
        # getattr(logging, "warning") would be the logging.warning function, not a level.
        raise ConfigError(f"LOG_LEVEL={level!r} is not a log level; accepted: {', '.join(LOG_LEVELS)}")
    numeric = logging.DEBUG if name == "TRACE" else getattr(logging, name)
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(numeric)
