"""Evaluation: benchmarks, backends, extraction and scoring, metrics, and the report.

`benchmarks` loads zero-shot examples; `backends` generates greedily with vLLM
or HF transformers; `score` extracts strict and flexible answers; `metrics`
computes accuracies with bootstrap CIs; `evaluate` runs a checkpoint over a
suite with a content-keyed cache; `report` writes the paper-style table.
"""
