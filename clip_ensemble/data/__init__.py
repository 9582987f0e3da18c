"""Stage 3, data: labelled images and where they come from, and the backbones' embeddings of them.

- `labelled`: `LabelledImages` from Hub datasets, image folders or lists, and few-shot sampling;
- `features`: the on-disk feature cache (embeddings keyed by backbone and image content);
- `extraction`: embedding whole datasets, across processes with accelerate.
"""
