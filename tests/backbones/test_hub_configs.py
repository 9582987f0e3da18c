"""The curated backbone sets in hub_configs/: every file validates, bad files get errors that name the problem."""

import json
from pathlib import Path

import pytest

from clip_ensemble import CLIPEnsembleConfig
from clip_ensemble.backbones.hub_configs import (
    CONFIG_DIR,
    backbone_entries,
    format_config_table,
    list_configs,
    load_hub_config,
    resolve_backbones,
)

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "hub_configs"
PAPER_BACKBONES = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]


def test_the_package_ships_the_top_level_hub_configs():
    assert CONFIG_DIR.resolve() == REPO_CONFIGS
    assert list_configs() == sorted(path.stem for path in REPO_CONFIGS.glob("*.json"))
    assert {"openai-vit", "paper-openai-9", "laion-vit", "siglip", "small-cpu"} <= set(list_configs())


@pytest.mark.parametrize("name", list_configs())
def test_every_set_validates_and_builds_an_ensemble_config(name):
    config = load_hub_config(name)
    assert config["name"] == name and config["description"] and config["sources"]
    entries = backbone_entries(name)
    assert [set(entry) for entry in entries] == [{"name_or_path", "revision"}] * len(config["backbones"])
    # The entries are what `from_backbones` and the config take.
    assert CLIPEnsembleConfig(backbones=entries, labels=["cat"]).num_backbones == len(entries)


def test_the_paper_set_is_its_nine_openai_backbones():
    backbones = load_hub_config("paper-openai-9")["backbones"]
    assert [entry["profile"] for entry in backbones] == PAPER_BACKBONES
    assert [entry["name_or_path"] for entry in backbones[:5]] == [
        f"hf-hub:timm/{name}_clip.openai"
        for name in ("resnet50", "resnet101", "resnet50x4", "resnet50x16", "resnet50x64")
    ]
    assert backbones[5:] == load_hub_config("openai-vit")["backbones"]


def test_config_table_lists_every_set_with_its_totals():
    table = format_config_table()
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["set", "backbones"] and len(lines) == 1 + len(list_configs())
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    small = load_hub_config("small-cpu")["backbones"]
    assert rows["small-cpu"][1:4] == ["2", f"{sum(b['params_millions'] for b in small):.1f}", "17.6"]
    # The extra column: only sets with OpenCLIP backbones need it.
    assert rows["paper-openai-9"][4] == "[open-clip]" and rows["small-cpu"][4] != "[open-clip]"


def test_config_table_of_one_set_lists_its_backbones():
    table = format_config_table("openai-vit")
    assert table.startswith("openai-vit: ")
    for entry in load_hub_config("openai-vit")["backbones"]:
        assert entry["name_or_path"] in table
    assert "587.9" in table.splitlines()[-3]  # the total line: 8.82 + 35.13 + 162.03 + 381.92


def write_set(folder: Path, backbones, **fields) -> Path:
    path = folder / "custom.json"
    path.write_text(json.dumps({"description": "d", "sources": "s", "backbones": backbones, **fields}))
    return path


GOOD = {"name_or_path": "org/a", "revision": "main", "license": "mit", "params_millions": 1.5, "image_gflops": 2}


def test_a_set_file_outside_the_package_loads_by_path(tmp_path):
    unknown = {**GOOD, "name_or_path": "org/b", "image_gflops": None, "note": "not in any public table"}
    path = write_set(tmp_path, [GOOD, unknown])
    assert backbone_entries(path) == [
        {"name_or_path": "org/a", "revision": "main"},
        {"name_or_path": "org/b", "revision": "main"},
    ]
    assert "n/a" in format_config_table(path).splitlines()[-3]


def test_unknown_set_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"Unknown backbone set 'openai-vits'; choose one of \['laion-vit', "):
        load_hub_config("openai-vits")


@pytest.mark.parametrize(
    ("backbones", "message"),
    [
        ([{k: v for k, v in GOOD.items() if k != "license"}], r"backbones\[0\] \('org/a'\) has no field 'license'"),
        (
            [GOOD, {**GOOD, "name_or_path": "org/b", "gflops": 3}],
            r"backbones\[1\] \('org/b'\) has an unknown field 'gflops'",
        ),
        ([{**GOOD, "image_gflops": "ten"}], r"field 'image_gflops' must be a number or null, got 'ten'"),
        ([{**GOOD, "params_millions": True}], r"field 'params_millions' must be a number or null"),
        ([{**GOOD, "params_millions": None}], r"params_millions is null; add a 'note'"),
        ([GOOD, GOOD], r"lists \['org/a'\] more than once"),
        ([], "lists no backbones"),
        (["org/a"], r"backbones\[0\] must be a JSON object"),
    ],
)
def test_bad_backbone_entries_name_the_file_entry_and_field(tmp_path, backbones, message):
    path = write_set(tmp_path, backbones)
    with pytest.raises(ValueError, match=message) as error:
        load_hub_config(path)
    assert str(path) in str(error.value)


def test_bad_set_files_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="No backbone set file at"):
        load_hub_config(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"description": ')
    with pytest.raises(ValueError, match="broken.json' is not valid JSON"):
        load_hub_config(broken)
    no_sources = tmp_path / "no_sources.json"
    no_sources.write_text(json.dumps({"description": "d", "backbones": [GOOD]}))
    with pytest.raises(ValueError, match="no_sources.json' has no field 'sources'"):
        load_hub_config(no_sources)


def test_resolve_backbones_takes_a_set_name_a_set_file_or_repo_ids(tmp_path):
    assert resolve_backbones(["small-cpu"]) == backbone_entries("small-cpu")
    set_file = tmp_path / "mine.json"
    set_file.write_text((REPO_CONFIGS / "small-cpu.json").read_text())
    assert resolve_backbones([str(set_file)]) == backbone_entries("small-cpu")
    assert resolve_backbones(["org/clip", str(tmp_path)]) == ["org/clip", str(tmp_path)]
