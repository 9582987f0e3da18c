"""Device placement: planning whole backbones against max_memory, offloading, dtypes, and running per device."""

import gc
import math
import threading

import pytest
import torch
from accelerate.utils import compute_module_sizes

from clip_ensemble import CLIPEnsembleModel
from clip_ensemble.backbones.transformers_backbone import TransformersBackbone
from clip_ensemble.models.placement import (
    backbone_size,
    main_device,
    normalize_device,
    offload_backbone,
    plan_placement,
    run_per_device,
)

LABELS = ["cat", "dog", "bird"]
# bfloat16 keeps 8 significant bits: each rounding is off by at most u = 2^-8 relative.
BF16_UNIT_ROUNDOFF = 2.0**-8


@pytest.fixture(scope="module")
def reference(backbone_dirs):
    """The ensemble loaded plainly, in float32 on the CPU, and its logits on fixed images."""
    return CLIPEnsembleModel.from_backbones(backbone_dirs, labels=LABELS).eval()


def logits(model, images) -> torch.Tensor:
    with torch.no_grad():
        return model(images=images).logits


# Planning (a pure function of sizes, device_map and max_memory).


def test_sequential_fills_devices_in_order():
    budget = {0: 10, 1: 10, "cpu": 100}
    assert plan_placement([4, 4, 4], "sequential", budget) == [0, 0, 1]
    assert plan_placement([8, 4, 2], "sequential", budget) == [0, 1, 0]  # each to the first device with room


def test_balanced_puts_the_biggest_first_on_the_emptiest_accelerator():
    budget = {0: 10, 1: 10, "cpu": 100}
    # 6 -> 0 (tie: lowest index), 5 -> 1, 2 -> 1 (5 left vs 4), 1 -> 0 (4 left vs 3)
    assert plan_placement([2, 6, 5, 1], "balanced", budget) == [1, 0, 1, 0]
    assert plan_placement([2, 6, 5, 1], "auto", budget) == [1, 0, 1, 0]
    assert plan_placement([3, 3], "auto", {"cpu": 10}) == ["cpu", "cpu"]


def test_offloaded_backbones_get_room_on_the_main_device():
    # [0, 1, 'cpu'] would leave GPU 0 no room to run the offloaded third backbone: GPU 0 keeps 6 free for it.
    assert plan_placement([6, 6, 6], "sequential", {0: 10, 1: 10, "cpu": 100}) == [1, "cpu", "cpu"]
    # CPU only: a disk backbone is brought whole into CPU memory to run, so the CPU keeps room for the largest.
    placement = plan_placement([4, 8, 3], "auto", {"cpu": 10, "disk": math.inf})
    assert placement == ["disk", "disk", "disk"]  # keeping any on the CPU would need more than 10 with the room
    assert plan_placement([4, 3], "auto", {"cpu": 10, "disk": math.inf}) == ["cpu", "cpu"]
    assert main_device([1, "cpu"], {0: 10, 1: 10, "cpu": 100}) == 0


def test_single_device_and_per_backbone_maps():
    names = ["org/a", "org/b", "org/c"]
    assert plan_placement([1, 2, 3], "cpu") == ["cpu"] * 3
    assert plan_placement([1, 2], torch.device("cuda", 1)) == [1, 1]
    assert plan_placement([1, 2, 3], {0: "cuda:1", "org/b": 0, 2: "disk"}, names=names) == [1, 0, "disk"]
    assert main_device([1, 0, "disk"]) == 0 and main_device(["cpu", "disk"]) == "cpu"
    with pytest.raises(ValueError, match=r"does not place the backbones 1 'org/b', 2 'org/c'; add them"):
        plan_placement([1, 2, 3], {0: "cpu"}, names=names)
    with pytest.raises(ValueError, match=r"key 'org/z' is not a backbone: use an index 0..2 or one of the names"):
        plan_placement([1, 2, 3], {"org/z": "cpu"}, names=names)
    with pytest.raises(ValueError, match="listed twice: use the index"):
        plan_placement([1, 2], {"org/a": "cpu"}, names=["org/a", "org/a"])
    with pytest.raises(ValueError, match="places backbone 0 'org/a' twice"):
        plan_placement([1, 2, 3], {0: "cpu", "org/a": "cpu", 1: "cpu", 2: "cpu"}, names=names)


def test_normalize_device():
    assert [normalize_device(d) for d in (0, "cuda:2", torch.device("cuda"), "cpu", "mps", "disk")] == [
        0,
        2,
        0,
        "cpu",
        "mps",
        "disk",
    ]
    with pytest.raises(ValueError, match="'everywhere' is not a device"):
        normalize_device("everywhere")
    with pytest.raises(ValueError, match="numbered from 0"):
        normalize_device(-1)
    with pytest.raises(ValueError, match="'meta' holds no weights"):
        normalize_device("meta")


def test_budget_errors_say_how_much_memory_is_needed_and_the_fix():
    with pytest.raises(ValueError, match=r"Backbone 1 'big' needs 30 bytes .* Raise max_memory, pass offload_folder"):
        plan_placement([10, 30], "auto", {"cpu": 20}, names=["small", "big"])
    # With disk allowed it is offloaded, but it must still fit on the CPU to run.
    with pytest.raises(ValueError, match=r"brought whole to 'cpu' .* Raise max_memory\['cpu'\] to at least 30 bytes"):
        plan_placement([10, 30], "auto", {"cpu": 20, "disk": math.inf}, names=["small", "big"])
    assert plan_placement([10, 30], "auto", {"cpu": "40KiB"}) == ["cpu", "cpu"]


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="needs max_memory"):
        plan_placement([1], "auto")
    with pytest.raises(ValueError, match="explicit device_map dict is used as given: drop max_memory"):
        plan_placement([1], {0: "cpu"}, {"cpu": 10})
    with pytest.raises(ValueError, match="puts every backbone on one device: drop max_memory"):
        plan_placement([1], "cpu", {"cpu": 10})
    with pytest.raises(ValueError, match="not in a valid format"):
        plan_placement([1], "auto", {"cpu": "lots"})
    with pytest.raises(ValueError, match=r"max_memory\['cpu'\] = -1"):
        plan_placement([1], "auto", {"cpu": -1})
    with pytest.raises(ValueError, match="names no device to compute on"):
        plan_placement([1], "auto", {"disk": math.inf})


# Running backbones per device.


def test_run_per_device_keeps_order_and_runs_devices_side_by_side():
    threads: dict[int, str] = {}
    both_started = threading.Barrier(2, timeout=10)  # broken (an error) unless the two devices' work overlaps

    def work(index: int) -> int:
        threads[index] = threading.current_thread().name
        if index in (0, 1):
            both_started.wait()
        return 10 * index

    # "meta" stands in for a second accelerator: each device's backbones in order, the devices at the same time.
    devices = [torch.device("meta"), torch.device("cpu"), torch.device("meta"), torch.device("cpu")]
    assert run_per_device(work, devices) == [0, 10, 20, 30]
    assert threads[0] == threads[2] != threads[1] == threads[3]


def test_run_per_device_on_the_cpu_runs_in_turn_in_the_calling_thread():
    threads = []

    def work(index: int) -> int:
        threads.append(threading.current_thread().name)
        return 10 * index

    assert run_per_device(work, [torch.device("cpu")] * 3) == [0, 10, 20]
    assert threads == [threading.current_thread().name] * 3


# Loading with a device_map, on the CPU.


def test_sizes_are_measured_without_loading(backbone_dirs):
    loaded = TransformersBackbone.from_pretrained(backbone_dirs[1])
    assert backbone_size({"name_or_path": backbone_dirs[1]}) == compute_module_sizes(loaded.model)[""]
    assert backbone_size(loaded) == compute_module_sizes(loaded.model)[""]
    # bfloat16 halves the floating weights; the int64 position ids keep their size.
    half = backbone_size({"name_or_path": backbone_dirs[1]}, torch.bfloat16)
    assert half < backbone_size(loaded) / 2 + 2_000


def test_per_backbone_device_map_gives_the_same_logits(backbone_dirs, reference, images, tmp_path):
    device_map = {0: "cpu", backbone_dirs[1]: "disk", 2: "cpu"}
    model = CLIPEnsembleModel.from_backbones(
        backbone_dirs, labels=LABELS, device_map=device_map, offload_folder=tmp_path
    ).eval()
    assert model.hf_device_map == {"gate": "cpu", "backbones.0": "cpu", "backbones.1": "disk", "backbones.2": "cpu"}
    offloaded = model.backbones[1]
    assert offloaded.device == torch.device("cpu")
    assert {p.device.type for p in offloaded.model.parameters()} == {"meta"}  # weights stay on disk between calls
    (folder,) = tmp_path.iterdir()
    assert (folder / "index.json").is_file()
    torch.testing.assert_close(logits(model, images), logits(reference, images), rtol=0, atol=0)

    del model, offloaded
    gc.collect()
    assert list(tmp_path.iterdir()) == []  # the offload files went with the model; the folder itself is kept


def test_weights_held_in_cpu_memory_and_brought_to_the_execution_device(backbone_dirs, reference, images):
    """The path of a backbone on 'cpu' beside an accelerator: weights in CPU memory, moved whole for each call."""
    model = CLIPEnsembleModel.from_backbones(backbone_dirs, labels=LABELS).eval()
    for backbone in model.backbones:
        offload_backbone(backbone, torch.device("cpu"))
        assert {p.device.type for p in backbone.model.parameters()} == {"meta"}
    torch.testing.assert_close(logits(model, images), logits(reference, images), rtol=0, atol=0)
    model.set_labels(["car", "boat"])  # text towers run offloaded too
    assert logits(model, images).shape == (4, 2)


def test_too_small_max_memory_offloads_to_disk_with_the_same_logits(backbone_dirs, reference, images, tmp_path):
    sizes = [backbone_size({"name_or_path": d}) for d in backbone_dirs]
    # Room for the largest only: the others go to disk and run in that room, one at a time.
    model = CLIPEnsembleModel.from_backbones(
        backbone_dirs, labels=LABELS, device_map="auto", max_memory={"cpu": max(sizes)}, offload_folder=tmp_path
    ).eval()
    assert "disk" in model.hf_device_map.values()
    torch.testing.assert_close(logits(model, images), logits(reference, images), rtol=0, atol=0)


def test_too_small_max_memory_without_offload_folder_says_what_is_needed(backbone_dirs):
    sizes = [backbone_size({"name_or_path": d}) for d in backbone_dirs]
    with pytest.raises(ValueError, match=rf"needs {max(sizes)} bytes .* pass offload_folder"):
        CLIPEnsembleModel.from_backbones(backbone_dirs, labels=LABELS, device_map="auto", max_memory={"cpu": 1000})
    with pytest.raises(ValueError, match=r"to at least \d+ bytes"):
        CLIPEnsembleModel.from_backbones(
            backbone_dirs, labels=LABELS, device_map="sequential", max_memory={"cpu": "10KiB"}, offload_folder="x"
        )
    with pytest.raises(ValueError, match="pass device_map='auto' with them"):
        CLIPEnsembleModel.from_backbones(backbone_dirs, labels=LABELS, max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match=r"placed on 'disk'; pass offload_folder"):
        CLIPEnsembleModel.from_backbones(backbone_dirs, labels=LABELS, device_map="disk")


def test_bfloat16_on_cpu_is_close_to_float32(backbone_dirs, reference, images):
    model = CLIPEnsembleModel.from_backbones(backbone_dirs, labels=LABELS, torch_dtype="bfloat16").eval()
    assert all(backbone.dtype == torch.bfloat16 for backbone in model.backbones)
    assert model.gate.fc1.weight.dtype == torch.float32  # the gate and its inputs stay float32
    with torch.no_grad():
        low, high = model(images=images), reference(images=images)
    # Unit-norm embeddings and heads off by at most 4u each (measured: under 2u), and the logit scale rounded to
    # bfloat16 (u): |s'e'.w' - s e.w| <= s (u + |e' - e| + |w' - w|) <= 9 u s for every logit.
    for b in range(len(backbone_dirs)):
        assert (low.image_embeds[b] - high.image_embeds[b]).norm(dim=-1).max() <= 4 * BF16_UNIT_ROUNDOFF
        assert (model.zero_shot_heads[b] - reference.zero_shot_heads[b]).norm(dim=-1).max() <= 4 * BF16_UNIT_ROUNDOFF
        bound = 9 * BF16_UNIT_ROUNDOFF * reference.logit_scales[b]
        assert (low.per_backbone_logits[:, b] - high.per_backbone_logits[:, b]).abs().max() <= bound
    with pytest.raises(ValueError, match="disagree; pass only `dtype`"):
        CLIPEnsembleModel.from_backbones(backbone_dirs, labels=LABELS, dtype="float16", torch_dtype="bfloat16")
    with pytest.raises(ValueError, match="not a floating-point torch dtype"):
        CLIPEnsembleModel.from_backbones(backbone_dirs, labels=LABELS, dtype="int8")


def test_from_pretrained_places_the_backbones(backbone_dirs, reference, images, tmp_path):
    reference.save_pretrained(tmp_path / "gate")
    model = CLIPEnsembleModel.from_pretrained(
        tmp_path / "gate", device_map={0: "cpu", 1: "cpu", 2: "disk"}, offload_folder=tmp_path / "offload"
    )
    assert model.hf_device_map["backbones.2"] == "disk"
    torch.testing.assert_close(logits(model, images), logits(reference, images), rtol=0, atol=0)
    half = CLIPEnsembleModel.from_pretrained(tmp_path / "gate", device_map="auto", torch_dtype=torch.bfloat16)
    assert half.backbones[0].dtype == torch.bfloat16 and set(half.hf_device_map.values()) == {"cpu"}


def test_open_clip_backbone_offloads_whole(backbone_dirs, images, tmp_path):
    """OpenCLIP's text tower reads weights outside its submodules' forward: the whole-model hook brings them too."""
    pytest.importorskip("open_clip")
    from clip_ensemble.tasks import save_tiny_open_clip_resnet

    resnet = f"local-dir:{save_tiny_open_clip_resnet(tmp_path / 'resnet')}"
    plain = CLIPEnsembleModel.from_backbones([backbone_dirs[0], resnet], labels=LABELS).eval()
    placed = CLIPEnsembleModel.from_backbones(
        [backbone_dirs[0], resnet], labels=LABELS, device_map={0: "cpu", 1: "disk"}, offload_folder=tmp_path / "off"
    ).eval()
    state = plain.backbones[1].model.state_dict()  # what the file holds: no non-persistent buffer
    assert backbone_size({"name_or_path": resnet}) == sum(t.numel() * t.element_size() for t in state.values())
    torch.testing.assert_close(logits(placed, images), logits(plain, images), rtol=0, atol=0)
