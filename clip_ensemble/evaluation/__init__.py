"""Stage 5, evaluation: a calibrated ensemble beside every backbone and baseline on one split.

- `evaluate`: `evaluate()` and `EvaluationReport`;
- `metrics`: top-k accuracy, per-class recall, confusion (a new metric goes here);
- `report`: the Markdown, CSV and chart report;
- `clip_benchmark`: results in CLIP_benchmark's format;
- `evaluate_modules`: the `evaluate` library's metrics and evaluator, offline.
"""
