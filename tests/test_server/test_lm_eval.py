"""lm-eval over HTTP: ``--model local-completions`` against rtp-mm gives the per-sample loglikelihoods that
``--model hf`` computes in-process on the same tiny checkpoint, for a multiple-choice task and a
loglikelihood-rolling task (several windows per document). Everything is local: the tasks are YAML files with JSON
datasets written here, loaded through ``include_path``; the tokenizer is the checkpoint folder's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rtp_mm import LLM, ModelConfig
from rtp_mm_testing.oracle import tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.serving import background_server

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a tiny tokenizer for tests."]
QUESTIONS = [
    ("The quick brown fox", [" jumps", " is", " dog"], 0),
    ("Hello world, this is a", [" tiny", " lazy", " quick brown"], 0),
    ("The lazy", [" dog.", " fox", " world"], 0),
    ("this is a tiny tokenizer for", [" tests.", " the dog", " Hello"], 0),
]
DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog. Hello world, this is a tiny tokenizer for tests. " * 2,
    "Hello world. The lazy dog jumps over the quick brown fox, this is a test.",
]
HF_MAX_LENGTH = 24  # small, so that each document is scored in several rolling windows
ATOL = 1e-3


def _write_tasks(folder: Path) -> None:
    mc = folder / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS))
    docs = folder / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    (folder / "tiny_mc.yaml").write_text(
        f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""
    )
    (folder / "tiny_rolling.yaml").write_text(
        f"""task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""
    )


def _loglikelihoods(samples: list[dict]) -> dict[int, list[float]]:
    """doc_id -> the sample's loglikelihoods (one per choice; one per document when rolling)."""

    def floats(x) -> list[float]:
        if isinstance(x, list | tuple):
            return [f for item in (x[:1] if isinstance(x, tuple) else x) for f in floats(item)]
        return [float(x)]

    return {s["doc_id"]: floats(s["filtered_resps"]) for s in samples}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lm_eval_llama")
    tiny_llama(path, seed=13)
    tiny_bpe_tokenizer(path, SENTENCES)
    return path


def test_local_completions_match_hf(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    _write_tasks(tmp_path)
    tasks = ["tiny_mc", "tiny_rolling"]

    def evaluate(model: str, model_args: dict) -> dict[str, dict[int, list[float]]]:
        results = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=tasks,
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
            log_samples=True,
            batch_size=1,
        )
        return {task: _loglikelihoods(results["samples"][task]) for task in tasks}

    hf_args = {
        "pretrained": str(checkpoint),
        "dtype": "float32",
        "device": "cpu",
        "max_length": HF_MAX_LENGTH,
        "add_bos_token": False,
    }
    expected = evaluate("hf", hf_args)

    config = ModelConfig(model_type="llama", ckpt_path=checkpoint, max_seq_len=64, weight_type="FP32")
    with LLM(config, kv_cache_mem_mb=16, max_num_batched_tokens=16) as llm, background_server(llm) as url:
        api_args = {
            "model": "tiny",
            "base_url": f"{url}/v1/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(checkpoint),
            "tokenized_requests": True,
            # TemplateAPI keeps max_length - 1 tokens per request and scores windows of max_length - 2, where hf
            # keeps max_length + 1 and windows of max_length: the same windows.
            "max_length": HF_MAX_LENGTH + 2,
        }
        got = evaluate("local-completions", api_args)

    sizes = {"tiny_mc": len(QUESTIONS), "tiny_rolling": len(DOCUMENTS)}
    for task in tasks:
        assert got[task].keys() == expected[task].keys() == set(range(sizes[task]))
        for doc_id, values in expected[task].items():
            assert got[task][doc_id] == pytest.approx(values, abs=ATOL), (task, doc_id)
