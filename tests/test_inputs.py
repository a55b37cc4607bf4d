"""Bad inputs to the Python API get a fastig error naming the argument and what was expected, and a model is
never changed by being attributed (issue 16, items 12 and 13)."""

import warnings

import pytest
import torch
from torch import nn

import fastig
from fastig import attr
from fastig.attr._base import TrainingModeWarning
from fastig.errors import FastigError, InputError

from _shared import SmallCNN


@pytest.fixture
def model():
    return SmallCNN().eval()


def _every_method(model):
    """One object of each attribution class, on SmallCNN (output [N, 5] for 8x8 RGB images), with its options for
    an input x (shaped to x's examples, as a caller who meant x would give them)."""
    def window(x):
        return dict(sliding_window_shapes=tuple(min(4, s) for s in x.shape[1:]), strides=4)

    return {
        "ig": (attr.IntegratedGradients(model), lambda x: dict(n_steps=4)),
        "saliency": (attr.Saliency(model), lambda x: {}),
        "input_x_gradient": (attr.InputXGradient(model), lambda x: {}),
        "smoothgrad": (attr.NoiseTunnel(attr.Saliency(model)), lambda x: dict(nt_samples=2, stdevs=0.1)),
        "gradient_shap": (attr.GradientShap(model),
                          lambda x: dict(baselines=torch.zeros((2,) + x.shape[1:], dtype=x.dtype), n_samples=2)),
        "guided_backprop": (attr.GuidedBackprop(model), lambda x: {}),
        "blur_ig": (attr.BlurIntegratedGradients(model), lambda x: dict(n_steps=4)),
        "guided_ig": (attr.GuidedIntegratedGradients(model), lambda x: dict(n_steps=4)),
        "deeplift": (attr.DeepLift(model), lambda x: {}),
        "occlusion": (attr.Occlusion(model), window),
        "feature_ablation": (attr.FeatureAblation(model), lambda x: {}),
    }


@pytest.mark.parametrize("name", list(_every_method(SmallCNN())))
@pytest.mark.parametrize("bad, expected", [
    (lambda x: x[0], r"inputs\[0\] has shape \(3, 8, 8\).*\[N, 3, H, W\]"),  # a single image without its batch
    (lambda x: x[None], r"inputs\[0\] has shape \(1, 2, 3, 8, 8\).*\[N, 3, H, W\]"),
    (lambda x: x.double(), r"inputs\[0\] has dtype torch.float64.*parameters are torch.float32"),
])
def test_an_input_that_does_not_fit_the_model_is_named_with_what_it_expects(model, name, bad, expected):
    method, options = _every_method(model)[name]
    x = bad(torch.rand(2, 3, 8, 8))
    with pytest.raises(InputError, match=expected) as refused:
        method.attribute(x, target=1, **options(x))
    assert "\n" not in str(refused.value)
    assert refused.value.__cause__ is not None  # the model's own error is kept, chained


def test_a_fitting_input_of_another_rank_is_not_refused():
    """The diagnosis only runs when the model fails: a model that takes [N, H, W] and adds the channel works."""
    class Grey(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x.unsqueeze(1)).sum((2, 3))

    out = attr.IntegratedGradients(Grey()).attribute(torch.rand(2, 6, 6), target=0, n_steps=4)
    assert out.shape == (2, 6, 6)


@pytest.mark.parametrize("name", ["ig", "saliency", "smoothgrad", "occlusion"])
def test_an_empty_batch_is_refused_by_name(model, name):
    method, options = _every_method(model)[name]
    x = torch.rand(0, 3, 8, 8)
    with pytest.raises(InputError, match=r"inputs\[0\] holds no example \(shape \(0, 3, 8, 8\)\)"):
        method.attribute(x, target=0, **options(x))


def test_a_baseline_of_the_wrong_shape_is_a_fastig_error_naming_it(model):
    x = torch.rand(2, 3, 8, 8)
    for baseline in (torch.zeros(2, 3, 4, 4), torch.zeros(3, 8, 8), torch.zeros(3, 3, 8, 8)):
        with pytest.raises(InputError, match=r"baselines\[0\] has shape .*input's shape \(2, 3, 8, 8\)"):
            attr.IntegratedGradients(model).attribute(x, baselines=baseline, target=0, n_steps=4)


@pytest.mark.parametrize("target, expected", [
    (torch.tensor([[0], [1]]), r"target.*one integer per example \(2\).*shape \(2, 1\)"),
    (torch.tensor([0, 1, 2]), r"target.*one integer per example \(2\).*shape \(3,\)"),
    ([0, 1, 2], r"target list has 3 entries.*2 examples"),
    (7, r"target 7 is out of range.*5 classes"),
    (torch.tensor([0, 9]), r"target out of range.*5 classes"),
])
def test_a_target_of_the_wrong_shape_or_range_is_a_fastig_error_naming_it(model, target, expected):
    with pytest.raises(InputError, match=expected):
        attr.IntegratedGradients(model).attribute(torch.rand(2, 3, 8, 8), target=target, n_steps=4)


def test_the_functional_form_refuses_negative_classes(model):
    x = torch.rand(2, 3, 8, 8)
    for target in (-1, [0, -2], torch.tensor([-1, 0]), (-1,)):
        with pytest.raises(InputError, match=r"target.*negative.*-[12]"):
            fastig.attribute(model, x, target=target, method="saliency")
    # the Captum-named classes keep Captum's (Python's) indexing: -1 is the last class
    last = attr.Saliency(model).attribute(x, target=-1)
    torch.testing.assert_close(last, attr.Saliency(model).attribute(x, target=4))


@pytest.mark.parametrize("method, options", [
    ("smoothgrad", dict(nt_samples=2)),
    ("gradient_shap", dict(n_samples=2)),
])
@pytest.mark.parametrize("stdevs", [float("inf"), float("nan"), -1.0, 1e300])
def test_noise_options_are_named_when_they_cannot_make_finite_inputs(model, method, options, stdevs):
    with pytest.raises(InputError, match=r"^stdevs"):
        fastig.attribute(model, torch.rand(2, 3, 8, 8), target=0, method=method, stdevs=stdevs, **options)


# --- a model in training mode ------------------------------------------------------------------------------


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["ig", "smoothgrad", "occlusion", "deeplift"])
def test_a_model_in_training_mode_is_warned_about_once_and_left_unchanged(name):
    torch.manual_seed(0)
    net = BatchNormNet()
    net.train()
    net.drop.eval()  # a mixed state must come back exactly as it was
    before, flags = _state(net), {n: m.training for n, m in net.named_modules()}
    x = torch.rand(2, 3, 8, 8)
    method_options = {"ig": (attr.IntegratedGradients, dict(n_steps=4)),
                      "smoothgrad": (lambda m: attr.NoiseTunnel(attr.Saliency(m)), dict(nt_samples=2, stdevs=0.1)),
                      "occlusion": (attr.Occlusion, dict(sliding_window_shapes=(3, 4, 4), strides=4)),
                      "deeplift": (attr.DeepLift, {})}
    make, options = method_options[name]
    with pytest.warns(TrainingModeWarning, match="BatchNormNet is in training mode.*eval mode"):
        first = make(net).attribute(x, target=1, **options)
    assert {n: m.training for n, m in net.named_modules()} == flags
    after = _state(net)
    assert all(torch.equal(before[k], after[k]) for k in before), "BatchNorm statistics changed"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingModeWarning)  # once per model
        torch.manual_seed(1)
        second = make(net).attribute(x, target=1, **options)
    if name != "smoothgrad":  # deterministic in eval mode: no dropout, running statistics
        torch.testing.assert_close(first, second)
        torch.testing.assert_close(first, make(net.eval()).attribute(x, target=1, **options))


def test_a_model_in_training_mode_is_restored_when_the_attribution_fails():
    net = BatchNormNet().train()
    with pytest.warns(TrainingModeWarning):
        with pytest.raises(FastigError):
            attr.Saliency(net).attribute(torch.rand(2, 3, 8, 8), target=9)
    assert all(m.training for m in net.modules())
