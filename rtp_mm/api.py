"""The offline Python API: ``LLM``.

    llm = LLM(ModelConfig(model_type="llama", ckpt_path=P), kv_cache_mem_mb=256, device="cpu")
    outs = llm.generate(["Hello"], generate_config=GenerateConfig(max_new_tokens=16, top_k=1))
    outs = llm.chat([{"role": "user", "content": "Hi"}])
    async for out in llm.generate_stream("Hello"): ...
    llm.shutdown()

Prompts are a ``str``, a list of ``str`` or a list of token-id lists (used as given: no template, no BOS added).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from rtp_mm.config import EngineConfig, ModelConfig, Settings, WeightType
from rtp_mm.errors import ConfigError, EmptyPromptError, EngineDead, InvalidRequest, NotImplementedYetError
from rtp_mm.kernels.linear import HALF_GEMV_MAX_ROWS
from rtp_mm.llm.engine import embedding
from rtp_mm.llm.engine.block_manager import BlockManager
from rtp_mm.llm.engine.engine import LLMEngine, RequestOutput
from rtp_mm.llm.engine.generate_config import GenerateConfig
from rtp_mm.llm.engine.loop import EngineLoop
from rtp_mm.llm.engine.model_runner import ModelRunner, kv_block_bytes
from rtp_mm.llm.engine.request import Request
from rtp_mm.llm.engine.scheduler import Scheduler
from rtp_mm.llm.engine.warmup import warm_up
from rtp_mm.llm.models.load import LoadedModel, load_model
from rtp_mm.llm.models.packing import can_pack, pack_linears
from rtp_mm.llm.models.transforms import quantize_int8_weights, use_half_weights

if TYPE_CHECKING:
    from rtp_mm.vision.runner import VisionRunner
from rtp_mm.model_types import (
    ModelTypeInfo,
    check_model_type_matches,
    detect_model_type,
    read_config_json,
    resolve_model_type,
)

logger = logging.getLogger(__name__)

# Without KV_CACHE_MEM_MB, a CPU engine takes this fraction of the available RAM for KV blocks, capped.
CPU_KV_FRACTION = 0.25
CPU_KV_CAP_MB = 2048

_DTYPES = {WeightType.FP16: torch.float16, WeightType.BF16: torch.bfloat16, WeightType.FP32: torch.float32}


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


def _resolve_paths(model_config: ModelConfig) -> ModelConfig:
    """Fill in the built-in default model and a detected MODEL_TYPE; check MODEL_TYPE against the checkpoint."""
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


class LLM:
    """One model served by one engine thread. Thread-safe: generate() may be called from several threads."""

    def __init__(
        self,
        model_config: ModelConfig,
        engine_config: EngineConfig | None = None,
        skip_tokenizer_init: bool = False,
        **engine_overrides: Any,
    ):
        engine_config = dataclasses.replace(engine_config or EngineConfig(), **engine_overrides)
        model_config = _resolve_paths(model_config)
        info = resolve_model_type(model_config.model_type)
        self.model_config = model_config
        self.engine_config = engine_config
        self.model_type = info
        self.device = engine_config.device
        self.dtype, self.weight_storage_dtype = resolve_dtypes(model_config, self.device)
        self._skip_tokenizer_init = skip_tokenizer_init
        if info.vision and engine_config.vision_backend == "tensorrt":
            # Fail before minutes of weight loading when TensorRT or the GPU is missing (no fallback to PyTorch).
            from rtp_mm.trt_builders.tensorrt_engine import cuda_identity, require_tensorrt

            require_tensorrt()
            cuda_identity(self.device)
        self._loop = EngineLoop(self._build_engine)  # loads on the engine thread: see loop.py
        self.engine = self._loop.engine
        if self.vision is not None and self.device == "cpu" and engine_config.vision_backend == "torch":
            # The eager ViT on CPU runs between engine steps, on the engine thread: encoding on the callers' threads
            # would compete with decoding for the cores anyway, and each such thread would add an OpenMP team.
            encode = self.vision.encode_fn
            self.vision.encode_fn = lambda pixels: self._loop.call(lambda _: encode(pixels), timeout=None)

    def _build_engine(self) -> LLMEngine:
        """Load the model and build the engine (runs on the engine thread)."""
        info, model_config, engine_config = self.model_type, self.model_config, self.engine_config
        skip_tokenizer_init = self._skip_tokenizer_init
        self.loaded: LoadedModel = load_model(
            info.family,
            info.name,
            model_config.ckpt_path,
            self.dtype,
            self.device,
            num_load_processes=engine_config.load_ckpt_num_process,
        )
        self._apply_weight_transforms(model_config)
        self.vision: VisionRunner | None = self._load_vision(info, model_config, engine_config)
        spec = self.loaded.model.spec
        self.max_seq_len = model_config.max_seq_len or spec.default_max_seq_len or 1024
        self.tokenizer = None
        if not skip_tokenizer_init:
            from rtp_mm.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(model_config.tokenizer_path, info.family)
        eos = self.loaded.eos_token_ids()
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = frozenset({self.tokenizer.eos_token_id})
        eos |= getattr(self.tokenizer, "extra_eos_token_ids", frozenset())  # e.g. ChatGLM3's <|user|>
        block_size = model_config.seq_size_per_block
        if engine_config.pre_allocate_op_mem:
            # CUDA: the whole step budget, so its activation memory is held before KV sizing. CPU: KV sizing does
            # not measure free memory, so a short forward that initialises the kernels is enough.
            budget = min(engine_config.step_token_budget, self.max_seq_len - 1)
            if self.device == "cpu":
                budget = min(budget, 64)
            spent = warm_up(self.loaded.model, budget, block_size)
            logger.info("warm-up forward of %d tokens took %.2f s (PRE_ALLOCATE_OP_MEM=1)", budget, spent)
        num_blocks = self._num_kv_blocks(block_size)
        runner = ModelRunner(self.loaded.model, num_blocks, block_size, int8_kv=engine_config.int8_kv_cache)
        bm = BlockManager(num_blocks, block_size, enable_prefix_caching=engine_config.reuse_cache)
        scheduler = Scheduler(bm, engine_config.concurrency_limit, engine_config.step_token_budget)
        engine = LLMEngine(runner, scheduler, self.max_seq_len, self.tokenizer, eos)
        logger.info(
            "engine ready: %s, %d KV blocks x %d tokens (%d tokens), max_seq_len %d, activations %s, weights %s",
            info.name,
            num_blocks,
            block_size,
            num_blocks * block_size,
            self.max_seq_len,
            self.dtype,
            self.weight_path,
        )
        return engine

    def _apply_weight_transforms(self, model_config: ModelConfig) -> None:
        """Weight storage and kernels as transformations of the built model (the decoder maths never branches)."""
        model = self.loaded.model
        if model_config.weight_type is WeightType.INT8:
            quantize_int8_weights(model)  # weight-only per-channel int8, quantized here from any checkpoint format
            self.weight_path = (
                "int8 weight-only: upcast to fp32 (block by block when large), fp32 GEMM, per-channel scale"
                if self.device == "cpu" and self.dtype == torch.float32
                else "int8 weight-only: dequantize, then F.linear"
            )
        elif self.weight_storage_dtype is not None:
            use_half_weights(model, self.weight_storage_dtype)
            half = str(self.weight_storage_dtype).removeprefix("torch.")
            self.weight_path = (
                f"{half} weights: {half} GEMV up to {HALF_GEMV_MAX_ROWS} rows, upcast + fp32 GEMM above"
                if self.device == "cpu"
                else f"{half} weights"
            )
        elif can_pack(model):
            pack_linears(model)
            self.weight_path = "fp32, oneDNN packed GEMM"
        else:
            self.weight_path = str(self.dtype)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> LLM:
        settings = Settings.from_env(env)
        return cls(settings.model, settings.engine, **overrides)

    def _load_vision(
        self, info: ModelTypeInfo, model_config: ModelConfig, engine_config: EngineConfig
    ) -> VisionRunner | None:
        if not info.vision:
            if engine_config.vision_backend != "torch":
                logger.warning("VIT backend %s has no effect: %s has no vision encoder", self._vit_env(), info.name)
            return None
        from rtp_mm.vision.base import load_vision_model
        from rtp_mm.vision.runner import VisionRunner

        config = read_config_json(model_config.ckpt_path) or {}
        model = load_vision_model(
            info.family, model_config.ckpt_path, config, engine_config.extra_data_path, self.device, self.dtype
        )
        if model is None:
            logger.warning("%s: serving the text part only; the vision encoder is not implemented yet", info.name)
            return None
        backend = engine_config.vision_backend
        if backend == "torch":
            return VisionRunner(model)
        from rtp_mm.trt_builders.build import VitBuildConfig, backend_encode_fn, precision_name

        build = VitBuildConfig(
            model_type=info.name,
            cache_path=engine_config.vision_cache_path(),
            backend=backend,
            precision=precision_name(self.dtype),
            batch_profile=engine_config.vit_trt_batch,
            workspace_mb=engine_config.vit_trt_workspace_mb,
            device=self.device,
        )
        encode_fn = backend_encode_fn(model, build, log=logger.warning)
        # One engine call takes at most the profile's max batch: batch the runner to it.
        return VisionRunner(model, encode_fn=encode_fn, max_batch=engine_config.vit_trt_batch[2])

    def _vit_env(self) -> str:
        return "VIT_TRT=1" if self.engine_config.vit_trt else f"VIT_BACKEND={self.engine_config.vit_backend}"

    def _num_kv_blocks(self, block_size: int) -> int:
        per_block = kv_block_bytes(self.loaded.model, block_size, self.dtype, int8_kv=self.engine_config.int8_kv_cache)
        mem_mb = self.engine_config.kv_cache_mem_mb
        if self.engine_config.kv_cache_blocks > 0:
            budget = self.engine_config.kv_cache_blocks * per_block
            source = f"TEST_BLOCK_NUM={self.engine_config.kv_cache_blocks}"
        elif mem_mb > 0:
            budget = mem_mb * 2**20
            source = f"KV_CACHE_MEM_MB={mem_mb}"
        else:
            budget = _auto_kv_bytes(self.device)
            source = "automatic KV sizing"
        num_blocks = budget // per_block
        needed = -(-self.max_seq_len // block_size)
        if num_blocks < needed:
            need_mb = -(-needed * per_block // 2**20)
            raise ConfigError(
                f"{source} gives {num_blocks} KV blocks but one sequence of MAX_SEQ_LEN={self.max_seq_len} needs "
                f"{needed} ({need_mb} MiB); set KV_CACHE_MEM_MB >= {need_mb} or lower MAX_SEQ_LEN"
            )
        return int(num_blocks)

    # ---- requests ---------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest("text prompts need a tokenizer (this LLM was built with skip_tokenizer_init=True)")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise EmptyPromptError("prompt is empty")
            return self.encode(prompt)
        if isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise InvalidRequest(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _normalise_prompts(self, prompts: Any) -> list[str | list[int]]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        if isinstance(prompts, Sequence):
            return list(prompts)
        raise InvalidRequest(f"prompts must be a string, a list of strings or token-id lists, got {type(prompts)}")

    def make_request(
        self,
        prompt: str | Sequence[int],
        generate_config: GenerateConfig | None = None,
        images: Sequence[Any] | None = None,
    ) -> Request:
        """Validate and build one request. ``images`` (PIL images, encoded bytes or file paths) fill the prompt's
        image placeholders in order; they need a vision MODEL_TYPE. Runs the vision encoder (on this thread, its
        preprocessing in the VisionRunner's pool)."""
        config = generate_config or GenerateConfig()
        ids = self._prompt_ids(prompt)
        if self.vision is None:
            if images:
                self._refuse_images()
            return self.engine.make_request(ids, config, request_id=self.engine.new_request_id())
        # A vision model checks every prompt, image or not: a placeholder without its image is a per-request error.
        prepared = self.vision.prepare(ids, list(images or ()))
        return self.engine.make_request(
            prepared.token_ids,
            config,
            mm_inputs=prepared.mm_inputs,
            request_id=self.engine.new_request_id(),
            positions=prepared.positions,
        )

    def _refuse_images(self) -> None:
        if self.model_type.vision:
            raise NotImplementedYetError(
                f"MODEL_TYPE={self.model_type.name}: the vision encoder is not implemented yet; text only"
            )
        raise InvalidRequest(f"MODEL_TYPE={self.model_type.name} is a text-only model: images are not accepted")

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        generate_config: GenerateConfig | None = None,
        images: Sequence[Any] | Sequence[Sequence[Any]] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion (batched by the engine); outputs in prompt order. ``images``: for one
        prompt, its list of images; for several prompts, one list per prompt."""
        items = self._normalise_prompts(prompts)
        per_prompt: list[Sequence[Any] | None] = [None] * len(items)
        if images is not None:
            per_prompt = [images] if len(items) == 1 and not _is_nested(images) else list(images)
            if len(per_prompt) != len(items):
                raise InvalidRequest(f"images has {len(per_prompt)} entries for {len(items)} prompts")
        return self.run_requests(self._make_requests(items, per_prompt, generate_config))

    def _make_requests(
        self, prompts: list[Any], images: list[Sequence[Any] | None], config: GenerateConfig | None
    ) -> list[Request]:
        """One request per prompt. Prompts with images are prepared on parallel threads, so the VisionRunner
        encodes the images of the whole call in shared batches instead of one prompt at a time."""
        pairs = list(zip(prompts, images, strict=True))
        with_images = sum(1 for _, imgs in pairs if imgs)
        if self.vision is None or with_images < 2:
            return [self.make_request(p, config, imgs) for p, imgs in pairs]
        with ThreadPoolExecutor(min(with_images, 8), thread_name_prefix="rtp-mm-prepare") as pool:
            return list(pool.map(lambda pair: self.make_request(pair[0], config, pair[1]), pairs))

    def run_requests(self, requests: list[Request]) -> list[RequestOutput]:
        results: dict[int, RequestOutput] = {}
        done = threading.Event()
        lock = threading.Lock()

        def sink(out: RequestOutput) -> None:
            if out.finished:
                with lock:
                    results[out.request_id] = out
                    if len(results) == len(requests):
                        done.set()

        for req in requests:
            self._loop.submit(req, sink)
        if requests:
            done.wait()
        outs = [results[r.request_id] for r in requests]
        for out in outs:
            if out.error is not None:
                raise out.error
        return outs

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("this model has no chat template; use generate() with a raw prompt")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        encode_chat = getattr(self.tokenizer, "encode_chat", None)
        if encode_chat is not None:  # rtp-mm's adapters build chat prompts at the id level, as the originals do
            return list(encode_chat(messages))
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[Any]]:
        """Prompt ids of one conversation and the image sources of its image parts, in order. Image parts (OpenAI
        ``image_url`` or ``{"type": "image", "image": x}``) become the vision model's placeholder text first."""
        from rtp_mm.vision.chat import has_image_parts, render_image_parts

        if not has_image_parts(messages):
            return self.chat_ids(messages), []
        if self.vision is None:
            self._refuse_images()
        rendered, sources = render_image_parts(messages, self.vision.model.image_placeholder)
        return self.chat_ids(rendered), sources

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        generate_config: GenerateConfig | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several; the model's chat template is applied. Messages may hold
        image parts (data: URLs, paths, bytes or PIL images), rendered as the model's image placeholders."""
        from rtp_mm.vision.chat import load_source

        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts, images = [], []
        for conversation in conversations:
            ids, sources = self.chat_prompt(conversation)
            prompts.append(ids)
            images.append([load_source(src, k) for k, src in enumerate(sources)])
        return self.run_requests(self._make_requests(prompts, images, generate_config))

    def embed(
        self,
        inputs: str | Sequence[str] | Sequence[Sequence[int]],
        is_query: bool = False,
        case_sensitive: bool = False,
        attention_mask: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """SGPT sentence embeddings [n, hidden], float32 with unit L2 norm: the position-weighted mean of the final
        hidden states, computed by the engine's own model in a prefill-only forward (no decoding, no KV pool).

        Texts are prepared as RTP-LLM's sgpt_bloom_vector does: lowercased unless ``case_sensitive``, then wrapped
        in ``[``...``]`` bracket tokens when ``is_query``, else ``{``...``}``. Token-id lists are used as given
        (brackets included). ``attention_mask`` (token ids only) marks padding with 0, e.g. a left-padded batch:
        padding is neither fed to the model nor pooled, but counts in the position weights as in
        sentence-transformers, so a padded input gives the same vector there as here.
        """
        items = self._normalise_prompts(inputs)
        if attention_mask is not None and len(attention_mask) != len(items):
            raise InvalidRequest(f"attention_mask has {len(attention_mask)} rows for {len(items)} inputs")
        pooling = embedding.sentence_transformers_pooling(self.model_config.ckpt_path)
        if pooling not in (None, "weightedmean_tokens"):
            raise InvalidRequest(f"the checkpoint's pooling mode {pooling!r} is not supported (weightedmean_tokens)")
        vocab = self.loaded.model.spec.vocab_size
        padded: list[list[int]] = []
        masks: list[list[int]] = []
        for n, item in enumerate(items):
            if isinstance(item, str):
                if attention_mask is not None:
                    raise InvalidRequest("attention_mask applies to token-id inputs only, not to texts")
                if not item:
                    raise EmptyPromptError(f"input {n} is empty")
                if self.tokenizer is None:
                    raise InvalidRequest("text inputs need a tokenizer (this LLM was built with skip_tokenizer_init)")
                ids = embedding.sgpt_input_ids(self.tokenizer, item, is_query, case_sensitive, self.max_seq_len)
            else:
                ids = self._prompt_ids(item)
            given = None if attention_mask is None else attention_mask[n]
            mask = embedding.check_mask(n, ids, given, self.max_seq_len, vocab)
            padded.append(ids)
            masks.append(mask)
        return self._pool_embeddings(padded, masks)

    def _pool_embeddings(self, padded: list[list[int]], masks: list[list[int]]) -> torch.Tensor:
        spans = [embedding.real_span(m) for m in masks]
        real = [ids[lo:hi] for ids, (lo, hi) in zip(padded, spans, strict=True)]
        block_size = self.model_config.seq_size_per_block
        hidden: list[torch.Tensor] = []
        for group in embedding.batch_by_tokens(real, self.engine_config.step_token_budget):
            run = lambda engine, g=group: embedding.prefill_hidden(engine.runner.model, g, block_size)  # noqa: E731
            hidden += self._loop.call(run, 600.0)
        pooled = [embedding.pool_padded(h, m, span) for h, m, span in zip(hidden, masks, spans, strict=True)]
        if not pooled:
            return torch.zeros(0, self.loaded.model.spec.hidden_size)
        return embedding.l2_normalize(torch.stack(pooled))

    async def generate_stream(
        self,
        prompt: str | Sequence[int],
        generate_config: GenerateConfig | None = None,
        images: Sequence[Any] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Incremental outputs of one prompt; leaving the iterator early cancels the request. The vision encoder (if
        ``images``) runs in a worker thread, not on the event loop."""
        if images:
            req = await asyncio.to_thread(self.make_request, prompt, generate_config, images)
        else:
            req = self.make_request(prompt, generate_config)
        async for out in self.stream_request(req):
            yield out

    async def stream_request(self, req: Request) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._loop.submit(req, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        finished = False
        try:
            while True:
                out = await queue.get()
                if out.error is not None:
                    finished = True
                    raise out.error
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self._loop.abort(req.request_id)

    def abort(self, request_id: int) -> None:
        self._loop.abort(request_id)

    @property
    def alive(self) -> bool:
        return self._loop.alive

    def stats(self) -> dict[str, Any]:
        if not self._loop.alive:
            raise EngineDead("the engine is not running")
        stats = self._loop.call(lambda engine: engine.stats())
        if self.vision is not None:
            stats.update(self.vision.stats())  # encoder-cache hits/misses, images encoded, ViT batches
        return stats

    def shutdown(self) -> None:
        self._loop.shutdown()
        if self.vision is not None:
            self.vision.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()


def _auto_kv_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.9)
    available = _available_ram_bytes()
    return int(min(available * CPU_KV_FRACTION, CPU_KV_CAP_MB * 2**20))


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _is_nested(images: Sequence[Any]) -> bool:
    """True when ``images`` is one list of images per prompt (not one prompt's images)."""
    return bool(images) and all(isinstance(x, list | tuple) for x in images)
