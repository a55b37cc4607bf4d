"""The model zoo: torchvision key/shape/parameter-count compatibility, initialization, the registry, safe
checkpoint loading, and the center-pixel toy model.

The expected keys, shapes and counts below are written from torchvision's published architectures (and its
published parameter counts), not computed from fastig's own code.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
from torch import nn

import fastig.models as zoo
from fastig.errors import CheckpointError, UnknownNameError
from fastig.models import centerpixel as cp
from fastig.models.checkpoints import file_sha256, hash_prefix_from_name, load_checkpoint, read_state_dict

# name -> (parameter count, number of state_dict entries, a few exact (key, shape) pairs), as torchvision has them.
TORCHVISION = {
    "resnet18": (11_689_512, 122, [
        ("conv1.weight", (64, 3, 7, 7)), ("bn1.running_mean", (64,)), ("layer1.0.conv1.weight", (64, 64, 3, 3)),
        ("layer2.0.downsample.0.weight", (128, 64, 1, 1)), ("layer2.0.downsample.1.num_batches_tracked", ()),
        ("layer4.1.bn2.running_var", (512,)), ("fc.weight", (1000, 512)), ("fc.bias", (1000,)),
    ]),
    "resnet34": (21_797_672, 218, [
        ("layer1.2.conv2.weight", (64, 64, 3, 3)), ("layer3.5.conv2.weight", (256, 256, 3, 3)),
        ("layer4.0.downsample.0.weight", (512, 256, 1, 1)), ("layer4.2.bn2.weight", (512,)), ("fc.weight", (1000, 512)),
    ]),
    "resnet50": (25_557_032, 320, [
        ("layer1.0.conv1.weight", (64, 64, 1, 1)), ("layer1.0.conv3.weight", (256, 64, 1, 1)),
        ("layer1.0.downsample.0.weight", (256, 64, 1, 1)), ("layer2.0.conv2.weight", (128, 128, 3, 3)),
        ("layer3.5.bn3.running_mean", (1024,)), ("layer4.2.conv3.weight", (2048, 512, 1, 1)),
        ("fc.weight", (1000, 2048)),
    ]),
    "vgg16": (138_357_544, 32, [
        ("features.0.weight", (64, 3, 3, 3)), ("features.0.bias", (64,)), ("features.28.weight", (512, 512, 3, 3)),
        ("classifier.0.weight", (4096, 25088)), ("classifier.3.weight", (4096, 4096)),
        ("classifier.6.weight", (1000, 4096)), ("classifier.6.bias", (1000,)),
    ]),
    "vgg19": (143_667_240, 38, [
        ("features.16.weight", (256, 256, 3, 3)), ("features.34.weight", (512, 512, 3, 3)),
        ("classifier.0.weight", (4096, 25088)), ("classifier.6.weight", (1000, 4096)),
    ]),
    "alexnet": (61_100_840, 16, [
        ("features.0.weight", (64, 3, 11, 11)), ("features.3.weight", (192, 64, 5, 5)),
        ("features.6.weight", (384, 192, 3, 3)), ("features.8.weight", (256, 384, 3, 3)),
        ("features.10.weight", (256, 256, 3, 3)), ("classifier.1.weight", (4096, 9216)),
        ("classifier.4.weight", (4096, 4096)), ("classifier.6.weight", (1000, 4096)),
    ]),
    # As returned by get(): torchvision's googlenet without the auxiliary heads.
    "googlenet": (6_624_904, 344, [
        ("conv1.conv.weight", (64, 3, 7, 7)), ("conv1.bn.running_var", (64,)), ("conv3.conv.weight", (192, 64, 3, 3)),
        ("inception3a.branch1.conv.weight", (64, 192, 1, 1)),
        ("inception3a.branch3.1.conv.weight", (32, 16, 3, 3)),  # torchvision's 3x3 in the "5x5" branch
        ("inception4e.branch2.1.conv.weight", (320, 160, 3, 3)),
        ("inception5b.branch4.1.conv.weight", (128, 832, 1, 1)), ("fc.weight", (1000, 1024)),
    ]),
    # vpulab's RGBBranch(ResNet-18, 365 classes): resnet18's 11,689,512 - (512*1000 + 1000) + (512*365 + 365).
    "sascenenet_rgb": (11_363_757, 122, [
        ("in_block.0.weight", (64, 3, 7, 7)), ("in_block.1.running_mean", (64,)),
        ("encoder1.0.conv1.weight", (64, 64, 3, 3)), ("encoder2.0.downsample.0.weight", (128, 64, 1, 1)),
        ("encoder4.1.bn2.weight", (512,)), ("fc.weight", (365, 512)),
    ]),
}
# torchvision's googlenet-1378be20.pth holds the auxiliary heads: 13,004,888 parameters, 364 entries.
GOOGLENET_WITH_AUX = (13_004_888, 364, [
    ("aux1.conv.conv.weight", (128, 512, 1, 1)), ("aux1.conv.bn.running_mean", (128,)),
    ("aux1.fc1.weight", (1024, 2048)), ("aux2.conv.conv.weight", (128, 528, 1, 1)), ("aux2.fc2.weight", (1000, 1024)),
])
ALL_NAMES = ["resnet18", "resnet34", "resnet50", "vgg16", "vgg19", "alexnet", "googlenet", "sascenenet_rgb",
             "centerpixel"]


def resnet_keys(blocks: list[int], bottleneck: bool, prefix=("conv1", "bn1", "layer", "fc")) -> list[str]:
    """torchvision's ResNet state_dict keys, in order, derived from its published layout."""
    stem_conv, stem_bn, layer, fc = prefix
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = [f"{stem_conv}.weight"] + [f"{stem_bn}.{b}" for b in bn]
    n_convs = 3 if bottleneck else 2
    for stage, count in enumerate(blocks, start=1):
        for i in range(count):
            p = f"{layer}{stage}.{i}"
            for c in range(1, n_convs + 1):
                keys += [f"{p}.conv{c}.weight"] + [f"{p}.bn{c}.{b}" for b in bn]
            if i == 0 and (stage > 1 or bottleneck):
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{b}" for b in bn]
    return keys + [f"{fc}.weight", f"{fc}.bias"]


@pytest.fixture(scope="module")
def built():
    """Each zoo model built once per module (vgg19 alone has 143M parameters)."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = zoo.get(name, weights="none")
        return cache[name]

    return get


@pytest.fixture(scope="module")
def googlenet_full():
    """GoogLeNet as torchvision's weight file expects it: with the auxiliary heads."""
    torch.manual_seed(1)
    return zoo.info("googlenet").builder()


def shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# -- architecture compatibility ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_keys_shapes_and_parameter_counts_match_torchvision(built, name):
    n_params, n_keys, samples = TORCHVISION[name]
    model = built(name)
    got = shapes(model)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert len(got) == n_keys
    for key, shape in samples:
        assert key in got, f"{name}: missing torchvision key {key}"
        assert got[key] == shape, f"{name}: {key} has shape {got[key]}, torchvision {shape}"


@pytest.mark.parametrize("name,blocks,bottleneck", [
    ("resnet18", [2, 2, 2, 2], False), ("resnet34", [3, 4, 6, 3], False), ("resnet50", [3, 4, 6, 3], True),
])
def test_resnet_key_lists_equal_torchvision_in_order(built, name, blocks, bottleneck):
    assert list(built(name).state_dict()) == resnet_keys(blocks, bottleneck)


def test_sascenenet_rgb_keys_follow_the_rgb_branch_file(built):
    expected = resnet_keys([2, 2, 2, 2], False, prefix=("in_block.0", "in_block.1", "encoder", "fc"))
    assert sorted(built("sascenenet_rgb").state_dict()) == sorted(expected)


@pytest.mark.parametrize("name,conv_indices", [
    ("vgg16", [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]),
    ("vgg19", [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]),
    ("alexnet", [0, 3, 6, 8, 10]),
])
def test_sequential_key_lists_equal_torchvision(built, name, conv_indices):
    linear = [0, 3, 6] if name.startswith("vgg") else [1, 4, 6]
    expected = [f"features.{i}.{w}" for i in conv_indices for w in ("weight", "bias")]
    expected += [f"classifier.{i}.{w}" for i in linear for w in ("weight", "bias")]
    assert list(built(name).state_dict()) == expected


def test_googlenet_is_built_with_aux_heads_and_returned_without(built, googlenet_full):
    n_params, n_keys, samples = GOOGLENET_WITH_AUX
    full = googlenet_full
    got = shapes(full)
    assert sum(p.numel() for p in full.parameters()) == n_params and len(got) == n_keys
    for key, shape in samples:
        assert got[key] == shape
    stripped = built("googlenet")
    assert stripped.aux1 is None and stripped.aux2 is None and not stripped.aux_logits
    assert stripped.transform_input
    assert not any(k.startswith("aux") for k in stripped.state_dict())


def test_googlenet_transform_input_maps_imagenet_normalization_to_half_half(built):
    net = built("googlenet")
    raw = torch.rand(2, 3, 5, 5)
    mean, std = torch.tensor(zoo.info("googlenet").mean), torch.tensor(zoo.info("googlenet").std)
    imagenet = (raw - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(net._transform_input(imagenet), (raw - 0.5) / 0.5, rtol=1e-5, atol=1e-5)


def test_googlenet_training_mode_returns_aux_outputs(googlenet_full):
    net = copy.deepcopy(googlenet_full).train()
    out = net(torch.randn(2, 3, 96, 96))
    assert out.logits.shape == out.aux_logits1.shape == out.aux_logits2.shape == (2, 1000)


@pytest.mark.parametrize("name,size", [
    ("resnet18", 48), ("resnet34", 48), ("resnet50", 48), ("vgg16", 32), ("vgg19", 32), ("alexnet", 64),
    ("googlenet", 48), ("sascenenet_rgb", 224),
])
def test_forward_gives_logits_and_input_gradients(built, name, size):
    model = built(name)
    assert not model.training
    x = torch.randn(2, 3, size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, zoo.info(name).num_classes) and torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0


# -- initialization ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "alexnet", "centerpixel"])
def test_random_initialization_is_deterministic_under_manual_seed(name):
    torch.manual_seed(123)
    a = zoo.get(name, weights="none").state_dict()
    torch.manual_seed(123)
    b = zoo.get(name, weights="none").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if name != "centerpixel":  # its weights are closed-form, not random
        torch.manual_seed(124)
        c = zoo.get(name, weights="none").state_dict()
        assert not all(torch.equal(a[k], c[k]) for k in a)


def test_initialization_follows_torchvision(built):
    resnet = built("resnet50")
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out_channels * k * k)).
    w = resnet.layer3[0].conv2.weight
    assert abs(w.std().item() / (2.0 / (256 * 9)) ** 0.5 - 1) < 0.05 and abs(w.mean().item()) < 0.003
    assert torch.all(resnet.layer3[0].bn2.weight == 1) and torch.all(resnet.layer3[0].bn2.bias == 0)
    vgg = built("vgg16")
    lin = vgg.classifier[3]
    assert abs(lin.weight.std().item() - 0.01) < 2e-4 and torch.all(lin.bias == 0)
    assert torch.all(vgg.features[0].bias == 0)
    goog = built("googlenet")
    w = goog.inception4a.branch2[1].conv.weight
    assert abs(w.std().item() - 0.01) < 5e-4 and w.abs().max() <= 2


# -- registry ----------------------------------------------------------------------------------------------


def test_names_and_info():
    assert list(zoo.names()) == ALL_NAMES
    for name in zoo.names():
        spec = zoo.info(name)
        assert spec.name == name and callable(spec.builder)
        assert len(spec.mean) == len(spec.std) == spec.channels
    r50 = zoo.info("resnet50")
    assert (r50.filename, r50.sha256) == ("resnet50-0676ba61.pth", "0676ba61")
    assert r50.url == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert (r50.input_size, r50.resize_size, r50.num_classes) == (224, 256, 1000)
    assert r50.mean == (0.485, 0.456, 0.406) and r50.std == (0.229, 0.224, 0.225)
    assert zoo.info("alexnet").filename == "alexnet-owt-7be5be79.pth" and zoo.info("alexnet").sha256 == "7be5be79"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r50.name = "x"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="resnet50.*centerpixel"):
        zoo.get("resnet5O")
    with pytest.raises(UnknownNameError):
        zoo.info("inception_v3")


def test_auto_without_the_file_names_file_folder_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTIG_CHECKPOINTS", str(tmp_path))
    assert zoo.checkpoint_dir() == tmp_path
    assert zoo.checkpoint_path("vgg16") == tmp_path / "vgg16-397923af.pth"
    with pytest.raises(CheckpointError) as err:
        zoo.get("vgg16")
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path) in msg
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in msg and "FASTIG_CHECKPOINTS" in msg


def test_default_checkpoint_folder_is_at_the_repository_root(monkeypatch):
    monkeypatch.delenv("FASTIG_CHECKPOINTS", raising=False)
    import fastig

    assert zoo.checkpoint_dir() == __import__("pathlib").Path(fastig.__file__).resolve().parent.parent / "checkpoints"


def test_auto_loads_a_wrapped_dataparallel_file_from_the_checkpoint_folder(tmp_path, monkeypatch):
    """sascenenet_rgb's file is a training checkpoint: {"state_dict": {"module.<key>": ...}, "epoch", ...}."""
    monkeypatch.setenv("FASTIG_CHECKPOINTS", str(tmp_path))
    torch.manual_seed(5)
    source = zoo.info("sascenenet_rgb").builder()
    wrapped = {"epoch": 30, "best_prec1": 41.2, "arch": "ResNet-18",
               "state_dict": {"module." + k: v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "RGB_ResNet18_Places.pth.tar")
    model = zoo.get("sascenenet_rgb", device="cpu")
    assert not model.training
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_centerpixel_needs_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTIG_CHECKPOINTS", str(tmp_path))
    assert zoo.checkpoint_path("centerpixel") is None
    assert isinstance(zoo.get("centerpixel"), cp.CenterPixelNet)


def test_weights_argument_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        zoo.get("resnet18", weights="imagenet")
    with pytest.raises(CheckpointError, match="no such file"):
        zoo.get("resnet18", weights=tmp_path / "absent.pth")
    with pytest.raises(TypeError, match="weights"):
        zoo.get("resnet18", weights=3)


# -- checkpoints -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_round_trip_of_every_zoo_model(built, tmp_path, name):
    model = built(name)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    loaded = zoo.get(name, weights=path)
    assert not loaded.training
    got, want = loaded.state_dict(), model.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    path.unlink()  # the VGG files are over 500 MB


def test_torchvision_style_googlenet_file_with_aux_heads_loads_strictly(tmp_path, googlenet_full):
    full = googlenet_full
    path = tmp_path / "googlenet-file.pth"
    torch.save(full.state_dict(), path)
    model = zoo.get("googlenet", weights=path)
    assert model.aux1 is None
    torch.testing.assert_close(model.fc.weight, full.fc.weight, rtol=0, atol=0)


def test_module_prefix_model_wrapper_and_missing_batch_counters_are_accepted(tmp_path):
    torch.manual_seed(2)
    source = zoo.get("resnet18", weights="none")
    state = {"module." + k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": state, "epoch": 1}, tmp_path / "wrapped.pth")
    target = load_checkpoint(zoo.info("resnet18").builder(), tmp_path / "wrapped.pth")
    assert torch.equal(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def _resnet18_state():
    torch.manual_seed(3)
    return zoo.get("resnet18", weights="none").state_dict()


def test_wrong_shape_missing_and_unexpected_keys_are_named(tmp_path):
    state = _resnet18_state()
    state["fc.weight"] = torch.zeros(10, 512)
    del state["layer1.0.bn1.bias"]
    state["head.extra"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        zoo.get("resnet18", weights=path)
    msg = str(err.value)
    assert str(path) in msg
    assert "fc.weight: file (10, 512) vs model (1000, 512)" in msg
    assert "missing key(s) [layer1.0.bn1.bias]" in msg and "unexpected key(s) [head.extra]" in msg


def test_a_file_of_another_architecture_is_refused_by_name(tmp_path):
    path = tmp_path / "alex.pth"
    torch.save(zoo.info("alexnet").builder().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit ResNet: 102 missing key\(s\)"):
        zoo.get("resnet18", weights=path)


def test_truncated_text_empty_and_directory_files_are_refused(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(_resnet18_state(), good)
    data = good.read_bytes()
    for name, content in [("truncated.pth", data[: len(data) // 2]), ("text.pth", b"this is not a checkpoint\n"),
                          ("garbage.pth", bytes(range(256)) * 8), ("empty.pth", b"")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            zoo.get("resnet18", weights=path)
        assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_state_dict(tmp_path)


def test_non_state_dict_contents_are_refused(tmp_path):
    for i, obj in enumerate([[torch.zeros(2)], {"w": torch.zeros(2), "step": 3}, {}, torch.zeros(3)]):
        path = tmp_path / f"odd{i}.pth"
        torch.save(obj, path)
        with pytest.raises(CheckpointError, match="state_dict"):
            read_state_dict(path)


class _RunsCode:
    """A pickle payload that runs a shell command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _resnet18_state(), "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="refused") as err:
        zoo.get("resnet18", weights=path)
    assert str(path) in str(err.value) and "system" in str(err.value)
    assert not marker.exists()
    # Control: the file really does run code under an unsafe load, so the assertion above could fail.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_hash_prefix_rule_and_verification(tmp_path):
    assert hash_prefix_from_name("resnet18-f37072fd.pth") == "f37072fd"
    assert hash_prefix_from_name("/x/y-z/alexnet-owt-7be5be79.pth") == "7be5be79"
    assert hash_prefix_from_name("RGB_ResNet18_Places.pth.tar") is None
    assert hash_prefix_from_name("model.pth") is None
    plain = tmp_path / "weights.pth"
    torch.save(_resnet18_state(), plain)
    digest = file_sha256(plain)
    good = tmp_path / f"resnet18-{digest[:8]}.pth"
    plain.rename(good)
    assert zoo.get("resnet18", weights=good).fc.weight.shape == (1000, 512)
    bad = tmp_path / ("resnet18-" + ("0" if digest[0] != "0" else "1") + digest[1:8] + ".pth")
    good.rename(bad)
    with pytest.raises(CheckpointError, match="sha256") as err:
        zoo.get("resnet18", weights=bad)
    assert digest in str(err.value) and str(bad) in str(err.value)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(zoo.info("resnet18").builder(), bad.rename(plain), sha256="ffff")


def test_auto_verifies_torchvision_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTIG_CHECKPOINTS", str(tmp_path))
    torch.save(_resnet18_state(), tmp_path / "resnet18-f37072fd.pth")  # right name, wrong content
    with pytest.raises(CheckpointError, match="f37072fd"):
        zoo.get("resnet18")


# -- center-pixel toy model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def centerpixel_model():
    return zoo.get("centerpixel")


def _with_center(background: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    x = background.clone()
    x[:, 0, cp.CENTER, cp.CENTER] = values
    return x


@pytest.mark.parametrize("background", ["uniform", "zeros", "ones", "bernoulli"])
def test_centerpixel_predicts_the_center_intensity_whatever_the_background(centerpixel_model, background):
    gen = torch.Generator().manual_seed(hash(background) % 1000)
    shape = (256, 1, 227, 227)
    bg = {
        "uniform": lambda: torch.rand(shape, generator=gen),
        "zeros": lambda: torch.zeros(shape),
        "ones": lambda: torch.ones(shape),
        "bernoulli": lambda: (torch.rand(shape, generator=gen) > 0.5).float(),
    }[background]()
    intensities = torch.arange(256)
    with torch.no_grad():
        logits = centerpixel_model(_with_center(bg, intensities / 255.0))
    assert torch.equal(logits.argmax(1), intensities)
    assert logits.min() >= 1  # the ReLU never clips inside [0, 1]


def test_centerpixel_rounds_arbitrary_center_values(centerpixel_model):
    gen = torch.Generator().manual_seed(7)
    values = torch.rand(64, generator=gen)
    far_from_ties = (255 * values - (255 * values).floor() - 0.5).abs() > 0.01
    with torch.no_grad():
        pred = centerpixel_model(_with_center(torch.rand(64, 1, 227, 227, generator=gen), values)).argmax(1)
    assert torch.equal(pred[far_from_ties], torch.round(255 * values[far_from_ties]).long())


def test_centerpixel_matches_the_closed_form_in_float64(centerpixel_model):
    gen = torch.Generator().manual_seed(8)
    x = torch.rand(4, 1, 227, 227, generator=gen)
    c = torch.arange(256, dtype=torch.float64)
    xd = x.double().flatten(1)
    center = xd[:, cp.CENTER * 227 + cp.CENTER]
    background = xd.sum(1) - center
    reference = 2 * 255 * c * center[:, None] - c**2 + (255**2 + 1) + background[:, None] / (227 * 227)
    # In float64: a float32 matmul may sum the 51528 tiny background terms into the center's large product one
    # by one and round them all away (up to 0.5 on this project's AVX2 CPU), which depends on the BLAS kernel.
    with torch.no_grad():
        got = copy.deepcopy(centerpixel_model).double()(x.double())
    torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-6)


def test_centerpixel_gradients_of_other_pixels_are_identical_across_classes(centerpixel_model):
    x = torch.rand(1, 1, 227, 227, generator=torch.Generator().manual_seed(9), requires_grad=True)
    logits = centerpixel_model(x)
    grads = torch.stack([torch.autograd.grad(logits[0, c], x, retain_graph=True)[0][0, 0] for c in (0, 1, 77, 255)])
    mask = torch.ones(227, 227, dtype=torch.bool)
    mask[cp.CENTER, cp.CENTER] = False
    others = grads[:, mask]
    assert torch.all(others == others[0]) and torch.all(others[0] == others[0, 0]) and others[0, 0] > 0
    torch.testing.assert_close(grads[:, cp.CENTER, cp.CENTER], torch.tensor([0.0, 510.0, 510.0 * 77, 510.0 * 255]))


def test_centerpixel_registry_info_and_input_checks(centerpixel_model):
    spec = zoo.info("centerpixel")
    assert (spec.input_size, spec.channels, spec.num_classes) == (227, 1, 256)
    assert spec.mean == (0.0,) and spec.std == (1.0,) and spec.filename is None
    with pytest.raises(ValueError, match=r"\[N, 1, 227, 227\]"):
        centerpixel_model(torch.rand(1, 3, 227, 227))


# -- values the file holds (issue 16, item 14) ---------------------------------------------------------------


def _small_net():
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))


def test_integer_tensors_for_float_parameters_are_refused_by_name(tmp_path):
    state = _small_net().state_dict()
    state["0.weight"] = state["0.weight"].round().long()
    state["3.bias"] = torch.zeros(2, dtype=torch.int32)
    torch.save(state, tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match=r"ints.pth.*2 integer tensor\(s\) for float parameters.*"
                                              r"0.weight: torch.int64.*3.bias: torch.int32"):
        load_checkpoint(_small_net(), tmp_path / "ints.pth")


def test_non_finite_weights_warn_by_default_and_are_refused_on_request(tmp_path):
    from fastig.models.checkpoints import NonFiniteWeightsWarning

    state = _small_net().state_dict()
    state["1.running_var"][3] = float("nan")
    state["3.weight"][0, 0] = float("inf")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.warns(NonFiniteWeightsWarning, match=r"nan.pth.*2 tensor\(s\).*1.running_var.*3.weight"):
        model = load_checkpoint(_small_net(), tmp_path / "nan.pth")
    assert torch.isnan(model[1].running_var[3])  # loaded as it is: the user was warned
    with pytest.raises(CheckpointError, match=r"nan.pth.*non-finite.*3.weight"):
        load_checkpoint(_small_net(), tmp_path / "nan.pth", nonfinite="refuse")
    with pytest.raises(ValueError, match="nonfinite"):
        load_checkpoint(_small_net(), tmp_path / "nan.pth", nonfinite="ignore")
    resnet = _resnet18_state()
    resnet["fc.bias"][0] = float("nan")
    torch.save(resnet, tmp_path / "resnet_nan.pth")
    with pytest.raises(CheckpointError, match=r"non-finite.*fc.bias"):
        zoo.get("resnet18", weights=tmp_path / "resnet_nan.pth", nonfinite="refuse")


def test_the_cli_run_refuses_non_finite_weights(tmp_path):
    import cv2
    import numpy as np
    from click.testing import CliRunner

    from fastig.cli import cli

    state = _resnet18_state()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((32, 32, 3), np.uint8))
    result = CliRunner().invoke(cli, ["attribute", "--model", "resnet18", "--weights", str(tmp_path / "nan.pth"),
                                      "--method", "saliency", "--image", str(tmp_path / "a.png"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "non-finite" in result.output and "conv1.weight" in result.output


def test_fastig_evaluate_refuses_non_finite_weights(tmp_path):
    """The store's model is rebuilt with the given weights before any metric runs: NaN weights are refused there."""
    from fastig.io.store import Store
    from fastig.metrics import evaluate_store

    state = _resnet18_state()
    state["layer1.0.bn1.running_var"][0] = float("inf")
    torch.save(state, tmp_path / "inf.pth")
    store = Store.create(tmp_path / "run" / "attributions.h5", model="resnet18", method="saliency", options={},
                         shape=(224, 224))
    with store:
        store.write_rows(0, ["a.png"], [0], torch.zeros(1, 224, 224))
    with pytest.raises(CheckpointError, match=r"inf.pth.*refused.*layer1.0.bn1.running_var"):
        evaluate_store(store.path, ["completeness"], weights=tmp_path / "inf.pth")
