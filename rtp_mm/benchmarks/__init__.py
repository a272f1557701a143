"""Benchmarks of rtp-mm against baselines measured in the same run (``rtp-mm bench``, ``make bench``).

Not part of the product's import graph: nothing outside this package imports it except the ``rtp-mm`` CLI, which hands
``rtp-mm bench`` to ``rtp_mm.benchmarks.cli`` (checked by import-linter, see pyproject.toml).

- ``text``: the text engine against HF transformers ``generate`` (decode, serving, TTFT, KV capacity);
  ``workload`` holds its inputs and timing records, ``hf_baseline`` the HF side.
- ``vision``: the vision encoders (images/s, cache hits, eager vs onnxruntime); ``vision_cases`` builds the tiny
  real-width checkpoints it runs, ``vision_onnx`` the ONNX export and onnxruntime rows.
- ``report``: the BENCHMARKS.md section writer and machine description shared by both.
"""
