"""OpenCLIP backbones (the `[open-clip]` extra): `hf-hub:org/name` repos, e.g. the paper's OpenAI ResNets, and
`local-dir:/path` folders in the same layout (`open_clip_config.json` + `open_clip_model.safetensors`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import torch
from huggingface_hub import snapshot_download
from PIL import Image
from safetensors import safe_open
from torch import nn

from .base import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, Backbone

CONFIG_NAME = "open_clip_config.json"
# Only safetensors weights are loaded: a `.bin` checkpoint would be unpickled.
WEIGHTS_NAME = "open_clip_model.safetensors"
# From an hf-hub repo: the config, the weights and any tokenizer files (HF tokenizers read them from the folder),
# but none of the other checkpoints a repo may also hold (timm's image-only weights, pickled copies).
_SNAPSHOT_FILES = [CONFIG_NAME, WEIGHTS_NAME, "*token*", "vocab*", "merges.txt", "*.model"]
# transformers' `dtype` keyword as OpenCLIP's `precision`: the whole model in that dtype, as transformers does.
_PRECISIONS = {torch.float32: "fp32", torch.float16: "pure_fp16", torch.bfloat16: "pure_bf16"}
# Tensor types in safetensors headers.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def import_open_clip() -> ModuleType:
    """The `open_clip` module, imported on first use so that the base package does not need it."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            f"OpenCLIP backbones ('{HF_HUB_PREFIX}...' or '{LOCAL_DIR_PREFIX}...' ids) need open_clip_torch: "
            'pip install "clip-ensemble[open-clip]"'
        ) from error
    return open_clip


def _check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """transformers' `dtype` keyword for OpenCLIP: None, or one of the dtypes of `_PRECISIONS`."""
    if dtype is None:
        return None
    dtype = getattr(torch, dtype, dtype) if isinstance(dtype, str) else dtype  # "float16" -> torch.float16
    if dtype not in _PRECISIONS:
        raise ValueError(f"dtype={dtype!r} is not supported by OpenCLIP backbones; use one of {list(_PRECISIONS)}.")
    return dtype


def _resolve_folder(name_or_path: str, revision: str | None) -> tuple[Path, str | None]:
    """The local folder holding the model's files, and the revision to record (the commit, for a Hub repo)."""
    if name_or_path.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name_or_path[len(LOCAL_DIR_PREFIX) :]).expanduser()
        if not folder.is_dir():
            raise ValueError(f"Backbone '{name_or_path}': no folder at '{folder}'; check the path after 'local-dir:'.")
        return folder, revision
    if not name_or_path.startswith(HF_HUB_PREFIX):
        raise ValueError(
            f"Backbone '{name_or_path}' is not an OpenCLIP id; start it with '{HF_HUB_PREFIX}' (a Hub repo) or "
            f"'{LOCAL_DIR_PREFIX}' (a folder)."
        )
    repo_id = name_or_path[len(HF_HUB_PREFIX) :]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_SNAPSHOT_FILES))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Backbone '{name_or_path}' (revision {revision or 'main'}) could not be downloaded: {error}\n"
            "Check the repo id (OpenCLIP repos hold an open_clip_config.json); for a gated or private repo log in "
            "with `hf auth login`; offline, pass 'local-dir:' and a folder in the same layout."
        ) from error
    # Hub cache layout: .../models--org--name/snapshots/<commit>
    return folder, folder.name if folder.parent.name == "snapshots" else revision


class OpenCLIPBackbone(Backbone):
    """An OpenCLIP model with its own preprocessing and tokenizer (ResNets, ViTs, SigLIP, ... from `hf-hub:` ids).

    `encode_images` and `encode_texts` return L2-normalised float32 embeddings of shape (batch, embed_dim).
    """

    def __init__(
        self,
        model: nn.Module,
        transform,
        tokenizer,
        embed_dim: int,
        name_or_path: str,
        revision: str | None = None,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.transform = transform  # one PIL image -> (3, H, W)
        self.tokenizer = tokenizer  # list[str] -> (batch, context_length) token ids
        self._embed_dim = embed_dim
        self.name_or_path = name_or_path
        self.revision = revision
        self.folder: Path | None = None  # where the files were loaded from; set by from_pretrained

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, **model_kwargs) -> OpenCLIPBackbone:
        """Load from `hf-hub:org/name` (at `revision`) or `local-dir:/path`.

        `dtype` (float32, float16 or bfloat16) selects OpenCLIP's precision; other keyword arguments go to
        `open_clip.create_model_from_pretrained` (e.g. `device`).
        """
        open_clip = import_open_clip()
        folder, pinned = _resolve_folder(name_or_path, revision)
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
        if missing:
            raise ValueError(
                f"Backbone '{name_or_path}' has no {' and no '.join(missing)} in '{folder}'. An OpenCLIP backbone needs "
                f"{CONFIG_NAME} and {WEIGHTS_NAME} (safetensors only: pickled .bin weights are never loaded); "
                "convert a .bin checkpoint with safetensors.torch.save_file."
            )
        dtype = _check_dtype(model_kwargs.pop("dtype", None))
        if dtype is not None:
            model_kwargs["precision"] = _PRECISIONS[dtype]
        local_id = f"{LOCAL_DIR_PREFIX}{folder}"
        model, transform = open_clip.create_model_from_pretrained(local_id, **model_kwargs)
        model_cfg = json.loads((folder / CONFIG_NAME).read_text())["model_cfg"]
        tokenizer = open_clip.get_tokenizer(local_id)
        backbone = cls(model, transform, tokenizer, int(model_cfg["embed_dim"]), name_or_path, pinned)
        backbone.folder = folder
        return backbone

    @classmethod
    def weight_bytes(cls, name_or_path: str, revision: str | None = None, dtype: torch.dtype | None = None) -> int:
        """Bytes of the weights in `dtype` (default float32, OpenCLIP's), from the safetensors header: no tensor is
        read."""
        dtype = _check_dtype(dtype) or torch.float32
        folder, _ = _resolve_folder(name_or_path, revision)
        if not (folder / WEIGHTS_NAME).is_file():
            raise ValueError(f"Backbone '{name_or_path}' has no {WEIGHTS_NAME} in '{folder}'.")
        total = 0
        with safe_open(folder / WEIGHTS_NAME, framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118
                tensor = weights.get_slice(name)
                stored = _SAFETENSORS_DTYPES[tensor.get_dtype()]
                # Floating weights are cast to `dtype` on load; integer buffers keep their type.
                itemsize = dtype.itemsize if stored.is_floating_point else stored.itemsize
                total += math.prod(tensor.get_shape()) * itemsize
        return total

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def logit_scale(self) -> float:
        with self.onloaded():
            return float(self.model.logit_scale.exp())

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> pixel values (batch, 3, height, width) with OpenCLIP's resizing and normalisation."""
        return torch.stack([self.transform(image) for image in images])

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.device, self.dtype)
        with self.onloaded():
            features = self.model.encode_image(pixel_values)
        return nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        with self.onloaded():
            features = self.model.encode_text(tokens)
        return nn.functional.normalize(features.float(), dim=-1)

    def cache_key(self) -> dict:
        """What determines this backbone's image embeddings; the feature cache hashes it."""
        key = {
            "library": "open_clip",
            "name_or_path": self.name_or_path,
            "revision": self.revision,
            "preprocessing": repr(self.transform),
            "dtype": str(self.dtype),
        }
        if self.folder is not None:
            key["config"] = json.loads((self.folder / CONFIG_NAME).read_text())
            weights = (self.folder / WEIGHTS_NAME).stat()
            key["weights"] = (weights.st_size, weights.st_mtime_ns)  # a local folder has no commit to pin
        return key


__all__ = ["CONFIG_NAME", "OpenCLIPBackbone", "WEIGHTS_NAME", "import_open_clip"]
