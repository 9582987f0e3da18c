import pytest

from clip_ensemble import CLIPEnsembleConfig


def test_config_normalises_backbones_and_labels():
    config = CLIPEnsembleConfig(backbones=["org/a", {"name_or_path": "org/b", "revision": "v1"}], labels=["cat", "dog"])
    assert config.backbones[0] == {"name_or_path": "org/a", "revision": None, "embed_dim": None}
    assert config.backbones[1]["revision"] == "v1"
    assert config.id2label == {0: "cat", 1: "dog"} and config.label2id == {"cat": 0, "dog": 1}
    assert config.num_backbones == 2 and len(config.template_list) == 7


def test_config_round_trips_through_json(tmp_path):
    config = CLIPEnsembleConfig(backbones=["org/a"], labels=["cat", "dog"], templates=["a {}."], combination="softmax")
    config.save_pretrained(tmp_path)
    loaded = CLIPEnsembleConfig.from_pretrained(tmp_path)
    assert loaded.backbones == config.backbones and loaded.labels == ["cat", "dog"]
    assert loaded.templates == ["a {}."] and loaded.combination == "softmax" and loaded.id2label == {0: "cat", 1: "dog"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbones": [], "labels": ["cat"]}, "`backbones` is empty"),
        ({"backbones": ["org/a", "org/a"], "labels": ["cat"]}, "same backbone twice"),
        ({"backbones": [{"revision": "x"}], "labels": ["cat"]}, "no 'name_or_path'"),
        ({"backbones": ["org/a"], "labels": []}, "`labels` is empty"),
        ({"backbones": ["org/a"], "labels": ["cat", " "]}, "empty label"),
        ({"backbones": ["org/a"], "labels": ["cat", "dog", "cat"]}, r"\['cat'\] appear more than once"),
        ({"backbones": ["org/a"], "labels": ["cat"], "templates": ["a photo"]}, "must contain '{}'"),
        ({"backbones": ["org/a"], "labels": ["cat"], "templates": "nope"}, "Unknown template set 'nope'"),
        ({"backbones": ["org/a"], "labels": ["cat"], "combination": "max"}, "combination='max' is not supported"),
        ({"backbones": ["org/a"], "labels": ["cat"], "gate_hidden_size": 0}, "gate_hidden_size=0"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CLIPEnsembleConfig(**kwargs)


def test_config_rejects_backbone_of_wrong_type():
    with pytest.raises(TypeError, match=r"backbones\[0\] must be a repo id"):
        CLIPEnsembleConfig(backbones=[3], labels=["cat"])
