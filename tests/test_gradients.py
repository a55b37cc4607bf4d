"""Saliency, InputXGradient, GradientShap: Captum's numbers (same seeds), analytic references, batching, bad input,
and the center-pixel sanity checks of the gradient family."""

import itertools

import numpy as np
import pytest
import torch
from captum.attr import GradientShap as CaptumGradientShap
from captum.attr import InputXGradient as CaptumInputXGradient
from captum.attr import Saliency as CaptumSaliency

from fastig import methods
from fastig.api import attribute
from fastig.attr import GradientShap, GuidedBackprop, GuidedNonLinearityIG, InputXGradient, NoiseTunnel, Saliency
from fastig.models.centerpixel import CENTER, SIZE, centerpixel

from _shared import SmallCNN, TwoInputNet, assert_close


TARGETS = {"int": lambda n: 2, "list": lambda n: [i % 5 for i in range(n)], "tensor": lambda n: torch.arange(n) % 5}


# -- Saliency and InputXGradient --------------------------------------------------------------------------------


@pytest.mark.parametrize("target,batch,abs_", list(itertools.product(TARGETS, [None, 1, 3], [True, False])))
def test_saliency_matches_captum(target, batch, abs_):
    model = SmallCNN().eval()
    x = torch.randn(5, 3, 8, 8)
    t = TARGETS[target](5)
    theirs = CaptumSaliency(model).attribute(x, target=t, abs=abs_)
    ours = Saliency(model).attribute(x, target=t, abs=abs_, internal_batch_size=batch)
    assert_close(ours, theirs)


@pytest.mark.parametrize("target,batch", list(itertools.product(TARGETS, [None, 2])))
def test_input_x_gradient_matches_captum(target, batch):
    model = SmallCNN().eval()
    x = torch.randn(4, 3, 8, 8)
    t = TARGETS[target](4)
    assert_close(InputXGradient(model).attribute(x, target=t, internal_batch_size=batch),
                 CaptumInputXGradient(model).attribute(x, target=t))


@pytest.mark.parametrize("cls,captum_cls", [(Saliency, CaptumSaliency), (InputXGradient, CaptumInputXGradient)])
def test_tuple_inputs_and_additional_args_match_captum(cls, captum_cls):
    model = TwoInputNet()
    x1, x2 = torch.randn(3, 3, 2, 2), torch.randn(3, 5)
    args = (torch.tensor([[1.0], [2.0], [3.0]]),)
    theirs = captum_cls(model).attribute((x1, x2), target=1, additional_forward_args=args)
    ours = cls(model).attribute((x1, x2), target=1, additional_forward_args=args, internal_batch_size=2)
    assert isinstance(ours, tuple)
    assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7), (2, 2, 5, 4)])
def test_analytic_quadratic(dtype, shape):
    """f(x) = sum(w * x^2): gradient 2 w x, input x gradient 2 w x^2 (plain-torch reference)."""
    w = torch.randn(shape[1:], dtype=dtype)

    def f(x):
        return (w * x**2).flatten(1).sum(1)

    x = torch.randn(shape, dtype=dtype)
    sal = Saliency(f).attribute(x, abs=False, internal_batch_size=1)
    assert sal.dtype == dtype
    torch.testing.assert_close(sal, 2 * w * x)
    torch.testing.assert_close(Saliency(f).attribute(x), (2 * w * x).abs())
    torch.testing.assert_close(InputXGradient(f).attribute(x), 2 * w * x**2)


def test_bad_input_is_a_clear_error():
    model = SmallCNN()
    with pytest.raises(TypeError, match="callable"):
        Saliency(3)
    with pytest.raises(TypeError, match="inputs"):
        Saliency(model).attribute([1, 2])
    with pytest.raises(ValueError, match="out of range"):
        Saliency(model).attribute(torch.randn(2, 3, 8, 8), target=9)
    with pytest.raises(ValueError, match="internal_batch_size"):
        InputXGradient(model).attribute(torch.randn(2, 3, 8, 8), target=0, internal_batch_size=0)


# -- GradientShap -----------------------------------------------------------------------------------------------


def _both_gradient_shap(model, inputs, baselines, seed=3, multiply=True, batch=None, **kw):
    torch.manual_seed(seed)
    np.random.seed(seed)
    theirs = CaptumGradientShap(model, multiply_by_inputs=multiply).attribute(inputs, baselines, **kw)
    torch.manual_seed(seed)
    np.random.seed(seed)
    ours = GradientShap(model, multiply_by_inputs=multiply).attribute(inputs, baselines, internal_batch_size=batch, **kw)
    return ours, theirs


@pytest.mark.parametrize(
    "n_samples,stdevs,target,batch,multiply",
    [
        (5, 0.0, "int", None, True),
        (3, 0.2, "list", 1, True),
        (4, 0.5, "tensor", 5, False),
        (1, 0.1, "int", 2, True),
        (7, 1.0, "list", 64, True),
    ],
)
def test_gradient_shap_matches_captum(n_samples, stdevs, target, batch, multiply):
    model = SmallCNN().eval()
    x = torch.randn(3, 3, 8, 8)
    baselines = torch.randn(6, 3, 8, 8)
    (ours, our_delta), (theirs, their_delta) = _both_gradient_shap(
        model, x, baselines, multiply=multiply, batch=batch, n_samples=n_samples, stdevs=stdevs,
        target=TARGETS[target](3), return_convergence_delta=True,
    )
    assert_close(ours, theirs)
    assert our_delta.shape == their_delta.shape == (3 * n_samples,)
    torch.testing.assert_close(our_delta, their_delta, rtol=1e-5, atol=1e-5)


def test_gradient_shap_tuple_inputs_args_and_callable_baselines():
    model = TwoInputNet()
    x1, x2 = torch.randn(2, 3, 2, 2), torch.randn(2, 5)

    def baselines(inputs):
        return (torch.zeros(3, 3, 2, 2), torch.rand(3, 5))

    args = (torch.tensor([[1.0], [2.0]]),)
    ours, theirs = _both_gradient_shap(model, (x1, x2), baselines, batch=3, n_samples=4, stdevs=(0.1, 0.3),
                                       target=2, additional_forward_args=args)
    assert_close(ours, theirs)


class DrawReferences:
    """A callable object as the baseline distribution (Captum calls it with the inputs)."""

    def __call__(self, inputs):
        return inputs.flip(0) * 0.5


@pytest.mark.parametrize("baselines", [lambda: torch.linspace(-1, 1, 5 * 3 * 8 * 8).reshape(5, 3, 8, 8),
                                       lambda inputs: inputs * 0.25, DrawReferences()],
                         ids=["no-arguments", "of-the-inputs", "callable-object"])
def test_gradient_shap_callable_baselines_match_captum(baselines):
    model, x = SmallCNN().eval(), torch.randn(3, 3, 8, 8)
    ours, theirs = _both_gradient_shap(model, x, baselines, n_samples=3, stdevs=0.1, target=[0, 2, 1])
    assert_close(ours, theirs)


def test_gradient_shap_compute_convergence_delta_matches_captum():
    model, x = SmallCNN().eval(), torch.randn(2, 3, 8, 8)
    attributions = GradientShap(model).attribute(x, torch.zeros(3, 3, 8, 8), n_samples=4, target=3)
    for start in (torch.zeros(2, 3, 8, 8), 0.5, torch.rand(1, 3, 8, 8)):
        expected = CaptumGradientShap(model).compute_convergence_delta(attributions, start, x, target=3)
        got = GradientShap(model).compute_convergence_delta(attributions, start, x, target=3)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_gradient_shap_float64_and_single_reference():
    model = SmallCNN().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ours, theirs = _both_gradient_shap(model, x, torch.zeros(1, 3, 8, 8, dtype=torch.float64), n_samples=3, target=1)
    assert ours.dtype == torch.float64
    assert_close(ours, theirs, tol=1e-12)


def test_gradient_shap_on_linear_model_is_exact():
    """For f(x) = w.x and no noise, every sample gives (x - b) * w, so the mean is (x - mean of drawn b) * w."""
    w = torch.randn(6)
    x = torch.randn(4, 6)
    baselines = torch.ones(3, 6) * 2.0  # every reference row equal: the draw does not matter
    out = GradientShap(lambda z: z @ w).attribute(x, baselines, n_samples=9)
    torch.testing.assert_close(out, (x - 2.0) * w)


def test_gradient_shap_bad_input():
    model = SmallCNN()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="per-example shape"):
        GradientShap(model).attribute(x, torch.zeros(4, 3, 4, 4), target=0)
    with pytest.raises(ValueError, match="n_samples"):
        GradientShap(model).attribute(x, torch.zeros(4, 3, 8, 8), n_samples=0, target=0)
    with pytest.raises(TypeError, match="stdevs"):
        GradientShap(model).attribute(x, torch.zeros(4, 3, 8, 8), stdevs="big", target=0)
    with pytest.raises(TypeError, match="distribution"):
        GradientShap(model).attribute(x, 0.0, target=0)


# -- registry ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["saliency", "input_x_gradient", "smoothgrad", "guided_backprop", "deconvnet", "gradient_shap",
             "second_order", "gnl_ig"],
)
def test_registered_methods_run_with_their_demo_options(name):
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    spec = methods.get(name)
    out = attribute(model, x, target=1, method=name, **spec.demo)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape[0] == 2 and out.shape[-2:] == (8, 8) and torch.isfinite(out).all()


def test_registered_saliency_flags_reach_attribute():
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    signed = attribute(model, x, target=1, method="saliency", abs=False)
    torch.testing.assert_close(signed, CaptumSaliency(model).attribute(x, target=1, abs=False))
    assert (signed < 0).any()


# -- center-pixel sanity ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def center_model():
    return centerpixel().eval()


def _center_rank(attribution):
    score = attribution[0, 0].abs()
    return int((score >= score[CENTER, CENTER]).sum().item())


CENTER_METHODS = {
    "saliency": lambda m, x, t: Saliency(m).attribute(x, target=t),
    "input_x_gradient": lambda m, x, t: InputXGradient(m).attribute(x, target=t),
    "smoothgrad": lambda m, x, t: NoiseTunnel(Saliency(m)).attribute(x, target=t, nt_samples=4, stdevs=0.02),
    "guided_backprop": lambda m, x, t: GuidedBackprop(m).attribute(x, target=t),
    "gradient_shap": lambda m, x, t: GradientShap(m).attribute(x, torch.zeros(1, 1, SIZE, SIZE), target=t),
    "gnl_ig": lambda m, x, t: GuidedNonLinearityIG(m).attribute(x, target=t, n_steps=8),
}


@pytest.mark.parametrize("name", list(CENTER_METHODS))
@pytest.mark.parametrize("background", ["uniform", "noise"])
def test_center_pixel_ranks_first(name, background, center_model):
    """The explained (predicted) class depends only on the center pixel: methods whose attribution is (input x)
    the gradient of that logit must rank the center pixel first. (Class 0 is avoided: its logit has zero weight on
    the center pixel.)"""
    model = center_model
    x = torch.full((1, 1, SIZE, SIZE), 0.5) if background == "uniform" else torch.rand(1, 1, SIZE, SIZE)
    x[0, 0, CENTER, CENTER] = 0.6
    target = int(model(x).argmax(1))
    assert target == round(255 * 0.6)
    assert _center_rank(CENTER_METHODS[name](model, x, target)) == 1


def test_input_x_gradient_is_zero_on_pixels_equal_to_the_baseline(center_model):
    """Growing patch: a patch of non-zero pixels around the center on a black image; input x gradient must give
    exactly zero to every black pixel (the implicit baseline) and rank the center first."""
    model = center_model
    for half in (0, 2, 10, 40):
        x = torch.zeros(1, 1, SIZE, SIZE)
        x[0, 0, CENTER - half:CENTER + half + 1, CENTER - half:CENTER + half + 1] = torch.rand(2 * half + 1, 2 * half + 1) + 0.2
        target = int(model(x).argmax(1))
        out = InputXGradient(model).attribute(x, target=target)
        assert (out[x == 0] == 0).all()
        assert (out[x != 0] != 0).all()
        assert _center_rank(out) == 1
