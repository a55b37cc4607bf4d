"""SecondOrderGradients (2ndG): the Hessian-vector-product version equals explicit Hessians (fp64), equals the
original per-channel double loop, vanishes for ReLU networks, vectorized and real-batch products agree, layer
selection and bad input."""

import pytest
import torch

from fastig.attr import SecondOrderGradients
from fastig.attr._layers import capture
from fastig.attr.second_order import _batched_is_faster, _curvature_is_zero, _quadratic_forms, second_order_terms


class SmoothNet(torch.nn.Module):
    """head (the explained layer) -> tail; every non-linearity after the layer is smooth."""

    def __init__(self, channels=4, classes=5, size=6, act=torch.nn.Softplus):
        super().__init__()
        self.head = torch.nn.Sequential(torch.nn.Conv2d(2, channels, 3), act())
        self.tail = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
            torch.nn.Linear(3 * size * size, classes), torch.nn.GELU(),
        )

    def forward(self, x):
        return self.tail(self.head(x))


def explicit_terms(model, x, targets):
    """Reference: the full Hessian of s(tail(a)) w.r.t. the layer activations (torch.autograd.functional.hessian),
    its per-location channel blocks, and the first-order term from an explicit gradient."""
    acts = model.head(x).detach()
    firsts, quads = [], []
    for a, t in zip(acts, targets):
        def score(z):
            return model.tail(z.unsqueeze(0))[0, t]

        hess = torch.autograd.functional.hessian(score, a)
        grad = torch.autograd.functional.jacobian(score, a)
        c, locations = a.shape[0], a[0].numel()
        hess = hess.reshape(c, locations, c, locations)
        flat = a.reshape(c, locations)
        quads.append(torch.stack([flat[:, p] @ hess[:, p, :, p] @ flat[:, p] for p in range(locations)]).reshape(a.shape[1:]))
        firsts.append((a * grad.clamp(min=0)).sum(0))
    return torch.stack(firsts), torch.stack(quads)


def original_double_loop(model, x, target):
    """The released code's algorithm for one example: one backward per (location, channel) builds each H_pp."""
    acts = model.head(x).detach().requires_grad_()
    (grad,) = torch.autograd.grad(model.tail(acts)[0, target], acts, create_graph=True)
    c, h, w = acts.shape[1:]
    quad = torch.zeros(h, w, dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            block = torch.stack([torch.autograd.grad(grad[0, d, i, j], acts, retain_graph=True)[0][0, :, i, j]
                                 for d in range(c)])
            a = acts[0, :, i, j].detach()
            quad[i, j] = a @ block @ a
    first = (acts.detach() * grad.detach().clamp(min=0)).sum(1)[0]
    return first + 0.5 * quad.abs()


@pytest.mark.parametrize("act", [torch.nn.Softplus, torch.nn.Tanh, torch.nn.GELU])
@pytest.mark.parametrize("rows_per_pass", [1, 7, 1000])
def test_hvp_equals_explicit_hessian_fp64(act, rows_per_pass):
    model = SmoothNet(act=act).double().eval()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    targets = [1, 4, 0]
    first, quad = second_order_terms(model, model.head, (x,), targets, None, rows_per_pass)
    ref_first, ref_quad = explicit_terms(model, x, targets)
    assert quad.abs().max() > 1e-6  # the smooth network has curvature
    torch.testing.assert_close(quad, ref_quad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(first, ref_first, rtol=1e-10, atol=1e-13)
    maps = SecondOrderGradients(model, model.head).attribute(x, target=targets, internal_batch_size=rows_per_pass)
    assert maps.shape == (3, 1, 6, 6)
    torch.testing.assert_close(maps[:, 0], ref_first + 0.5 * ref_quad.abs(), rtol=1e-10, atol=1e-13)


def test_equals_the_original_double_loop():
    model = SmoothNet(channels=3, size=4).double().eval()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    maps = SecondOrderGradients(model, "head").attribute(x, target=2)
    torch.testing.assert_close(maps[0, 0], original_double_loop(model, x, 2), rtol=1e-10, atol=1e-13)


def test_dense_layer_and_float32():
    """A [N, C] layer is one location; float32 agrees with the fp64 reference to float32 rounding."""
    torch.manual_seed(1)
    head = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.SiLU())
    tail = torch.nn.Sequential(torch.nn.Linear(7, 4), torch.nn.Softplus(), torch.nn.Linear(4, 3))
    model = torch.nn.Sequential(head, tail).eval()
    x = torch.randn(4, 5)
    first, quad = second_order_terms(model, head, (x,), 2, None, 3)
    assert first.shape == quad.shape == (4,)
    model.double()  # the fp64 reference, same weights
    a = head(x.double()).detach()
    ref = torch.stack([z @ torch.autograd.functional.hessian(lambda v: tail(v.unsqueeze(0))[0, 2], z) @ z for z in a])
    torch.testing.assert_close(quad.double(), ref, rtol=1e-4, atol=1e-6)


def test_relu_network_has_no_second_order_term():
    """Piecewise-linear after the layer: the Hessian is zero, 2ndG is its first-order term."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 5),
    ).eval()
    x = torch.randn(2, 2, 8, 8)
    first, quad = second_order_terms(model, model[1], (x,), 3, None, None)
    assert torch.equal(quad, torch.zeros_like(quad))
    maps = SecondOrderGradients(model, model[1]).attribute(x, target=3)
    torch.testing.assert_close(maps[:, 0], first)


def test_layer_choices_agree():
    model = SmoothNet().eval()
    x = torch.randn(2, 2, 8, 8)
    by_module = SecondOrderGradients(model, model.head).attribute(x, target=1)
    by_name = SecondOrderGradients(model, "head").attribute(x, target=1)
    per_call = SecondOrderGradients(model).attribute(x, target=1, layer="head")
    torch.testing.assert_close(by_module, by_name, rtol=0, atol=0)
    torch.testing.assert_close(by_module, per_call, rtol=0, atol=0)
    default = SecondOrderGradients(model).attribute(x, target=1)  # last spatial layer: the tail's Tanh
    torch.testing.assert_close(default, SecondOrderGradients(model, "tail.1").attribute(x, target=1), rtol=0, atol=0)
    up = SecondOrderGradients(model, "head").attribute(x, target=1, upsample_to_input=True)
    assert up.shape == (2, 1, 8, 8)


def test_additional_args_and_model_untouched():
    class Scaled(SmoothNet):
        def forward(self, x, scale):
            return super().forward(x) * scale

    model = Scaled().double().eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    scale = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    maps = SecondOrderGradients(model, "head").attribute(x, target=0, additional_forward_args=(scale,),
                                                         internal_batch_size=5)
    plain = SecondOrderGradients(SmoothNet().double().eval(), "head")
    plain.forward_func.load_state_dict(model.state_dict())
    single = plain.attribute(x, target=0)
    # the score is linear in scale, so both terms scale with it (scale > 0)
    torch.testing.assert_close(maps, single * scale.reshape(2, 1, 1, 1), rtol=1e-10, atol=1e-13)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_bad_input_is_a_clear_error():
    model = SmoothNet()
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="no submodule"):
        SecondOrderGradients(model, "nope")
    with pytest.raises(ValueError, match="not a submodule"):
        SecondOrderGradients(model, torch.nn.ReLU())
    with pytest.raises(TypeError, match="nn.Module"):
        SecondOrderGradients(lambda z: z, "head")
    with pytest.raises(ValueError, match="internal_batch_size"):
        SecondOrderGradients(model, "head").attribute(x, target=0, internal_batch_size=0)
    shared = torch.nn.Tanh()
    twice = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3), shared, torch.nn.Conv2d(2, 2, 3), shared,
                                torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3))
    with pytest.raises(ValueError, match="more than once"):
        SecondOrderGradients(twice, shared).attribute(x, target=0)


def _grad_at(model, layer, x, target):
    """The explained score's gradient w.r.t. the layer's activations (with its graph), and the activations."""
    with capture(layer) as found:
        score = model(x)[:, target].sum()
    acts = found[0][0]
    (grad,) = torch.autograd.grad(score, acts, create_graph=True)
    return grad, acts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, channels, size, rows_per_pass", [(1, 3, 5, None), (3, 4, 6, 7), (2, 6, 4, 1)])
def test_vectorized_and_real_batch_products_agree(dtype, n, channels, size, rows_per_pass):
    """The vectorized double-backward pass over one graph and the real batch of example copies (one location per
    copy) give the same quadratic forms, on a convolutional tail (where the copies are chosen) and a dense one
    (where the vectorized pass is)."""
    torch.manual_seed(n * 100 + channels * 10 + size)
    conv = SmoothNet(channels=channels, size=size, act=torch.nn.SiLU).to(dtype).eval()
    dense = torch.nn.Sequential(torch.nn.Linear(5, channels), torch.nn.Tanh(), torch.nn.Linear(channels, 4),
                                torch.nn.Softplus(), torch.nn.Linear(4, 3)).to(dtype).eval()
    cases = [(conv, conv.head, torch.randn(n, 2, size + 2, size + 2, dtype=dtype), False),
             (dense, dense[1], torch.randn(n, 5, dtype=dtype), True)]
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    for model, layer, x, vectorized_chosen in cases:
        grad, acts = _grad_at(model, layer, x, target=2)

        def copies(count):
            copy_grad, copy_acts = _grad_at(model, layer, x.repeat((count,) + (1,) * (x.dim() - 1)), target=2)
            return copy_acts, [copy_grad]

        assert _batched_is_faster(grad) is vectorized_chosen
        per_pass = max(1, (rows_per_pass or 5) // n)
        vectorized = _quadratic_forms([grad], acts, rows_per_pass, batched=True)[:, 0]
        real = _quadratic_forms([grad], acts, rows_per_pass, batched=False, gradients_of_copies=copies,
                                copies_per_pass=per_pass)[:, 0]
        assert vectorized.dtype == real.dtype == dtype and vectorized.shape == acts.shape[:1] + acts.shape[2:]
        assert real.abs().max() > 1e-4  # curved tails: a real comparison
        torch.testing.assert_close(vectorized, real, **tol)
        chosen = _quadratic_forms([grad], acts, rows_per_pass, gradients_of_copies=copies,
                                  copies_per_pass=per_pass)[:, 0]
        torch.testing.assert_close(chosen, vectorized if vectorized_chosen else real, rtol=0, atol=0)


def test_zero_curvature_is_found_and_curvature_is_not_missed():
    """The one-product check: a ReLU tail has a zero Hessian (2ndG skips the per-location products), smooth
    tails do not (the products are computed)."""
    torch.manual_seed(3)
    relu = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 3, padding=1),
                               torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 2 * 2, 5)).eval()
    x = torch.randn(2, 2, 6, 6)
    assert _curvature_is_zero(*_grad_at(relu, relu[1], x, target=1))
    for act in (torch.nn.Softplus, torch.nn.Tanh, torch.nn.GELU):
        smooth = SmoothNet(act=act).eval()
        assert not _curvature_is_zero(*_grad_at(smooth, smooth.head, torch.randn(2, 2, 8, 8), target=1))
