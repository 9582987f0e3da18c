"""spaces/: the Space's YAML header and requirements agree with the app and the package."""

from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from clip_ensemble.backbones.hub_configs import backbone_entries

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_the_space_header_runs_app_py_with_the_default_backbones():
    import app

    text = (REPO / "spaces" / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["sdk"] == "gradio" and (REPO / header["app_file"]).is_file()
    gradio = next(Requirement(r) for r in _pyproject()["optional-dependencies"]["app"] if r.startswith("gradio"))
    assert Version(header["sdk_version"]) in gradio.specifier
    assert len(header["short_description"]) <= 60  # the Hub's limit
    assert app.DEFAULT_BACKBONES == ["small-cpu"]
    defaults = [entry["name_or_path"] for entry in backbone_entries("small-cpu")]
    assert header["models"] == defaults and header["preload_from_hub"] == defaults


def test_the_space_requirements_are_the_packages_dependencies():
    """A Space installs requirements.txt, not the package: it must list what pyproject.toml does (gradio comes
    with the SDK image)."""
    lines = (REPO / "spaces" / "requirements.txt").read_text().splitlines()
    listed = {str(Requirement(line)) for line in lines if line.strip() and not line.startswith(("#", "--"))}
    app_extra = [r for r in _pyproject()["optional-dependencies"]["app"] if not r.startswith("gradio")]
    assert listed == {str(Requirement(r)) for r in [*_pyproject()["dependencies"], *app_extra]}
