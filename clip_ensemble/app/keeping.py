"""Keeping a session's gate: in the browser (a JSON payload), as a downloaded zip, on the Hub, and loaded back.

Every gate loaded here goes through the library's one strict loader (`clip_ensemble.models.saved_gate`); this module
adds only the app's own rules: file size caps, and that a gate must fit the backbones this server runs.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from ..models.modeling_clip_ensemble import CLIPEnsembleModel
from ..models.saved_gate import (
    GATE_WEIGHTS_NAME,
    SavedGate,
    check_fits,
    read_saved_gate,
)
from .sessions import SessionGate, same_labels
from .uploads import MAX_CONFIG_BYTES, MAX_GATE_FILE_BYTES, check_repo_id, parse_labels, split_labels
from .wording import recorded_verdict

GATE_FOLDER = "clip-ensemble-gate"
BROWSER_PAYLOAD_VERSION = 1
_FIX = (
    "Load a gate calibrated on these backbones, or calibrate a new one here; to use this gate, start the app with its "
    "backbones (`python app.py --backbones ...`)."
)


class GateKeeping:
    """The methods of `SharedEnsemble` that keep a session's gate (this class only groups them)."""

    model: CLIPEnsembleModel
    local_backbones: list[str]
    _initial_gate: dict[str, torch.Tensor]
    _session: Callable[[SessionGate, Sequence[str]], AbstractContextManager[CLIPEnsembleModel]]

    def to_browser(self, session: SessionGate, labels_text: str) -> dict:
        """What the browser keeps (JSON): the typed labels and, when calibrated, the gate with its record and report.

        The weights travel as base64 safetensors (about 700 kB for two 512-d backbones); `from_browser` checks them.
        """
        payload = {"version": BROWSER_PAYLOAD_VERSION, "labels_text": labels_text or ""}
        if session.calibrated:
            payload["gate"] = {
                "backbones": self._backbone_keys(),
                "weights": base64.b64encode(save_safetensors(session.weights)).decode("ascii"),
                "calibration": session.calibration,
                "report": session.report,
                "labels": session.labels,
                "source": session.source,
            }
            if session.cascade is not None:
                payload["gate"]["cascade"] = session.cascade
                payload["gate"]["cascade_weights"] = base64.b64encode(
                    save_safetensors(session.cascade_weights)
                ).decode()
            if session.class_head is not None:
                payload["gate"]["class_head"] = session.class_head
                payload["gate"]["class_head_weights"] = base64.b64encode(
                    save_safetensors(session.class_head_weights)
                ).decode()
        return payload

    def from_browser(self, payload) -> tuple[SessionGate, str | None, str]:
        """The gate and typed labels a browser kept, checked as strictly as an upload.

        Returns (gate, labels text or None, a message: empty, or why a kept gate could not be restored).
        """
        if not isinstance(payload, dict) or payload.get("version") != BROWSER_PAYLOAD_VERSION:
            return SessionGate(), None, ""
        labels_text = payload.get("labels_text") if isinstance(payload.get("labels_text"), str) else None
        kept = payload.get("gate")
        if not isinstance(kept, dict):
            return SessionGate(), labels_text, ""
        try:
            saved = SavedGate(
                {
                    "model_type": "clip_ensemble",
                    "backbones": [dict(entry) for entry in kept.get("backbones") or []],
                    "labels": kept.get("labels"),
                    "calibration": kept.get("calibration"),
                    "cascade": kept.get("cascade"),
                    "class_head": kept.get("class_head"),
                },
                base64.b64decode(kept.get("weights") or ""),
                base64.b64decode(kept["cascade_weights"]) if kept.get("cascade_weights") else None,
                "this browser",
                base64.b64decode(kept["class_head_weights"]) if kept.get("class_head_weights") else None,
            )
            fitting = check_fits(saved, self.model.config, self._initial_gate, _FIX, "the gate kept in this browser")
        except (ValueError, TypeError) as error:
            return SessionGate(), labels_text, f"The gate kept in this browser could not be restored: {error}"
        gate = SessionGate(
            fitting.weights,
            saved.calibration,
            str(kept.get("report") or ""),
            labels=saved.labels,
            source=str(kept.get("source") or ""),
            cascade=fitting.cascade,
            cascade_weights=fitting.cascade_weights,
            class_head=saved.class_head,
            class_head_weights=fitting.class_head_weights,
        )
        return gate, labels_text, ""

    def _backbone_keys(self) -> list[dict]:
        return [
            {"name_or_path": entry["name_or_path"], "revision": entry["revision"], "embed_dim": entry["embed_dim"]}
            for entry in self.model.config.backbones
        ]

    def load_gate(self, files: Sequence[str | Path] | None = None, repo_id: str | None = None) -> SessionGate:
        """A gate saved by this app or `save_pretrained`: the downloaded zip, its `config.json` + `gate.safetensors`,
        or a Hub repo id; checked strictly against the loaded backbones and gate."""
        files = [Path(f) for f in files or []]
        repo_id = (repo_id or "").strip()
        limits = {"max_config_bytes": MAX_CONFIG_BYTES, "max_weights_bytes": MAX_GATE_FILE_BYTES}
        if files and repo_id:
            raise ValueError("Give either files or a Hub repo id, not both.")
        if repo_id:
            repo_id = check_repo_id(repo_id)
            try:
                saved = read_saved_gate(repo_id, **limits)
            except Exception as error:
                if type(error) is ValueError:  # the loader's own word on the files; the Hub's errors are subclasses
                    raise
                raise ValueError(  # offline, not found, gated: the Hub raises many types
                    f"Could not download the gate from the Hub repo '{repo_id}': {type(error).__name__}. Check the id "
                    "(and that the repo is public); offline, upload the downloaded zip instead."
                ) from None
            source = f"loaded from the Hub repo {repo_id}"
        elif files:
            if len(files) > 1 and any(f.suffix.lower() == ".zip" for f in files):
                raise ValueError("Upload the downloaded gate zip alone, or the gate's files without a zip.")
            zipped = files[0].suffix.lower() == ".zip"
            saved = read_saved_gate(files[0] if zipped else files, **limits)
            source = f"loaded from {files[0].name}" if zipped else f"loaded from config.json and {GATE_WEIGHTS_NAME}"
        else:
            raise ValueError(
                "Upload the downloaded gate zip (or its config.json and gate.safetensors), or give a Hub repo id."
            )
        fitting = check_fits(saved, self.model.config, self._initial_gate, _FIX)
        calibration = saved.calibration
        report = recorded_verdict(calibration) + f"\n\nGate {source}."
        return SessionGate(
            fitting.weights,
            calibration,
            report,
            labels=saved.labels,
            source=source,
            cascade=fitting.cascade,
            cascade_weights=fitting.cascade_weights,
            class_head=saved.class_head,
            class_head_weights=fitting.class_head_weights,
        )

    def _require_calibrated(self, session: SessionGate) -> None:
        if not session.calibrated:
            raise ValueError(
                (session.expired + " " if session.expired else "")
                + "This session's gate is not calibrated yet: calibrate it first, then save it."
            )

    def _saved(self, session: SessionGate, labels_text: str, folder: Path, repo_id: str | None = None) -> None:
        """`save_pretrained` with the calibration's own labels; the card notes the current labels and local
        backbones."""
        current = split_labels(labels_text)
        labels = session.labels or parse_labels(labels_text)
        with self._session(session, labels) as model:
            if repo_id is None:
                model.save_pretrained(folder)
            else:
                model.save_pretrained(folder, repo_id=repo_id)
        notes = []
        if session.labels and current and not same_labels(current, session.labels):
            notes.append(
                f"- This gate was calibrated on the labels {', '.join(session.labels)} (saved as its labels, with "
                f"their calibration figures). In the app it was last used with other labels: {', '.join(current)}; "
                "the gate weighs backbones, not labels, so `model.set_labels([...])` serves any label set (a class head, "
                "if calibration kept one, serves its own labels only)."
            )
        if self.local_backbones:
            notes.append(
                f"- Warning: the backbones {', '.join(self.local_backbones)} were loaded from local folders of the "
                "machine that made this gate; others cannot load it unless they have the same folders at the same "
                "paths. Prefer Hub backbones to share a gate."
            )
        if notes:
            card = folder / "README.md"
            card.write_text(card.read_text() + "\n## Notes from the app\n\n" + "\n".join(notes) + "\n")

    def save_zip(self, session: SessionGate, labels_text: str, directory: str | Path) -> Path:
        """`directory/clip-ensemble-gate.zip`: the saved folder (config.json, the weights, README.md), which
        `CLIPEnsembleModel.from_pretrained` loads once unzipped and the app's "Load a gate" takes back."""
        self._require_calibrated(session)
        folder = Path(directory) / GATE_FOLDER
        self._saved(session, labels_text, folder)
        archive = shutil.make_archive(str(folder), "zip", root_dir=directory, base_dir=GATE_FOLDER)
        shutil.rmtree(folder)
        return Path(archive)

    def push(self, session: SessionGate, labels_text: str, repo_id: str, token: str, private: bool = True) -> str:
        """Push the session's gate to `repo_id` with the user's `token`; returns the commit URL.

        The token is used for this call only, and is kept out of every error message.
        """
        self._require_calibrated(session)
        repo_id, token = check_repo_id(repo_id, namespace_required=False), (token or "").strip()
        if not token:
            # Never fall back to a token of the server's (HF_TOKEN): the gate goes to the user's account.
            raise ValueError(
                "Paste a Hugging Face access token with write permission (huggingface.co/settings/tokens)."
            )
        from huggingface_hub import CommitOperationAdd, HfApi

        try:
            api = HfApi(token=token)
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            with tempfile.TemporaryDirectory() as folder:
                self._saved(session, labels_text, Path(folder), repo_id=repo_id)
                operations = [
                    CommitOperationAdd(path_in_repo=file.name, path_or_fileobj=str(file))
                    for file in sorted(Path(folder).iterdir())
                ]
                commit = api.create_commit(repo_id, operations=operations, commit_message="Upload CLIP ensemble gate")
        except Exception as error:  # any Hub or network failure: report it without the token
            message = str(error).replace(token, "***")
            raise ValueError(
                f"Pushing to '{repo_id}' failed: {message}. Check that the token has write permission and that "
                "the repo name is yours or your organisation's."
            ) from None
        return commit.commit_url


__all__ = ["BROWSER_PAYLOAD_VERSION", "GATE_FOLDER", "GateKeeping"]
