"""A transformers image-classification `Pipeline` for the ensemble, so `evaluate`'s evaluator and pipeline code run it
the way they run any Hub image classifier."""

from __future__ import annotations

import torch
from transformers import Pipeline

from .modeling_clip_ensemble import CLIPEnsembleModel
from .processing_clip_ensemble import ImageInput


class CLIPEnsemblePipeline(Pipeline):
    """Image classification with a `CLIPEnsembleModel`: per image, the `top_k` labels (5 by default) with their
    probabilities, `[{"label": ..., "score": ...}, ...]`, best first, as transformers' image-classification pipeline
    returns them.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> from clip_ensemble import CLIPEnsembleModel, CLIPEnsemblePipeline

    >>> model = CLIPEnsembleModel.from_pretrained("me/my-gate")
    >>> classifier = CLIPEnsemblePipeline(model)  # or: pipeline("image-classification", model=model,
    >>> #                                                        pipeline_class=CLIPEnsemblePipeline)
    >>> classifier(["cat.jpg", "dog.jpg"], top_k=1, batch_size=8)
    [[{'label': 'cat', 'score': 0.98}], [{'label': 'dog', 'score': 0.95}]]
    ```

    Images are what `clip_ensemble.load_image` reads: PIL images (e.g. a `datasets` Image column), file paths,
    encoded bytes or arrays. Batching (`batch_size=`) stacks each backbone's pixel values separately.
    """

    # The ensemble preprocesses with its own per-backbone processor: nothing to load from the repo.
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, model: CLIPEnsembleModel, **kwargs):
        if not isinstance(model, CLIPEnsembleModel):
            raise TypeError(
                f"CLIPEnsemblePipeline needs a CLIPEnsembleModel, got {type(model).__name__}; load one with "
                "`CLIPEnsembleModel.from_pretrained`."
            )
        kwargs.setdefault("task", "image-classification")
        # The base class batches only when an image processor is set; ours returns one tensor per backbone.
        kwargs.setdefault("image_processor", model.processor)
        super().__init__(model=model, **kwargs)
        self.model.eval()

    def _sanitize_parameters(self, top_k: int | None = None) -> tuple[dict, dict, dict]:
        postprocess = {}
        if top_k is not None:
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
                raise ValueError(f"top_k={top_k!r}; give a positive number of labels to return, e.g. top_k=5.")
            postprocess["top_k"] = top_k
        return {}, {}, postprocess

    def preprocess(self, image: ImageInput) -> dict[str, torch.Tensor]:
        pixel_values = self.model.processor(image)["pixel_values"]
        # One (1, 3, H_b, W_b) tensor per backbone, under its own key so that batches stack them separately.
        return {f"pixel_values_{b}": pixels for b, pixels in enumerate(pixel_values)}

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pixel_values = [model_inputs[f"pixel_values_{b}"] for b in range(len(self.model.backbones))]
        return {"logits": self.model(pixel_values=pixel_values).logits}  # (batch, num_labels)

    def postprocess(self, model_outputs: dict[str, torch.Tensor], top_k: int = 5) -> list[dict]:
        probs = model_outputs["logits"][0].float().softmax(dim=-1)
        top = probs.topk(min(top_k, probs.shape[-1]))
        labels = self.model.labels
        return [{"label": labels[i], "score": float(s)} for s, i in zip(top.values, top.indices.tolist())]

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Save the ensemble (config, gate and card); its processors come with its backbones."""
        self.model.save_pretrained(save_directory, **kwargs)


__all__ = ["CLIPEnsemblePipeline"]
