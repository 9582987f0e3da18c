"""CLIPEnsembleModel: several frozen CLIP backbones, zero-shot heads, and a gate that weighs them per image."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ..backbones.base import Backbone
from ..backbones.zero_shot import build_zero_shot_classifier
from .cascade import Cascade
from .class_head import ClassHead
from .configuration_clip_ensemble import CLIPEnsembleConfig, _normalize_backbone
from .cost import describe_costs, measure_gflops
from .gate import EnsembleGate, combine_logits
from .placement import Device, load_backbones, run_per_device, torch_device
from .processing_clip_ensemble import CLIPEnsembleProcessor, ImageInput
from .saved_gate import (
    CASCADE_WEIGHTS_NAME,
    CLASS_HEAD_WEIGHTS_NAME,
    GATE_WEIGHTS_NAME,
)
from .saving import GateFilesMixin

logger = logging.getLogger(__name__)


@dataclass
class CLIPEnsembleOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy of `logits` against the given `labels`.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            The ensemble's logits: per-backbone logits weighted by the gate and summed.
        gate_weights (`torch.FloatTensor` of shape `(batch_size, num_backbones)`):
            The weight of each backbone for each image.
        per_backbone_logits (`torch.FloatTensor` of shape `(batch_size, num_backbones, num_labels)`):
            Each backbone's own zero-shot logits, `logit_scale_b * image_embed_b @ W_b.T`.
        image_embeds (`tuple[torch.FloatTensor]`, one of shape `(batch_size, embed_dim_b)` per backbone):
            L2-normalised image embeddings, the gate's input.
        gflops (`torch.FloatTensor` of shape `(batch_size,)`):
            The compute spent on each image: the summed GFLOPs of the backbones it ran through (all of them without
            a cascade). With `image_embeds` input, what the images would have cost from pixels.
        num_backbones_run (`torch.LongTensor` of shape `(batch_size,)`):
            How many backbones each image needed: the first ones of `model.cascade.order`, or all of them without a
            cascade. With a cascade and pixel input, a backbone an image did not run leaves NaN in its
            `per_backbone_logits` and `image_embeds` rows and weight 0 in `gate_weights`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    gate_weights: torch.FloatTensor | None = None
    per_backbone_logits: torch.FloatTensor | None = None
    image_embeds: tuple[torch.FloatTensor, ...] | None = None
    gflops: torch.FloatTensor | None = None
    num_backbones_run: torch.LongTensor | None = None


class CLIPEnsembleModel(GateFilesMixin, PreTrainedModel):
    r"""
    An adaptive ensemble of CLIP backbones ("Synergy and Diversity in CLIP", arXiv:2405.17139). Each backbone
    classifies zero-shot with its own text tower; a small gate reads all image embeddings and rescales each
    backbone's logits per image before they are summed. Only the config and the gate are saved: backbones are
    loaded from their own repos.

    Example:

    ```python
    >>> from clip_ensemble import CLIPEnsembleModel

    >>> model = CLIPEnsembleModel.from_backbones(
    ...     ["openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16"], labels=["cat", "dog"]
    ... )
    >>> model.classify(["cat.jpg"], top_k=1)
    [[{'label': 'cat', 'score': 0.98}]]
    ```
    """

    config_class = CLIPEnsembleConfig
    base_model_prefix = "clip_ensemble"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: CLIPEnsembleConfig, backbones: Sequence[Backbone]):
        super().__init__(config)
        if not config.backbones:
            raise ValueError("The config lists no backbones; build the model with `from_backbones`.")
        if len(backbones) != config.num_backbones:
            raise ValueError(f"The config lists {config.num_backbones} backbones but {len(backbones)} were given.")
        for index, (entry, backbone) in enumerate(zip(config.backbones, backbones)):
            if entry["embed_dim"] is None:
                entry["embed_dim"] = backbone.embed_dim
            elif entry["embed_dim"] != backbone.embed_dim:
                raise ValueError(
                    f"Backbone {index} '{entry['name_or_path']}' has embedding width {backbone.embed_dim}, but the "
                    f"config expects {entry['embed_dim']}: the repo changed since the gate was calibrated. Pin the "
                    "revision the gate was calibrated with, or calibrate a new gate."
                )
        self.gate = EnsembleGate(self.embed_dims, config.gate_hidden_size, config.combination)
        self.post_init()
        # Set after post_init so that pretrained backbone weights are never re-initialised.
        self.backbones = nn.ModuleList(backbones)
        # Frozen; read once, since reading a scalar off an accelerator waits for it.
        self.logit_scales = [backbone.logit_scale for backbone in backbones]
        self.processor = CLIPEnsembleProcessor([backbone.preprocess for backbone in backbones])
        self._head_cache: dict[tuple, list[torch.Tensor]] = {}
        self.class_head: ClassHead | None = None
        self.set_labels(config.labels, config.templates)
        if config.class_head is not None:  # weights follow in `from_pretrained`
            self.set_class_head(ClassHead(sum(self.embed_dims), config.class_head["rank"], len(config.labels)))
        self.cascade: Cascade | None = None
        if config.cascade is not None:  # weights follow with `load_cascade`
            self.set_cascade(self._cascade_from_config(config.cascade))

    def _init_weights(self, module: nn.Module) -> None:
        # The gate initialises itself (so that it starts as logit averaging); backbones come pretrained.
        pass

    @property
    def embed_dims(self) -> list[int]:
        return [entry["embed_dim"] for entry in self.config.backbones]

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    @property
    def backbone_gflops(self) -> list[float]:
        """Forward GFLOPs per image of each backbone's image tower at its own input size, measured once per backbone
        with torch's FLOP counter (`clip_ensemble.models.cost.measure_gflops`; 2 FLOPs per multiply-add)."""
        return [measure_gflops(backbone) for backbone in self.backbones]

    def describe(self) -> str:
        """The backbones as a Markdown table: embedding width, input size and measured GFLOPs per image; and the
        cascade, if any."""
        return describe_costs(self.config, self.backbones)

    def set_cascade(self, cascade: Cascade | None, **info) -> None:
        """Run backbones as `cascade` says (see `clip_ensemble.models.cascade.Cascade`), or all of them with `None`.

        `info` (what its fitting estimated: tolerance, mean GFLOPs, accuracy) goes into `config.cascade` with the
        cascade's order and stop margins, and from there into the saved config and the model card.
        """
        if cascade is None:
            self.cascade, self.config.cascade = None, None
            return
        if not isinstance(cascade, Cascade):
            raise TypeError(
                f"set_cascade takes a clip_ensemble.models.cascade.Cascade or None, got {type(cascade).__name__}."
            )
        if len(cascade.order) != self.config.num_backbones:
            raise ValueError(
                f"The cascade orders {len(cascade.order)} backbones, the ensemble has {self.config.num_backbones}."
            )
        self.cascade = cascade.to(self.gate.fc1.weight.device)
        previous = self.config.cascade if self.config.cascade and not info else {}
        self.config.cascade = {
            **previous,
            **info,
            "order": list(cascade.order),
            "stop_margins": list(cascade.stop_margins),
        }

    def set_class_head(self, head: ClassHead | None, **info) -> None:
        """Add `head`'s per-class correction to the combined logits (see `clip_ensemble.models.class_head`), or none
        with `None`. `info` (how it was fitted) goes into `config.class_head` with its rank."""
        if head is None:
            self.class_head, self.config.class_head = None, None
            return
        if not isinstance(head, ClassHead):
            raise TypeError(f"set_class_head takes a ClassHead or None, got {type(head).__name__}.")
        if head.basis.shape[0] != sum(self.embed_dims) or head.num_labels != len(self.config.labels):
            raise ValueError(
                f"The class head reads {head.basis.shape[0]}-d gate inputs for {head.num_labels} labels; this "
                f"ensemble's are {sum(self.embed_dims)}-d, for {len(self.config.labels)} labels. A head serves the "
                "backbones and labels it was calibrated on: calibrate this ensemble for a head of its own."
            )
        self.class_head = head.to(self.gate.fc1.weight.device)
        previous = self.config.class_head if self.config.class_head and not info else {}
        self.config.class_head = {**previous, **info, "rank": head.rank}

    def _cascade_from_config(self, entry: dict) -> Cascade:
        return Cascade(
            self.embed_dims,
            entry["order"],
            entry["stop_margins"],
            self.config.gate_hidden_size,
            self.config.combination,
        )

    @classmethod
    def from_backbones(
        cls,
        backbones: Sequence[str | dict | Backbone],
        labels: Sequence[str],
        templates: Sequence[str] | str = "short",
        *,
        device_map: str | int | torch.device | dict | None = None,
        max_memory: dict | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        offload_folder: str | os.PathLike | None = None,
        **gate_settings,
    ) -> CLIPEnsembleModel:
        """Build an uncalibrated ensemble (equal to the mean of logits) from repo ids, folders or backbones.

        `device_map` ("auto", "balanced", "sequential", one device, or a dict from backbone index or name to
        device), `max_memory` ({device: bytes or "10GiB"}) and `offload_folder` place each backbone whole on one
        device (see `clip_ensemble.models.placement`); `dtype` (alias `torch_dtype`) is the backbones' precision, the gate
        stays float32. `gate_settings` are `gate_hidden_size` and `combination` (see `CLIPEnsembleConfig`).
        """
        if not backbones:
            raise ValueError("No backbones given: pass at least one CLIP repo id or local folder.")
        loaded, placement, main = load_backbones(
            [b if isinstance(b, Backbone) else _normalize_backbone(i, b) for i, b in enumerate(backbones)],
            device_map=device_map,
            max_memory=max_memory,
            dtype=dtype,
            torch_dtype=torch_dtype,
            offload_folder=offload_folder,
        )
        config = CLIPEnsembleConfig(
            backbones=[backbone.describe() for backbone in loaded],
            labels=list(labels),
            templates=templates if isinstance(templates, str) else list(templates),
            **gate_settings,
        )
        return cls(config, loaded)._place_gate(placement, main)

    def _place_gate(self, placement: list[Device] | None, main: Device | None) -> CLIPEnsembleModel:
        """The gate (with the cascade and class head a config names) on the main device, where the backbones'
        embeddings are gathered; records `hf_device_map`."""
        if placement is not None:
            for module in (self.gate, self.cascade, self.class_head):
                if module is not None:
                    module.to(torch_device(main))
            self.hf_device_map = {"gate": main, **{f"backbones.{i}": d for i, d in enumerate(placement)}}
        return self

    def set_labels(self, labels: Sequence[str], templates: Sequence[str] | str | None = None) -> None:
        """Switch to a new label set (and optionally templates); the gate is kept, it does not depend on labels.

        A class head, learnt for the labels and templates it was calibrated with, follows its labels listed in another
        order, and is dropped (with a warning) for other labels or templates. Zero-shot heads are cached per (labels,
        templates), so switching back costs no text forward pass.
        """
        templates = self.config.templates if templates is None else templates
        # Validate through the config before touching the model.
        checked = CLIPEnsembleConfig(
            backbones=self.config.backbones,
            labels=list(labels),
            templates=templates if isinstance(templates, str) else list(templates),
        )
        key = (tuple(checked.labels), tuple(checked.template_list))
        if key not in self._head_cache:
            self._head_cache[key] = [
                build_zero_shot_classifier(backbone, checked.labels, checked.template_list)
                for backbone in self.backbones
            ]  # one (num_labels, embed_dim_b) head per backbone
        same_set = sorted(checked.labels) == sorted(self.config.labels)
        if self.class_head is not None and same_set and checked.templates == self.config.templates:
            if checked.labels != self.config.labels:  # its rows follow the labels; nothing else changes
                rows = [self.config.labels.index(label) for label in checked.labels]
                self.class_head = self.class_head.reordered(rows)
        elif self.class_head is not None:
            logger.warning(
                "The class head was calibrated for the labels %s and is dropped for the new labels or templates; the "
                "gate carries over. Calibrate again for a class head on these labels.",
                self.config.labels,
            )
            self.set_class_head(None)
        self.zero_shot_heads = self._head_cache[key]
        self.config.labels, self.config.templates = checked.labels, checked.templates
        self.config.id2label, self.config.label2id = checked.id2label, checked.label2id

    def encode_images(self, pixel_values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-backbone pixel values -> per-backbone normalised embeddings (batch, embed_dim_b)."""
        if len(pixel_values) != len(self.backbones):
            raise ValueError(
                f"Got pixel values for {len(pixel_values)} backbones, the ensemble has {len(self.backbones)}; "
                "preprocess with `model.processor(images)`."
            )
        # Backbones on different accelerators run at the same time; inputs move to each backbone's device.
        return run_per_device(
            lambda i: self.backbones[i].encode_images(pixel_values[i]), [b.device for b in self.backbones]
        )

    def zero_shot_logits(self, image_embeds: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-backbone normalised embeddings -> (batch, num_backbones, num_labels): z_b = s_b * e_b @ W_b^T."""
        if len(image_embeds) != len(self.backbones):
            raise ValueError(
                f"Got image_embeds for {len(image_embeds)} backbones, the ensemble has {len(self.backbones)}."
            )
        for index, (embeds, width) in enumerate(zip(image_embeds, self.embed_dims)):
            if embeds.shape[-1] != width:
                raise ValueError(f"image_embeds[{index}] has width {embeds.shape[-1]}, backbone {index} has {width}.")
        return torch.stack(
            [
                scale * embeds @ head.to(embeds.device).T
                for scale, embeds, head in zip(self.logit_scales, image_embeds, self.zero_shot_heads)
            ],
            dim=1,
        )

    def forward(
        self,
        pixel_values: Sequence[torch.Tensor] | None = None,
        images: Sequence[ImageInput] | None = None,
        image_embeds: Sequence[torch.Tensor] | None = None,
        labels: torch.LongTensor | None = None,
    ) -> CLIPEnsembleOutput:
        r"""
        Give exactly one of:
            pixel_values (`list[torch.FloatTensor]`): one `(batch, 3, H_b, W_b)` tensor per backbone, from
                `model.processor(images)`.
            images (`list`): PIL images, file paths or encoded bytes; preprocessed for each backbone.
            image_embeds (`list[torch.FloatTensor]`): cached normalised embeddings, one `(batch, embed_dim_b)`
                per backbone (calibration trains on these without running any backbone).
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class indices; adds the loss.
        """
        if sum(x is not None for x in (pixel_values, images, image_embeds)) != 1:
            raise ValueError("Pass exactly one of `pixel_values`, `images` or `image_embeds`.")
        if images is not None:
            pixel_values = self.processor(images)["pixel_values"]
        device = self.gate.fc1.weight.device
        if self.cascade is not None and any(margin is not None for margin in self.cascade.stop_margins):
            output = self._cascade_forward(pixel_values, image_embeds)
        else:
            if image_embeds is None:
                image_embeds = self.encode_images(pixel_values)
            image_embeds = [embeds.to(device, torch.float32) for embeds in image_embeds]
            per_backbone_logits = self.zero_shot_logits(image_embeds)  # (batch, num_backbones, num_labels)
            gate_weights = self.gate(torch.cat(image_embeds, dim=-1))  # (batch, num_backbones)
            batch = len(per_backbone_logits)
            output = CLIPEnsembleOutput(
                logits=self.combined_logits(per_backbone_logits, gate_weights, image_embeds),  # (batch, num_labels)
                gate_weights=gate_weights,
                per_backbone_logits=per_backbone_logits,
                image_embeds=tuple(image_embeds),
                gflops=torch.full((batch,), sum(self.backbone_gflops), device=device),
                num_backbones_run=torch.full((batch,), len(self.backbones), device=device),
            )
        if labels is not None:
            output.loss = nn.functional.cross_entropy(output.logits, labels.to(device))
        return output

    def combined_logits(
        self, per_backbone_logits: torch.Tensor, gate_weights: torch.Tensor, image_embeds: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """(batch, B, C) logits weighted by (batch, B) gate weights and summed, plus the class head's correction of
        the gate input (`image_embeds`, per backbone or already concatenated) when there is one: (batch, C)."""
        logits = combine_logits(per_backbone_logits, gate_weights)
        if self.class_head is not None:
            logits = logits + self.class_head(torch.cat(list(image_embeds), dim=-1))
        return logits

    def _cascade_forward(
        self, pixel_values: Sequence[torch.Tensor] | None, image_embeds: Sequence[torch.Tensor] | None
    ) -> CLIPEnsembleOutput:
        """Backbones in the cascade's order, each on the images still running; an image stops at the first stage
        whose margin reaches its stop margin. Each image's logits depend on its own row only (up to float32 batching
        differences in the backbones' matrix products). Given `image_embeds`, no backbone runs: the cascade's
        decisions are replayed on them."""
        device = self.gate.fc1.weight.device
        inputs = pixel_values if image_embeds is None else image_embeds
        if len(inputs) != len(self.backbones):
            what = "pixel values" if image_embeds is None else "image_embeds"
            raise ValueError(f"Got {what} for {len(inputs)} backbones, the ensemble has {len(self.backbones)}.")
        batch, num_labels, num_backbones = len(inputs[0]), len(self.config.labels), len(self.backbones)
        if image_embeds is not None:  # every embedding is given: every backbone's logits too
            embeds = [e.to(device, torch.float32) for e in image_embeds]
            per_backbone_logits = self.zero_shot_logits(embeds)
        else:  # NaN where a backbone does not run
            embeds = [torch.full((batch, width), float("nan"), device=device) for width in self.embed_dims]
            per_backbone_logits = torch.full((batch, num_backbones, num_labels), float("nan"), device=device)
        logits = torch.empty(batch, num_labels, device=device)
        gate_weights = torch.zeros(batch, num_backbones, device=device)
        run = torch.full((batch,), num_backbones, device=device)  # backbones run: all, unless an image stops
        running = None  # the images still in the cascade; None while none has stopped (no indexing needed)
        order = self.cascade.order
        for k, b in enumerate(order):
            if image_embeds is None:
                pixels = pixel_values[b]  # only the images still running go through the backbone, as one batch
                new = self.backbones[b].encode_images(pixels if running is None else pixels[running.to(pixels.device)])
                new = new.to(device, torch.float32)
                new_logits = self.logit_scales[b] * new @ self.zero_shot_heads[b].to(device).T
                if running is None:
                    embeds[b], per_backbone_logits[:, b] = new, new_logits
                else:
                    embeds[b][running], per_backbone_logits[running, b] = new, new_logits
            if k == len(order) - 1:  # the last backbone: the model's own gate over all of them
                gate_inputs = torch.cat(embeds, dim=-1)
                rows = slice(None) if running is None else running
                gate_inputs = gate_inputs if running is None else gate_inputs[running]
                weights = self.gate(gate_inputs)
                logits[rows] = self.combined_logits(per_backbone_logits[rows], weights, [gate_inputs])
                gate_weights[rows] = weights
                break
            if self.cascade.stop_margins[k] is None:  # no image stops here: nothing to combine yet
                continue
            prefix = order[: k + 1]
            prefix_index = torch.tensor(prefix, device=device)
            # A static stage reads no embeddings; (running, k + 1, num_labels) logits of the backbones run so far.
            static = self.cascade.is_static(k)
            prefix_embeds = None if static else [embeds[p] if running is None else embeds[p][running] for p in prefix]
            running_logits = per_backbone_logits if running is None else per_backbone_logits[running]
            prefix_logits = running_logits.index_select(1, prefix_index)
            combined, weights, stop = self.cascade.stage(k, prefix_embeds, prefix_logits, static=static)
            stopped, going_on = stop.nonzero().squeeze(1), (~stop).nonzero().squeeze(1)  # positions among running
            done = stopped if running is None else running[stopped]
            logits[done], run[done] = combined[stopped], k + 1
            gate_weights[done.unsqueeze(1), prefix_index] = weights[stopped]
            running = going_on if running is None else running[going_on]
            if len(running) == 0:
                break
        gflops = [0.0] + [self.backbone_gflops[b] for b in order]
        costs = torch.tensor(gflops, device=device).cumsum(0)  # (B + 1,) after running k backbones
        return CLIPEnsembleOutput(
            logits=logits,
            gate_weights=gate_weights,
            per_backbone_logits=per_backbone_logits,
            image_embeds=tuple(embeds),
            gflops=costs[run],
            num_backbones_run=run,
        )

    @torch.no_grad()
    def classify(
        self, images: ImageInput | Sequence[ImageInput], top_k: int = 5, return_cost: bool = False
    ) -> list[list[dict]] | list[dict]:
        """Per image, the `top_k` labels with their probabilities: `[[{"label": ..., "score": ...}, ...], ...]`.

        With `return_cost=True`, per image a dict: `top` (that list), `gflops` (the compute it took) and
        `backbones_run` (the names of the backbones it needed, in run order; fewer than all when a cascade let it
        stop early).
        """
        was_training = self.training
        self.eval()
        output = self(images=images)
        self.train(was_training)
        probs = output.logits.softmax(dim=-1)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        predictions = [
            [{"label": self.config.labels[i], "score": float(s)} for s, i in zip(scores, indices.tolist())]
            for scores, indices in zip(top.values, top.indices)
        ]
        if not return_cost:
            return predictions
        order = self.cascade.order if self.cascade is not None else list(range(len(self.backbones)))
        names = self.config.backbone_names
        return [
            {"top": top, "gflops": float(gflops), "backbones_run": [names[b] for b in order[: int(count)]]}
            for top, gflops, count in zip(predictions, output.gflops, output.num_backbones_run)
        ]


__all__ = [
    "CASCADE_WEIGHTS_NAME",
    "CLASS_HEAD_WEIGHTS_NAME",
    "CLIPEnsembleModel",
    "CLIPEnsembleOutput",
    "GATE_WEIGHTS_NAME",
]
