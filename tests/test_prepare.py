"""fastig.models.prepare: eval + frozen parameters + Conv/BatchNorm folding + channels_last, checked against the
unprepared model (float64 for the folding algebra, float32 for the error actually seen) on logits and input
gradients, with random weights and randomized BatchNorm statistics so that folding is not trivial."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastig.models as zoo
from fastig.models.prepare import fold_batchnorms, fold_conv_bn, prepare


def randomize_batchnorms(model: nn.Module, seed: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


def logits_and_input_grad(model: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_()
    out = model(x)
    (grad,) = torch.autograd.grad(out[:, 3].sum() + 0.01 * out.sum(), x)
    return out.detach(), grad


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def l2_rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def net(request):
    torch.manual_seed(0)
    return request.param, randomize_batchnorms(zoo.get(request.param, weights="none"))


def test_folding_is_exact_in_float64(net):
    name, model = net
    reference = copy.deepcopy(model).double()
    prepared = prepare(reference)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y0, g0 = logits_and_input_grad(reference, x)
    y1, g1 = logits_and_input_grad(prepared, x)
    assert max_rel(y1, y0) < 1e-12 and max_rel(g1, g0) < 1e-12


def test_float32_error_is_float32_rounding(net):
    name, model = net
    prepared = prepare(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    y0, g0 = logits_and_input_grad(model, x)
    y1, g1 = logits_and_input_grad(prepared, x)
    assert max_rel(y1, y0) < 1e-5
    # Input gradients agree to ~1e-6; a ReLU or max-pool decision flipped by float32 rounding can move a few
    # gradient entries (the unprepared float32 model deviates from float64 the same way), hence the L2 bound.
    assert l2_rel(g1, g0) < 5e-2
    assert g1.shape == x.shape and g1.is_contiguous()


def test_prepared_model_state(net):
    name, model = net
    prepared = prepare(model)
    assert prepared is not model and not prepared.training
    assert not any(p.requires_grad for p in prepared.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert prepared.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    # The original is untouched.
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_inplace_prepares_the_model_itself():
    torch.manual_seed(0)
    model = zoo.get("resnet18", weights="none").train()
    assert prepare(model, inplace=True) is model
    assert not model.training and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.fixture(scope="module")
def googlenet():
    torch.manual_seed(4)
    return randomize_batchnorms(zoo.get("googlenet", weights="none"))


@pytest.mark.parametrize("name,n_batchnorms", [("resnet18", 20), ("resnet50", 53), ("sascenenet_rgb", 20)])
def test_every_zoo_batchnorm_is_folded(name, n_batchnorms):
    model = zoo.get(name, weights="none")
    assert fold_batchnorms(model) == n_batchnorms
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_googlenet_batchnorms_are_folded_exactly(googlenet):
    reference = copy.deepcopy(googlenet).double()
    prepared = prepare(reference)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules()) == 57
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y0, g0 = logits_and_input_grad(reference, x)
    y1, g1 = logits_and_input_grad(prepared, x)
    assert max_rel(y1, y0) < 1e-12 and max_rel(g1, g0) < 1e-12


def test_sascenenet_batchnorms_are_folded_exactly():
    torch.manual_seed(6)
    reference = randomize_batchnorms(zoo.get("sascenenet_rgb", weights="none")).double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y0, g0 = logits_and_input_grad(reference, x)
    y1, g1 = logits_and_input_grad(prepare(reference), x)
    assert max_rel(y1, y0) < 1e-12 and max_rel(g1, g0) < 1e-12


class Custom(nn.Module):
    """conv then bn are registered one after the other, but bn does not consume conv's output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.conv(self.bn(x)) + self.seq(x)


def test_unknown_modules_are_left_alone_and_sequential_pairs_are_folded():
    torch.manual_seed(5)
    model = randomize_batchnorms(Custom()).eval()
    x = torch.randn(2, 3, 8, 8)
    reference = model(x)
    prepared = prepare(model, channels_last=False)
    assert isinstance(prepared.bn, nn.BatchNorm2d)  # not folded: its dataflow is unknown
    assert isinstance(prepared.seq[1], nn.Identity)
    torch.testing.assert_close(prepared(x), reference, rtol=1e-5, atol=1e-5)


def test_fold_conv_bn_with_conv_bias_groups_and_no_affine():
    torch.manual_seed(6)
    conv = nn.Conv2d(4, 6, 3, groups=2, bias=True).double()
    bn = nn.BatchNorm2d(6, affine=False).double()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    expected = bn(conv(x))
    fold_conv_bn(conv, bn)
    torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)


def test_folding_refuses_training_mode_and_non_modules():
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorms(zoo.get("resnet18", weights="none").train())
    with pytest.raises(TypeError, match="Module"):
        prepare(lambda x: x)


def test_prepared_model_works_with_captum_style_gradients_on_centerpixel():
    model = zoo.get("centerpixel")
    prepared = prepare(model)
    x = torch.rand(2, 1, 227, 227, requires_grad=True)
    (g,) = torch.autograd.grad(prepared(x)[:, 100].sum(), x)
    assert g[0, 0, 113, 113].item() == pytest.approx(51000.0)
