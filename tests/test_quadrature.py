"""fastig's quadrature rules equal captum's tables exactly (bit for bit)."""

import pytest
import torch
from captum.attr._utils.approximation_methods import approximation_parameters

from fastig.core import quadrature


@pytest.mark.parametrize("rule", quadrature.RULES)
@pytest.mark.parametrize("n", [2, 3, 7, 50, 128, 300])
def test_rules_match_captum_exactly(rule, n):
    step_sizes, alphas = approximation_parameters(rule)
    table = quadrature.named_rule(rule, n)
    assert table.alphas == list(alphas(n))
    assert torch.equal(table.weights, torch.tensor(step_sizes(n)).float())


@pytest.mark.parametrize("n", [2, 10, 50])
def test_trapezoid_weights_sum_to_one_minus_one_over_n(n):
    weights = quadrature.named_rule("riemann_trapezoid", n).weights.double()
    assert weights.sum().item() == pytest.approx(1 - 1 / n, abs=1e-6)


def test_endpoints():
    trapezoid, left, right = (quadrature.named_rule(f"riemann_{r}", 5) for r in ("trapezoid", "left", "right"))
    assert trapezoid.includes_start and trapezoid.includes_end
    assert left.includes_start and not left.includes_end
    assert right.includes_end and not right.includes_start
    gl = quadrature.named_rule("gausslegendre", 5)
    assert not gl.includes_start and not gl.includes_end


def test_gauss_legendre_integrates_polynomials_exactly():
    rule = quadrature.named_rule("gausslegendre", 4)  # exact up to degree 7
    alphas = torch.tensor(rule.alphas, dtype=torch.float64)
    weights = torch.tensor(quadrature.step_sizes("gausslegendre", 4), dtype=torch.float64)
    assert (weights * alphas**7).sum().item() == pytest.approx(1 / 8, rel=1e-12)


@pytest.mark.parametrize("rule,n", [("simpson", 10), ("riemann_left", 1), ("gausslegendre", 0), ("riemann_left", 2.5)])
def test_bad_rules_are_rejected(rule, n):
    with pytest.raises(ValueError):
        quadrature.named_rule(rule, n)
