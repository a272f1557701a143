"""From configuration to a running engine's parts: the model, its weight transforms, the vision encoder, the
tokenizer, the KV-cache size, the runner, scheduler and engine.

``build_engine`` runs on the engine thread (``EngineLoop`` takes it as its factory), so the model is loaded, warmed up
and stepped by one thread: on CPU that keeps PyTorch's OpenMP threads to one team (llm/engine/loop.py).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from rtp_mm.api.prompts import PromptProcessor
from rtp_mm.api.tp_launch import check_tensor_parallel, start_group, stop_group
from rtp_mm.config import EngineConfig, ModelConfig, WeightType
from rtp_mm.errors import ConfigError
from rtp_mm.kernels.collectives import TPGroup
from rtp_mm.kernels.linear import HALF_GEMV_MAX_ROWS
from rtp_mm.kernels.triton import select_backend
from rtp_mm.llm.engine import cuda_graphs
from rtp_mm.llm.engine.block_manager import BlockManager
from rtp_mm.llm.engine.engine import LLMEngine, ModelLimits
from rtp_mm.llm.engine.kv_prefix import KVPrefix
from rtp_mm.llm.engine.model_runner import ModelRunner, kv_block_bytes
from rtp_mm.llm.engine.multimodal import EncodeStage, ImageEncoder
from rtp_mm.llm.engine.scheduler import Scheduler
from rtp_mm.llm.engine.speculative import build_speculator
from rtp_mm.llm.engine.tp import ShardDriver
from rtp_mm.llm.engine.warmup import warm_up
from rtp_mm.llm.lora.manager import LoraManager
from rtp_mm.llm.models.decoder import Decoder
from rtp_mm.llm.models.load import LoadedModel, load_model
from rtp_mm.llm.models.packing import can_pack, pack_linears
from rtp_mm.llm.models.ptuning import find_ptuning, prefix_kv
from rtp_mm.llm.models.transforms import (
    quantize_int8_weights,
    resident_weight_bytes,
    use_cpu_kernels,
    use_half_weights,
    use_triton_kernels,
)
from rtp_mm.model_types import (
    ModelTypeInfo,
    check_model_type_matches,
    detect_model_type,
    read_config_json,
    resolve_model_type,
)
from rtp_mm.speculative_config import check_gen_num_per_circle
from rtp_mm.tokenizers.loader import load_tokenizer
from rtp_mm.vision.base import VisionModel, load_vision_model
from rtp_mm.vision.inputs import image_encoder

logger = logging.getLogger(__name__)

# Without KV_CACHE_MEM_MB, a CPU engine takes this fraction of the available RAM for KV blocks, capped.
CPU_KV_FRACTION = 0.25
CPU_KV_CAP_MB = 2048

_DTYPES = {WeightType.FP16: torch.float16, WeightType.BF16: torch.bfloat16, WeightType.FP32: torch.float32}


@dataclass(frozen=True)
class ModelInfo:
    """What any thread may read about the served model (immutable once the engine is built)."""

    model_type: ModelTypeInfo
    model_config: ModelConfig  # as served: default model filled in, MODEL_TYPE detected
    engine_config: EngineConfig
    max_seq_len: int
    vocab_size: int
    hidden_size: int
    dtype: torch.dtype  # activations and KV cache
    weight_path: str  # how the weight matmuls run (logged, and reported by the bench)
    eos_token_ids: frozenset[int]  # the model's (a request may name its own eos_token_id)
    rank_weight_bytes: tuple[int, ...] = ()  # resident weight bytes per tensor-parallel rank (one entry without TP)


@dataclass
class BuiltEngine:
    """The parts ``build_engine`` made. The engine is the engine thread's; ``tokenizer`` and ``vision`` are shared
    with callers for read-only work (token texts, image preprocessing)."""

    engine: LLMEngine
    info: ModelInfo
    tokenizer: Any | None
    vision: VisionModel | None
    model: Any  # the Decoder (embedding models pool its hidden states on the engine thread)


def resolve_dtypes(model_config: ModelConfig, device: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(activation dtype, narrower weight-storage dtype or None).

    An explicit ``act_type`` wins for activations (and the KV cache). Otherwise CUDA computes in the weight type
    (INT8 weights in fp16). On CPU, activations default to fp32, which AVX2 CPUs compute well; a FP16/BF16
    WEIGHT_TYPE then keeps the weights in that half-precision type (half the memory, faster small-batch decode,
    see ``rtp_mm.kernels.linear`` and BENCHMARKS.md).
    """
    weight = _DTYPES.get(model_config.weight_type)
    if model_config.act_type is not None:
        act = _DTYPES[model_config.act_type]
    elif device == "cpu":
        act = torch.float32
    else:
        act = weight or torch.float16
    narrower = weight is not None and weight != act and weight.itemsize < act.itemsize
    return act, weight if narrower else None


def resolve_model_config(model_config: ModelConfig) -> ModelConfig:
    """Fill in the built-in default model and a detected MODEL_TYPE; check MODEL_TYPE against the checkpoint; find the
    P-tuning prefix (PTUNING_PATH, else auto-detected), refused for a family without P-tuning."""
    resolved = _resolve_model(model_config)
    info = resolve_model_type(resolved.model_type)
    ptuning_path = find_ptuning(info.family, info.name, resolved.ckpt_path, resolved.ptuning_path)
    return dataclasses.replace(resolved, ptuning_path=ptuning_path)


def _resolve_model(model_config: ModelConfig) -> ModelConfig:
    if not model_config.ckpt_path:
        from rtp_mm.default_model import DEFAULT_MODEL_TYPE, default_model_path

        path = str(default_model_path())
        model_type = model_config.model_type or DEFAULT_MODEL_TYPE
        return dataclasses.replace(
            model_config, ckpt_path=path, tokenizer_path=model_config.tokenizer_path or path, model_type=model_type
        )
    config = read_config_json(model_config.ckpt_path)
    model_type = model_config.model_type
    if not model_type:
        detected = detect_model_type(config) if config else None
        if detected is None:
            raise ConfigError(
                f"MODEL_TYPE is not set and CHECKPOINT_PATH={model_config.ckpt_path!r} does not say its architecture; "
                "set MODEL_TYPE"
            )
        model_type = detected
    elif config:
        check_model_type_matches(model_type, config, model_config.ckpt_path)
    return dataclasses.replace(model_config, model_type=model_type)


def check_backends(model_type: ModelTypeInfo, engine_config: EngineConfig) -> None:
    """Fail before minutes of weight loading when TensorRT or the GPU is missing (no fallback to PyTorch)."""
    if model_type.vision and engine_config.vision_backend == "tensorrt":
        from rtp_mm.trt_builders.tensorrt_engine import cuda_identity, require_tensorrt

        require_tensorrt()
        cuda_identity(engine_config.device)


@dataclass
class ModelParts:
    """What every tensor-parallel rank builds alike: its model shard, warmed up, and the runner over its KV cache."""

    loaded: LoadedModel
    runner: ModelRunner
    lora: LoraManager
    dtype: torch.dtype
    weight_path: str
    max_seq_len: int
    num_blocks: int
    draft: LoadedModel | None
    rank_weight_bytes: tuple[int, ...]  # resident weight bytes of every rank, in rank order


def build_model(model_config: ModelConfig, engine_config: EngineConfig, group: TPGroup | None) -> ModelParts:
    """Load (this rank's shard of) the model, transform its weights, warm it up, size the KV cache and make the runner.
    Every rank of a tensor-parallel group runs this in step: its collectives (warm-up, the KV block count) pair up."""
    info = resolve_model_type(model_config.model_type)
    device = str(group.device) if group is not None else engine_config.device
    dtype, weight_storage = resolve_dtypes(model_config, engine_config.device)
    loaded = load_model(
        info.family,
        info.name,
        model_config.ckpt_path,
        dtype,
        device,
        num_load_processes=engine_config.load_ckpt_num_process,
        tp=group,
        split_vocab=engine_config.tp_split_emb_and_lmhead,
    )
    lora = LoraManager(loaded.model, info.family, loaded.family_model, engine_config.max_lora_model_size)
    if group is not None:
        lora.unsupported = f"LoRA adapters are not sharded under tensor parallelism (TP_SIZE={group.size})"
    lora.start(model_config.lora_infos)  # one adapter is merged here, into the weights before their transforms
    weight_path = apply_weight_transforms(loaded, model_config, dtype, weight_storage, engine_config.device)
    weight_path += "; " + use_kernel_backend(loaded.model, device)
    spec = loaded.model.spec
    max_seq_len = model_config.max_seq_len or spec.default_max_seq_len or 1024
    block_size = model_config.seq_size_per_block
    if engine_config.pre_allocate_op_mem:
        # CUDA: the whole step budget, so its activation memory is held before KV sizing. CPU: KV sizing does
        # not measure free memory, so a short forward that initialises the kernels is enough.
        budget = min(engine_config.step_token_budget, max_seq_len - 1)
        if engine_config.device == "cpu":
            budget = min(budget, 64)
        spent = warm_up(loaded.model, budget, block_size)
        logger.info("warm-up forward of %d tokens took %.2f s (PRE_ALLOCATE_OP_MEM=1)", budget, spent)
    draft = _load_draft(model_config, engine_config, dtype, engine_config.device)
    num_blocks = num_kv_blocks(loaded, engine_config, dtype, block_size, max_seq_len, draft)
    if group is not None:  # free memory may differ between ranks: all take the smallest count
        num_blocks = group.all_min(num_blocks)
    runner = ModelRunner(loaded.model, num_blocks, block_size, int8_kv=engine_config.int8_kv_cache)
    runner.lora = lora
    weight_bytes = resident_weight_bytes(loaded.model)
    per_rank = tuple(group.all_gather_ints(weight_bytes)) if group is not None else (weight_bytes,)
    if group is not None and group.rank == 0:
        logger.warning("tensor-parallel weights per rank: %s MiB", ", ".join(f"{b / 2**20:.1f}" for b in per_rank))
    return ModelParts(loaded, runner, lora, dtype, weight_path, max_seq_len, num_blocks, draft, per_rank)


def build_engine(model_config: ModelConfig, engine_config: EngineConfig, skip_tokenizer_init: bool) -> BuiltEngine:
    """Load the model and build the engine (runs on the engine thread); ``model_config`` is already resolved.

    With TP_SIZE > 1 this is rank 0: it starts (or joins) the group first, and on failure takes the group down."""
    check_gen_num_per_circle(model_config.gen_num_per_circle, engine_config.speculative)
    group = None
    if engine_config.parallel.enabled:
        check_tensor_parallel(model_config, engine_config)
        group = start_group(model_config, engine_config)
    try:
        return _build_engine(model_config, engine_config, skip_tokenizer_init, group)
    except BaseException:
        if group is not None:
            stop_group(group)
        raise


def _build_engine(
    model_config: ModelConfig, engine_config: EngineConfig, skip_tokenizer_init: bool, group: TPGroup | None
) -> BuiltEngine:
    info = resolve_model_type(model_config.model_type)
    device = str(group.device) if group is not None else engine_config.device
    parts = build_model(model_config, engine_config, group)
    loaded, runner, lora, dtype = parts.loaded, parts.runner, parts.lora, parts.dtype
    weight_path, max_seq_len, num_blocks, draft = parts.weight_path, parts.max_seq_len, parts.num_blocks, parts.draft
    driver = ShardDriver(group, runner, lambda: stop_group(group)) if group is not None else None
    vision = _load_vision(info, model_config, engine_config, device, dtype)
    spec = loaded.model.spec
    tokenizer = None if skip_tokenizer_init else load_tokenizer(model_config.tokenizer_path, info.family)
    eos = loaded.eos_token_ids()
    if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = frozenset({tokenizer.eos_token_id})
    eos |= getattr(tokenizer, "extra_eos_token_ids", frozenset())  # e.g. ChatGLM3's <|user|>
    block_size = model_config.seq_size_per_block
    if model_config.ptuning_path:  # P-tuning v2: the prefix K/V in top blocks the block manager never owns
        kv = prefix_kv(model_config.ptuning_path, spec)
        runner.kv_prefix = KVPrefix.reserve(runner.caches, block_size, kv, -(-max_seq_len // block_size))
        logger.info("P-tuning v2 prefix of %d tokens from %s", kv.shape[2], model_config.ptuning_path)
    prefix = runner.kv_prefix
    usable = num_blocks - (prefix.num_blocks if prefix else 0)
    if engine_config.pre_allocate_op_mem and torch.device(device).type in cuda_graphs.CAPTURE_DEVICES:
        usable, line = cuda_graphs.attach_decode_graphs(runner, usable, max_seq_len, engine_config.concurrency_limit)
        logger.info("%s (PRE_ALLOCATE_OP_MEM=1)", line)
    bm = BlockManager(usable, block_size, enable_prefix_caching=engine_config.reuse_cache)
    scheduler = Scheduler(bm, engine_config.concurrency_limit, engine_config.step_token_budget)
    sp = engine_config.speculative
    draft_runner = draft and ModelRunner(draft.model, num_blocks, block_size, int8_kv=engine_config.int8_kv_cache)
    speculator = sp and build_speculator(
        sp.sp_type,
        model_config.gen_num_per_circle,
        scheduler,
        spec.vocab_size,
        draft_runner,
        (sp.sp_min_token_match, sp.sp_max_token_match),
    )
    encoder = None if vision is None else _image_encoder(vision, info, engine_config, device, dtype)
    engine = LLMEngine(
        runner,
        scheduler,
        ModelLimits(
            vocab_size=spec.vocab_size,
            max_seq_len=max_seq_len,
            prefix_lm=spec.prefix_lm,
            prefix_len=prefix.length if prefix else 0,
        ),
        tokenizer=tokenizer,
        eos_token_ids=eos,
        prompt_processor=None if tokenizer is None else PromptProcessor(tokenizer, vision, info),
        encode_stage=None if encoder is None else EncodeStage(encoder),
        speculator=speculator,
        lora=lora,
    )
    engine.shard_driver = driver
    logger.info(
        "engine ready: %s, %d KV blocks x %d tokens (%d tokens), max_seq_len %d, activations %s, weights %s",
        info.name,
        num_blocks,
        block_size,
        num_blocks * block_size,
        max_seq_len,
        dtype,
        weight_path,
    )
    model_info = ModelInfo(
        model_type=info,
        model_config=model_config,
        engine_config=engine_config,
        max_seq_len=max_seq_len,
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        dtype=dtype,
        weight_path=weight_path,
        eos_token_ids=eos,
        rank_weight_bytes=parts.rank_weight_bytes,
    )
    return BuiltEngine(engine, model_info, tokenizer, vision, loaded.model)


def use_kernel_backend(model: Decoder, device: str) -> str:
    """The kernel backend, chosen once at start-up: Triton on CUDA, the C++ CPU kernels on a CPU that can build them,
    else the torch ops. Returns the choice for the start-up log."""
    backend = select_backend(device)
    if backend == "triton":
        return use_triton_kernels(model)
    if torch.device(device).type == "cpu":
        return use_cpu_kernels(model)
    return "torch ops"


def apply_weight_transforms(
    loaded: LoadedModel, model_config: ModelConfig, dtype: torch.dtype, weight_storage: torch.dtype | None, device: str
) -> str:
    """Weight storage and kernels as transformations of the built model (the decoder maths never branches).
    Returns a description of the weight matmul path."""
    model = loaded.model
    if model_config.weight_type is WeightType.INT8:
        quantize_int8_weights(model)  # weight-only per-channel int8, quantized here from any checkpoint format
        if device == "cpu" and dtype == torch.float32:
            return "int8 weight-only: upcast to fp32 (block by block when large), fp32 GEMM, per-channel scale"
        return "int8 weight-only: dequantize, then F.linear"
    if weight_storage is not None:
        use_half_weights(model, weight_storage)
        half = str(weight_storage).removeprefix("torch.")
        if device == "cpu":
            return f"{half} weights: {half} GEMV up to {HALF_GEMV_MAX_ROWS} rows, upcast + fp32 GEMM above"
        return f"{half} weights"
    if can_pack(model):
        pack_linears(model)
        return "fp32, oneDNN packed GEMM"
    return str(dtype)


def _load_vision(
    info: ModelTypeInfo, model_config: ModelConfig, engine_config: EngineConfig, device: str, dtype: torch.dtype
) -> VisionModel | None:
    if not info.vision:
        if engine_config.vision_backend != "torch":
            vit = "VIT_TRT=1" if engine_config.vit_trt else f"VIT_BACKEND={engine_config.vit_backend}"
            logger.warning("%s has no effect: %s has no vision encoder", vit, info.name)
        if engine_config.extra_data_path:
            logger.warning("EXTRA_DATA_PATH has no effect: %s reads no data beside its checkpoint", info.name)
        return None
    config = read_config_json(model_config.ckpt_path) or {}
    return load_vision_model(info.family, model_config.ckpt_path, config, engine_config.extra_data_path, device, dtype)


def _image_encoder(
    vision: VisionModel, info: ModelTypeInfo, engine_config: EngineConfig, device: str, dtype: torch.dtype
) -> ImageEncoder:
    """The engine's encoder: eager torch, or an onnxruntime/TensorRT engine from the cache in its ``encode``."""
    backend = engine_config.vision_backend
    if backend == "torch":
        return image_encoder(vision)
    from rtp_mm.trt_builders.build import VitBuildConfig, backend_encode_fn, precision_name

    build = VitBuildConfig(
        model_type=info.name,
        cache_path=engine_config.vision_cache_path(),
        backend=backend,
        precision=precision_name(dtype),
        batch_profile=engine_config.vit_trt_batch,
        workspace_mb=engine_config.vit_trt_workspace_mb,
        device=device,
    )
    # One engine call takes at most the profile's max batch: the encode stage batches to it.
    return image_encoder(vision, backend_encode_fn(vision, build, log=logger.warning), engine_config.vit_trt_batch[2])


def _load_draft(
    model_config: ModelConfig, engine_config: EngineConfig, dtype: torch.dtype, device: str
) -> LoadedModel | None:
    """Speculative decoding's draft model (SP_TYPE=vanilla), loaded as the target is, computing in its dtype."""
    sp = engine_config.speculative
    if sp is None or not sp.uses_draft_model:
        return None
    act = next(weight_type for weight_type, torch_dtype in _DTYPES.items() if torch_dtype == dtype)
    try:
        config = resolve_model_config(
            dataclasses.replace(
                model_config,
                model_type=sp.sp_model_type,
                ckpt_path=sp.sp_checkpoint_path,
                tokenizer_path=sp.sp_checkpoint_path,
                weight_type=sp.sp_weight_type or model_config.weight_type,
                act_type=act,
                ptuning_path=None,
                lora_infos=None,
            )
        )
    except ConfigError as e:
        raise ConfigError(f"the draft model (SP_MODEL_TYPE / SP_CHECKPOINT_PATH): {e}") from None
    info = resolve_model_type(config.model_type)
    draft = load_model(info.family, info.name, config.ckpt_path, dtype, device, engine_config.load_ckpt_num_process)
    if draft.model.spec.prefix_lm is not None:
        raise ConfigError(f"SP_MODEL_TYPE={info.name!r} is a prefix-LM (GLM v1): it cannot serve as a draft model")
    path = apply_weight_transforms(draft, config, dtype, resolve_dtypes(config, device)[1], device)
    path += "; " + use_kernel_backend(draft.model, device)
    logger.info("draft model %s from %s, weights %s", info.name, config.ckpt_path, path)
    return draft


def num_kv_blocks(
    loaded: LoadedModel,
    engine_config: EngineConfig,
    dtype: torch.dtype,
    block_size: int,
    max_seq_len: int,
    draft: LoadedModel | None = None,
) -> int:
    per_block = kv_block_bytes(loaded.model, block_size, dtype, int8_kv=engine_config.int8_kv_cache)
    if draft is not None:  # speculative decoding: the draft holds as many blocks as the target, in the same budget
        per_block += kv_block_bytes(draft.model, block_size, dtype, int8_kv=engine_config.int8_kv_cache)
    mem_mb = engine_config.kv_cache_mem_mb
    if engine_config.kv_cache_blocks > 0:
        budget = engine_config.kv_cache_blocks * per_block
        source = f"TEST_BLOCK_NUM={engine_config.kv_cache_blocks}"
    elif mem_mb > 0:
        budget = mem_mb * 2**20
        source = f"KV_CACHE_MEM_MB={mem_mb}"
    else:
        budget = _auto_kv_bytes(engine_config.device)
        source = "automatic KV sizing"
    num_blocks = budget // per_block
    needed = -(-max_seq_len // block_size)
    if num_blocks < needed:
        need_mb = -(-needed * per_block // 2**20)
        raise ConfigError(
            f"{source} gives {num_blocks} KV blocks but one sequence of MAX_SEQ_LEN={max_seq_len} needs "
            f"{needed} ({need_mb} MiB); set KV_CACHE_MEM_MB >= {need_mb} or lower MAX_SEQ_LEN"
        )
    return int(num_blocks)


def _auto_kv_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.9)
    return int(min(_available_ram_bytes() * CPU_KV_FRACTION, CPU_KV_CAP_MB * 2**20))


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30
