"""Latent IG: the dVAE latent path and the attributions along it, against a plain per-point float64 reference.

The dVAE is a miniature of fastig's own Encoder/Decoder (n_hid 8, 32 codes, random weights); the classifier a tiny
smooth conv net, so every check runs in well under a second. The CLI test runs resnet50 (random weights) end to
end with a miniature dVAE saved as state_dicts.
"""

import copy
import math

import cv2
import h5py
import json
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

import fastig
from fastig.attr import LatentIntegratedGradients
from fastig.attr.latent_ig import dvae_files, load_dvae
from fastig.cli import cli
from fastig.core.paths import SLERP_PARALLEL_COS, lerp, slerp
from fastig.errors import CheckpointError
from fastig.models.dvae import DECODER_FILE, ENCODER_FILE, Decoder, Encoder, map_pixels, soft_codes

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
VOCAB = 32


def small_dvae(seed=0, n_blk=1):
    torch.manual_seed(seed)
    encoder = Encoder(n_hid=8, n_blk_per_group=n_blk, vocab_size=VOCAB).eval().requires_grad_(False)
    decoder = Decoder(n_init=8, n_hid=8, n_blk_per_group=n_blk, vocab_size=VOCAB).eval().requires_grad_(False)
    for p in [*encoder.parameters(), *decoder.parameters()]:
        if p.dim() == 1:  # non-zero biases, so the affine part of the embedding counts
            p.normal_(std=0.2)
    # sharper codes and more contrast than the plain random init, so that the decoded images differ from image
    # to image and the latent part of the path moves (a random decoder otherwise gives nearly one grey image)
    encoder.blocks.output.conv.w.mul_(10)
    decoder.blocks.output.conv.w.mul_(10)
    return encoder, decoder


def small_classifier(dtype=torch.float64, classes=5):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, classes))
    return net.to(dtype).eval()


@pytest.fixture(scope="module")
def dvae():
    return small_dvae()


def images(shape, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(shape, generator=g, dtype=torch.float64)
    mean, std = torch.tensor(MEAN).reshape(1, 3, 1, 1), torch.tensor(STD).reshape(1, 3, 1, 1)
    return ((pixels - mean.double()) / std.double()).to(dtype)


# --- the plain reference: one image and one point at a time, float64 -----------------------------------------


def ref_encode(encoder, decoder, x, latent, size):
    """One normalized image [3, H, W] -> its latent, step by step."""
    mean, std = torch.tensor(MEAN, dtype=x.dtype).reshape(3, 1, 1), torch.tensor(STD, dtype=x.dtype).reshape(3, 1, 1)
    pixels = torch.clamp(x * std + mean, 0, 1)[None]
    if tuple(pixels.shape[-2:]) != size:
        shrink = size[0] < pixels.shape[-2] or size[1] < pixels.shape[-1]
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    logits = encoder(0.8 * pixels + 0.1)[0]
    if latent == "logits":
        return logits
    probs = torch.exp(logits - logits.max(0).values) / torch.exp(logits - logits.max(0).values).sum(0)
    if latent == "probs":
        return probs
    conv = decoder.blocks.input
    return torch.einsum("ov,vhw->ohw", conv.w[:, :, 0, 0].to(x.dtype), probs) + conv.b.to(x.dtype)[:, None, None]


def ref_decode(decoder, z, latent, size):
    if latent == "embedding":
        stats = decoder.from_embedding(z[None])
    else:
        stats = decoder((torch.softmax(z, 0) if latent == "logits" else z)[None])
    pixels = torch.clamp((torch.sigmoid(stats[:, :3]) - 0.1) / 0.8, 0, 1)
    if tuple(pixels.shape[-2:]) != size:
        shrink = size[0] < pixels.shape[-2] or size[1] < pixels.shape[-1]
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    mean, std = torch.tensor(MEAN, dtype=z.dtype).reshape(3, 1, 1), torch.tensor(STD, dtype=z.dtype).reshape(3, 1, 1)
    return (pixels[0] - mean) / std


def ref_slerp(a, b, t):
    """Per latent position (vector over channels), with Python floats."""
    out = torch.empty_like(a)
    for i in range(a.shape[1]):
        for j in range(a.shape[2]):
            u, v = a[:, i, j], b[:, i, j]
            nu, nv = float(u.norm()), float(v.norm())
            cos = float(u @ v) / (nu * nv) if nu and nv else 1.0
            if abs(cos) > SLERP_PARALLEL_COS:
                out[:, i, j] = (1 - t) * u + t * v
            else:
                w = math.acos(max(-1.0, min(1.0, cos)))
                out[:, i, j] = math.sin((1 - t) * w) / math.sin(w) * u + math.sin(t * w) / math.sin(w) * v
    return out


def ref_points(dvae, x, b, interpolation="lerp", latent="embedding", n_steps=6, gap_steps=2, dvae_size=None):
    """All path points of one example [3, H, W] as a list, in float64."""
    encoder, decoder = dvae
    x, b = x.double(), b.double()
    size = tuple(x.shape[-2:])
    dsize = (dvae_size, dvae_size) if dvae_size else tuple(-(-s // 8) * 8 for s in size)
    z0, z1 = (ref_encode(encoder, decoder, v, latent, dsize) for v in (b, x))
    decoded = []
    for k in range(n_steps + 1):
        t = k / n_steps
        z = (1 - t) * z0 + t * z1 if interpolation == "lerp" else ref_slerp(z0, z1, t)
        decoded.append(ref_decode(decoder, z, latent, size))
    start = [b + j / gap_steps * (decoded[0] - b) for j in range(gap_steps)]
    end = [decoded[-1] + j / gap_steps * (x - decoded[-1]) for j in range(1, gap_steps + 1)]
    return start + decoded + end


def ref_attribution(net, points, target, rule):
    grads = []
    for p in points:
        leaf = p[None].clone().requires_grad_()
        grads.append(torch.autograd.grad(net(leaf)[0, target], leaf)[0][0])
    m = len(points) - 1
    if rule == "riemann_left":
        return sum(grads[k] * (points[k + 1] - points[k]) for k in range(m))
    return sum(grads[k] * (points[min(k + 1, m)] - points[max(k - 1, 0)]) / 2 for k in range(m + 1))


# --- the path -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["lerp", "slerp"])
@pytest.mark.parametrize("latent", ["embedding", "probs", "logits"])
@pytest.mark.parametrize("shape,dvae_size", [((2, 3, 16, 16), None), ((1, 3, 20, 28), None), ((2, 3, 16, 16), 24)])
def test_path_points_match_the_reference_and_end_exactly(dvae, interpolation, latent, shape, dvae_size):
    x = images(shape)
    b = images((1,) + shape[1:], seed=5)  # one baseline for all examples
    lig = LatentIntegratedGradients(small_classifier(), dvae)
    path = lig.path(x, b, n_steps=5, gap_steps=2, interpolation=interpolation, latent=latent, dvae_size=dvae_size)
    n = shape[0]
    assert path.n_steps == 5 + 2 * 2 + 1
    everything = path.points(slice(0, path.n_steps), slice(0, n))[0].reshape((path.n_steps,) + shape)
    assert torch.equal(everything[0], b.expand(shape)) and torch.equal(everything[-1], x)
    for i in range(n):
        expected = torch.stack(ref_points(dvae, x[i], b[0], interpolation, latent, 5, 2, dvae_size))
        torch.testing.assert_close(everything[:, i], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_endpoints_are_exact_in_every_dtype_and_batching(dvae, dtype):
    x = images((3, 3, 16, 16), dtype)
    lig = LatentIntegratedGradients(small_classifier(dtype), dvae)
    path = lig.path(x, 0.0, n_steps=4, interpolation="slerp")
    for examples in (slice(0, 3), slice(1, 2)):
        first = path.points(slice(0, 1), examples)[0]
        last = path.points(slice(path.n_steps - 1, path.n_steps), examples)[0]
        assert first.dtype == dtype and torch.equal(first, torch.zeros_like(first))
        assert torch.equal(last, x[examples])
    # the moves telescope to input - baseline
    moves = path.moves(slice(0, path.n_steps - 1), slice(0, 3))[0].double().sum(0)
    torch.testing.assert_close(moves, x.double(), atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)


def test_lerp_of_embeddings_is_lerp_of_soft_codes(dvae):
    """The embedding is affine in the soft codes, so lerp in either space decodes to the same images."""
    x, b = images((2, 3, 16, 16)), images((2, 3, 16, 16), seed=9)
    lig = LatentIntegratedGradients(small_classifier(), dvae)
    paths = {latent: lig.path(x, b, n_steps=6, latent=latent) for latent in ("embedding", "probs")}
    points = {k: p.points(slice(0, p.n_steps), slice(0, 2))[0] for k, p in paths.items()}
    torch.testing.assert_close(points["embedding"], points["probs"], rtol=1e-10, atol=1e-10)
    assert paths["embedding"].z_start.shape[1] == 8 and paths["probs"].z_start.shape[1] == VOCAB
    slerped = lig.path(x, b, n_steps=6, interpolation="slerp").points(slice(0, 11), slice(0, 2))[0]
    # points (2 examples each): gap steps p = 0, 1, then D(k/6) at p = 2 + k, then p = 9, 10
    interior = slice(2 * 3, 2 * 8)
    assert (slerped[interior] - points["embedding"][interior]).abs().max() > 1e-3  # a different path
    torch.testing.assert_close(slerped[:6], points["embedding"][:6], rtol=0, atol=0)  # same start, to D_0


def test_slerp_against_reference_and_its_properties():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 6, 3, 3, generator=g,
                                                                                  dtype=torch.float64)
    b[0, :, 0, 0] = 3 * a[0, :, 0, 0]  # parallel: lerp
    b[1, :, 1, 1] = -a[1, :, 1, 1]  # opposite: lerp
    a[1, :, 2, 2] = 0  # zero vector: lerp
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    got = slerp(a, b, t)
    for k, tk in enumerate(t.tolist()):
        for i in range(2):
            torch.testing.assert_close(got[k, i], ref_slerp(a[i], b[i], tk), rtol=1e-12, atol=1e-12)
    assert torch.equal(got[0], a) and torch.equal(got[-1], b)
    torch.testing.assert_close(got[:, 0, :, 0, 0], lerp(a, b, t)[:, 0, :, 0, 0], rtol=1e-12, atol=1e-12)
    unit_a, unit_b = F.normalize(a, dim=1), F.normalize(b, dim=1)  # unit vectors stay on the unit sphere
    norms = slerp(unit_a, unit_b, t).norm(dim=2)
    keep = torch.ones_like(norms[0], dtype=torch.bool)
    keep[0, 0, 0] = keep[1, 1, 1] = keep[1, 2, 2] = False
    torch.testing.assert_close(norms[:, keep], torch.ones_like(norms[:, keep]), rtol=0, atol=1e-12)
    assert slerp(a.float(), b.float(), t).dtype == torch.float32


# --- the attributions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["riemann_left", "riemann_trapezoid"])
@pytest.mark.parametrize("interpolation", ["lerp", "slerp"])
@pytest.mark.parametrize("shape,batch", [((2, 3, 16, 16), None), ((3, 3, 16, 24), 2), ((1, 3, 12, 12), 3)])
def test_attributions_match_the_reference_float64(dvae, rule, interpolation, shape, batch):
    net = small_classifier()
    x, b = images(shape), images(shape, seed=7)
    targets = [i % 5 for i in range(shape[0])]
    lig = LatentIntegratedGradients(net, dvae)
    got = lig.attribute(x, b, target=targets, n_steps=5, method=rule, internal_batch_size=batch,
                        interpolation=interpolation, gap_steps=2)
    for i in range(shape[0]):
        points = ref_points(dvae, x[i], b[i], interpolation, "embedding", 5, 2)
        torch.testing.assert_close(got[i], ref_attribution(net, points, targets[i], rule), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("latent", ["probs", "logits"])
def test_attributions_float32_against_float64_reference(dvae, latent):
    net64 = small_classifier()
    net32 = copy.deepcopy(net64).float()
    x, b = images((2, 3, 16, 16)), images((2, 3, 16, 16), seed=4)
    got = LatentIntegratedGradients(net32, dvae).attribute(x.float(), b.float(), target=2, n_steps=4, latent=latent,
                                                           internal_batch_size=3)
    assert got.dtype == torch.float32
    for i in range(2):
        expected = ref_attribution(net64, ref_points(dvae, x[i], b[i], "lerp", latent, 4, 1), 2, "riemann_left")
        torch.testing.assert_close(got[i].double(), expected, rtol=1e-3, atol=2e-6)


def test_completeness_delta_shrinks_with_steps(dvae, capsys):
    net = small_classifier()
    x, b = images((2, 3, 16, 16)), images((2, 3, 16, 16), seed=11)
    lig = LatentIntegratedGradients(net, dvae)
    steps = [4, 8, 16, 32, 64]
    rows = {}
    for interpolation in ("lerp", "slerp"):
        for rule in ("riemann_left", "riemann_trapezoid"):
            rows[interpolation, rule] = [
                lig.attribute(x, b, target=1, n_steps=n, method=rule, interpolation=interpolation,
                              return_convergence_delta=True)[1].abs().max().item()
                for n in steps
            ]
    gap = (net(x)[:, 1] - net(b)[:, 1]).abs().min().item()
    with capsys.disabled():
        print(f"\nlatent IG: max |completeness delta| vs n_steps (|f(x) - f(b)| >= {gap:.3f}; gap_steps = n/4)")
        print(f"{'interpolation':>13} {'rule':>17} " + " ".join(f"{n:>10d}" for n in steps))
        for (interpolation, rule), deltas in rows.items():
            print(f"{interpolation:>13} {rule:>17} " + " ".join(f"{d:10.3e}" for d in deltas))
    for (interpolation, rule), deltas in rows.items():
        assert all(later < earlier for earlier, later in zip(deltas, deltas[1:])), (interpolation, rule, deltas)
        # first order for the left rule (about /2 per doubling), second order for the trapezoid rule (about /4)
        assert deltas[-1] < deltas[0] / (8 if rule == "riemann_left" else 64), (interpolation, rule, deltas)
        assert deltas[-1] < (0.1 if rule == "riemann_left" else 1e-3) * gap


@pytest.mark.parametrize("interpolation", ["lerp", "slerp"])
@pytest.mark.parametrize("latent", ["embedding", "logits"])
def test_idgi_is_complete_to_rounding(dvae, interpolation, latent):
    net = small_classifier()
    x, b = images((2, 3, 16, 16)), images((1, 3, 16, 16), seed=2)
    lig = LatentIntegratedGradients(net, dvae)
    attr, delta = lig.attribute(x, b, target=[0, 3], n_steps=3, idgi=True, interpolation=interpolation,
                                latent=latent, internal_batch_size=4, return_convergence_delta=True)
    assert delta.abs().max() < 1e-12
    # and it is IDGI over the reference's points
    for i, target in enumerate([0, 3]):
        points = ref_points(dvae, x[i], b[0], interpolation, latent, 3, 1)
        expected = torch.zeros_like(points[0])
        for p, q in zip(points, points[1:]):
            leaf = p[None].clone().requires_grad_()
            out = net(leaf)[0, target]
            g = torch.autograd.grad(out, leaf)[0][0]
            expected += g * g * (net(q[None])[0, target] - out.detach()) / (g * g).sum()
        torch.testing.assert_close(attr[i], expected, rtol=1e-9, atol=1e-13)
    prob, delta32 = LatentIntegratedGradients(small_classifier(torch.float32), dvae).attribute(
        x.float(), target=1, n_steps=3, idgi=True, output="probability", return_convergence_delta=True)
    assert prob.dtype == torch.float32 and delta32.abs().max() < 1e-6


def test_decoder_passes_are_batched_and_no_point_is_decoded_twice(dvae):
    x = images((2, 3, 16, 16))
    lig = LatentIntegratedGradients(small_classifier(), dvae)
    n, k = 2, 16
    # the (shared, zero) baseline's and each input's decoding, then each interior point once
    once = 1 + n + n * (k - 1)
    lig.attribute(x, images((n, 3, 16, 16)), target=0, n_steps=k)
    assert lig.last_timings["decoded_images"] == once + n - 1  # one baseline per example
    for options, passes in [({"internal_batch_size": None}, 2), ({"internal_batch_size": 8}, None),
                            ({"internal_batch_size": 8, "method": "riemann_trapezoid"}, None),
                            ({"internal_batch_size": 8, "idgi": True}, None)]:
        lig.attribute(x, target=0, n_steps=k, **options)
        timings = lig.last_timings
        assert timings["decoded_images"] == once, options
        if passes is not None:
            assert timings["decoder_passes"] == passes
        else:  # one pass for the endpoints, then at most one per engine batch (4 steps x 2 examples)
            points = k + 2 * math.ceil(k / 4) + 1
            assert timings["decoder_passes"] <= 1 + math.ceil(points / 4), timings
        assert timings["total_s"] >= timings["encoder_s"] + timings["decoder_s"] > 0


def test_cpu_decoder_passes_are_bounded_in_memory_and_give_the_same_points(dvae, monkeypatch):
    from fastig.models import dvae as dvae_module

    x = images((2, 3, 16, 16))
    lig = LatentIntegratedGradients(small_classifier(), dvae)
    whole = lig.attribute(x, target=0, n_steps=6)
    assert lig.last_timings["decoder_passes"] == 2
    per_image = dvae[1].n_hid * 64 * 2 * 2 * 8  # largest activation of one 16x16 float64 image
    monkeypatch.setattr(dvae_module, "DECODER_CPU_BYTES", 2 * per_image)
    split = lig.attribute(x, target=0, n_steps=6)
    # endpoints: 1 baseline + 2 inputs in 2 passes; interior: 5 steps x 2 examples in 5 passes
    assert lig.last_timings["decoder_passes"] == 2 + 5
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-15)


# --- weights, errors, the registry and the CLI ------------------------------------------------------------------


@pytest.fixture
def dvae_folder(tmp_path):
    encoder, decoder = small_dvae(seed=4, n_blk=2)
    folder = tmp_path / "dvae"
    folder.mkdir()
    torch.save(encoder.state_dict(), folder / ENCODER_FILE)
    torch.save(decoder.state_dict(), folder / DECODER_FILE)
    return folder


def test_loading_from_a_folder_infers_the_widths_and_is_cached(dvae_folder):
    encoder, decoder = load_dvae(dvae_folder)
    assert (encoder.n_hid, encoder.n_blk_per_group, encoder.vocab_size) == (8, 2, VOCAB)
    assert (decoder.n_init, decoder.n_hid, decoder.vocab_size) == (8, 8, VOCAB)
    reference = small_dvae(seed=4, n_blk=2)[1]
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in decoder.state_dict().items())
    assert load_dvae(dvae_folder)[0] is encoder  # the same objects: not read again
    lig = LatentIntegratedGradients(small_classifier(), str(dvae_folder))
    assert lig.encoder is encoder
    small = Encoder(n_hid=4, n_blk_per_group=1, vocab_size=VOCAB)
    torch.save(small.state_dict(), dvae_folder / ENCODER_FILE)  # a new file is read again
    assert load_dvae(dvae_folder)[0].n_hid == 4


def test_dvae_files_prefers_converted_files_and_names_the_missing_one(tmp_path, monkeypatch):
    for name in ("encoder.pkl", "decoder.pkl"):
        (tmp_path / name).write_bytes(b"x")
    assert dvae_files(tmp_path) == (tmp_path / "encoder.pkl", tmp_path / "decoder.pkl")
    (tmp_path / ENCODER_FILE).write_bytes(b"x")
    assert dvae_files(tmp_path)[0] == tmp_path / ENCODER_FILE
    (tmp_path / "decoder.pkl").unlink()
    with pytest.raises(CheckpointError, match=DECODER_FILE):
        dvae_files(tmp_path)
    monkeypatch.setenv("FASTIG_CHECKPOINTS", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match=f"{ENCODER_FILE} in .*empty.*convert-dvae"):
        LatentIntegratedGradients(small_classifier())
    with pytest.raises(CheckpointError, match="must be a folder"):
        dvae_files(tmp_path / ENCODER_FILE)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (dict(inputs=(images((1, 3, 16, 16)), images((1, 3, 16, 16)))), ValueError, "one image tensor"),
        (dict(inputs=torch.zeros(1, 1, 16, 16, dtype=torch.float64)), ValueError, r"\[N, 3, H, W\]"),
        (dict(inputs=torch.zeros(1, 3, 16, 16, dtype=torch.long)), ValueError, "floating-point"),
        (dict(interpolation="cubic"), ValueError, "interpolation"),
        (dict(latent="codes"), ValueError, "latent"),
        (dict(dvae_size=12), ValueError, "multiple of 8"),
        (dict(method="gausslegendre"), ValueError, "riemann_left, riemann_trapezoid"),
        (dict(gap_steps=0), ValueError, "gap_steps"),
        (dict(gap_steps=1.5), ValueError, "gap_steps"),
        (dict(n_steps=0), ValueError, "n_steps"),
        (dict(idgi=1), TypeError, "idgi"),
    ],
)
def test_bad_arguments_are_clear_errors(dvae, call, error, message):
    call = {"inputs": images((1, 3, 16, 16)), "target": 0, "n_steps": 2, **call}
    with pytest.raises(error, match=message):
        LatentIntegratedGradients(small_classifier(), dvae).attribute(**call)


def test_bad_constructor_arguments(dvae):
    with pytest.raises(TypeError, match="dvae must"):
        LatentIntegratedGradients(small_classifier(), 3)
    other = Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=16)
    with pytest.raises(ValueError, match="codes"):
        LatentIntegratedGradients(small_classifier(), (dvae[0], other))
    with pytest.raises(ValueError, match="mean/std"):
        LatentIntegratedGradients(small_classifier(), dvae, mean=(0.5,), std=(0.5,)).attribute(
            images((1, 3, 16, 16)), target=0, n_steps=2)


def test_functional_form_passes_the_dvae_folder_to_the_constructor(dvae_folder):
    net = small_classifier()
    x = images((1, 3, 16, 16))
    got = fastig.attribute(net, x, target=2, method="latent_ig", dvae=str(dvae_folder), n_steps=3,
                           rule="riemann_trapezoid", interpolation="slerp")
    expected = LatentIntegratedGradients(net, load_dvae(dvae_folder)).attribute(
        x, target=2, n_steps=3, method="riemann_trapezoid", interpolation="slerp")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))
    return path


def test_cli_latent_ig_on_resnet50_end_to_end(tmp_path, image, dvae_folder):
    out = tmp_path / "out"
    args = ["attribute", "--model", "resnet50", "--weights", "none", "--method", "latent_ig", "--dvae", dvae_folder,
            "--interpolation", "slerp", "--steps", "4", "--image", image, "--out", out]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    with h5py.File(out / "attributions.h5") as f:
        maps = f["attributions/latent_ig"][:]
        assert maps.shape == (1, 224, 224) and np.isfinite(maps).all() and np.abs(maps).sum() > 0
        options = json.loads(f.attrs["options"])
    assert options["dvae"] == str(dvae_folder) and options["interpolation"] == "slerp" and options["n_steps"] == 4
    assert (out / "0000_img_latent_ig.png").exists()


def test_cli_names_the_missing_dvae_file_before_any_work(tmp_path, image):
    out = tmp_path / "out"
    args = ["attribute", "--model", "resnet18", "--weights", "none", "--method", "latent_ig", "--dvae",
            tmp_path / "nowhere", "--image", image, "--out", out]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("fastig: error:") and ENCODER_FILE in last and "convert-dvae" in last
    assert "Traceback" not in result.output and not out.exists()
    for flags, message in [(["--rule", "gausslegendre"], "riemann_trapezoid"), (["--dvae-size", "100"], "multiple of 8"),
                           (["--gap-steps", "0"], "gap_steps")]:
        result = CliRunner().invoke(cli, [str(a) for a in args] + flags)
        assert result.exit_code == 2 and message in result.output and not out.exists(), result.output
    listing = CliRunner().invoke(cli, ["methods"])
    assert "latent_ig" in listing.output and "--dvae" in listing.output and "--interpolation" in listing.output
