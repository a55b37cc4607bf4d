"""Work whose size the user chooses is bounded before it starts (issue 16, items 6 and 8): Blur IG at any sigma,
path methods at any number of steps. Each case runs under an address-space limit, so an unbounded allocation fails
the test instead of the machine."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from fastig.attr import BlurIntegratedGradients, GuidedIntegratedGradients, IntegratedGradients
from fastig.core import quadrature
from fastig.core import paths
from fastig.core.paths import BLUR_TRUNCATE, gaussian_blur
from fastig.errors import InputError

from _limits import memory_limit
from _shared import SmallCNN


def gaussian_blur_matrix(size, sigma):
    """fastig's 1-D blur matrix (the two factors of :func:`fastig.core.paths.gaussian_blur`), a copy to compare."""
    return paths._blur_matrix(size, float(sigma)).clone()


def _kernel_sum(sigma):
    """scipy's normalization: the sum of exp(-t^2 / (2 sigma^2)) over |t| <= int(4 sigma + 0.5), summed directly."""
    radius = int(BLUR_TRUNCATE * sigma + 0.5)
    half = np.exp(-0.5 * (np.arange(radius + 1) / sigma) ** 2)
    return 2 * half.sum() - half[0]


# --- item 6: Blur IG's kernel at a huge sigma ----------------------------------------------------------------


def test_pair_cannot_blur_at_a_huge_sigma():
    """The reference: scipy's gaussian_filter (PAIR's blur) builds all 2 * int(4 sigma + 0.5) + 1 taps."""
    with memory_limit(200 << 20):
        with pytest.raises(MemoryError):
            ndimage.gaussian_filter1d(np.ones(8), 1e9, mode="constant")


@pytest.mark.parametrize("sigma", [3e4, 1e5])
def test_blur_matrix_beyond_the_direct_radius_matches_the_direct_sum(sigma):
    """Past 2^16 taps the kernel's normalization is computed in closed form (Euler-Maclaurin); where the direct
    sum is still affordable (here), the two agree to float64 rounding."""
    matrix = gaussian_blur_matrix(9, sigma)
    d = torch.arange(9, dtype=torch.float64)
    direct = torch.exp(-0.5 * ((d[None] - d[:, None]) / sigma) ** 2) / _kernel_sum(sigma)
    torch.testing.assert_close(matrix, direct, rtol=1e-13, atol=0)


def test_blur_matrix_with_the_radius_past_the_image_matches_scipy():
    v = np.random.default_rng(0).standard_normal(40)
    for sigma in (15.0, 500.0):  # radius 60 and 2000 taps, all past the 40 pixels
        expected = ndimage.gaussian_filter1d(v, sigma, mode="constant")
        ours = gaussian_blur_matrix(40, sigma) @ torch.from_numpy(v)
        np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_blur_at_a_huge_sigma_is_bounded_and_tends_to_zero():
    """With zero padding and the kernel normalized over its whole radius, a kernel much wider than the image puts
    almost none of its mass on it: blur(x, sigma) -> sum(x) / Z^2 at every pixel, Z = sum of the 1-D kernel
    ~ sigma sqrt(2 pi) erf(2 sqrt 2), so the most blurred image is the zero image, not the image mean."""
    x = torch.rand(2, 3, 16, 20, dtype=torch.float64)
    with memory_limit(200 << 20):
        for sigma in (1e6, 1e9, 1e15):
            blurred = gaussian_blur(x, sigma)
            z = sigma * math.sqrt(2 * math.pi) * math.erf(int(BLUR_TRUNCATE * sigma + 0.5) / (sigma * math.sqrt(2)))
            limit = x.sum(dim=(-2, -1), keepdim=True) / z**2
            torch.testing.assert_close(blurred, limit.expand_as(x), rtol=1e-6, atol=0)
            assert blurred.abs().max() < 1e-9


def test_blur_ig_with_a_huge_max_sigma_runs_in_bounded_memory():
    model = SmallCNN().eval()
    x = torch.rand(2, 3, 8, 8)
    with memory_limit(300 << 20):
        attributions, delta = BlurIntegratedGradients(model).attribute(
            x, target=1, n_steps=4, max_sigma=1e9, return_convergence_delta=True)
    assert torch.isfinite(attributions).all() and torch.isfinite(delta).all()


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_blur_ig_refuses_a_non_finite_max_sigma(value):
    with pytest.raises(ValueError, match="max_sigma"):
        BlurIntegratedGradients(SmallCNN()).attribute(torch.rand(1, 3, 8, 8), target=0, max_sigma=value)


# --- item 8: the step tables and what a method keeps per step ------------------------------------------------


@pytest.mark.parametrize("rule", ["riemann_trapezoid", "riemann_left", "gausslegendre"])
def test_a_billion_steps_is_refused_up_front_with_what_fits(rule):
    model = SmallCNN().eval()
    with memory_limit(300 << 20):
        with pytest.raises(InputError, match=r"n_steps=1,000,000,000 .*at most [\d,]+ steps fit") as refused:
            IntegratedGradients(model).attribute(torch.rand(1, 3, 8, 8), target=0, n_steps=10**9, method=rule)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("cls, options", [(BlurIntegratedGradients, {}), (GuidedIntegratedGradients, {})])
def test_other_path_methods_refuse_a_billion_steps(cls, options):
    with memory_limit(300 << 20):
        with pytest.raises(InputError, match="n_steps=1,000,000,000"):
            cls(SmallCNN().eval()).attribute(torch.rand(1, 3, 8, 8), target=0, n_steps=10**9, **options)


def test_the_step_bound_says_what_fits_and_that_many_steps_run():
    """The bound is a memory budget: the number of steps it names is accepted and one more is not; Gauss-Legendre
    is bounded by its n x n node computation as well."""
    budget = 64 << 20
    fits = quadrature.max_steps("riemann_trapezoid", budget=budget)
    assert 10_000 < fits < budget // 8
    quadrature.check_steps_fit("riemann_trapezoid", fits, budget=budget)
    with pytest.raises(InputError, match=f"at most {fits:,} steps fit"):
        quadrature.check_steps_fit("riemann_trapezoid", fits + 1, budget=budget)
    gauss = quadrature.max_steps("gausslegendre", budget=budget)
    assert gauss <= quadrature.GAUSS_LEGENDRE_MAX_STEPS and gauss < fits
    quadrature.named_rule("gausslegendre", 300)  # ordinary sizes are untouched
    quadrature.named_rule("riemann_trapezoid", 10**4)


def test_the_cli_refuses_a_billion_steps_in_one_line(tmp_path):
    import cv2
    from click.testing import CliRunner

    from fastig.cli import cli

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((227, 227), np.uint8))
    with memory_limit(1 << 30):
        result = CliRunner().invoke(cli, ["attribute", "--model", "centerpixel", "--method", "ig", "--steps", "1000000000",
                                          "--image", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "n_steps=1,000,000,000" in result.output and "at most 4,096 steps" in result.output
    assert "Traceback" not in result.output
