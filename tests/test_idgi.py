"""IDGI (Yang, Wang, Bilgic, CVPR 2023) on every path: the paper's formula, completeness, skipped steps, costs."""

import numpy as np
import pytest
import torch

import fastig
from fastig.attr import BlurIntegratedGradients, GuidedIntegratedGradients, IntegratedGradients
from fastig.core import quadrature
from fastig.core.paths import gaussian_blur

from _pair import NumpyWithQuantileInterpolation
from _shared import SmallCNN, relative_error


def idgi_reference(gradients, predictions):
    """The official IDGI formula, from the paper: for consecutive path points i, i+1,
    result += g_i^2 * (f_{i+1} - f_i) / sum(g_i^2), with g_i the gradient at point i (the last is not used)."""
    result = np.zeros_like(gradients[0])
    for i in range(len(gradients) - 1):
        squared = gradients[i] ** 2
        result += squared * (predictions[i + 1] - predictions[i]) / np.sum(squared)
    return result


def gradients_and_predictions(model, points, target):
    """Plain autograd, one point at a time: numpy gradients and target outputs at every point."""
    grads, preds = [], []
    for p in points:
        p = p.detach().clone().requires_grad_()
        out = model(p.unsqueeze(0))[0, target]
        (g,) = torch.autograd.grad(out, p)
        grads.append(g.numpy())
        preds.append(out.item())
    return np.stack(grads), np.array(preds)


class TwoInputNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn = SmallCNN()
        self.extra = torch.nn.Linear(4, 5)

    def forward(self, image, vector):
        return self.cnn(image) * torch.tanh(self.extra(vector))


# --- the formula on the straight line ----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["riemann_left", "riemann_trapezoid", "gausslegendre", "riemann_middle"])
def test_integrated_gradients_matches_the_reference_formula(rule):
    model = SmallCNN().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    baseline = torch.randn(2, 3, 8, 8, dtype=torch.float64) * 0.1
    targets = [1, 4]
    ours = IntegratedGradients(model).attribute(x, baseline, target=targets, n_steps=9, method=rule, idgi=True)
    alphas = sorted({0.0, *quadrature.alphas(rule, 9), 1.0})
    if rule == "riemann_left":  # the official code's points: 0, 1/n, ..., (n-1)/n, and 1
        np.testing.assert_allclose(alphas, np.arange(10) / 9, rtol=0, atol=1e-7)
    for i in range(2):
        points = [baseline[i] + a * (x[i] - baseline[i]) for a in alphas]
        expected = idgi_reference(*gradients_and_predictions(model, points, targets[i]))
        assert relative_error(ours[i], expected) < 1e-10


def test_linear_model_distributes_the_output_change_by_squared_weights():
    w = torch.randn(1, 3, 4, 4, dtype=torch.float64)

    def model(v):
        return (v * w).sum((1, 2, 3)) + 0.5

    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    attr = IntegratedGradients(model).attribute(x, n_steps=7, idgi=True)
    change = (model(x) - model(torch.zeros_like(x))).reshape(3, 1, 1, 1)
    torch.testing.assert_close(attr, w**2 / (w**2).sum() * change, rtol=1e-12, atol=1e-14)


# --- completeness, batching, several inputs -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("batch_size", [None, 1, 3, 5])
def test_completeness_to_float_rounding_on_random_cnns(dtype, tol, batch_size):
    model = SmallCNN().to(dtype).eval()
    x = torch.randn(3, 3, 8, 8, dtype=dtype)
    attr, delta = IntegratedGradients(model).attribute(
        x, target=[0, 2, 4], n_steps=8, method="riemann_left", internal_batch_size=batch_size,
        return_convergence_delta=True, idgi=True,
    )
    rows = torch.arange(3), [0, 2, 4]
    with torch.no_grad():
        gap = (model(x)[rows] - model(torch.zeros_like(x))[rows]).double()
    scale = gap.abs().max().item()
    assert (attr.double().sum((1, 2, 3)) - gap).abs().max().item() <= tol * scale
    assert delta.abs().max().item() <= tol * scale


def test_batches_carry_the_held_step_over_without_evaluating_any_point_twice():
    model = SmallCNN().double().eval()
    points_seen = []

    def counting(v):
        points_seen.append(v.shape[0])
        return model(v)

    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    reference = IntegratedGradients(model).attribute(x, target=1, n_steps=10, method="riemann_left", idgi=True)
    for batch_size in (1, 3, 7, 40):
        points_seen.clear()
        attr = IntegratedGradients(counting).attribute(
            x, target=1, n_steps=10, method="riemann_left", internal_batch_size=batch_size, idgi=True
        )
        assert relative_error(attr, reference) < 1e-12
        assert sum(points_seen) == 4 * 11  # 10 points with gradients and 1 forward-only point per example


def test_several_inputs_share_one_gradient_norm():
    model = TwoInputNet().double().eval()
    image = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    vector = torch.randn(2, 4, dtype=torch.float64)
    attr_image, attr_vector = IntegratedGradients(model).attribute(
        (image, vector), target=3, n_steps=8, method="riemann_left", idgi=True, internal_batch_size=4
    )
    alphas = np.arange(9) / 8  # exact in float32, like the rule's linspace
    for i in range(2):
        grads, preds = [], []
        for a in alphas:
            p = (image[i : i + 1] * a).requires_grad_(), (vector[i : i + 1] * a).requires_grad_()
            out = model(*p)[0, 3]
            g = torch.autograd.grad(out, p)
            grads.append(np.concatenate([g[0].numpy().ravel(), g[1].numpy().ravel()]))
            preds.append(out.item())
        expected = idgi_reference(np.stack(grads), np.array(preds))
        ours = np.concatenate([attr_image[i].numpy().ravel(), attr_vector[i].numpy().ravel()])
        assert relative_error(ours, expected) < 1e-10


def test_zero_gradient_steps_are_skipped_and_the_delta_shows_their_cost():
    """f = relu(<w, x> - 1): below the kink the gradient is zero. The segment from the last point below the kink to
    the first above has a zero left gradient but a positive output change: it is skipped (no NaN), and the delta
    is minus that change."""
    w = torch.ones(1, 1, 2, 2, dtype=torch.float64)

    def model(v):
        return torch.relu((v * w).sum((1, 2, 3)) - 1.0)

    x = torch.full((1, 1, 2, 2), 0.9, dtype=torch.float64)  # <w, x> = 3.6: the kink is at alpha = 1/3.6
    attr, delta = IntegratedGradients(model).attribute(
        x, n_steps=8, method="riemann_left", return_convergence_delta=True, idgi=True
    )
    assert torch.isfinite(attr).all()
    f = [max(3.6 * k / 8 - 1, 0.0) for k in range(9)]  # outputs at alpha = k/8: zero up to k = 2
    skipped = f[3] - f[2]  # left point k=2 has zero gradient, right point k=3 is past the kink
    torch.testing.assert_close(delta, torch.tensor([-skipped], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(attr, torch.full_like(x, (f[8] - f[3]) / 4), rtol=0, atol=1e-12)


def test_probability_output_explains_the_softmax():
    model = SmallCNN().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    attr, delta = IntegratedGradients(model).attribute(
        x, target=[1, 2], n_steps=8, idgi=True, output="probability", return_convergence_delta=True
    )
    softmax_model = IntegratedGradients(lambda v: torch.softmax(model(v), 1))
    expected = softmax_model.attribute(x, target=[1, 2], n_steps=8, idgi=True)
    assert relative_error(attr, expected) < 1e-12
    with torch.no_grad():
        p = torch.softmax(model(x), 1)[[0, 1], [1, 2]] - torch.softmax(model(torch.zeros_like(x)), 1)[[0, 1], [1, 2]]
    torch.testing.assert_close(attr.sum((1, 2, 3)), p, rtol=0, atol=1e-12)
    assert delta.abs().max() < 1e-12


def test_refuses_multiply_by_inputs_false():
    with pytest.raises(ValueError, match="multiply_by_inputs"):
        IntegratedGradients(SmallCNN(), multiply_by_inputs=False).attribute(torch.randn(1, 3, 8, 8), target=0, idgi=True)


# --- IDGI on the Guided IG and Blur IG paths -----------------------------------------------------------------------


@pytest.fixture
def pair():
    saliency_core = pytest.importorskip("saliency.core")
    from saliency.core import guided_ig

    original = guided_ig.np
    guided_ig.np = NumpyWithQuantileInterpolation("numpy")
    yield saliency_core
    guided_ig.np = original


def test_guided_ig_path_matches_the_formula_on_pairs_path(pair):
    """The points of PAIR's Guided IG path, recorded from its gradient calls, plus the input at the end."""
    model = SmallCNN().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    targets = [0, 3]
    ours, delta = GuidedIntegratedGradients(model).attribute(
        x, target=targets, n_steps=15, max_dist=0.1, idgi=True, return_convergence_delta=True
    )
    for i in range(2):
        points = []

        def record(batch, call_model_args=None, expected_keys=None):
            points.append(torch.tensor(batch[0]))
            v = torch.tensor(batch).requires_grad_()
            (g,) = torch.autograd.grad(model(v)[0, targets[i]], v)
            return {pair.INPUT_OUTPUT_GRADIENTS: g.numpy()}

        pair.GuidedIG().GetMask(x[i].numpy(), record, x_steps=15, max_dist=0.1)
        assert len(points) == 15
        expected = idgi_reference(*gradients_and_predictions(model, points + [x[i]], targets[i]))
        assert relative_error(ours[i], expected) < 1e-9
    assert delta.abs().max() < 1e-9
    one_by_one = GuidedIntegratedGradients(model).attribute(
        x, target=targets, n_steps=15, max_dist=0.1, idgi=True, internal_batch_size=1
    )
    assert relative_error(one_by_one, ours) < 1e-12


def test_blur_ig_path_matches_the_formula_on_pairs_path(pair):
    """The blur levels PAIR's Blur IG evaluates, plus the fully blurred input; signed to explain f(x) - f(blurred)."""
    model = SmallCNN().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    targets = [2, 4]
    ours, delta = BlurIntegratedGradients(model).attribute(
        x, target=targets, n_steps=12, max_sigma=3.0, idgi=True, return_convergence_delta=True
    )
    for i in range(2):
        points = []

        def record(batch, call_model_args=None, expected_keys=None):
            points.extend(torch.tensor(np.asarray(batch).transpose(0, 3, 1, 2)))
            return {pair.INPUT_OUTPUT_GRADIENTS: np.zeros_like(batch)}

        pair.BlurIG().GetMask(x[i].numpy().transpose(1, 2, 0), record, steps=12, max_sigma=3.0, batch_size=5)
        points.append(gaussian_blur(x[i : i + 1], 3.0)[0])
        expected = -idgi_reference(*gradients_and_predictions(model, points, targets[i]))
        assert relative_error(ours[i], expected) < 1e-10
    rows = torch.arange(2), targets
    with torch.no_grad():
        gap = model(x)[rows] - model(gaussian_blur(x, 3.0))[rows]
    torch.testing.assert_close(ours.sum((1, 2, 3)), gap, rtol=0, atol=1e-12)
    assert delta.abs().max() < 1e-12


def test_idgi_on_random_resnet18_is_complete_and_matches_the_formula():
    models = pytest.importorskip("fastig.models")
    model = models.get("resnet18", weights="none").double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    baseline = torch.randn(1, 3, 32, 32, dtype=torch.float64) * 0.1
    attr, delta = IntegratedGradients(model).attribute(
        x, baseline, target=42, n_steps=4, method="riemann_left", idgi=True, return_convergence_delta=True
    )
    points = [baseline[0] + k / 4 * (x[0] - baseline[0]) for k in range(5)]
    expected = idgi_reference(*gradients_and_predictions(model, points, 42))
    assert relative_error(attr[0], expected) < 1e-10
    assert delta.abs().item() < 1e-10

    # at a zero baseline this freshly initialized net has a zero gradient (every ReLU sits at 0): the formula as
    # written divides 0 by 0 there, fastig skips the step
    attr, delta = IntegratedGradients(model).attribute(
        x, target=42, n_steps=4, method="riemann_left", idgi=True, return_convergence_delta=True
    )
    grads, preds = gradients_and_predictions(model, [x[0] * k / 4 for k in range(5)], 42)
    assert not grads[0].any()
    with np.errstate(invalid="ignore"):
        assert np.isnan(idgi_reference(grads, preds)).all()
    assert relative_error(attr[0], idgi_reference(grads[1:], preds[1:])) < 1e-10  # the other steps as written
    assert abs(delta.item() + (preds[1] - preds[0])) < 1e-10  # the delta is what the skipped step cost


def test_cli_registry_passes_idgi_and_output():
    model = SmallCNN().double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    for method in ("ig", "guided_ig", "blur_ig"):
        via_registry = fastig.attribute(model, x, target=1, method=method, n_steps=5, idgi=True, output="probability")
        assert torch.isfinite(via_registry).all()
    direct = IntegratedGradients(model).attribute(x, target=1, n_steps=5, idgi=True, output="probability")
    torch.testing.assert_close(fastig.attribute(model, x, target=1, method="ig", n_steps=5, idgi=True, output="probability"),
                               direct, rtol=0, atol=0)
