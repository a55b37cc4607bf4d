"""Lime, KernelShap, their numpy surrogates and the superpixels: parity with Captum (same seed), closed forms."""

import numpy as np
import pytest
import scipy.optimize
import torch

import captum.attr as ca
from fastig.attr import KernelShap, Lime
from fastig.attr.surrogate import Lasso, LinearRegression, get_exp_kernel_similarity_function
from fastig.core.superpixels import superpixels


def scaled_cnn(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(24, 5))
    return lambda x: 40 * net(x)  # outputs vary enough across samples for the Lasso to keep coefficients


def block_mask(h, w, cell):
    cols = (w + cell - 1) // cell
    return ((torch.arange(h) // cell)[:, None] * cols + torch.arange(w)[None, :] // cell).reshape(1, 1, h, w)


def weighted_data(seed, n=60, f=8):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, (n, f)).astype(np.float64)
    y = x @ rng.normal(size=f) + 0.3 * rng.normal(size=n) + 1.5
    return x, y, rng.uniform(0.2, 2.0, n)


# -- the numpy surrogates -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,alpha", [(0, 0.01), (1, 0.05), (2, 0.2)])
def test_lasso_minimizes_sklearn_objective(seed, alpha):
    x, y, w = weighted_data(seed)
    model = Lasso(alpha=alpha, tol=1e-10, max_iter=10000).fit_arrays(x, y, w)

    def objective(coef, b):
        return ((w * (y - x @ coef - b) ** 2).sum() / (2 * w.sum())) + alpha * np.abs(coef).sum()

    # reference: the same objective as a smooth bound-constrained problem (coef = p - q, p, q >= 0), L-BFGS-B
    f = x.shape[1]

    def smooth(z):
        p, q, b = z[:f], z[f : 2 * f], z[-1]
        r = y - x @ (p - q) - b
        grad_c = -(x.T @ (w * r)) / w.sum()
        return (w * r**2).sum() / (2 * w.sum()) + alpha * (p + q).sum(), np.concatenate(
            [grad_c + alpha, -grad_c + alpha, [-(w * r).sum() / w.sum()]])

    res = scipy.optimize.minimize(smooth, np.zeros(2 * f + 1), jac=True, method="L-BFGS-B",
                                  bounds=[(0, None)] * (2 * f) + [(None, None)], options={"ftol": 1e-15, "gtol": 1e-12})
    reference = res.x[:f] - res.x[f : 2 * f]
    np.testing.assert_allclose(model.coef_, reference, atol=1e-5)
    assert objective(model.coef_, model.intercept_) <= objective(reference, res.x[-1]) + 1e-10


def test_lasso_default_tolerance_is_close_to_exact():
    x, y, w = weighted_data(4)
    loose, exact = Lasso(0.01).fit_arrays(x, y, w), Lasso(0.01, tol=1e-12, max_iter=100000).fit_arrays(x, y, w)
    np.testing.assert_allclose(loose.coef_, exact.coef_, atol=1e-3)


def test_weighted_linear_regression_closed_form():
    x, y, w = weighted_data(5)
    model = LinearRegression().fit_arrays(x, y, w)
    design = np.hstack([x, np.ones((len(x), 1))])
    solution = np.linalg.solve(design.T @ (w[:, None] * design), design.T @ (w * y))
    np.testing.assert_allclose(model.coef_, solution[:-1], atol=1e-9)
    assert model.intercept_ == pytest.approx(solution[-1], abs=1e-9)
    assert model.representation().shape == (1, x.shape[1])


# -- Lime and KernelShap vs Captum --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(n_samples=40),
    dict(n_samples=30, baselines=0.3, return_input_shape=False, perturbations_per_eval=7),
    dict(n_samples=20, target=[1, 4]),
])
def test_lime_matches_captum_with_the_same_seed(kw):
    # Captum's default Lasso needs scikit-learn (absent here): Captum runs with fastig's Lasso, so this compares
    # Captum's sampling, kernel and data path with fastig's, number for number.
    net, x = scaled_cnn(), torch.randn(2, 3, 8, 8)
    kw = {"target": 2, "feature_mask": block_mask(8, 8, 2), **kw}
    torch.manual_seed(3)
    ours = Lime(net).attribute(x, **kw)
    torch.manual_seed(3)
    theirs = ca.Lime(net, interpretable_model=Lasso(alpha=0.01)).attribute(x, **kw)
    assert ours.shape == theirs.shape and ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_lime_custom_kernel_and_sampler_match_captum():
    net, x = scaled_cnn(1), torch.randn(1, 3, 6, 6)
    similarity = get_exp_kernel_similarity_function("euclidean", kernel_width=3.0)

    def perturb(original, **kwargs):
        return (torch.rand(1, kwargs["num_interp_features"]) > 0.3).long()

    kw = dict(target=0, feature_mask=block_mask(6, 6, 2), n_samples=25)
    torch.manual_seed(9)
    ours = Lime(net, Lasso(alpha=0.005), lambda *a, **k: similarity(*a, **k), perturb).attribute(x, **kw)
    torch.manual_seed(9)
    theirs = ca.Lime(net, Lasso(alpha=0.005), ca._core.lime.get_exp_kernel_similarity_function("euclidean", 3.0),
                     perturb).attribute(x, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(n_samples=30), dict(n_samples=25, baselines=-0.5, target=[0, 3])])
def test_kernel_shap_matches_captum_with_the_same_seed(kw):
    net, x = scaled_cnn(2), torch.randn(2, 3, 8, 8)
    kw = {"target": 1, "feature_mask": block_mask(8, 8, 4), **kw}
    torch.manual_seed(4)
    ours = KernelShap(net).attribute(x, **kw)
    theirs_explainer = ca.KernelShap(net)
    theirs_explainer.interpretable_model = LinearRegression()  # Captum's SkLearnLinearRegression needs scikit-learn
    torch.manual_seed(4)
    theirs = theirs_explainer.attribute(x, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_kernel_shap_is_exact_on_a_linear_model():
    torch.manual_seed(5)
    w, x, b = torch.randn(6), torch.randn(1, 6), torch.randn(1, 6)
    attr = KernelShap(lambda t: t @ w).attribute(x, baselines=b, n_samples=60)
    torch.testing.assert_close(attr, w * (x - b), rtol=1e-3, atol=1e-4)


def test_lime_n_segments_uses_superpixels():
    net, x = scaled_cnn(), torch.randn(1, 3, 12, 12)
    attr = Lime(net).attribute(x, target=0, n_samples=30, n_segments=4)
    assert attr.shape == x.shape and len(torch.unique(attr)) <= 4
    with pytest.raises(ValueError, match="n_segments"):
        Lime(net).attribute(torch.randn(1, 12), target=0, n_segments=4)


def test_lime_bad_arguments():
    net = scaled_cnn()
    with pytest.raises(ValueError, match="n_samples"):
        Lime(net).attribute(torch.randn(1, 3, 4, 4), target=0, n_samples=0)
    with pytest.raises(TypeError, match="interpretable_model"):
        Lime(net, interpretable_model=object())


# -- superpixels --------------------------------------------------------------------------------------------------

def test_grid_superpixels():
    seg = superpixels(torch.randn(2, 3, 16, 24), 6, method="grid")
    assert seg.shape == (2, 1, 16, 24) and seg.dtype == torch.long
    assert torch.equal(torch.unique(seg), torch.arange(6))
    assert len(torch.unique(seg[0, 0, :8, :8])) == 1  # cells are rectangles


def test_slic_superpixels_follow_color_edges():
    image = torch.zeros(1, 3, 16, 16)
    image[:, 0, :, :5] = 1.0  # a red band of 5 columns: not aligned with the 2-cell starting grid
    seg = superpixels(image, 2, method="slic", compactness=0.1)[0, 0]
    assert torch.unique(seg[:, :5]).numel() == 1 and torch.unique(seg[:, 5:]).numel() == 1
    assert seg[0, 0] != seg[0, 10]


def test_superpixels_bad_input():
    with pytest.raises(ValueError, match="image batch"):
        superpixels(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="method"):
        superpixels(torch.randn(1, 3, 8, 8), method="watershed")
