"""NoiseTunnel: Captum's numbers for the same seeds (every nt_type, chunking, wrapped methods, baselines drawn from a
distribution, deltas), analytic cases and bad input."""

import itertools

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient as CaptumInputXGradient
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import NoiseTunnel as CaptumNoiseTunnel
from captum.attr import Saliency as CaptumSaliency

from fastig.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency

from _shared import SmallCNN, TwoInputNet, assert_close


def both(ours_method, captum_method, inputs, seed=5, **kw):
    torch.manual_seed(seed)
    np.random.seed(seed)
    theirs = CaptumNoiseTunnel(captum_method).attribute(inputs, **kw)
    torch.manual_seed(seed)
    np.random.seed(seed)
    ours = NoiseTunnel(ours_method).attribute(inputs, **kw)
    return ours, theirs


@pytest.mark.parametrize(
    "nt_type,nt_samples,chunk,stdevs",
    [(t, n, c, s) for t, (n, c, s) in itertools.product(
        ["smoothgrad", "smoothgrad_sq", "vargrad"], [(5, None, 1.0), (7, 3, 0.3), (4, 4, 0.1), (6, 1, 0.5)])],
)
def test_saliency_matches_captum(nt_type, nt_samples, chunk, stdevs):
    model = SmallCNN().eval()
    x = torch.randn(3, 3, 8, 8)
    ours, theirs = both(Saliency(model), CaptumSaliency(model), x, nt_type=nt_type, nt_samples=nt_samples,
                        nt_samples_batch_size=chunk, stdevs=stdevs, target=[0, 3, 4])
    assert_close(ours, theirs)


@pytest.mark.parametrize("abs_", [True, False])
def test_kwargs_reach_the_wrapped_method(abs_):
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    ours, theirs = both(Saliency(model), CaptumSaliency(model), x, nt_samples=3, stdevs=0.2, target=1, abs=abs_)
    assert_close(ours, theirs)


def test_input_x_gradient_tuple_inputs_and_args_match_captum():
    model = TwoInputNet()
    x1, x2 = torch.randn(2, 3, 2, 2), torch.randn(2, 5)
    args = (torch.tensor([[1.0], [-2.0]]),)
    ours, theirs = both(InputXGradient(model), CaptumInputXGradient(model), (x1, x2), nt_type="vargrad", nt_samples=5,
                        nt_samples_batch_size=2, stdevs=(0.1, 0.4), target=torch.tensor([2, 0]),
                        additional_forward_args=args)
    assert isinstance(ours, tuple)
    assert_close(ours, theirs)


@pytest.mark.parametrize("draw", [False, True])
@pytest.mark.parametrize("chunk", [None, 2])
def test_integrated_gradients_with_baselines_and_delta_match_captum(draw, chunk):
    model = SmallCNN().eval()
    x = torch.randn(3, 3, 8, 8)
    baselines = torch.randn(4, 3, 8, 8) if draw else torch.randn(3, 3, 8, 8) * 0.1
    (ours, our_delta), (theirs, their_delta) = both(
        IntegratedGradients(model), CaptumIG(model), x, nt_samples=5, nt_samples_batch_size=chunk, stdevs=0.2,
        draw_baseline_from_distrib=draw, baselines=baselines, target=2, n_steps=6, return_convergence_delta=True,
    )
    assert_close(ours, theirs, tol=1e-5)
    assert our_delta.shape == their_delta.shape == (15,)
    torch.testing.assert_close(our_delta, their_delta, rtol=1e-4, atol=1e-5)


def test_float64_inputs():
    model = SmallCNN().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ours, theirs = both(Saliency(model), CaptumSaliency(model), x, nt_samples=3, stdevs=0.5, target=0)
    assert ours.dtype == torch.float64
    assert_close(ours, theirs, tol=1e-12)


def test_linear_model_analytic():
    """For f(x) = w.x the gradient is w at every noisy copy: smoothgrad = |w|, smoothgrad_sq = w^2, vargrad = 0."""
    w = torch.randn(7)
    x = torch.randn(3, 7)
    nt = NoiseTunnel(Saliency(lambda z: z @ w))
    torch.testing.assert_close(nt.attribute(x, nt_samples=6, stdevs=2.0), w.abs().expand(3, 7))
    torch.testing.assert_close(nt.attribute(x, nt_type="smoothgrad_sq", nt_samples=6), (w**2).expand(3, 7))
    torch.testing.assert_close(nt.attribute(x, nt_type="vargrad", nt_samples=6), torch.zeros(3, 7), atol=1e-6, rtol=0)


def test_noise_statistics():
    """Identity-times-input model f(x) = sum(x^2)/2 has gradient x: smoothgrad of the signed gradient is the mean
    noisy input (close to x), vargrad its variance (close to stdev^2)."""
    x = torch.randn(2, 50)
    nt = NoiseTunnel(Saliency(lambda z: (z**2).sum(1) / 2))
    mean = nt.attribute(x, nt_samples=4000, nt_samples_batch_size=1000, stdevs=0.5, abs=False)
    var = nt.attribute(x, nt_type="vargrad", nt_samples=4000, stdevs=0.5, abs=False)
    assert (mean - x).abs().max() < 0.06
    assert (var.mean() - 0.25).abs() < 0.01


def test_bad_input_is_a_clear_error():
    model = SmallCNN()
    x = torch.randn(2, 3, 8, 8)
    nt = NoiseTunnel(Saliency(model))
    with pytest.raises(ValueError, match="nt_type"):
        nt.attribute(x, nt_type="smooth", target=0)
    with pytest.raises(ValueError, match="nt_samples"):
        nt.attribute(x, nt_samples=0, target=0)
    with pytest.raises(ValueError, match="stdevs"):
        nt.attribute(x, stdevs=(0.1, 0.2), target=0)
    with pytest.raises(ValueError, match="convergence delta"):
        nt.attribute(x, target=0, return_convergence_delta=True)
    with pytest.raises(ValueError, match="baselines"):
        NoiseTunnel(IntegratedGradients(model)).attribute(x, target=0, draw_baseline_from_distrib=True)
    with pytest.raises(TypeError, match="attribution"):
        NoiseTunnel(model)
