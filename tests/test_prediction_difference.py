"""PredictionDifferenceAnalysis: weight-of-evidence arithmetic on a model with a known answer, and a plain loop."""

import math

import pytest
import torch

from fastig.attr import PredictionDifferenceAnalysis
from fastig.attr.prediction_difference import weight_of_evidence


def log2_odds_laplace(p, n, k):
    p = (p * n + 1) / (n + k)
    return math.log2(p / (1 - p))


def test_weight_of_evidence_by_hand():
    we = weight_of_evidence(torch.tensor([0.9, 0.5]), torch.tensor([0.6, 0.5]), 100000, 2)
    assert we[0].item() == pytest.approx(log2_odds_laplace(0.9, 100000, 2) - log2_odds_laplace(0.6, 100000, 2))
    assert we[1].item() == 0.0


@pytest.mark.parametrize("stride", [1, 3])
def test_known_answer_mean_model(stride):
    # two classes, logit_0 = a * mean(x): on a constant image of ones with all-zero reference images every window
    # lowers the mean by k^2 / (H W), so every pixel's relevance is the same, known weight of evidence.
    a, h, w, k = 3.0, 8, 10, 3

    def model(x):
        score = a * x.mean((1, 2, 3))
        return torch.stack([score, torch.zeros_like(score)], 1)

    x = torch.ones(1, 2, h, w, dtype=torch.float64)
    relevance = PredictionDifferenceAnalysis(model).attribute(
        x, target=0, window_size=k, n_samples=4, stride=stride, reference=torch.zeros(5, 2, h, w, dtype=torch.float64))
    sigmoid = lambda v: 1 / (1 + math.exp(-v))
    expected = log2_odds_laplace(sigmoid(a), 100000, 2) - log2_odds_laplace(sigmoid(a * (1 - k * k / (h * w))), 100000, 2)
    torch.testing.assert_close(relevance, torch.full_like(relevance, expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def loop_reference(net, x, target, k, n_samples, reference):
    """The algorithm written plainly: one window, one sample, one forward at a time (float64)."""
    with torch.no_grad():
        probs = lambda t: torch.softmax(net(t).double(), 1)
        p = probs(x)
        n_classes = p.shape[1]
        p = p[:, target]
        h, w = x.shape[2:]
        total, count = torch.zeros(x.shape[0], h, w, dtype=torch.float64), torch.zeros(h, w, dtype=torch.float64)
        for r in range(h - k + 1):
            for q in range(w - k + 1):
                marginal = []
                for s in range(n_samples):
                    y = x.clone()
                    y[:, :, r : r + k, q : q + k] = reference[s % reference.shape[0], :, r : r + k, q : q + k]
                    marginal.append(probs(y)[:, target])
                pm = torch.stack(marginal).mean(0)
                lap = lambda v: (v * 100000 + 1) / (100000 + n_classes)
                we = torch.log2(lap(p) / (1 - lap(p))) - torch.log2(lap(pm) / (1 - lap(pm)))
                total[:, r : r + k, q : q + k] += we[:, None, None]
                count[r : r + k, q : q + k] += 1
        return total / count


def test_batched_equals_plain_loop_on_a_cnn():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()
    x, reference = torch.randn(2, 3, 9, 9), torch.randn(2, 3, 9, 9)
    ours = PredictionDifferenceAnalysis(net).attribute(x, target=3, window_size=4, n_samples=3, reference=reference,
                                                       perturbations_per_eval=7)
    expected = loop_reference(net, x, 3, 4, 3, reference)
    torch.testing.assert_close(ours[:, 0].double(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(ours[:, 0], ours[:, 2])


def test_self_sampling_is_seeded_and_zero_for_an_ignoring_model():
    model = lambda x: torch.stack([x[:, 0, 0, 0], -x[:, 0, 0, 0]], 1)  # looks at one pixel only
    x = torch.randn(1, 3, 8, 8)
    torch.manual_seed(1)
    a = PredictionDifferenceAnalysis(model).attribute(x, target=0, window_size=2, n_samples=3)
    torch.manual_seed(1)
    b = PredictionDifferenceAnalysis(model).attribute(x, target=0, window_size=2, n_samples=3)
    assert torch.equal(a, b)
    assert a[0, 0, 4:, 4:].abs().max() == 0 and a[0, 0, 0, 0] != 0  # windows away from the pixel change nothing


def test_bad_arguments():
    pda = PredictionDifferenceAnalysis(lambda x: x.flatten(1)[:, :2])
    with pytest.raises(ValueError, match="window_size"):
        pda.attribute(torch.randn(1, 3, 4, 4), target=0, window_size=5)
    with pytest.raises(ValueError, match="reference"):
        pda.attribute(torch.randn(1, 3, 4, 4), target=0, window_size=2, reference=torch.randn(2, 3, 5, 5))
