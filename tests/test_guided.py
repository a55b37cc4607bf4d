"""GuidedBackprop, Deconvolution, GuidedNonLinearityIG: Captum's numbers on nn.ReLU models, hand-written guided
networks as references (functional and in-place ReLUs included), and the model left exactly as it was."""

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Deconvolution as CaptumDeconvolution
from captum.attr import GuidedBackprop as CaptumGuidedBackprop
from captum.attr import IntegratedGradients as CaptumIG

from fastig.attr import Deconvolution, GuidedBackprop, GuidedNonLinearityIG, IntegratedGradients, Saliency


class Weights(torch.nn.Module):
    """conv -> relu -> maxpool(3, stride 2, overlapping) -> conv -> relu -> linear; the ReLUs differ per subclass."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 4, 3)
        self.fc = torch.nn.Linear(4 * 2 * 2, 5)

    def head(self, x):
        return self.conv1(x)

    def tail(self, x):
        return self.fc(torch.flatten(x, 1))


class ModuleReluNet(Weights):
    def __init__(self, inplace=False):
        super().__init__()
        self.relu1 = torch.nn.ReLU(inplace=inplace)
        self.pool = torch.nn.MaxPool2d(3, stride=2)
        self.relu2 = torch.nn.ReLU(inplace=inplace)

    def forward(self, x):
        return self.tail(self.relu2(self.conv2(self.pool(self.relu1(self.head(x))))))


class FunctionalReluNet(Weights):
    """ReLUs called inside forward, as googlenet/inception do: Captum's hooks never see them."""

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        x = F.relu(self.head(x), inplace=self.inplace) if self.inplace else torch.relu(self.head(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.conv2(x)
        x = x.relu_() if self.inplace else x.relu()
        return self.tail(x)


def _positive_grad(t):
    if t.requires_grad:  # forward passes without gradients (e.g. IDGI's outputs) have nothing to hook
        t.register_hook(lambda g: g.clamp(min=0))
    return t


class ExplicitGuidedNet(Weights):
    """The reference: the guided rules written out with tensor hooks, independently of fastig."""

    def __init__(self, relu_rule="guided", guided_pool=False):
        super().__init__()
        self.relu_rule, self.guided_pool = relu_rule, guided_pool

    def relu(self, x):
        if self.relu_rule == "guided":  # positive part of g, then relu's own mask (x > 0)
            return _positive_grad(torch.relu(x))
        return _positive_grad(torch.relu(x).detach() + x - x.detach())  # deconv: relu forward, identity mask

    def forward(self, x):
        x = self.relu(self.head(x))
        x = F.max_pool2d(x, 3, stride=2)
        if self.guided_pool:
            x = _positive_grad(x)
        return self.tail(self.relu(self.conv2(x)))


def same_weights(cls, source, **kw):
    model = cls(**kw)
    model.load_state_dict(source.state_dict(), strict=False)
    return model.eval()


@pytest.fixture
def nets():
    base = ModuleReluNet().eval()
    return base, same_weights(FunctionalReluNet, base)


@pytest.mark.parametrize("ours_cls,captum_cls", [(GuidedBackprop, CaptumGuidedBackprop),
                                                 (Deconvolution, CaptumDeconvolution)])
@pytest.mark.parametrize("target", [1, [0, 2, 4]])
def test_matches_captum_on_relu_modules(ours_cls, captum_cls, target, nets):
    module_net, _ = nets
    x = torch.randn(3, 3, 10, 10)
    theirs = captum_cls(module_net).attribute(x, target=target)
    ours = ours_cls(module_net).attribute(x, target=target, internal_batch_size=2)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ours_cls,rule", [(GuidedBackprop, "guided"), (Deconvolution, "deconv")])
@pytest.mark.parametrize("inplace", [False, True])
def test_functional_relus_are_covered(ours_cls, rule, inplace, nets):
    """On a model using torch.relu / F.relu / Tensor.relu(_) fastig applies the rule (equal to the hand-written
    reference); Captum only hooks nn.ReLU modules, so it returns the plain gradient there."""
    module_net, _ = nets
    functional = same_weights(FunctionalReluNet, module_net, inplace=inplace)
    reference = same_weights(ExplicitGuidedNet, module_net, relu_rule=rule)
    x = torch.randn(4, 3, 10, 10)
    expected = Saliency(reference).attribute(x, target=3, abs=False)
    ours = ours_cls(functional).attribute(x, target=3)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)
    plain = Saliency(functional).attribute(x, target=3, abs=False)
    captum_cls = CaptumGuidedBackprop if rule == "guided" else CaptumDeconvolution
    theirs = captum_cls(functional).attribute(x, target=3)
    torch.testing.assert_close(theirs, plain)  # Captum's rule does not reach functional ReLUs
    assert (ours - plain).abs().max() > 1e-3 * plain.abs().max()  # the rule changes the result


def test_inplace_relu_modules_match_reference(nets):
    module_net, _ = nets
    inplace = same_weights(ModuleReluNet, module_net, inplace=True)
    reference = same_weights(ExplicitGuidedNet, module_net)
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(GuidedBackprop(inplace).attribute(x, target=0),
                               Saliency(reference).attribute(x, target=0, abs=False), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid"])
@pytest.mark.parametrize("functional", [False, True])
def test_gnl_ig_equals_ig_of_the_hand_written_guided_network(rule, functional, nets):
    """GNL-IG = IG in which every path gradient is guided through ReLUs and max-pooling: it must equal Captum's
    plain IG on a network whose ReLUs and max-pool are explicitly guided, and differ from plain IG."""
    module_net, functional_net = nets
    model = functional_net if functional else module_net
    reference = same_weights(ExplicitGuidedNet, module_net, guided_pool=True)
    x = torch.randn(3, 3, 10, 10)
    baselines = torch.randn(3, 3, 10, 10) * 0.1
    kw = dict(baselines=baselines, target=[1, 2, 0], n_steps=12, method=rule)
    expected = CaptumIG(reference).attribute(x, **kw)
    ours, delta = GuidedNonLinearityIG(model).attribute(x, internal_batch_size=5, return_convergence_delta=True, **kw)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    plain = IntegratedGradients(model).attribute(x, **kw)
    assert (ours - plain).abs().max() > 1e-2 * plain.abs().max()
    # the forward is untouched: the delta compares with the true output difference
    with torch.no_grad():
        gap = model(x)[torch.arange(3), [1, 2, 0]] - model(baselines)[torch.arange(3), [1, 2, 0]]
    torch.testing.assert_close(delta, ours.flatten(1).sum(1) - gap, rtol=1e-4, atol=1e-5)


def test_guided_maxpool_rule_matters():
    """Max-pooling with positive gradients only, isolated: f = sum(w * maxpool(x)) with mixed-sign w."""
    w = torch.tensor([[1.0, -2.0], [-0.5, 3.0]])

    class Pool(torch.nn.Module):
        def forward(self, x):
            return (F.max_pool2d(x, 2) * w).flatten(1).sum(1)

    x = torch.randn(2, 1, 4, 4)
    guided = GuidedNonLinearityIG(Pool(), multiply_by_inputs=False).attribute(x, n_steps=4, method="riemann_right")
    plain = IntegratedGradients(Pool(), multiply_by_inputs=False).attribute(x, n_steps=4, method="riemann_right")
    assert (plain < 0).any()
    torch.testing.assert_close(guided, plain.clamp(min=0))


def _hooks(model):
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()]


@pytest.mark.parametrize("make", [
    lambda m: lambda x: GuidedBackprop(m).attribute(x, target=1),
    lambda m: lambda x: Deconvolution(m).attribute(x, target=1),
    lambda m: lambda x: GuidedNonLinearityIG(m).attribute(x, target=1, n_steps=4),
])
def test_model_is_left_exactly_as_it_was(make, nets):
    _, model = nets
    x = torch.randn(2, 3, 10, 10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)
    plain_before = Saliency(model).attribute(x, target=1, abs=False)
    make(model)(x)
    assert _hooks(model) == hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training is False
    torch.testing.assert_close(Saliency(model).attribute(x, target=1, abs=False), plain_before, rtol=0, atol=0)


def test_rules_are_removed_after_an_exception(nets):
    _, model = nets

    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            self.inner(x)
            raise RuntimeError("boom")

    x = torch.randn(2, 3, 10, 10)
    plain_before = Saliency(model).attribute(x, target=1, abs=False)
    for method in (GuidedBackprop(Failing()), GuidedNonLinearityIG(Failing())):
        with pytest.raises(RuntimeError, match="boom"):
            method.attribute(x, target=1)
        torch.testing.assert_close(Saliency(model).attribute(x, target=1, abs=False), plain_before, rtol=0, atol=0)
    y = torch.tensor([-1.0, 2.0], requires_grad=True)
    (g,) = torch.autograd.grad(F.relu(y), y, grad_outputs=torch.tensor([5.0, -3.0]))
    assert g.tolist() == [0.0, -3.0]  # a plain ReLU gradient again


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="nn.Module"):
        GuidedBackprop(lambda x: x)
    with pytest.raises(TypeError, match="nn.Module"):
        GuidedNonLinearityIG(lambda x: x)
    from fastig.attr.rules import applied

    with pytest.raises(ValueError, match="ReLU rule"):
        with applied({"relu": "positive"}):
            pass


@pytest.mark.parametrize("options", [dict(idgi=True), dict(output="probability")])
def test_gnl_ig_inherits_integrated_gradients_options(options, nets):
    """idgi= and output= reach IntegratedGradients: GNL-IG equals fastig IG on the hand-written guided network."""
    _, model = nets
    reference = same_weights(ExplicitGuidedNet, model, guided_pool=True)
    x = torch.randn(2, 3, 10, 10)
    expected = IntegratedGradients(reference).attribute(x, target=2, n_steps=10, **options)
    ours = GuidedNonLinearityIG(model).attribute(x, target=2, n_steps=10, internal_batch_size=7, **options)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
