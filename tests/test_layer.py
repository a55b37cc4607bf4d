"""Layer attributions and GuidedGradCam: Captum's numbers (captum 0.9, same run) over a grid of arguments; the
engine's batching does not change LayerIntegratedGradients; clear errors."""

import itertools

import captum.attr as captum_attr
import pytest
import torch

from _shared import TwoInputNet, assert_close
from fastig.attr import (GuidedGradCam, LayerActivation, LayerGradCam, LayerGradientXActivation,
                         LayerIntegratedGradients)

TOL = 1e-5  # float32, relative to the reference's largest entry


class Net(torch.nn.Module):
    """conv -> ReLU -> conv -> ReLU (module ReLUs, as Captum's guided backprop needs) -> pool -> linear, with an
    optional scale argument; the second conv is the layer explained."""

    def __init__(self, classes=4, inplace=True):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 5, 3)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(5, 6, 3, padding=1)
        self.relu2 = torch.nn.ReLU(inplace=inplace)  # in place right after the layer: values must stay intact
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.fc = torch.nn.Linear(6 * 4, classes)

    def forward(self, x, scale=1.0):
        h = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return torch.tanh(self.fc(torch.flatten(self.pool(h), 1))) * scale


class PairLayer(torch.nn.Module):
    """A layer that takes two tensors and returns two (a tuple output and a two-tensor input)."""

    def forward(self, a, b):
        return a * 2 + b, a - b


class PairNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
        self.pair = PairLayer()
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        u, v = self.pair(torch.sigmoid(self.a(x)), torch.tanh(self.b(x)))
        return self.out(torch.cat([u * v, v], 1))


TARGETS = [0, [1, 3, 0], torch.tensor([2, 2, 1])]


def inputs(n=3):
    return torch.randn(n, 3, 8, 8)


@pytest.mark.parametrize("to_input", [False, True])
@pytest.mark.parametrize("layer_name", ["conv2", "relu1"])
def test_layer_activation(to_input, layer_name):
    model, x = Net().eval(), inputs()
    layer = getattr(model, layer_name)
    ours = LayerActivation(model, layer).attribute(x, attribute_to_layer_input=to_input)
    theirs = captum_attr.LayerActivation(model, layer).attribute(x, attribute_to_layer_input=to_input)
    assert_close(ours, theirs, TOL)
    assert LayerActivation(model, layer).multiplies_by_inputs is True


@pytest.mark.parametrize("target,to_input,multiply,args", [
    (t, to_input, multiply, 2.5 if to_input == multiply else None)
    for t, to_input, multiply in itertools.product(TARGETS, [False, True], [True, False])])
def test_layer_gradient_x_activation(target, to_input, multiply, args):
    model, x = Net().eval(), inputs()
    kwargs = dict(target=target, additional_forward_args=args, attribute_to_layer_input=to_input)
    ours = LayerGradientXActivation(model, model.conv2, multiply_by_inputs=multiply).attribute(x, **kwargs)
    theirs = captum_attr.LayerGradientXActivation(model, model.conv2, multiply_by_inputs=multiply).attribute(x, **kwargs)
    assert_close(ours, theirs, TOL)
    assert ours.abs().max() > 0


def test_layer_gradient_x_activation_memory_efficient_and_by_name():
    model, x = Net().eval(), inputs()
    ours = LayerGradientXActivation(model, "conv2", memory_efficient=True).attribute(x, target=1)
    theirs = captum_attr.LayerGradientXActivation(model, model.conv2, memory_efficient=True).attribute(x, target=1)
    assert_close(ours, theirs, TOL)


@pytest.mark.parametrize("target,to_input,relu,summation", [
    (TARGETS[i % 3], to_input, relu, summation)
    for i, (to_input, relu, summation) in enumerate(itertools.product([False, True], [False, True], [True, False]))])
def test_layer_grad_cam(target, to_input, relu, summation):
    model, x = Net().eval(), inputs()
    kwargs = dict(target=target, attribute_to_layer_input=to_input, relu_attributions=relu,
                  attr_dim_summation=summation)
    ours = LayerGradCam(model, model.conv2).attribute(x, **kwargs)
    theirs = captum_attr.LayerGradCam(model, model.conv2).attribute(x, **kwargs)
    assert_close(ours, theirs, TOL)
    up = LayerGradCam.interpolate(ours, (8, 8), "bilinear")
    assert_close(up, captum_attr.LayerAttribution.interpolate(theirs, (8, 8), "bilinear"), TOL)


def test_grad_cam_dense_layer():
    """A [N, C] layer: Captum uses the gradients themselves as the weights."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).eval()
    x = torch.randn(4, 5)
    ours = LayerGradCam(model, model[1]).attribute(x, target=2)
    assert_close(ours, captum_attr.LayerGradCam(model, model[1]).attribute(x, target=2), TOL)


@pytest.mark.parametrize("to_input", [False, True])
def test_tuple_layers(to_input):
    """A layer with two outputs (or two inputs) gives a tuple of attributions, as in Captum."""
    model, x = PairNet().eval(), torch.randn(3, 6)
    for ours_cls, theirs_cls in [(LayerGradientXActivation, captum_attr.LayerGradientXActivation),
                                 (LayerActivation, captum_attr.LayerActivation)]:
        kwargs = dict(attribute_to_layer_input=to_input)
        if ours_cls is LayerGradientXActivation:
            kwargs["target"] = 1
        ours = ours_cls(model, model.pair).attribute(x, **kwargs)
        theirs = theirs_cls(model, model.pair).attribute(x, **kwargs)
        assert isinstance(ours, tuple) and len(ours) == 2
        assert_close(ours, theirs, TOL)
    ours = LayerIntegratedGradients(model, model.pair).attribute(x, target=2, n_steps=7,
                                                                 attribute_to_layer_input=to_input)
    theirs = captum_attr.LayerIntegratedGradients(model, model.pair).attribute(x, target=2, n_steps=7,
                                                                               attribute_to_layer_input=to_input)
    assert_close(ours, theirs, TOL)


@pytest.mark.parametrize("rule,n_steps,baselines,target,to_input,batch", [
    ("gausslegendre", 50, None, 1, False, None),
    ("gausslegendre", 13, 0.3, [0, 2, 3], True, None),
    ("riemann_trapezoid", 8, "tensor", torch.tensor([3, 1, 0]), False, 7),
    ("riemann_left", 9, "row", 2, True, 4),
    ("riemann_middle", 6, None, [1, 1, 2], False, 1),
    ("riemann_right", 5, "tensor", 0, True, 1000),
])
def test_layer_integrated_gradients(rule, n_steps, baselines, target, to_input, batch):
    """Captum's LayerIntegratedGradients fails on an in-place op after the layer, fastig does not: Captum runs on
    the same weights without it."""
    model, x = Net().eval(), inputs()
    reference = Net(inplace=False).eval()
    reference.load_state_dict(model.state_dict())
    if baselines == "tensor":
        baselines = torch.randn_like(x) * 0.1
    elif baselines == "row":
        baselines = torch.randn(1, 3, 8, 8) * 0.1
    kwargs = dict(baselines=baselines, target=target, n_steps=n_steps, method=rule, internal_batch_size=batch,
                  attribute_to_layer_input=to_input, return_convergence_delta=True, additional_forward_args=1.5)
    for multiply in (True, False):
        ours, delta = LayerIntegratedGradients(model, model.conv2, multiply_by_inputs=multiply).attribute(x, **kwargs)
        theirs, their_delta = captum_attr.LayerIntegratedGradients(
            reference, reference.conv2, multiply_by_inputs=multiply).attribute(x, **kwargs)
        assert_close(ours, theirs, TOL)
        torch.testing.assert_close(delta, their_delta.to(delta.dtype), rtol=1e-4, atol=1e-5)
    assert LayerIntegratedGradients(model, model.conv2).has_convergence_delta()


def test_layer_integrated_gradients_two_inputs_and_args():
    model = TwoInputNet().eval()
    layer = model.a
    x1, x2 = torch.randn(4, 3, 4), torch.randn(4, 5)
    scale = torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    kwargs = dict(target=1, additional_forward_args=(scale,), n_steps=11)
    ours = LayerIntegratedGradients(model, layer).attribute((x1, x2), **kwargs)
    theirs = captum_attr.LayerIntegratedGradients(model, layer).attribute((x1, x2), **kwargs)
    assert_close(ours, theirs, TOL)
    # batching through the engine does not change the numbers
    small = LayerIntegratedGradients(model, layer).attribute((x1, x2), internal_batch_size=3, **kwargs)
    assert_close(small, ours, 1e-6)


@pytest.mark.parametrize("mode,to_input,target", [("nearest", False, 1), ("bilinear", True, [0, 3, 2]),
                                                  ("area", False, torch.tensor([1, 2, 0]))])
def test_guided_grad_cam(mode, to_input, target):
    model, x = Net().eval(), inputs()
    kwargs = dict(target=target, interpolate_mode=mode, attribute_to_layer_input=to_input)
    ours = GuidedGradCam(model, model.conv2).attribute(x, **kwargs)
    theirs = captum_attr.GuidedGradCam(model, model.conv2).attribute(x, **kwargs)
    assert_close(ours, theirs, TOL)
    assert ours.abs().max() > 0
    assert GuidedGradCam(model, model.conv2).multiplies_by_inputs is False


def test_guided_grad_cam_uninterpolable_input_warns_like_captum():
    """A second input without spatial dims cannot take the map: an empty tensor and a warning (Captum's
    behaviour)."""

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, x, extra):
            return self.net(x) + extra.sum(1, keepdim=True)

    model, x, extra = Two().eval(), inputs(), torch.randn(3, 4)
    with pytest.warns(UserWarning):
        ours = GuidedGradCam(model, model.net.conv2).attribute((x, extra), target=1)
    with pytest.warns(UserWarning):
        theirs = captum_attr.GuidedGradCam(model, model.net.conv2).attribute((x, extra), target=1)
    assert_close(ours[0], theirs[0], TOL)
    assert ours[1].numel() == 0 == theirs[1].numel()


def test_hooks_removed_and_errors():
    model, x = Net().eval(), inputs()
    LayerIntegratedGradients(model, model.conv2).attribute(x, target=0, n_steps=3)
    LayerGradCam(model, model.conv2).attribute(x, target=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(TypeError, match="list of layers"):
        LayerGradCam(model, [model.conv1, model.conv2])
    with pytest.raises(ValueError, match="no submodule"):
        LayerGradCam(model, "nope")
    with pytest.raises(ValueError, match="not called"):
        LayerGradCam(lambda z: model(z), torch.nn.Conv2d(1, 1, 1)).attribute(x, target=0)
    with pytest.raises(ValueError, match="give a target"):
        LayerGradCam(model, model.conv2).attribute(x)
    with pytest.raises(ValueError, match="grad_kwargs"):
        LayerIntegratedGradients(model, model.conv2).attribute(x, target=0, grad_kwargs={"create_graph": True})
    with pytest.raises(ValueError, match="n_steps"):
        LayerIntegratedGradients(model, model.conv2).attribute(x, target=0, n_steps=0)
    shared = torch.nn.Tanh()
    twice = torch.nn.Sequential(torch.nn.Linear(3, 3), shared, torch.nn.Linear(3, 3), shared)
    with pytest.raises(ValueError, match="more than once"):
        LayerGradientXActivation(twice, shared).attribute(torch.randn(2, 3), target=0)
