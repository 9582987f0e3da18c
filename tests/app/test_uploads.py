"""What visitors type: labels and dataset ids, checked before anything runs."""

import pytest

from clip_ensemble.app.uploads import check_dataset_id, parse_labels


def test_labels_are_parsed_and_checked():
    assert parse_labels(" cat, dog \n\nbig bird,") == ["cat", "dog", "big bird"]
    with pytest.raises(ValueError, match=r"at least two labels.*\['cat'\]"):
        parse_labels("cat")
    with pytest.raises(ValueError, match=r"\['dog'\] are typed more than once"):
        parse_labels("dog, cat, dog")
    with pytest.raises(ValueError, match="3 labels typed; this takes at most 2"):
        parse_labels("a, b, c", max_labels=2)


def test_dataset_ids_never_name_server_paths(tmp_path, monkeypatch):
    assert check_dataset_id(" tanganke/eurosat ") == "tanganke/eurosat"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    builtin = ["imagefolder", "parquet", "arrow", "json", "csv", "text", "webdataset", "audiofolder"]
    urls = ["https://example.com/data.zip", "hf://datasets/org/name", "file:///etc/passwd", "s3://bucket/x"]
    paths = ["photos", "photos/cats", "/etc", "../secrets", "org/../x", "./photos", "data.json", ""]
    for name in [*builtin, *[f"{b}/x" for b in builtin], "eurosat", *urls, *paths]:
        with pytest.raises(ValueError, match="Hub dataset id"):
            check_dataset_id(name)
    # An operator's allow-list replaces the rule: only the listed ids.
    assert check_dataset_id("tanganke/eurosat", allowed=["tanganke/eurosat"]) == "tanganke/eurosat"
    with pytest.raises(ValueError, match=r"not one of the datasets this app serves: \['tanganke/eurosat'\]"):
        check_dataset_id("someone/else", allowed=["tanganke/eurosat"])
