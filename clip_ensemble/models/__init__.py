"""Stage 2, models: the ensemble itself, built on backbones.

- `configuration_clip_ensemble`, `modeling_clip_ensemble`, `processing_clip_ensemble`: config, model, processor;
- `gate`: the per-image gate and how its weights combine the backbones' logits;
- `cascade`, `cost`: the runtime cascade and each backbone's GFLOPs;
- `placement`: backbones on devices (accelerate);
- `saved_gate`: the one strict loader of saved gates (for `from_pretrained`, the CLI and the app);
- `modelcard`: the README saved and pushed with a gate (it takes plain data, never evaluation objects).
"""
