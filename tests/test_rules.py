"""Backward rules (fastig.attr.rules) through ``rules=`` of every gradient and path method.

The reference is a one-hidden-layer ReLU net ``f(x) = W2 relu(W1 x + b1) + b2``, whose guided gradient for class
``t`` is known in closed form: ``W1^T (W2[t] * (W2[t] > 0) * (W1 x + b1 > 0))`` (deconvnet: without the last
factor), computed here by hand in float64. PAIR's Guided IG and Blur IG, given that gradient as their model
function, are the references of guided Guided IG and guided Blur IG. GNL-IG's old class and ``rules="gnl"`` on
IntegratedGradients must agree bit for bit on a zoo model with max-pools and functional ReLUs (googlenet).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import fastig
from fastig import methods
from fastig.attr import (BlurIntegratedGradients, Deconvolution, GradientShap, GuidedBackprop,
                         GuidedIntegratedGradients, GuidedNonLinearityIG, InputXGradient, IntegratedGradients,
                         NoiseTunnel, Occlusion, Saliency, SecondOrderGradients)
from fastig.attr import rules as backward_rules
from fastig.errors import InputError, UnknownNameError

saliency_core = pytest.importorskip("saliency.core")
from saliency.core import guided_ig as pair_guided_ig_module  # noqa: E402
from _pair import NumpyWithQuantileInterpolation  # noqa: E402  (PAIR's Guided IG on NumPy >= 2.4)

SHAPE = (3, 4, 4)  # one image: 48 inputs


class OneHidden(torch.nn.Module):
    """f(x) = fc2(relu(fc1(flatten(x)))), the ReLU functional (F.relu) or an nn.ReLU module."""

    def __init__(self, functional=True, hidden=12, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(int(np.prod(SHAPE)), hidden)
        self.fc2 = torch.nn.Linear(hidden, classes)
        self.relu = None if functional else torch.nn.ReLU()

    def forward(self, x):
        pre = self.fc1(x.flatten(1))
        return self.fc2(F.relu(pre) if self.relu is None else self.relu(pre))


def closed_form(model, x, target, rule="guided"):
    """The guided (or deconvnet) gradient of class ``target`` at each row of ``x``, by hand in float64."""
    w1, b1, w2 = (p.detach().double() for p in (model.fc1.weight, model.fc1.bias, model.fc2.weight))
    x = torch.as_tensor(x, dtype=torch.float64)
    g = w2[torch.as_tensor(target)].reshape(-1, w2.shape[1]).expand(x.shape[0], -1)  # d f_t / d hidden
    g = g.clamp(min=0)
    if rule == "guided":
        g = g * (x.flatten(1) @ w1.T + b1 > 0)
    return (g @ w1).reshape(x.shape)


def plain_gradient(model, x, target):
    w1, b1, w2 = (p.detach().double() for p in (model.fc1.weight, model.fc1.bias, model.fc2.weight))
    x = torch.as_tensor(x, dtype=torch.float64)
    return ((w2[target] * (x.flatten(1) @ w1.T + b1 > 0)) @ w1).reshape(x.shape)


@pytest.fixture
def model():
    return OneHidden().double().eval()


def inputs(n=3, seed=1):
    return torch.randn((n,) + SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


# --- gradient methods: the closed form ----------------------------------------------------------------------


@pytest.mark.parametrize("functional", [True, False])
@pytest.mark.parametrize("rule", ["guided", "deconv"])
def test_saliency_and_input_x_gradient_follow_the_closed_form(functional, rule):
    model = OneHidden(functional).double().eval()
    x, targets = inputs(), [0, 3, 1]
    expected = closed_form(model, x, targets, rule)
    ours = Saliency(model).attribute(x, target=targets, abs=False, rules=rule)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    assert relative_error(Saliency(model).attribute(x, target=targets, abs=False), expected) > 1e-2  # rules matter
    torch.testing.assert_close(InputXGradient(model).attribute(x, target=targets, rules=rule), x * expected,
                               rtol=1e-12, atol=1e-12)
    own_class = GuidedBackprop if rule == "guided" else Deconvolution
    torch.testing.assert_close(own_class(model).attribute(x, target=targets), expected, rtol=1e-12, atol=1e-12)


def test_rules_compose_from_a_mapping_or_a_rules_object(model):
    x = inputs()
    named = IntegratedGradients(model).attribute(x, target=2, n_steps=5, rules="gnl")
    for same in ({"relu": "guided", "max_pool": "positive"}, backward_rules.Rules("guided", "positive")):
        assert torch.equal(IntegratedGradients(model).attribute(x, target=2, n_steps=5, rules=same), named)
    plain = IntegratedGradients(model).attribute(x, target=2, n_steps=5)
    assert torch.equal(IntegratedGradients(model).attribute(x, target=2, n_steps=5, rules={}), plain)
    assert backward_rules.active() is None
    with backward_rules.applied({"max_pool": "positive"}):
        assert backward_rules.active() == backward_rules.Rules(max_pool="positive")
        with backward_rules.applied("deconv"):
            assert backward_rules.active() == backward_rules.RULE_SETS["deconv"]
        assert backward_rules.active().relu == "gradient"
    assert backward_rules.active() is None


# --- path methods: PAIR's algorithms fed the closed-form guided gradient ------------------------------------


def pair_gradient_function(model, target, channels_last=False):
    def call(x_batch, call_model_args=None, expected_keys=None):
        x = np.asarray(x_batch)
        x = x.transpose(0, 3, 1, 2) if channels_last else x
        grad = closed_form(model, x, target).numpy()
        return {saliency_core.INPUT_OUTPUT_GRADIENTS: grad.transpose(0, 2, 3, 1) if channels_last else grad}

    return call


def test_guided_guided_ig_is_pairs_guided_ig_of_the_guided_gradient(model, monkeypatch):
    monkeypatch.setattr(pair_guided_ig_module, "np", NumpyWithQuantileInterpolation("numpy"))
    x, baselines, targets = inputs(), inputs(seed=2) * 0.1, [0, 3, 1]
    ours = GuidedIntegratedGradients(model).attribute(x, baselines, target=targets, n_steps=16, fraction=0.25,
                                                      max_dist=0.1, rules="guided")
    theirs = torch.tensor(np.stack([
        saliency_core.GuidedIG().GetMask(xi.numpy(), pair_gradient_function(model, t), x_baseline=bi.numpy(),
                                         x_steps=16, fraction=0.25, max_dist=0.1)
        for xi, bi, t in zip(x, baselines, targets)]))
    assert relative_error(ours, theirs) < 1e-9
    plain = GuidedIntegratedGradients(model).attribute(x, baselines, target=targets, n_steps=16, fraction=0.25,
                                                       max_dist=0.1)
    assert relative_error(plain, theirs) > 1e-2


def test_guided_blur_ig_is_pairs_blur_ig_of_the_guided_gradient(model):
    x, targets = inputs(), [2, 0, 3]
    ours = BlurIntegratedGradients(model).attribute(x, target=targets, n_steps=12, max_sigma=3.0, rules="guided")
    theirs = torch.tensor(np.stack([
        saliency_core.BlurIG().GetMask(xi.numpy().transpose(1, 2, 0), pair_gradient_function(model, t, True),
                                       steps=12, max_sigma=3.0, batch_size=1).transpose(2, 0, 1)
        for xi, t in zip(x, targets)]))
    assert relative_error(ours, theirs) < 1e-10
    assert relative_error(BlurIntegratedGradients(model).attribute(x, target=targets, n_steps=12, max_sigma=3.0),
                          theirs) > 1e-2


def test_ig_rules_are_ig_of_the_closed_form_gradient(model):
    """Riemann-right IG with guided rules = the mean of the closed-form guided gradients at the path points."""
    x, targets, n = inputs(), [1, 1, 2], 7
    ours = IntegratedGradients(model).attribute(x, target=targets, n_steps=n, method="riemann_right", rules="guided")
    points = [closed_form(model, x * k / n, targets) for k in range(1, n + 1)]
    # (fastig's quadrature weights are float32-exact only: 1e-7 relative, far below a rule's effect)
    torch.testing.assert_close(ours, x * sum(points) / n, rtol=1e-6, atol=1e-9)
    assert relative_error(IntegratedGradients(model).attribute(x, target=targets, n_steps=n, method="riemann_right"),
                          x * sum(points) / n) > 1e-2


def test_gradient_shap_and_noise_tunnel_take_rules(model):
    """Both draw random points: the same seeds with rules= give what the classes with their own rules give (or the
    closed form at the drawn points), and something else without."""
    x = inputs(2)
    torch.manual_seed(0)
    tunnel = NoiseTunnel(Saliency(model)).attribute(x, target=1, nt_samples=4, stdevs=0.3, abs=False, rules="guided")
    torch.manual_seed(0)
    own = NoiseTunnel(GuidedBackprop(model)).attribute(x, target=1, nt_samples=4, stdevs=0.3)
    assert torch.equal(tunnel, own)
    torch.manual_seed(0)
    plain = NoiseTunnel(Saliency(model)).attribute(x, target=1, nt_samples=4, stdevs=0.3, abs=False)
    assert relative_error(plain, own) > 1e-2

    baselines = inputs(3, seed=4)

    def shap(**kw):
        torch.manual_seed(0)
        np.random.seed(0)
        return GradientShap(model).attribute(x, baselines, n_samples=5, stdevs=0.1, target=2, **kw)

    guided, unguided = shap(rules="guided"), shap()
    # GradientShap = mean over samples of (x_noisy - b) * grad(point); the same draws with a guided model
    reference = OneHidden().double().eval()
    reference.relu = _PositiveGradientReLU()
    torch.manual_seed(0)
    np.random.seed(0)
    expected = GradientShap(reference).attribute(x, baselines, n_samples=5, stdevs=0.1, target=2)
    torch.testing.assert_close(guided, expected, rtol=1e-12, atol=1e-12)
    assert relative_error(unguided, expected) > 1e-2


class _PositiveGradientReLU(torch.nn.Module):
    """A guided ReLU written with a tensor hook, independently of fastig."""

    def forward(self, x):
        out = torch.relu(x)
        if out.requires_grad:
            out.register_hook(lambda g: g.clamp(min=0))
        return out


def test_latent_ig_rules_reach_the_classifier_only():
    """The dVAE's own ReLUs are not differentiated: guided latent IG = latent IG of the hand-guided classifier."""
    from fastig.attr import LatentIntegratedGradients
    from test_latent_ig import images, small_dvae

    dvae = small_dvae()
    classifier = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                     torch.nn.Linear(4 * 8 * 8, 3)).double().eval()
    x = images((2, 3, 8, 8))
    ours = LatentIntegratedGradients(classifier, dvae).attribute(x, target=1, n_steps=3, rules="guided")
    guided_classifier = torch.nn.Sequential(classifier[0], _PositiveGradientReLU(), *classifier[2:])
    expected = LatentIntegratedGradients(guided_classifier, dvae).attribute(x, target=1, n_steps=3)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    plain = LatentIntegratedGradients(classifier, dvae).attribute(x, target=1, n_steps=3)
    assert relative_error(plain, expected) > 1e-3


# --- GNL-IG: the old class and rules="gnl" on a zoo model ---------------------------------------------------


def test_gnl_rules_on_ig_equal_guided_non_linearity_ig_exactly():
    models = pytest.importorskip("fastig.models")
    torch.manual_seed(0)
    model = models.get("googlenet", weights="none")  # functional in-place ReLUs and ceil-mode max-pools
    x = torch.randn(1, 3, 32, 32)
    kw = dict(target=7, n_steps=2)
    ours = IntegratedGradients(model).attribute(x, rules="gnl", **kw)
    assert torch.equal(ours, GuidedNonLinearityIG(model).attribute(x, **kw))
    assert not torch.equal(ours, IntegratedGradients(model).attribute(x, rules="guided", **kw))  # max-pool counts


# --- the mechanism: removal, refusals, errors ---------------------------------------------------------------


class Failing(OneHidden):
    def forward(self, x):
        super().forward(x)  # through the ReLU under the rules, then fail
        raise RuntimeError("boom")


def test_rules_are_removed_after_an_exception(model):
    x = inputs()
    failing = Failing().double()
    for method in (Saliency(failing), IntegratedGradients(failing)):
        with pytest.raises(RuntimeError, match="boom"):
            method.attribute(x, target=1, rules="deconv")
        with pytest.raises(RuntimeError, match="boom"):
            with backward_rules.applied("gnl"):
                method.attribute(x, target=1)
        assert backward_rules.active() is None
        torch.testing.assert_close(Saliency(model).attribute(x, target=1, abs=False), plain_gradient(model, x, 1))
    y = torch.tensor([-1.0, 2.0], requires_grad=True)
    (g,) = torch.autograd.grad(F.relu(y), y, grad_outputs=torch.tensor([5.0, -3.0]))
    assert g.tolist() == [0.0, -3.0]  # a plain ReLU gradient again


@pytest.mark.parametrize("make, message", [
    (lambda m: Occlusion(m), "Occlusion does not take rules="),
    (lambda m: NoiseTunnel(Occlusion(m)), "NoiseTunnel does not take rules="),
    (lambda m: SecondOrderGradients(m, layer="fc1"), "SecondOrderGradients does not take rules="),
    (lambda m: GuidedBackprop(m), "GuidedBackprop always backpropagates with rules='guided'"),
    (lambda m: GuidedNonLinearityIG(m), "GuidedNonLinearityIG always backpropagates with rules='gnl'"),
    (lambda m: NoiseTunnel(GuidedBackprop(m)), "NoiseTunnel does not take rules="),
])
def test_methods_without_rules_refuse_them(model, make, message):
    with pytest.raises(InputError, match=message):
        make(model).attribute(inputs(), target=0, rules="guided")


@pytest.mark.parametrize("rules, message", [
    ("guidded", "rules: unknown rule set 'guidded'; choices: 'guided', 'deconv', 'gnl'"),
    ({"relu": "guided", "maxpool": "positive"}, "unknown keys \\['maxpool'\\]"),
    ({"relu": "positive"}, "unknown ReLU rule relu='positive'; choices: gradient, guided, deconv"),
    (3, "unknown rule set 3"),
])
def test_unknown_rules_are_one_clear_error(model, rules, message):
    with pytest.raises(UnknownNameError, match=message):
        IntegratedGradients(model).attribute(inputs(), target=0, rules=rules)
    assert len(str(pytest.raises(UnknownNameError, backward_rules.resolve, rules).value).splitlines()) == 1


def test_classes_that_take_rules_document_them():
    from fastig.attr import LatentIntegratedGradients

    for cls in (IntegratedGradients, GuidedIntegratedGradients, BlurIntegratedGradients, LatentIntegratedGradients,
                Saliency, InputXGradient, GradientShap):
        assert cls.takes_rules and "attribute(..., rules=...)" in cls.__doc__, cls
    assert "rules=" not in Occlusion.__doc__


def test_functional_form_takes_rules(model):
    x = inputs()
    assert torch.equal(fastig.attribute(model, x, target=1, method="saliency", abs=False, rules="guided"),
                       Saliency(model).attribute(x, target=1, abs=False, rules="guided"))


# --- the CLI ------------------------------------------------------------------------------------------------


def test_cli_choices_are_the_rule_sets():
    assert methods.OPTIONS["rules"].type is backward_rules.RULE_NAMES
    with_rules = {name for name in methods.names() if "rules" in methods.get(name).options}
    assert with_rules == {"ig", "guided_ig", "blur_ig", "latent_ig", "saliency", "input_x_gradient", "smoothgrad",
                          "gradient_shap"}


def test_cli_rules(tmp_path):
    import cv2
    import h5py

    image = tmp_path / "img.png"
    cv2.imwrite(str(image), (np.random.default_rng(0).random((30, 30)) * 255).astype(np.uint8))
    base = ["attribute", "--model", "centerpixel", "--method", "saliency", "--image", str(image)]
    result = CliRunner().invoke(fastig.cli.cli, base + ["--rules", "guided", "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    plain = CliRunner().invoke(fastig.cli.cli, base + ["--out", str(tmp_path / "p")])
    assert plain.exit_code == 0, plain.output
    # the center-pixel model's one ReLU is the identity on [0, 1] inputs with a positive gradient: same map
    with h5py.File(tmp_path / "g" / "attributions.h5") as g, h5py.File(tmp_path / "p" / "attributions.h5") as p:
        assert np.array_equal(g["attributions/saliency"][:], p["attributions/saliency"][:])
    other = CliRunner().invoke(fastig.cli.cli, base + ["--rules", "deconv", "--out", str(tmp_path / "g")])
    assert other.exit_code == 2 and "other settings" in other.output  # the rules are part of the run's identity
    bad = CliRunner().invoke(fastig.cli.cli, base + ["--rules", "positive", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2
    lines = bad.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastig: error:") and "--rules" in lines[0], bad.output
    refused = CliRunner().invoke(fastig.cli.cli, base[:4] + ["occlusion", "--image", str(image), "--rules",
                                                             "guided", "--out", str(tmp_path / "o")])
    assert refused.exit_code == 2 and "--rules does not apply to --method occlusion" in refused.output
