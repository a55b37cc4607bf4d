"""LRP: Captum's numbers on models Captum supports (default and per-layer rules), a float64 reference,
conservation, skip connections and module reuse (where Captum is wrong or fails)."""

from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import LRP as CaptumLRP
from captum.attr._utils import lrp_rules as captum_rules
from torch import nn

from fastig import models
from fastig.attr.lrp import LRP, Alpha1_Beta0_Rule, EpsilonRule, GammaRule, IdentityRule, ZRule, as_rule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum")


class SmallCNN(nn.Module):
    """Every layer type Captum's LRP supports: Conv, BatchNorm (eval), ReLU, MaxPool, Tanh, AvgPool,
    AdaptiveAvgPool, Dropout, Linear."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(8, 8, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Dropout(),
        )
        self.fc = nn.Linear(8, 10)
        self.eval()
        with torch.no_grad():
            self.features[1].running_mean.normal_()
            self.features[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


CAPTUM_RULES = {"epsilon": lambda: captum_rules.EpsilonRule(0.1), "gamma": captum_rules.GammaRule,
                "alpha_beta": captum_rules.Alpha1_Beta0_Rule, "identity": captum_rules.IdentityRule}
FASTIG_RULES = {"epsilon": lambda: EpsilonRule(0.1), "gamma": GammaRule, "alpha_beta": Alpha1_Beta0_Rule,
                "identity": IdentityRule}


def with_rules(model, rules, table):
    model = copy.deepcopy(model)  # Captum deletes the rule attributes after attribute()
    for index, name in rules.items():
        layer = model.fc if index == "fc" else model.features[index]
        layer.rule = table[name]()
    return model


@pytest.mark.parametrize("rules", [
    {},
    {0: "gamma", 4: "alpha_beta", "fc": "gamma"},
    {0: "alpha_beta", 7: "epsilon"},
    {1: "identity"},
], ids=["default", "gamma-alphabeta", "alphabeta-eps", "identity"])
@pytest.mark.parametrize("n", [1, 3])
def test_matches_captum_on_small_cnn(rules, n):
    base = SmallCNN()
    torch.manual_seed(n)
    x = torch.rand(n, 3, 8, 8)
    target = list(range(n))
    expected, expected_delta = CaptumLRP(with_rules(base, rules, CAPTUM_RULES)).attribute(
        x, target=target, return_convergence_delta=True)
    got, delta = LRP(with_rules(base, rules, FASTIG_RULES)).attribute(x, target=target, return_convergence_delta=True)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(delta, expected_delta.detach(), atol=1e-5, rtol=1e-4)


def test_captum_rule_objects_and_rules_keyword_agree():
    base = SmallCNN()
    x = torch.rand(2, 3, 8, 8)
    expected = CaptumLRP(with_rules(base, {0: "gamma", "fc": "alpha_beta"}, CAPTUM_RULES)).attribute(x, target=3)
    # Captum's own rule objects on the modules
    got = LRP(with_rules(base, {0: "gamma", "fc": "alpha_beta"}, CAPTUM_RULES)).attribute(x, target=3)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    # the fastig keyword: by qualified name and by class
    got = LRP(base, rules={"features.0": "gamma", nn.Linear: "alpha_beta"}).attribute(x, target=3)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    # "default" replaces the epsilon rule everywhere; lrp_rule does the same for one call
    everywhere = {i: "gamma" for i in (0, 1, 3, 4, 6, 7, 9)} | {"fc": "gamma"}
    expected = CaptumLRP(with_rules(base, everywhere, CAPTUM_RULES)).attribute(x, target=3)
    torch.testing.assert_close(LRP(base, rules={"default": "gamma"}).attribute(x, target=3), expected,
                               atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(LRP(base).attribute(x, target=3, lrp_rule="gamma"), expected, atol=1e-6, rtol=1e-4)
    assert all("forward" not in vars(m) and not hasattr(m, "rule") for m in base.modules())


def lrp_epsilon_reference(layers, x, target, eps):
    """LRP-epsilon on Linear-ReLU-Linear-ReLU-Linear, written out layer by layer in float64 (relevance form)."""
    params = [(l.weight.double(), l.bias.double()) for l in layers]
    activations = [x.double()]
    for i, (w, b) in enumerate(params):
        z = activations[-1] @ w.T + b
        activations.append(z if i == len(params) - 1 else z.relu())
    out = activations[-1]
    relevance = torch.zeros_like(out)
    relevance[:, target] = out[:, target]
    for (w, b), a in zip(reversed(params), reversed(activations[:-1])):
        z = a @ w.T + b
        s = relevance / (z + eps * torch.where(z >= 0, 1.0, -1.0).double())
        relevance = a * (s @ w)
    return relevance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-9, 0.5])
def test_matches_float64_reference(dtype, eps):
    torch.manual_seed(7)
    layers = [nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)]
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2]).to(dtype)
    x = torch.randn(4, 6, dtype=dtype)
    got = LRP(model, rules={"default": EpsilonRule(eps)}).attribute(x, target=1)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got.double(), lrp_epsilon_reference(layers, x, 1, eps), atol=tol, rtol=tol)


def test_conservation_without_biases():
    # Bias-free layers and the z-rule: relevance is conserved, sum(R) = output, up to the 1e-9 stabilizer that
    # every rule adds to its denominators (a relative loss of about 1e-9 / |z| per layer)
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, bias=False),
                          nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 5, bias=False)).double()
    x = torch.rand(3, 3, 12, 12, dtype=torch.float64)
    relevance, delta = LRP(model, rules={"default": "z"}).attribute(x, target=2, return_convergence_delta=True)
    output = model(x)[:, 2]
    assert (output.abs() > 1e-3).all()
    torch.testing.assert_close(relevance.flatten(1).sum(1), output, atol=0, rtol=1e-6)
    assert (delta.abs() < 1e-6 * output.abs()).all()


class ResidualNet(nn.Module):
    """Bias-free residual net with a reused ReLU (as torchvision's BasicBlock)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3, bias=False)

    def forward(self, x):
        x = self.relu(self.conv0(x))
        out = self.relu(self.conv2(self.relu(self.conv1(x))) + x)
        return self.fc(self.pool(out).flatten(1))


def test_skip_connections_conserve_relevance_where_captum_does_not():
    model = ResidualNet().double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    output = model(x)[:, 1]
    relevance, delta = LRP(model).attribute(x, target=1, return_convergence_delta=True)
    torch.testing.assert_close(relevance.flatten(1).sum(1), output, atol=0, rtol=1e-6)
    _, captum_delta = CaptumLRP(model).attribute(x, target=1, return_convergence_delta=True)
    assert captum_delta.abs().max() > 1e-3 * output.abs().max()  # Captum: the shortcut's relevance is mis-scaled


def test_resnet18_conserves_relevance_and_matches_captum_without_shortcuts():
    torch.manual_seed(10)
    model = models.get("resnet18", weights="none").eval()
    with torch.no_grad():
        model.fc.bias.zero_()  # with BatchNorm at its initial statistics, the network is bias-free
    x = torch.rand(1, 3, 32, 32)
    relevance, delta = LRP(model, rules={"default": "z"}).attribute(x, target=5, return_convergence_delta=True)
    output = model(x)[:, 5]
    assert delta.abs().max() < 1e-3 * output.abs().max()
    # the same layers without shortcuts (stem and a block's first half, average pool, classifier): Captum's numbers
    head = HeadOnResNetLayers(model).eval()
    expected = CaptumLRP(copy.deepcopy(head)).attribute(x, target=2)
    torch.testing.assert_close(LRP(head).attribute(x, target=2), expected, atol=1e-6, rtol=1e-4)


class HeadOnResNetLayers(nn.Module):
    def __init__(self, resnet):
        super().__init__()
        block = resnet.layer1[0]
        self.body = nn.Sequential(resnet.conv1, resnet.bn1, nn.ReLU(), resnet.maxpool, block.conv1, block.bn1,
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        torch.manual_seed(11)
        self.fc = nn.Linear(64, 4)

    def forward(self, t):
        return self.fc(self.body(t).flatten(1))


def test_unsupported_layers_and_bad_rules():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 2))
    with pytest.raises(TypeError, match="Sigmoid"):
        LRP(model).attribute(torch.randn(2, 3), target=0)
    assert all("forward" not in vars(m) for m in model.modules())  # restored after the error
    LRP(model, rules={nn.Sigmoid: None}).attribute(torch.randn(2, 3), target=0)  # explicit pass-through
    with pytest.raises(ValueError, match="unknown LRP rule"):
        LRP(model, rules={"default": "alpha"})
    with pytest.raises(ValueError, match="does not have"):
        LRP(model, rules={"features.9": "z"})
    with pytest.raises(TypeError, match="nn.Module"):
        LRP(lambda x: x)
    model[0].rule = "not a rule object"
    with pytest.raises(ValueError, match="unknown LRP rule"):
        LRP(model)
    assert isinstance(as_rule("z"), ZRule)


def test_verbose_prints_rules(capsys):
    LRP(SmallCNN()).attribute(torch.rand(1, 3, 8, 8), target=0, verbose=True)
    assert "EpsilonRule" in capsys.readouterr().out


def test_centerpixel_ranks_the_center_pixel_first():
    # relu(W x + b) with every logit >= 1 on [0, 1] inputs: LRP-epsilon gives R_p = x_p W[c, p] z_c / (z_c + eps),
    # i.e. input x gradient: the center pixel gets ~2 c^2, every other pixel <= 1 / 227^2 (the bias keeps the
    # rest). For a class c >= 1 the center pixel must rank first (for c = 0 its weight is 0).
    model = models.get("centerpixel", weights="none")
    torch.manual_seed(13)
    x = torch.rand(3, 1, 227, 227)
    x[:, 0, 113, 113] = torch.tensor([1 / 255, 0.5, 1.0])
    target = model(x).argmax(1)
    for rule in ("epsilon", "z", "gamma", "alpha_beta"):
        relevance = LRP(model).attribute(x, target=target, lrp_rule=rule)
        assert (relevance.flatten(1).argmax(1) == 113 * 227 + 113).all(), rule
    relevance = LRP(model).attribute(x, target=target)
    torch.testing.assert_close(relevance.flatten(1), x.flatten(1) * model.linear.weight[target], atol=1e-6, rtol=1e-4)


class AddedInputs(nn.Module):
    """forward(x1, x2) on x1 + x2, then a normalization written in forward, then layers with rules."""

    def __init__(self, late_input=False):
        super().__init__()
        torch.manual_seed(14)
        self.fc1, self.relu, self.fc2 = nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)
        self.late_input = late_input

    def forward(self, x1, x2):
        hidden = self.relu(self.fc1((x1 + x2 - 0.5) / 0.25))
        return self.fc2(hidden + x2[:, :1] if self.late_input else hidden)


def test_inputs_the_model_adds_get_captums_relevance_or_a_split():
    model = AddedInputs()
    assert LRP(model).forward_func is model
    torch.manual_seed(15)
    x1, x2 = torch.rand(3, 5), torch.rand(3, 5)
    expected = CaptumLRP(model).attribute((x1, x2), target=1)
    got = LRP(model).attribute((x1, x2), target=1)
    for g, e in zip(got, expected):  # Captum: relevance passes back like a gradient, each operand gets the sum's
        torch.testing.assert_close(g, e.detach(), atol=1e-6, rtol=1e-5)
    # split_inputs=True: the first layer's input relevance R_a (a = (x1 + x2 - 0.5) / 0.25), divided by
    # contribution through the sum and the affine map: x_i * R_a / (4 (x1 + x2 - 0.5)), float64 reference
    a = (x1 + x2 - 0.5) / 0.25
    r_a = got[0] * 0.25  # Captum's gradient form: R_x = R_a * da/dx = 4 R_a
    split = LRP(model).attribute((x1, x2), target=1, split_inputs=True)
    for x, s in zip((x1, x2), split):
        torch.testing.assert_close(s.double(), (x * r_a / (0.25 * a)).double(), atol=1e-5, rtol=1e-4)


def test_an_input_that_skips_the_first_layers_is_split_with_a_warning():
    model = AddedInputs(late_input=True)
    x1, x2 = torch.rand(2, 5), torch.rand(2, 5)
    with pytest.warns(UserWarning, match="split"):
        got = LRP(model).attribute((x1, x2), target=0)
    for g, s in zip(got, LRP(model).attribute((x1, x2), target=0, split_inputs=True)):
        torch.testing.assert_close(g, s)
