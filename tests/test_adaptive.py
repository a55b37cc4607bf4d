"""n_steps="auto" (adaptive quadrature), alphas= (fixed schedules) and fit_schedule, on IG, IDGI and Blur IG.

Accuracy is judged against the integral itself: a high-step reference, or the closed form where there is one.
"""

import warnings

import pytest
import torch

from fastig.attr import BlurIntegratedGradients, IntegratedGradients
from fastig.core import quadrature
from fastig.core.adaptive import ToleranceNotReached, fit_schedule

from _shared import SmallCNN, TwoInputNet


def relative_l2(ours, reference):
    """Per-example relative L2 distance, all features of an example together: [n]."""
    ours, reference = ours.double().flatten(1), reference.double().flatten(1)
    return (ours - reference).norm(dim=1) / reference.norm(dim=1)


class Kinks(torch.nn.Module):
    """f(x) = sum_j relu(u_j . x - c_j): on the line alpha * x (zero baseline) unit j switches on at the known
    alpha_j = c_j / (u_j . x); the gradient jumps there and is constant elsewhere."""

    def __init__(self, directions, offsets):
        super().__init__()
        self.u = torch.nn.Parameter(directions, requires_grad=False)  # [J, D]
        self.c = torch.nn.Parameter(offsets, requires_grad=False)  # [J]

    def forward(self, x):
        return torch.relu(x.flatten(1) @ self.u.T - self.c).sum(1, keepdim=True)

    def exact_ig(self, x):
        """Closed form: unit j contributes u_j * x times the length of the part of [0, 1] where it is on."""
        flat = x.flatten(1).double()
        u, c = self.u.double(), self.c.double()
        slope = flat @ u.T  # [n, J]: the unit's input is alpha * slope - c
        switch = c / slope
        share = torch.where(slope > 0, (1 - switch).clamp(0, 1), switch.clamp(0, 1))
        return ((share @ u) * flat).reshape(x.shape)


def kink_model(alphas, features=12, seed=0):
    """A Kinks model whose units switch on at ``alphas`` along the line to ``x`` (returned too, shape [1, D])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, features, generator=g) + 0.5
    u = torch.randn(len(alphas), features, generator=g)
    u = u * torch.sign(u @ x[0]).reshape(-1, 1)  # u_j . x > 0: the unit switches on, not off
    c = torch.tensor(alphas) * (u @ x[0])
    return Kinks(u, c), x


# --- analytic models -------------------------------------------------------------------------------------------


def test_linear_model_one_step_is_exact_and_auto_stops_at_two():
    model = torch.nn.Linear(10, 3).double()
    x, b = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    exact = model.weight[1].detach() * (x - b)
    ig = IntegratedGradients(model)
    assert torch.allclose(ig.attribute(x, b, target=1, n_steps=1), exact, atol=1e-12)
    ours, delta = ig.attribute(x, b, target=1, n_steps="auto", return_convergence_delta=True)
    assert torch.allclose(ours, exact, atol=1e-12)
    info = ig.last_info
    assert info.passes.tolist() == [2] * 4 and info.forward_passes.tolist() == [0] * 4  # the gradients at both ends
    assert info.converged.all() and float(info.error.max()) < 1e-12
    assert delta.abs().max() < 1e-12


def test_points_go_to_a_kink_and_the_map_is_exact_to_the_tolerance():
    kink = 0.3
    model, x = kink_model([kink])
    ig = IntegratedGradients(model)
    ours = ig.attribute(x, target=0, n_steps="auto", tolerance=1e-3)
    info = ig.last_info
    assert info.converged.all()
    assert relative_l2(ours, model.exact_ig(x)).item() <= 1e-3
    points = info.alphas[0]
    near = ((points - kink).abs() < 0.05).sum().item()
    assert near >= len(points) / 2, points  # most of the gradients within 0.05 of the kink
    assert ((points - kink).abs() < 0.01).any()


def test_two_kinks_in_different_directions_both_get_points():
    kinks = [0.15, 0.7]
    model, x = kink_model(kinks, seed=3)
    ig = IntegratedGradients(model)
    ours = ig.attribute(x, target=0, n_steps="auto", tolerance=1e-3)
    points = ig.last_info.alphas[0]
    assert relative_l2(ours, model.exact_ig(x)).item() <= 1e-3
    for k in kinks:
        assert ((points - k).abs() < 0.02).sum() >= 3, (k, points)


def test_nearest_node_rule_reproduces_the_points_and_weights_it_reports():
    """The attributions are sum_k w_k grad f(x_k) * (x - b) over info.alphas/info.weights (plain autograd)."""
    model = SmallCNN().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    b = torch.randn(1, 3, 8, 8, dtype=torch.float64) * 0.1
    ig = IntegratedGradients(model)
    ours = ig.attribute(x, b, target=[0, 2, 4], n_steps="auto", tolerance=0.02)
    info = ig.last_info
    for e, t in enumerate([0, 2, 4]):
        a, w = info.alphas[e], info.weights[e]
        assert torch.allclose(w, quadrature.nearest_node_weights(a)) and abs(w.sum().item() - 1) < 1e-12
        points = (b + a.reshape(-1, 1, 1, 1) * (x[e : e + 1] - b)).requires_grad_()
        (g,) = torch.autograd.grad(model(points)[:, t].sum(), points)
        expected = (w.reshape(-1, 1, 1, 1) * g).sum(0) * (x[e] - b[0])
        assert torch.allclose(ours[e], expected, rtol=1e-10, atol=1e-12)


# --- small CNNs: tolerance, convergence, batching ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_case():
    torch.manual_seed(1)
    model = SmallCNN().eval()
    x = torch.randn(6, 3, 8, 8)
    target = [0, 1, 2, 3, 4, 0]
    reference = IntegratedGradients(model).attribute(x, target=target, n_steps=4096, method="riemann_middle")
    return model, x, target, reference


def test_small_cnn_meets_the_tolerance_against_the_reference(cnn_case):
    model, x, target, reference = cnn_case
    ig = IntegratedGradients(model)
    for tolerance in (0.02, 0.005):
        ours = ig.attribute(x, target=target, n_steps="auto", tolerance=tolerance)
        info = ig.last_info
        assert info.converged.all() and (info.error <= tolerance).all()
        error = relative_l2(ours, reference)
        # the estimate is a statistical one (jumps at unknown places): the median meets it, none misses it twice
        assert error.median() <= tolerance and error.max() <= 2 * tolerance, (error, info.map_error)


def test_converges_to_the_reference_as_the_tolerance_shrinks(cnn_case):
    model, x, target, reference = cnn_case
    ig = IntegratedGradients(model)
    errors, passes = [], []
    for tolerance in (0.1, 0.02, 0.004):
        errors.append(relative_l2(ig.attribute(x, target=target, n_steps="auto", tolerance=tolerance), reference))
        passes.append(ig.last_info.passes)
    assert (errors[2] < errors[0]).all() and errors[2].max() < 0.01
    assert errors[0].median() > errors[1].median() > errors[2].median()
    assert (passes[2] >= passes[1]).all() and (passes[1] >= passes[0]).all()


def test_unreachable_tolerance_is_reported_not_hidden(cnn_case):
    model, x, target, _ = cnn_case
    ig = IntegratedGradients(model)
    with pytest.warns(ToleranceNotReached, match="did not reach tolerance 1e-05 within max_steps=6"):
        ig.attribute(x, target=target, n_steps="auto", tolerance=1e-5, max_steps=6)
    info = ig.last_info
    assert (info.passes == 6).all() and not info.converged.any() and (info.error > 1e-5).all()
    assert "0/6 examples met the tolerance" in info.summary()


def test_batched_equals_one_example_at_a_time_and_is_deterministic(cnn_case):
    model, x, target, _ = cnn_case
    ig = IntegratedGradients(model)
    together = ig.attribute(x, target=target, n_steps="auto", tolerance=0.01)
    info = ig.last_info
    again = ig.attribute(x, target=target, n_steps="auto", tolerance=0.01)
    assert torch.equal(together, again)
    small_batches = ig.attribute(x, target=target, n_steps="auto", tolerance=0.01, internal_batch_size=3)
    assert torch.equal(ig.last_info.passes, info.passes)
    torch.testing.assert_close(small_batches, together, rtol=1e-5, atol=1e-7)
    for e in range(len(x)):
        alone = ig.attribute(x[e : e + 1], target=target[e], n_steps="auto", tolerance=0.01)
        assert ig.last_info.passes.item() == info.passes[e].item()
        torch.testing.assert_close(ig.last_info.alphas[0], info.alphas[e], rtol=0, atol=0)
        torch.testing.assert_close(alone[0], together[e], rtol=1e-5, atol=1e-7)


def test_examples_get_different_step_counts_in_full_batches():
    """Examples that need more points get more; the requests of all running examples share model calls."""
    model, x_easy = kink_model([0.5], features=12, seed=5)
    hard, _ = kink_model([0.2, 0.4, 0.6, 0.8], features=12, seed=6)

    class Both(torch.nn.Module):  # example 0 through the one-kink model, example 1 through the four-kink one
        def forward(self, x):
            return torch.cat([model(x[:, 0]), hard(x[:, 1])], 1).gather(1, x[:, 2, :1].long())

    x = torch.zeros(2, 3, 12)
    x[:, :2] = x_easy
    x[1, 2] = 1
    calls = []
    forward = Both()
    ig = IntegratedGradients(lambda inp: (calls.append(inp.shape[0]), forward(inp))[1])
    ig.attribute(x, baselines=torch.cat([torch.zeros(2, 2, 12), x[:, 2:]], 1), n_steps="auto", tolerance=1e-3,
                 internal_batch_size=8)
    passes = ig.last_info.passes
    assert passes[1] > passes[0]
    gradient_calls = calls  # no forward-only passes: f at both ends comes with their gradients
    assert sum(gradient_calls) == passes.sum()
    assert sum(c == 8 for c in gradient_calls) >= len(gradient_calls) // 2  # mostly full batches


def test_several_inputs_targets_and_arguments():
    model = TwoInputNet().double()
    x1, x2 = torch.randn(3, 3, 2, 2, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).reshape(3, 1)
    ig = IntegratedGradients(model)
    kwargs = dict(target=[0, 1, 2], additional_forward_args=(scale,))
    reference = ig.attribute((x1, x2), n_steps=4096, method="riemann_middle", **kwargs)
    ours, delta = ig.attribute((x1, x2), n_steps="auto", tolerance=1e-3, return_convergence_delta=True, **kwargs)
    assert isinstance(ours, tuple) and [o.shape for o in ours] == [x1.shape, x2.shape]
    joint = torch.cat([o.flatten(1) for o in ours], 1)
    joint_reference = torch.cat([r.flatten(1) for r in reference], 1)
    assert relative_l2(joint, joint_reference).max() <= 2e-3
    assert delta.abs().max() <= 1e-3 * joint_reference.abs().sum(1).max()


# --- IDGI and Blur IG ------------------------------------------------------------------------------------------


def test_idgi_auto_is_complete_and_converges_to_high_step_idgi(cnn_case):
    model, x, target, _ = cnn_case
    ig = IntegratedGradients(model)
    reference = ig.attribute(x, target=target, n_steps=4096, method="riemann_trapezoid", idgi=True)
    errors = []
    for tolerance in (0.05, 0.005):
        ours, delta = ig.attribute(x, target=target, n_steps="auto", tolerance=tolerance, idgi=True,
                                   return_convergence_delta=True)
        assert delta.abs().max() < 1e-4
        errors.append(relative_l2(ours, reference))
    assert (errors[1] < errors[0]).all() and errors[1].median() <= 0.005


def test_blur_ig_auto_converges_to_high_step_blur_ig():
    torch.manual_seed(2)
    model = SmallCNN().eval()
    x = torch.randn(3, 3, 8, 8)
    blur = BlurIntegratedGradients(model)
    # 512 uniform levels are within about 0.005 of the integral here (Blur IG's error falls as 1/n)
    reference, reference_delta = blur.attribute(x, target=1, n_steps=512, max_sigma=3.0, return_convergence_delta=True)
    ours, delta = blur.attribute(x, target=1, n_steps="auto", tolerance=0.02, max_sigma=3.0,
                                 return_convergence_delta=True)
    info = blur.last_info
    assert info.converged.all() and (info.completeness == 0).all()  # Blur IG's path integral is not complete
    assert relative_l2(ours, reference).max() <= 0.04
    assert (delta - reference_delta).abs().max() <= 0.04 * reference.flatten(1).abs().sum(1).max()
    uniform = blur.attribute(x, target=1, n_steps=int(info.passes.max()), max_sigma=3.0)
    assert relative_l2(ours, reference).median() < relative_l2(uniform, reference).median()


# --- fixed schedules ------------------------------------------------------------------------------------------


def test_alphas_reproduce_the_named_rules(cnn_case):
    model, x, target, _ = cnn_case
    ig = IntegratedGradients(model)
    for rule in ("gausslegendre", "riemann_middle", "riemann_left"):
        named = ig.attribute(x, target=target, n_steps=9, method=rule)
        torch.testing.assert_close(ig.attribute(x, target=target, alphas=quadrature.named_rule(rule, 9)), named)
    middle = [(k + 0.5) / 9 for k in range(9)]  # nearest-node weights on uniform midpoints: the midpoint rule
    torch.testing.assert_close(ig.attribute(x, target=target, alphas=middle),
                               ig.attribute(x, target=target, n_steps=9, method="riemann_middle"))
    blur = BlurIntegratedGradients(model)
    left = ([k / 9 for k in range(9)], [1 / 9] * 9)  # Blur IG's uniform levels and spacings
    torch.testing.assert_close(blur.attribute(x, target=target, alphas=left, max_sigma=2.0),
                               blur.attribute(x, target=target, n_steps=9, max_sigma=2.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alphas,weights,match", [
    ([0.5, 1.5], None, "in \\[0, 1\\]"),
    ([0.6, 0.2], None, "increasing"),
    ([0.2, 0.6], [0.5], "one per alpha"),
    ([], None, "non-empty"),
    ("abc", None, "alphas must be"),
])
def test_bad_schedules_are_refused(alphas, weights, match):
    ig = IntegratedGradients(SmallCNN())
    with pytest.raises(ValueError, match=match):
        ig.attribute(torch.randn(1, 3, 8, 8), target=0, alphas=alphas if weights is None else (alphas, weights))


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_steps="auto", alphas=[0.5]), "not both"),
    (dict(n_steps="auto", tolerance=0), "tolerance must be a number in \\(0, 1\\)"),
    (dict(n_steps="auto", max_steps=1), "max_steps must be an integer >= 2"),
    (dict(n_steps="many"), "n_steps must be an integer"),
])
def test_bad_auto_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IntegratedGradients(SmallCNN()).attribute(torch.randn(1, 3, 8, 8), target=0, **kwargs)
    if "alphas" not in kwargs and kwargs.get("n_steps") == "auto":
        with pytest.raises(ValueError, match=match):
            BlurIntegratedGradients(SmallCNN()).attribute(torch.randn(1, 3, 8, 8), target=0, **kwargs)
    with pytest.raises(ValueError, match="sqrt=True"):
        BlurIntegratedGradients(SmallCNN()).attribute(torch.randn(1, 3, 8, 8), target=0, n_steps="auto", sqrt=True)


def test_max_steps_beyond_memory_is_refused_before_any_pass():
    from fastig.core.adaptive import check_points_fit
    from fastig.errors import InputError

    check_points_fit(1000, 100, budget=100_000)  # exactly fits
    with pytest.raises(InputError, match="max_steps=1,001 does not fit in memory.* at most 1,000 of them fit"):
        check_points_fit(1001, 100, budget=100_000)
    calls = []
    model = SmallCNN()
    model.register_forward_hook(lambda *_: calls.append(1))
    for attribution in (IntegratedGradients(model), BlurIntegratedGradients(model)):
        with pytest.raises(InputError, match="max_steps=10,000,000,000,000 does not fit"):
            attribution.attribute(torch.randn(2, 3, 8, 8), target=0, n_steps="auto", max_steps=10**13)
    assert calls == []  # refused before the first model pass


def test_fit_schedule_puts_points_where_the_jumps_are_and_beats_uniform_on_new_inputs():
    # inputs near one direction x0, whose units switch on between alpha 0.1 and 0.3 of the way from 0
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(16, generator=g) + 0.5
    u = torch.randn(40, 16, generator=g)
    u = u * torch.sign(u @ x0).reshape(-1, 1)
    model = Kinks(u, (0.1 + 0.2 * torch.rand(40, generator=g)) * (u @ x0))
    inputs = x0 * (1 + 0.05 * torch.randn(8, 16, generator=g))
    schedule = fit_schedule(model, inputs[:3], 12, target=0, fit_steps=64)
    points = torch.tensor(schedule.alphas)
    assert ((points > 0.05) & (points < 0.4)).sum() >= 8, points
    assert abs(schedule.weights.sum().item() - 1) < 1e-12
    ig = IntegratedGradients(model)
    rest = inputs[3:]
    exact = model.exact_ig(rest)
    fitted = relative_l2(ig.attribute(rest, target=0, alphas=schedule), exact)
    uniform = relative_l2(ig.attribute(rest, target=0, n_steps=12, method="riemann_middle"), exact)
    assert fitted.median() < 0.7 * uniform.median(), (fitted, uniform)


def test_warning_free_when_the_tolerance_is_met(cnn_case):
    model, x, target, _ = cnn_case
    with warnings.catch_warnings():
        warnings.simplefilter("error", ToleranceNotReached)
        IntegratedGradients(model).attribute(x, target=target, n_steps="auto", tolerance=0.05)


def test_latent_ig_alphas_place_the_decoded_points():
    """alphas= moves latent IG's decoded points: a subset of a uniform grid gives the same points as that grid,
    uniform alphas give the uniform path, and n_steps='auto' is refused with its reason."""
    from test_latent_ig import images, small_classifier, small_dvae

    from fastig.attr import LatentIntegratedGradients

    lig = LatentIntegratedGradients(small_classifier(), small_dvae())
    x, b = images((2, 3, 16, 16)), images((2, 3, 16, 16), seed=7)
    uniform = lig.path(x, b, n_steps=8, gap_steps=2)
    chosen = lig.path(x, b, alphas=[0.25, 0.375, 0.875], gap_steps=2)
    assert chosen.latent_alphas == [0.0, 0.25, 0.375, 0.875, 1.0]
    every = slice(0, 2)
    for k, t in enumerate(chosen.latent_alphas):
        torch.testing.assert_close(chosen.points(slice(2 + k, 3 + k), every)[0],
                                   uniform.points(slice(2 + round(8 * t), 3 + round(8 * t)), every)[0])
    same = lig.attribute(x, b, target=1, alphas=[k / 8 for k in range(1, 8)], gap_steps=2)
    torch.testing.assert_close(same, lig.attribute(x, b, target=1, n_steps=8, gap_steps=2))
    with pytest.raises(ValueError, match="no n_steps='auto'"):
        lig.attribute(x, b, target=1, n_steps="auto")


# --- the command line and the store ---------------------------------------------------------------------------


def test_cli_steps_auto_records_passes_and_error_per_image(tmp_path):
    import cv2
    import h5py
    import numpy as np
    from click.testing import CliRunner

    from fastig.cli import cli

    images = []
    for k in range(2):
        images += ["--image", str(tmp_path / f"img{k}.png")]
        cv2.imwrite(images[-1], (np.random.default_rng(k).random((40, 50, 3)) * 255).astype(np.uint8))
    out = tmp_path / "out"
    run = lambda *args: CliRunner().invoke(cli, ["attribute", "--model", "centerpixel", *args])  # noqa: E731
    result = run("--method", "ig", "--steps", "auto", "--tolerance", "0.05", "--max-steps", "16", *images,
                 "--out", str(out), "--no-heatmaps")
    assert result.exit_code == 0, result.output
    with h5py.File(out / "attributions.h5") as f:
        passes, error, cost = (f[f"inputs/{name}"][:] for name in ("passes", "error", "cost"))
        assert passes.shape == (2,) and ((passes >= 2) & (passes <= 16)).all()
        assert (cost == passes).all() and np.isfinite(error).all()
        assert "auto" in f.attrs["options"]
    for args, message in [
        (("--method", "guided_ig", "--steps", "auto"), "--steps auto does not apply to --method guided_ig"),
        (("--method", "ig", "--tolerance", "0.1"), "--tolerance applies with --steps auto"),
        (("--method", "ig", "--steps", "many"), "'many' is neither an integer nor 'auto'"),
        (("--method", "ig", "--steps", "auto", "--max-steps", str(10**13)), "max_steps=10,000,000,000,000 does not fit"),
    ]:
        bad = run(*args, *images, "--out", str(tmp_path / "bad"))
        assert bad.exit_code == 2 and message in bad.output, bad.output
