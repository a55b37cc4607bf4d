"""DeepLIFT's rescale and LRP's layer rules as values of the one rule mechanism (fastig.attr.rules): applied with
``rules.applied`` they give DeepLift's and LRP's numbers, they cover functional calls, the model is not touched,
and DeepLift and LRP keep no mechanism of their own."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LRP as CaptumLRP
from captum.attr import DeepLift as CaptumDeepLift
from torch import nn

from fastig.attr import LRP, DeepLift, InputXGradient, IntegratedGradients, Saliency, deeplift, lrp
from fastig.attr import rules as backward_rules
from fastig.attr.rules import RESCALE, EpsilonRule, GammaRule, Rules, applied
from fastig.errors import InputError, InvalidArgumentError, UnknownNameError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum")


class ModuleNet(nn.Module):
    """conv - relu - maxpool - conv - sigmoid - conv - tanh - avgpool - linear - softmax, all as modules."""

    def __init__(self, softmax=True, sigmoid=True):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3), nn.Conv2d(5, 5, 1)
        self.relu, self.pool, self.tanh = nn.ReLU(), nn.MaxPool2d(2), nn.Tanh()
        self.sigmoid = nn.Sigmoid() if sigmoid else nn.Dropout()  # LRP has no rule for sigmoids (as in Captum)
        self.avg, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(5, 6)
        self.softmax = nn.Softmax(dim=1) if softmax else None

    def forward(self, x):
        x = self.sigmoid(self.conv2(self.pool(self.relu(self.conv1(x)))))
        x = self.fc(self.avg(self.tanh(self.conv3(x))).flatten(1))
        return x if self.softmax is None else self.softmax(x)


class FunctionalNet(ModuleNet):
    """The same network through functional calls (as googlenet/inception call F.relu in forward), with an in-place
    ReLU whose result is not assigned."""

    def forward(self, x):
        x = F.conv2d(x, self.conv1.weight, self.conv1.bias, padding=1)
        x.relu_()
        x = F.conv2d(F.max_pool2d(x, 2), self.conv2.weight, self.conv2.bias)
        x = torch.sigmoid(x) if isinstance(self.sigmoid, nn.Sigmoid) else x
        x = F.adaptive_avg_pool2d(torch.tanh(F.conv2d(x, self.conv3.weight, self.conv3.bias)), 1)
        x = F.linear(x.flatten(1), self.fc.weight, self.fc.bias)
        return x if self.softmax is None else x.softmax(dim=1)


def captum_deeplift(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CaptumDeepLift(model).attribute(*args, **kwargs)


def data(n=2):
    torch.manual_seed(1)
    return torch.randn(n, 3, 10, 10), 0.1 * torch.randn(n, 3, 10, 10)


def test_the_rescale_rules_applied_by_hand_are_deeplift():
    model, (x, b) = ModuleNet(), data()
    for rules in (RESCALE, {"relu": "rescale", "max_pool": "rescale", "nonlinear": "rescale"}):
        with torch.enable_grad(), applied(rules):
            leaf = x.clone().requires_grad_()
            out = model(torch.cat([leaf, b]))[:, 3]
            (grad,) = torch.autograd.grad(out.sum(), leaf)
        torch.testing.assert_close((x - b) * grad, DeepLift(model).attribute(x, b, target=3), atol=1e-7, rtol=1e-5)
    # composable: the rescale rule on ReLUs alone is another (valid) rule set, not DeepLift's
    with torch.enable_grad(), applied({"relu": "rescale"}):
        leaf = x.clone().requires_grad_()
        (relu_only,) = torch.autograd.grad(model(torch.cat([leaf, b]))[:, 3].sum(), leaf)
    assert not torch.allclose(relu_only, grad)


def test_deeplift_covers_functional_non_linearities():
    # the functional network gets the module network's numbers (Captum's where Captum's rules work, see
    # test_deeplift.py), summation-to-delta included; Captum on the functional network keeps plain gradients there
    # and loses the sum
    modules, functional, (x, b) = ModuleNet(softmax=False), FunctionalNet(softmax=False), data()
    got, delta = DeepLift(functional).attribute(x, b, target=2, return_convergence_delta=True)
    torch.testing.assert_close(got, DeepLift(modules).attribute(x, b, target=2), atol=1e-7, rtol=1e-5)
    assert delta.abs().max() < 1e-5
    _, captum_delta = captum_deeplift(functional, x, b, target=2, return_convergence_delta=True)
    assert captum_delta.abs().max() > 1e-3
    # softmax (Tensor.softmax) too
    torch.testing.assert_close(DeepLift(FunctionalNet()).attribute(x, b, target=2),
                               DeepLift(ModuleNet()).attribute(x, b, target=2), atol=1e-7, rtol=1e-5)


class PoolWithIndices(nn.Module):
    """conv - MaxPool2d(2, return_indices=True) - linear on the pooled values."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv, self.pool, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2, return_indices=True), \
            nn.Linear(4 * 25, 3)

    def forward(self, x):
        values, indices = self.pool(self.conv(x))
        assert indices.dtype == torch.int64
        return self.head(values.flatten(1))

    def without_indices(self):
        return nn.Sequential(self.conv, nn.MaxPool2d(2), nn.Flatten(), self.head)


def test_max_pools_with_indices():
    model, (x, b) = PoolWithIndices(), data()
    torch.testing.assert_close(DeepLift(model).attribute(x, b, target=1),
                               captum_deeplift(model.without_indices(), x, b, target=1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(LRP(model).attribute(x, target=2), LRP(model.without_indices()).attribute(x, target=2))


def lrp_net(net=ModuleNet):
    return net(softmax=False, sigmoid=False).eval()


@pytest.mark.parametrize("rule", ["epsilon", "gamma"])
def test_an_lrp_rule_applied_to_a_gradient_method_is_lrp(rule):
    # every layer under one rule: InputXGradient of the rule's relevance gradients is LRP with that default rule
    model, (x, _) = lrp_net(), data(3)
    expected = LRP(model, rules={"default": rule}).attribute(x, target=[0, 4, 2])
    torch.testing.assert_close(InputXGradient(model).attribute(x, target=[0, 4, 2], rules={"layers": rule}), expected,
                               atol=1e-7, rtol=1e-5)
    with torch.enable_grad(), applied(Rules(layers=backward_rules.as_rule(rule))):
        leaf = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(leaf)[:, 4].sum(), leaf)
    torch.testing.assert_close((x * grad)[1], expected[1], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("rules", [{}, {"default": "gamma"}])
def test_lrp_covers_functional_layers(rules):
    # F.conv2d / F.linear / F.max_pool2d / torch.tanh called in forward get the default rule: the module network's
    # numbers, which are Captum's
    modules, functional = lrp_net(), lrp_net(FunctionalNet)
    x, _ = data()
    got = LRP(functional, rules=rules).attribute(x, target=1)
    torch.testing.assert_close(got, LRP(modules, rules=rules).attribute(x, target=1), atol=1e-7, rtol=1e-5)
    if not rules:
        torch.testing.assert_close(got, CaptumLRP(copy.deepcopy(modules)).attribute(x, target=1).detach(),
                                   atol=1e-6, rtol=1e-4)
    # the same tensors with plain gradients differ (LRP really ran on the functional calls)
    assert not torch.allclose(got, InputXGradient(functional).attribute(x, target=1), atol=1e-4)


class Probe(nn.Module):
    """An identity layer that checks, during the pass, that nothing of the model it sits in was modified."""

    def __init__(self):
        super().__init__()
        self.model = None

    def forward(self, x):
        for module in self.model.modules():
            assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
            assert "forward" not in vars(module) and not hasattr(module, "rule")
        self.calls = getattr(self, "calls", 0) + 1
        return x


@pytest.mark.parametrize("method", ["deeplift", "lrp", "lrp_split"])
def test_the_model_is_not_modified(method):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), Probe(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 16, 3)).eval()
    object.__setattr__(model[2], "model", model)  # not a submodule
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, b = data()
    if method == "deeplift":
        DeepLift(model).attribute(x, b, target=0)
    else:
        LRP(model, rules={Probe: None}).attribute(x, target=0, split_inputs=method == "lrp_split")
    assert model[2].calls == 1  # one pass, checked from inside
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    assert backward_rules.active() is None


def test_global_module_hooks_are_removed_after_a_failure():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            self.fc(x)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        LRP(Failing()).attribute(torch.randn(2, 4), target=0)
    assert not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    y = torch.randn(2, 4, requires_grad=True)
    layer = nn.Linear(4, 2)
    (g,) = torch.autograd.grad(layer(y)[:, 0].sum(), y)
    torch.testing.assert_close(g, layer.weight[0].expand(2, 4))  # a plain gradient again


def test_deeplift_and_lrp_keep_no_mechanism_of_their_own():
    for module in (deeplift, lrp):
        source = inspect.getsource(module)
        assert "autograd.Function" not in source and ".forward =" not in source and "register_" not in source
        assert "backward_rules.applied(" in source
    for gone in ("rescale_rules", "_Rescale", "_RescaleMaxPool", "_rescale_forward"):
        assert not hasattr(deeplift, gone)
    for gone in ("_rule_forward", "_tanh_forward", "_InputRegion", "_Relevance", "_with_weights"):
        assert not hasattr(lrp, gone)
    assert not hasattr(LRP, "_rules_applied")
    assert lrp.EpsilonRule is backward_rules.EpsilonRule and lrp.as_rule is backward_rules.as_rule


def test_rule_values_are_checked_and_paired_rules_refused_by_gradient_methods():
    assert Rules(layers="epsilon") == Rules(layers=EpsilonRule()) != Rules(layers=GammaRule())
    assert RESCALE.paired and not Rules(layers="z").paired and not RESCALE.is_plain
    with pytest.raises(UnknownNameError, match="non-linearity rule"):
        Rules(nonlinear="guided")
    with pytest.raises(UnknownNameError, match="layers="):
        Rules(layers="alpha")
    with pytest.raises(InvalidArgumentError, match="rescale_eps"):
        Rules(rescale_eps=-1.0)
    with pytest.raises(InvalidArgumentError, match="do not combine"):
        Rules(relu="rescale", layers="epsilon")
    model, (x, _) = lrp_net(), data()
    for method in (IntegratedGradients(model), Saliency(model)):
        with pytest.raises(InputError, match="DeepLift"):
            method.attribute(x, target=0, rules={"relu": "rescale"})
    with pytest.raises(InputError, match="does not take rules"):
        DeepLift(model).attribute(x, target=0, rules="guided")

