"""sgpt_bloom_vector: LLM.embed against the golden SGPT-BLOOM data and against HF BloomModel + SGPT pooling."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BloomConfig, BloomModel

from rtp_mm import LLM, GenerateConfig, ModelConfig
from rtp_mm.errors import EmptyPromptError, InvalidRequest
from rtp_mm.llm.engine.embedding import prefill_hidden
from rtp_mm_testing.oracle import perturb, random_prompts, write_checkpoint
from rtp_mm_testing.serving import openai_client
from rtp_mm_testing.shared import GOLDEN as GOLDEN_ROOT
from rtp_mm_testing.shared import require

GOLDEN = GOLDEN_ROOT / "sgpt_bloom_vector"


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.fixture(scope="module")
def golden_llm():
    require(GOLDEN)
    llm = LLM(
        ModelConfig(model_type="sgpt_bloom_vector", ckpt_path=str(GOLDEN / "checkpoint"), weight_type="FP32"),
        kv_cache_mem_mb=16,
        skip_tokenizer_init=True,
    )
    yield llm
    llm.shutdown()


def _golden_inputs() -> dict[str, dict]:
    return {case["name"]: case for case in json.loads((GOLDEN / "inputs.json").read_text())}


def test_golden_backbone_hidden_states(golden_llm):
    """The prefill-only forward reproduces BloomModel's last_hidden_state (golden tolerance 1e-4 * max)."""
    expected = load_file(str(GOLDEN / "expected.safetensors"))
    block_size = golden_llm.model_config.seq_size_per_block
    for name in ("query", "document", "plain_long"):
        ids = _golden_inputs()[name]["input_ids"]
        run = lambda engine, ids=ids: prefill_hidden(engine.runner.model, [ids], block_size)  # noqa: E731
        (hidden,) = golden_llm.client.call(run)
        want = expected[f"last_hidden_state_{name}"]
        assert (hidden - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max())), name


@pytest.mark.parametrize("name", ["query", "document", "plain_long"])
def test_golden_embeddings(golden_llm, name):
    expected = load_file(str(GOLDEN / "expected.safetensors"))[f"embedding_{name}"]
    got = golden_llm.embed([_golden_inputs()[name]["input_ids"]])
    assert got.shape == (1, expected.shape[0])
    assert _cosine(got[0], expected) >= 0.9999
    assert abs(float(got[0].norm()) - 1.0) < 1e-5  # RTP-LLM returns unit vectors


def test_golden_left_padded_batch(golden_llm):
    """Position weights run over the padded length, so the padded query differs from the unpadded one."""
    case = _golden_inputs()["batch_left_padded"]
    expected = load_file(str(GOLDEN / "expected.safetensors"))["embedding_batch_left_padded"]
    got = golden_llm.embed(case["input_ids"], attention_mask=case["attention_mask"])
    for row in range(2):
        assert _cosine(got[row], expected[row]) >= 0.9999
    unpadded = golden_llm.embed([_golden_inputs()["query"]["input_ids"]])[0]
    assert _cosine(unpadded, expected[0]) < 0.9999  # the padding really changes the weights


def test_embed_while_generating(golden_llm):
    """Embeddings are computed between engine steps, next to running generations, without disturbing either."""
    expected = load_file(str(GOLDEN / "expected.safetensors"))["embedding_document"]
    prompts = random_prompts(512, [7, 30, 12], seed=3)
    cfg = GenerateConfig(max_new_tokens=24, top_k=1, ignore_eos=True)
    alone = golden_llm.generate(prompts, cfg)
    outs: list = []
    worker = threading.Thread(target=lambda: outs.extend(golden_llm.generate(prompts, cfg)))
    worker.start()
    embeds = [golden_llm.embed([_golden_inputs()["document"]["input_ids"]])[0] for _ in range(3)]
    worker.join()
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert all(_cosine(e, expected) >= 0.9999 for e in embeds)


def test_golden_input_errors(golden_llm):
    ids = _golden_inputs()["query"]["input_ids"]
    with pytest.raises(InvalidRequest, match=r"attention_mask\[0\] may mask padding at the ends only"):
        golden_llm.embed([ids], attention_mask=[[1] * 3 + [0] + [1] * (len(ids) - 4)])
    with pytest.raises(InvalidRequest, match="attention_mask has 2 rows for 1 inputs"):
        golden_llm.embed([ids], attention_mask=[[1] * len(ids)] * 2)
    with pytest.raises(EmptyPromptError):
        golden_llm.embed([ids], attention_mask=[[0] * len(ids)])
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        golden_llm.embed([[5, 9999]])
    with pytest.raises(InvalidRequest, match="need a tokenizer"):
        golden_llm.embed("a text")


# --- text inputs: RTP-LLM's preparation (lowercase, bracket tokens) against an independent oracle ----------------

WORDS = ["[", "]", "{", "}", "[UNK]", "[PAD]", "hello", "world", "search", "engines", "rank", "documents", "Hello"]


def _tokenizer_files(path: Path) -> dict[str, int]:
    """A word-level tokenizer.json whose vocabulary has the four SGPT brackets as single tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(str(path))
    return vocab


@torch.no_grad()
def _oracle_embedding(model: BloomModel, ids: list[int]) -> torch.Tensor:
    """SGPT weighted-mean pooling written from its definition over HF BloomModel's last_hidden_state."""
    hidden = model(torch.tensor([ids])).last_hidden_state[0]
    weights = torch.arange(1, len(ids) + 1, dtype=torch.float32)[:, None]
    pooled = (hidden * weights).sum(0) / weights.sum()
    return pooled / pooled.norm()


def _tiny_sgpt(tmp_path: Path) -> tuple[BloomModel, Path, dict[str, int]]:
    """A tiny random SGPT-BLOOM checkpoint in the sentence-transformers layout, with a word-level tokenizer."""
    torch.manual_seed(81)
    model = perturb(BloomModel(BloomConfig(vocab_size=len(WORDS), hidden_size=64, n_layer=2, n_head=4)).eval())
    path = write_checkpoint(
        tmp_path / "sgpt",
        model.state_dict(),
        {
            "architectures": ["BloomModel"],
            "model_type": "bloom",
            "n_head": 4,
            "n_layer": 2,
            "hidden_size": 64,
            "vocab_size": len(WORDS),
            "layer_norm_epsilon": 1e-5,
        },
        modules=[
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ],
    )
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    vocab = _tokenizer_files(path)
    return model, path, vocab


def test_text_inputs_follow_rtp_llm(tmp_path):
    model, path, vocab = _tiny_sgpt(tmp_path)
    v = vocab.__getitem__
    with LLM(
        ModelConfig(model_type="sgpt_bloom_vector", ckpt_path=str(path), weight_type="FP32"), kv_cache_mem_mb=8
    ) as llm:
        got = llm.embed(["Hello World", "search engines rank documents"], is_query=True)
        query_ids = [v("["), v("hello"), v("world"), v("]")]
        assert _cosine(got[0], _oracle_embedding(model, query_ids)) >= 0.9999
        assert torch.allclose(got[0], _oracle_embedding(model, query_ids), atol=1e-5)
        long_ids = [v("["), v("search"), v("engines"), v("rank"), v("documents"), v("]")]
        assert _cosine(got[1], _oracle_embedding(model, long_ids)) >= 0.9999
        doc = llm.embed("Hello World")[0]  # documents get braces
        assert _cosine(doc, _oracle_embedding(model, [v("{"), v("hello"), v("world"), v("}")])) >= 0.9999
        cased = llm.embed("Hello World", case_sensitive=True)[0]
        assert _cosine(cased, _oracle_embedding(model, [v("{"), v("Hello"), v("[UNK]"), v("}")])) >= 0.9999
        (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
        with pytest.raises(InvalidRequest, match="pooling mode 'mean_tokens' is not supported"):
            llm.embed("hello")


def test_openai_embeddings_route(tmp_path):
    """/v1/embeddings through the official client: strings, token ids and the is_query extension give the vectors of
    LLM.embed, with usage counting the prompt tokens."""
    import openai

    from rtp_mm import Settings
    from rtp_mm.server.app import BackgroundServer, create_app

    model, path, vocab = _tiny_sgpt(tmp_path)
    with LLM(ModelConfig(model_type="sgpt_bloom_vector", ckpt_path=str(path)), kv_cache_mem_mb=8) as llm:
        app = create_app(llm.client, Settings(model=llm.model_config, engine=llm.engine_config))
        with BackgroundServer(app) as url:
            client = openai_client(url)
            texts = ["Hello World", "search engines rank documents"]
            reply = client.embeddings.create(model="sgpt", input=texts)
            assert [d.index for d in reply.data] == [0, 1]
            expected = llm.embed(texts)
            for d, want in zip(reply.data, expected, strict=True):
                assert torch.allclose(torch.tensor(d.embedding), want, atol=1e-6)
            assert reply.usage.prompt_tokens == sum(len(llm.encode(t)) for t in texts)
            query = client.embeddings.create(model="sgpt", input="Hello World", extra_body={"is_query": True})
            assert torch.allclose(torch.tensor(query.data[0].embedding), llm.embed("Hello World", True)[0], atol=1e-6)
            ids = [vocab["{"], vocab["hello"], vocab["}"]]
            by_ids = client.embeddings.create(model="sgpt", input=ids)
            assert torch.allclose(torch.tensor(by_ids.data[0].embedding), llm.embed([ids])[0], atol=1e-6)
            assert _cosine(torch.tensor(by_ids.data[0].embedding), _oracle_embedding(model, ids)) >= 0.9999
            with pytest.raises(openai.BadRequestError, match=r"input\[0\]=\[\]: list should have at least 1 item"):
                client.embeddings.create(model="sgpt", input=[[]])
            with pytest.raises(openai.BadRequestError, match="is_query"):
                client.embeddings.create(model="sgpt", input="x", extra_body={"is_query": "yes"})
