"""Saving and loading an ensemble: the config and the gate only (like a PEFT adapter), with the cascade and the
class head calibration kept beside it; backbones by reference. `CLIPEnsembleModel` takes these methods from
`GateFilesMixin`; every saved gate is read back through the one strict loader in `saved_gate`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
from huggingface_hub import CommitOperationAdd, HfApi

from .configuration_clip_ensemble import CLIPEnsembleConfig
from .modelcard import CardEvaluation, build_model_card
from .placement import load_backbones
from .saved_gate import (
    CASCADE_WEIGHTS_NAME,
    CLASS_HEAD_WEIGHTS_NAME,
    GATE_WEIGHTS_NAME,
    cascade_state,
    class_head_state,
    read_saved_gate,
    strict_state,
    write_weights,
)

_Model = TypeVar("_Model", bound="GateFilesMixin")


class GateFilesMixin:
    """`save_pretrained`, `push_to_hub`, `from_pretrained` and `load_gate` of `CLIPEnsembleModel`: the small files a
    calibrated ensemble is, written atomically and read back strictly."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        repo_id: str | None = None,
        evaluations: CardEvaluation | dict | Sequence[CardEvaluation | dict] = (),
        **_,
    ) -> None:
        """Write `config.json`, `gate.safetensors` (and `cascade.safetensors`, `class_head.safetensors` when there is a
        cascade or a class head) and a model card `README.md`; no backbone weight.

        `evaluations` (reports of `clip_ensemble.evaluate`) go into the card: the gate's results as model-index
        metadata, the table of every method as text.
        """
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"save_directory '{save_directory}' is a file; give a folder.")
        if isinstance(evaluations, dict) or not isinstance(evaluations, Sequence):
            evaluations = [evaluations]
        card = build_model_card(  # checks the evaluations before writing
            self.config, repo_id=repo_id, evaluations=evaluations, backbone_gflops=self.backbone_gflops
        )
        save_directory.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(save_directory)
        write_weights(self.gate.state_dict(), save_directory / GATE_WEIGHTS_NAME)
        cascade_file = save_directory / CASCADE_WEIGHTS_NAME
        if self.cascade is not None:
            write_weights(self.cascade.state_dict(), cascade_file)
        elif cascade_file.is_file():
            cascade_file.unlink()  # a cascade saved here before would not match this config
        head_file = save_directory / CLASS_HEAD_WEIGHTS_NAME
        if self.class_head is not None:
            write_weights(self.class_head.state_dict(), head_file)
        elif head_file.is_file():
            head_file.unlink()
        card.save(save_directory / "README.md")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload CLIP ensemble gate",
        create_pr: bool = False,
        evaluations: CardEvaluation | dict | Sequence[CardEvaluation | dict] = (),
    ):
        """Upload the config, the gate and the model card to `repo_id` (created if needed); returns the commit.

        `evaluations` (reports of `clip_ensemble.evaluate`) put the gate's results in the card's model-index.
        """
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, repo_id=repo_id, evaluations=evaluations)
            operations = [
                CommitOperationAdd(path_in_repo=file.name, path_or_fileobj=str(file))
                for file in sorted(Path(folder).iterdir())
            ]
            return api.create_commit(
                repo_id,
                operations=operations,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )

    @classmethod
    def from_pretrained(
        cls: type[_Model],
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        config: CLIPEnsembleConfig | None = None,
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        device_map: str | int | torch.device | dict | None = None,
        max_memory: dict | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        offload_folder: str | os.PathLike | None = None,
        **backbone_kwargs,
    ) -> _Model:
        """Load a saved ensemble: each backbone from its own repo at its pinned revision, then the gate, strictly.

        `device_map`, `max_memory`, `offload_folder` and `dtype` (alias `torch_dtype`) place the backbones as in
        `from_backbones`; other keyword arguments go to each backbone's `from_pretrained`.
        """
        # What AutoModel passes for the ensemble's own repo (and transformers' private keys such as `_from_auto`, which
        # a backbone's AutoModel sets itself) is not for the backbones.
        for hub_only in ("force_download", "proxies", "subfolder", "trust_remote_code"):
            backbone_kwargs.pop(hub_only, None)
        backbone_kwargs = {key: value for key, value in backbone_kwargs.items() if not key.startswith("_")}
        hub = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
        saved = read_saved_gate(pretrained_model_name_or_path, **hub)
        if config is None:
            config = CLIPEnsembleConfig.from_dict(dict(saved.config))
        backbones, placement, main = load_backbones(
            config.backbones,
            device_map=device_map,
            max_memory=max_memory,
            dtype=dtype,
            torch_dtype=torch_dtype,
            offload_folder=offload_folder,
            **backbone_kwargs,
        )
        model = cls(config, backbones)._place_gate(placement, main)
        what = f"The {GATE_WEIGHTS_NAME} of {saved.source}"
        model.gate.load_state_dict(strict_state(saved.gate_bytes, model.gate.state_dict(), what))
        if model.cascade is not None:
            model.cascade.load_state_dict(cascade_state(saved, config, config.cascade))
        if model.class_head is not None:
            head = class_head_state(saved, config)
            if head is None:
                raise ValueError(
                    f"The config has a class head but {saved.source} has none; load it without `config=`, or set "
                    "the config's class_head to None."
                )
            model.class_head.load_state_dict(head)
        model.eval()
        return model

    def load_gate(self, gate_file: str | os.PathLike) -> None:
        """Load gate weights strictly: missing, unexpected or mis-shaped tensors raise a `ValueError`."""
        data = Path(gate_file).read_bytes()
        self.gate.load_state_dict(strict_state(data, self.gate.state_dict(), f"The gate file '{gate_file}'"))


__all__ = ["GateFilesMixin"]
