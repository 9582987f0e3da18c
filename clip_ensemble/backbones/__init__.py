"""Stage 1, backbones: one interface over CLIP-like models and what is computed from a backbone alone.

- `base`: the `Backbone` interface every adapter implements;
- `transformers_backbone`, `open_clip_backbone`: the adapters (a new backbone family goes beside them);
- `loading`: which adapter loads a backbone id;
- `templates`, `zero_shot`: prompt templates and the zero-shot heads built from them;
- `hub_configs`: the curated backbone sets of `hub_configs/`.

Imports nothing from the later stages (models, data, calibration, evaluation, the interfaces).
"""
