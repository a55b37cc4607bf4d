"""Segment and inpainting baselines (fastig.core.baselines): which pixels change, seeding, inpainting on known
answers, and the hook that gives every path method ``baselines="segments"``, checked against a loop over the
drawn baselines one at a time."""

import sys
import types

import cv2
import h5py
import json
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fastig
from fastig.attr import (GuidedIntegratedGradients, GuidedNonLinearityIG, IntegratedGradients,
                         LatentIntegratedGradients)
from fastig.cli import cli
from fastig.core import baselines as bl
from fastig.core.baselines import SegmentBaselines, builtin_inpainter, from_options, telea_inpaint

from _shared import SmallCNN
from test_latent_ig import images as dvae_images, small_classifier, small_dvae


def picture(n=2, c=3, h=12, w=12, seed=0):
    return torch.randn((n, c, h, w), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fill", ["blur", "mean", "noise", "telea", "navier_stokes"])
def test_baseline_differs_from_the_image_exactly_on_the_chosen_segments(fill):
    x = picture()
    spec = SegmentBaselines(n_segments=9, fraction=0.4, fill=fill, n_samples=3, segments="grid")
    draw = spec.draw(x)
    assert draw.baselines.shape == (6, 3, 12, 12) and draw.masks.shape == (6, 1, 12, 12)
    changed = (draw.baselines != x.repeat_interleave(3, 0)).any(1, keepdim=True)
    assert torch.equal(changed, draw.masks)
    for k in range(6):
        labels = draw.labels[k // 3, 0]
        removed = torch.unique(labels[draw.masks[k, 0]])
        assert len(removed) == round(0.4 * 9)  # whole segments, exactly round(fraction * K) of them
        assert torch.equal(draw.masks[k, 0], torch.isin(labels, removed))


def test_same_seed_same_baselines_whatever_the_batch():
    x = picture(n=3)
    spec = SegmentBaselines(n_segments=8, fill="noise", n_samples=2, seed=5)
    both = spec.draw(x)
    assert torch.equal(both.baselines, spec.draw(x).baselines)
    alone = spec.draw(x[1:2])  # image 1 alone draws what it drew inside the batch
    assert torch.equal(alone.baselines, both.baselines[2:4]) and alone.seeds == both.seeds[1:2]
    other = SegmentBaselines(n_segments=8, fill="noise", n_samples=2, seed=6).draw(x)
    assert not torch.equal(other.masks, both.masks)
    assert not torch.equal(both.masks[0], both.masks[1])  # two samples of one image differ


def test_constant_and_ramp_images_inpaint_to_themselves():
    mask = torch.zeros(30, 30, dtype=torch.bool)
    mask[4:17, 5:25] = True
    mask[22:27, 0:8] = True  # touching the border
    constant = torch.full((3, 30, 30), 0.37)
    for name in ("telea", "navier_stokes"):
        out = builtin_inpainter(name)(constant, mask)
        assert (out - constant).abs().max() < 1e-6
    yy, xx = torch.meshgrid(torch.arange(30.0, dtype=torch.float64), torch.arange(30.0, dtype=torch.float64),
                            indexing="ij")
    ramp = torch.stack([0.1 * yy - 0.05 * xx, 0.02 * xx, 0 * yy + 1])
    assert (telea_inpaint(ramp, mask) - ramp).abs().max() < 1e-12  # first-order extrapolation is exact on lines
    # and the hole is really filled from its surroundings: two flat halves keep their values far from the edge
    halves = torch.zeros(1, 30, 30)
    halves[:, :, 15:] = 1.0
    hole = torch.zeros(30, 30, dtype=torch.bool)
    hole[10:20, 2:8] = True
    assert (telea_inpaint(halves, hole)[0, 10:20, 2:8]).abs().max() < 1e-9


def test_inpainting_plugin_gets_the_mask_and_only_fills_it():
    calls = []

    def inpaint(image, mask):
        calls.append(mask.clone())
        return torch.full_like(image, 7.0)

    x = picture(n=1)
    draw = SegmentBaselines(n_segments=4, segments="grid", fill=inpaint, n_samples=2).draw(x)
    assert len(calls) == 2 and all(torch.equal(c, m[0]) for c, m in zip(calls, draw.masks))
    assert torch.equal(draw.baselines[draw.masks.expand_as(draw.baselines)],
                       torch.full((int(draw.masks.sum()) * 3,), 7.0))
    assert SegmentBaselines(fill=inpaint).describe()["fill"].startswith("callable")
    with pytest.raises(ValueError, match="must return a tensor of the image's shape"):
        SegmentBaselines(n_segments=4, fill=lambda image, mask: image[0]).draw(x)
    with pytest.raises(ValueError, match="fraction below 1"):
        SegmentBaselines(n_segments=4, fraction=1.0, fill="telea").draw(x)


def test_label_maps_callables_and_opencv_superpixels(monkeypatch):
    x = picture(n=2, h=8, w=8)
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[:, 4:] = 1  # two segments: left and right halves, shared by both images
    draw = SegmentBaselines(segments=labels[None], fraction=0.5, fill="mean", n_samples=1).draw(x)
    assert all(torch.equal(m[0], labels == 0) or torch.equal(m[0], labels == 1) for m in draw.masks)
    by_callable = SegmentBaselines(segments=lambda images: labels.expand(len(images), 8, 8), fill="mean",
                                   n_samples=1).draw(x)
    assert torch.equal(by_callable.masks, draw.masks)
    with pytest.raises(ValueError, match="shape"):
        SegmentBaselines(segments=torch.zeros(3, 8, 8, dtype=torch.long)).draw(x)

    monkeypatch.delattr(cv2, "ximgproc", raising=False)
    with pytest.raises(ValueError, match="opencv-contrib-python-headless"):
        SegmentBaselines(segments="cv2").draw(x)
    seen = {}

    class FakeSlic:  # stands in for OpenCV's contrib module, which this machine does not have
        def __init__(self, image, algorithm, region_size, ruler):
            seen.update(shape=image.shape, dtype=image.dtype, region=region_size)

        def iterate(self, n):
            seen["iterations"] = n

        def getLabels(self):
            return (np.arange(64).reshape(8, 8) // 32).astype(np.int32)

    monkeypatch.setattr(cv2, "ximgproc", types.SimpleNamespace(SLICO=101, createSuperpixelSLIC=FakeSlic),
                        raising=False)
    draw = SegmentBaselines(segments="cv2", n_segments=16, n_samples=1, fill="mean").draw(x)
    assert seen == {"shape": (8, 8, 3), "dtype": np.uint8, "region": 2, "iterations": 10}
    assert torch.equal(draw.labels[0, 0], torch.from_numpy(np.arange(64).reshape(8, 8) // 32))


def test_bad_specs_name_the_argument():
    for kwargs, message in [({"fill": "paint"}, "fill must be one of"), ({"segments": "felzenszwalb"}, "segments"),
                            ({"fraction": 0}, "fraction"), ({"n_samples": 0}, "n_samples"),
                            ({"segments": torch.zeros(2, 4, 4)}, "integer tensor")]:
        with pytest.raises(ValueError, match=message):
            SegmentBaselines(**kwargs)
    with pytest.raises(ValueError, match="baselines='segments'"):
        from_options({"baseline_fill": "blur"})
    assert from_options({"baselines": "zeros", "n_steps": 3}) == {"baselines": None, "n_steps": 3}
    assert from_options({"baselines": "segments", "baseline_seed": 3})["baselines"] == SegmentBaselines(seed=3)


def _loop_reference(method, x, draw, s, target, **options):
    """The mean over each image's drawn baselines, one (image, baseline) pair per call."""
    attributions, deltas = [], []
    for i in range(x.shape[0]):
        for k in range(s):
            a, d = method.attribute(x[i:i + 1], baselines=draw.baselines[i * s + k:i * s + k + 1],
                                    target=target[i], return_convergence_delta=True, **options)
            attributions.append(a)
            deltas.append(d)
    shape = (x.shape[0], s) + tuple(x.shape[1:])
    return torch.cat(attributions).reshape(shape).mean(1), torch.cat(deltas).reshape(x.shape[0], s).mean(1)


@pytest.mark.parametrize("cls,options", [
    (IntegratedGradients, {"n_steps": 6}),
    (IntegratedGradients, {"n_steps": 6, "idgi": True}),
    (GuidedNonLinearityIG, {"n_steps": 6}),
    (GuidedIntegratedGradients, {"n_steps": 6}),
])
def test_every_path_method_averages_over_its_drawn_baselines(cls, options):
    model = SmallCNN().double().eval()
    x = picture(n=2, h=8, w=8).double()
    target = [1, 3]
    spec = SegmentBaselines(n_segments=4, fill="blur", n_samples=3, blur_sigma=2.0)
    method = cls(model)
    ours, delta = method.attribute(x, baselines=spec, target=torch.tensor(target), return_convergence_delta=True,
                                   **options)
    reference, ref_delta = _loop_reference(cls(model), x, method.last_baselines, 3, target, **options)
    assert ours.shape == x.shape and delta.shape == (2,)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(delta, ref_delta, rtol=1e-9, atol=1e-12)
    if options.get("idgi"):
        assert delta.abs().max() < 1e-9  # IDGI's completeness holds for every baseline, so for their mean


def test_latent_ig_takes_segment_baselines():
    model, dvae = small_classifier(), small_dvae()
    x = dvae_images((1, 3, 16, 16))
    method = LatentIntegratedGradients(model, dvae)
    ours, delta = method.attribute(x, baselines="segments", target=2, n_steps=3, return_convergence_delta=True)
    draw = method.last_baselines
    assert draw.baselines.shape == (4, 3, 16, 16)  # the default spec: 4 samples
    reference, ref_delta = _loop_reference(LatentIntegratedGradients(model, dvae), x, draw, 4, [2], n_steps=3)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(delta, ref_delta, rtol=1e-9, atol=1e-12)


def test_additional_args_and_the_functional_form():
    class Scaled(torch.nn.Module):
        def forward(self, x, scale):
            return (x.flatten(1)[:, :5] * scale).tanh()

    x, scale = picture(n=2, h=8, w=8), torch.tensor([[1.0], [2.0]])
    a = fastig.attribute(Scaled(), x, target=1, method="ig", n_steps=4, additional_forward_args=(scale,),
                         baselines="segments", baseline_samples=2, baseline_segments=4, baseline_fill="mean")
    spec = SegmentBaselines(n_segments=4, n_samples=2, fill="mean")
    draw = spec.draw(x)
    expected = torch.stack([
        sum(IntegratedGradients(Scaled()).attribute(x[i:i + 1], draw.baselines[2 * i + k:2 * i + k + 1], 1,
                                                    (scale[i:i + 1],), n_steps=4) for k in range(2))[0] / 2
        for i in range(2)])
    torch.testing.assert_close(a, expected)
    with pytest.raises(ValueError, match="one image tensor"):
        IntegratedGradients(Scaled()).attribute((x, x), baselines="segments")
    with pytest.raises(ValueError, match="baselines must be None"):  # Blur IG has no baseline to replace
        fastig.attribute(SmallCNN(), picture(h=8, w=8), target=0, method="blur_ig", baselines="segments")


def test_cli_records_the_baseline_settings(tmp_path):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8))
    out = tmp_path / "out"
    args = ["attribute", "--model", "centerpixel", "--method", "ig", "--steps", "2", "--baselines", "segments",
            "--baseline-fill", "mean", "--baseline-samples", "2", "--baseline-segments", "8", "--baseline-seed", "4",
            "--image", str(image), "--out", str(out), "--no-heatmaps"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    with h5py.File(out / "attributions.h5") as f:
        options = json.loads(f.attrs["options"])
        assert (options["baselines"], options["baseline_seed"], options["baseline_samples"]) == ("segments", 4, 2)
        assert np.abs(f["attributions/ig"][:]).sum() > 0
    bad = CliRunner().invoke(cli, args[:7] + ["--baseline-fill", "mean", "--image", str(image), "--out",
                                              str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--baselines segments" in bad.output
