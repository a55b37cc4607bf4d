"""GuidedIntegratedGradients: PAIR saliency's test vectors, parity with PAIR's GuidedIG, batching, delta, errors."""

import numpy as np
import pytest
import torch

import fastig
from fastig.attr import GuidedIntegratedGradients, IntegratedGradients

from _pair import NumpyWithQuantileInterpolation, pair_model_function
from _shared import SmallCNN, relative_error

saliency_core = pytest.importorskip("saliency.core")
from saliency.core import guided_ig as pair_guided_ig_module  # noqa: E402


@pytest.fixture(autouse=True)
def pair_runs_on_this_numpy(monkeypatch):
    monkeypatch.setattr(pair_guided_ig_module, "np", NumpyWithQuantileInterpolation("numpy"))


def pair_guided_ig(model, inputs, baselines, targets, output="logit", **options):
    """PAIR's GuidedIG.GetMask, one image at a time, stacked."""
    masks = [
        saliency_core.GuidedIG().GetMask(
            x.numpy(), pair_model_function(model, t, output), x_baseline=b.numpy(), **options
        )
        for x, b, t in zip(inputs, baselines, targets)
    ]
    return torch.tensor(np.stack(masks))





# --- PAIR's closed-form test vectors ------------------------------------------------------------------------


def linear(x):
    return 2 * x[:, 0] + x[:, 1]


def dependent_quadratic(x):
    return (2 * x[:, 0] + x[:, 1]) ** 2


def independent_quadratic(x):
    return 2 * x[:, 0] ** 2 + x[:, 1] ** 2


def vec(*values):
    return torch.tensor([values], dtype=torch.float64)


def test_linear_function_gives_integrated_gradients():
    attr = GuidedIntegratedGradients(linear).attribute(vec(10, 5), vec(-1, -3), n_steps=10, fraction=0.1, max_dist=0.5)
    torch.testing.assert_close(attr, vec(22, 8), rtol=1e-12, atol=1e-12)
    attr = GuidedIntegratedGradients(linear).attribute(vec(10, 5), n_steps=10, fraction=0.1, max_dist=0.5)
    torch.testing.assert_close(attr, vec(20, 5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x, baseline, expected", [((3, 3), (0, 0), (18, 9)), ((0, 0), (3, 3), (-18, -9))])
def test_independent_quadratic_gives_integrated_gradients(x, baseline, expected):
    attr = GuidedIntegratedGradients(independent_quadratic).attribute(
        vec(*x), vec(*baseline), n_steps=1000, fraction=0.1, max_dist=0.4
    )
    torch.testing.assert_close(attr, vec(*expected), rtol=0.01, atol=0)


def test_dependent_quadratic():
    gig = GuidedIntegratedGradients(dependent_quadratic)
    x = vec(3, 3)
    unbounded = gig.attribute(x, n_steps=1000, fraction=0.1, max_dist=1.0)
    torch.testing.assert_close(unbounded, vec(72, 9), rtol=0.01, atol=0)
    for options in ({"fraction": 0.1, "max_dist": 0.0}, {"fraction": 1.0, "max_dist": 0.5}):  # both reduce to IG
        torch.testing.assert_close(gig.attribute(x, n_steps=1000, **options), vec(54, 27), rtol=0.01, atol=0)
    bounded = gig.attribute(x, n_steps=1000, fraction=0.1, max_dist=0.2)[0]
    assert abs(bounded.sum().item() - 81.0) < 0.1
    assert 55.0 < bounded[0] < 71.0 and 10.0 < bounded[1] < 26.0


# --- parity with PAIR saliency --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fraction, max_dist, output", [(0.25, 0.02, "logit"), (0.1, 0.5, "logit"), (0.5, 1.0, "probability")]
)
def test_matches_pair_on_small_cnn(fraction, max_dist, output):
    model = SmallCNN().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    baselines = torch.randn(3, 3, 8, 8, dtype=torch.float64) * 0.1
    targets = [0, 3, 4]
    ours = GuidedIntegratedGradients(model).attribute(
        x, baselines, target=targets, n_steps=20, fraction=fraction, max_dist=max_dist, output=output
    )
    theirs = pair_guided_ig(model, x, baselines, targets, x_steps=20, fraction=fraction, max_dist=max_dist, output=output)
    assert relative_error(ours, theirs) < 1e-9


def test_matches_pair_in_float32_with_default_options():
    model = SmallCNN().eval()
    x = torch.rand(2, 3, 8, 8)
    ours = GuidedIntegratedGradients(model).attribute(x, target=[1, 2], n_steps=30)
    assert ours.dtype == torch.float32
    theirs = pair_guided_ig(model, x, torch.zeros_like(x), [1, 2], x_steps=30)
    assert relative_error(ours, theirs) < 1e-5


def test_matches_pair_on_random_resnet18():
    models = pytest.importorskip("fastig.models")
    model = models.get("resnet18", weights="none").double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    targets = [7, 500]
    ours = GuidedIntegratedGradients(model).attribute(x, target=targets, n_steps=6)
    theirs = pair_guided_ig(model, x, torch.zeros_like(x), targets, x_steps=6)
    assert relative_error(ours, theirs) < 1e-9


# --- the method's own properties -----------------------------------------------------------------------------


def test_max_dist_zero_is_left_riemann_integrated_gradients():
    model = SmallCNN().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    baselines = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    guided = GuidedIntegratedGradients(model).attribute(x, baselines, target=1, n_steps=16, max_dist=0.0)
    ig = IntegratedGradients(model).attribute(x, baselines, target=1, n_steps=16, method="riemann_left")
    assert relative_error(guided, ig) < 1e-12


def test_batched_equals_one_at_a_time_for_any_batch_size():
    model = SmallCNN().double().eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    targets = [0, 1, 2, 3]
    gig = GuidedIntegratedGradients(model)
    alone = torch.cat([gig.attribute(x[i : i + 1], target=targets[i], n_steps=12) for i in range(4)])
    for batch_size in (None, 1, 3):
        together = gig.attribute(x, target=targets, n_steps=12, internal_batch_size=batch_size)
        assert relative_error(together, alone) < 1e-12


def test_several_inputs_form_one_feature_vector():
    model = SmallCNN().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    def split_model(top, bottom):
        return model(torch.cat([top, bottom], dim=2))

    joint = GuidedIntegratedGradients(model).attribute(x, target=2, n_steps=10, max_dist=0.1)
    top, bottom = GuidedIntegratedGradients(split_model).attribute((x[:, :, :3], x[:, :, 3:]), target=2, n_steps=10, max_dist=0.1)
    assert relative_error(torch.cat([top, bottom], dim=2), joint) < 1e-12


def test_convergence_delta_is_the_completeness_gap_and_shrinks_with_steps():
    # a smooth model: on ReLU nets Guided IG's gap stalls near 1% (PAIR's too), as whole blocks of zero-gradient
    # features move at once
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Softplus(), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3)
    ).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    gig = GuidedIntegratedGradients(model)
    coarse_attr, coarse = gig.attribute(x, target=1, n_steps=20, return_convergence_delta=True)
    fine_attr, fine = gig.attribute(x, target=1, n_steps=200, return_convergence_delta=True)
    with torch.no_grad():
        gap = model(x)[:, 1] - model(torch.zeros_like(x))[:, 1]
    torch.testing.assert_close(coarse, coarse_attr.sum((1, 2, 3)) - gap, rtol=0, atol=1e-12)
    torch.testing.assert_close(fine, fine_attr.sum((1, 2, 3)) - gap, rtol=0, atol=1e-12)
    assert fine.abs().max() < coarse.abs().max() / 5


def test_input_equal_to_baseline_gives_zeros():
    model = SmallCNN().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    x[1] = 0
    attr = GuidedIntegratedGradients(model).attribute(x, target=0, n_steps=5)
    assert torch.all(attr[1] == 0) and attr[0].abs().sum() > 0


def test_registered_for_the_cli():
    model = SmallCNN().double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    via_registry = fastig.attribute(model, x, target=1, method="guided_ig", n_steps=7, max_dist=0.1, fraction=0.5)
    direct = GuidedIntegratedGradients(model).attribute(x, target=1, n_steps=7, max_dist=0.1, fraction=0.5)
    torch.testing.assert_close(via_registry, direct, rtol=0, atol=0)


@pytest.mark.parametrize(
    "options, error",
    [
        ({"fraction": 1.5}, ValueError),
        ({"max_dist": -0.1}, ValueError),
        ({"n_steps": 0}, ValueError),
        ({"fraction": "a lot"}, TypeError),
        ({"idgi": "yes"}, TypeError),
        ({"output": "softmax"}, ValueError),
    ],
)
def test_bad_options_are_clear_errors(options, error):
    with pytest.raises(error):
        GuidedIntegratedGradients(SmallCNN()).attribute(torch.randn(1, 3, 8, 8), target=0, **options)
