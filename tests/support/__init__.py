"""Shared test helpers (no tests here).

- ``launch``: one ``free_port``; ``spawn`` (real gloo groups in spawned processes); the
  subprocess environment and ``torchrun`` command of every child; ``run_train`` (the trainer under
  torchrun, its ``metrics.jsonl`` read back).
- ``tiny_models``: tiny random Hugging Face models (dense cases, mixtures of experts, the
  training tests' Qwen3).
- ``data``: tiny tokenizers with chat templates and their independent mask oracles; prepared
  training data.
- ``fixtures``: the training tests' inputs (tiny Qwen3, its converted checkpoint, data), also
  ``python -m tests.support.fixtures OUT``.
"""
