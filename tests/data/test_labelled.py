import datasets
import numpy as np
import pytest
from PIL import Image

from clip_ensemble import from_hub_dataset, from_image_folder, from_lists, sample_few_shot
from clip_ensemble.data.labelled import load_labelled_data


def _image(value: int) -> Image.Image:
    return Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8))


def test_from_lists_with_names_and_indices():
    data = from_lists([_image(i) for i in range(3)], ["dog", "cat", "dog"])
    assert data.label_names == ["cat", "dog"] and data.labels == [1, 0, 1]
    data = from_lists([_image(i) for i in range(2)], [1, 0], label_names=["a", "b"])
    assert data.counts() == {"a": 1, "b": 1}
    with pytest.raises(ValueError, match=r"Labels \['fish'\] are not in label_names"):
        from_lists([_image(0)], ["fish"], label_names=["a"])
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        from_lists([_image(0), _image(1)], ["a"])


def test_from_image_folder(tmp_path):
    for name, n in (("cat", 2), ("dog", 3)):
        (tmp_path / name).mkdir()
        for i in range(n):
            _image(i).save(tmp_path / name / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    data = from_image_folder(tmp_path)
    assert data.label_names == ["cat", "dog"] and data.counts() == {"cat": 2, "dog": 3}
    assert load_labelled_data(str(tmp_path)).counts() == data.counts()
    with pytest.raises(ValueError, match="holds no images in class sub-folders"):
        from_image_folder(tmp_path / "cat")


def test_from_hub_dataset_detects_columns_and_class_names():
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b"])})
    dataset = datasets.Dataset.from_dict({"img": [_image(0), _image(1)], "fine_label": [1, 0]}, features=features)
    data = from_hub_dataset(dataset)
    assert data.label_names == ["a", "b"] and data.labels == [1, 0]
    assert isinstance(data.images[0], Image.Image)
    dataset_dict = datasets.DatasetDict({"test": dataset})
    assert from_hub_dataset(dataset_dict, split="test").labels == [1, 0]
    with pytest.raises(ValueError, match=r"Split 'train' not found; the dataset has the splits \['test'\]"):
        from_hub_dataset(dataset_dict, split="train")


def test_from_hub_dataset_names_missing_columns():
    dataset = datasets.Dataset.from_dict({"photo": [_image(0)], "y": ["a"]})
    with pytest.raises(ValueError, match=r"expected one of \['image'.*only the columns \['photo', 'y'\]"):
        from_hub_dataset(dataset)
    data = from_hub_dataset(dataset, image_column="photo", label_column="y")
    assert data.label_names == ["a"]
    with pytest.raises(ValueError, match="image column 'pic' not found"):
        from_hub_dataset(dataset, image_column="pic")


def test_sample_few_shot_is_stratified_and_seeded():
    data = from_lists([_image(i) for i in range(30)], [i % 3 for i in range(30)], label_names=["a", "b", "c"])
    picked = sample_few_shot(data, shots=4, seed=0)
    assert len(picked) == 12 and [data.labels[i] for i in picked] == [0] * 4 + [1] * 4 + [2] * 4
    assert picked == sample_few_shot(data, shots=4, seed=0)
    assert picked != sample_few_shot(data, shots=4, seed=1)


def test_sample_few_shot_names_the_short_class():
    data = from_lists([_image(i) for i in range(7)], ["cat"] * 3 + ["dog"] * 4)
    with pytest.raises(ValueError, match=r"shots=4 but class 'cat' has only 3 images in 'lists'; lower `shots`"):
        sample_few_shot(data, shots=4)
    with pytest.raises(ValueError, match="shots=0"):
        sample_few_shot(data, shots=0)
