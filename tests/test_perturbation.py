"""Occlusion, FeatureAblation and ShapleyValueSampling: parity with Captum (same process), closed forms, batching."""

import warnings

import pytest
import torch

import captum.attr as ca
from fastig.attr import FeatureAblation, Occlusion, ShapleyValueSampling
from fastig.methods import WithDefaults


def small_cnn(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32, 5),
    )
    return net.to(dtype).eval()


def resnet18():
    """fastig's resnet18 with random weights (small input keeps it fast)."""
    import fastig.models

    torch.manual_seed(0)
    return fastig.models.get("resnet18", weights="none").eval()


def block_mask(h, w, cell):
    cols = (w + cell - 1) // cell
    rows = torch.arange(h) // cell
    return (rows[:, None] * cols + torch.arange(w)[None, :] // cell).reshape(1, 1, h, w)


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 3)
        self.b = torch.nn.Linear(4, 3)

    def forward(self, x, y, scale=1.0):
        return torch.tanh(self.a(x) + self.b(y)) * scale


def close(a, b, tol=1e-5):
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


# -- Occlusion ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(sliding_window_shapes=(3, 3, 3), strides=(1, 2, 2), target=2),
    dict(sliding_window_shapes=(3, 3, 3), strides=2, baselines=0.5, target=[0, 4], perturbations_per_eval=3),
    dict(sliding_window_shapes=(3, 4, 4), strides=3, target=torch.tensor([1, 3])),  # last window cut off
    dict(sliding_window_shapes=(3, 5, 2), strides=(3, 4, 2), baselines=torch.randn(1, 3, 9, 9), target=1),
])
def test_occlusion_matches_captum(kw):
    net, x = small_cnn(), torch.randn(2, 3, 9, 9)
    close(Occlusion(net).attribute(x, **kw), ca.Occlusion(net).attribute(x, **kw))


def test_occlusion_multiple_inputs_and_args_match_captum():
    torch.manual_seed(1)
    net, x, y = TwoInputs().eval(), torch.randn(3, 6), torch.randn(3, 4)
    kw = dict(sliding_window_shapes=((2,), (3,)), strides=(1, (1,)), target=1, additional_forward_args=(2.0,))
    for a, b in zip(Occlusion(net).attribute((x, y), **kw), ca.Occlusion(net).attribute((x, y), **kw)):
        close(a, b)


def test_occlusion_float64_on_resnet18_matches_captum():
    net, x = resnet18(), torch.randn(1, 3, 32, 32)
    kw = dict(sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8), target=3)
    close(Occlusion(net).attribute(x, **kw), ca.Occlusion(net).attribute(x, perturbations_per_eval=16, **kw), tol=1e-4)


def test_occlusion_linear_model_closed_form():
    # f(x) = w . x: a window's output change is the sum of w*(x - b) inside it; each scalar averages its windows.
    torch.manual_seed(2)
    w, x = torch.randn(8, dtype=torch.float64), torch.randn(1, 8, dtype=torch.float64)
    attr = Occlusion(lambda t: t @ w).attribute(x, sliding_window_shapes=(3,), strides=1)
    contrib = (w * x[0])
    expected = torch.empty(8, dtype=torch.float64)
    for i in range(8):
        windows = [s for s in range(6) if s <= i < s + 3]
        expected[i] = sum(contrib[s : s + 3].sum() for s in windows) / len(windows)
    torch.testing.assert_close(attr[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_occlusion_bad_arguments():
    net, x = small_cnn(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="exceeds"):
        Occlusion(net).attribute(x, sliding_window_shapes=(3, 9, 9))
    with pytest.raises(ValueError, match="stride"):
        Occlusion(net).attribute(x, sliding_window_shapes=(3, 2, 2), strides=(1, 3, 3))
    with pytest.raises(ValueError, match="sliding_window_shapes"):
        Occlusion(net).attribute(x, sliding_window_shapes=(2, 2))
    with pytest.raises(ValueError, match="perturbations_per_eval"):
        Occlusion(net).attribute(x, sliding_window_shapes=(3, 2, 2), perturbations_per_eval=0)


# -- FeatureAblation ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["default", "blocks", "broadcast_mask_baseline", "per_example_mask"])
def test_feature_ablation_matches_captum(dtype, case):
    net, x = small_cnn(dtype=dtype), torch.randn(3, 3, 6, 6, dtype=dtype)
    kw = dict(target=[1, 2, 0], perturbations_per_eval=16)
    if case == "blocks":
        kw.update(feature_mask=block_mask(6, 6, 2), perturbations_per_eval=4)
    elif case == "broadcast_mask_baseline":
        # (Captum fails on a partial last batch with a [1, ...] baseline tensor: one perturbation per call here)
        kw.update(feature_mask=block_mask(6, 6, 3)[0, 0], baselines=torch.randn(1, 3, 6, 6, dtype=dtype),
                  perturbations_per_eval=1)
    elif case == "per_example_mask":
        kw.update(feature_mask=torch.randint(0, 7, (3, 1, 6, 6)), baselines=-1.0)
    close(FeatureAblation(net).attribute(x, **kw), ca.FeatureAblation(net).attribute(x, **kw))


def test_feature_ablation_cross_tensor_features_match_captum():
    torch.manual_seed(3)
    net, x, y = TwoInputs().eval(), torch.randn(2, 6), torch.randn(2, 4)
    masks = (torch.tensor([[0, 0, 1, 1, 2, 2]]), torch.tensor([[2, 3, 3, 5]]))  # id 2 spans both inputs; 4 unused
    kw = dict(feature_mask=masks, target=0, baselines=(0.5, torch.zeros(1, 4)))
    for a, b in zip(FeatureAblation(net).attribute((x, y), **kw), ca.FeatureAblation(net).attribute((x, y), **kw)):
        close(a, b)


def test_feature_ablation_batching_does_not_change_results():
    net, x = resnet18(), torch.randn(1, 3, 32, 32)
    mask = block_mask(32, 32, 16)
    one = FeatureAblation(net).attribute(x, target=5, feature_mask=mask, perturbations_per_eval=1)
    auto = FeatureAblation(net).attribute(x, target=5, feature_mask=mask)
    close(auto, one, tol=1e-4)
    close(auto, ca.FeatureAblation(net).attribute(x, target=5, feature_mask=mask, perturbations_per_eval=4), tol=1e-4)


def test_feature_ablation_linear_closed_form():
    torch.manual_seed(4)
    w = torch.randn(10, dtype=torch.float64)
    x, b = torch.randn(3, 10, dtype=torch.float64), torch.randn(1, 10, dtype=torch.float64)
    attr = FeatureAblation(lambda t: t @ w).attribute(x, baselines=b)
    torch.testing.assert_close(attr, w * (x - b))


# -- ShapleyValueSampling -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(n_samples=3, perturbations_per_eval=8),
    dict(n_samples=4, perturbations_per_eval=3, baselines=0.2),
    dict(n_samples=3, target=torch.tensor([4, 1])),
])
def test_shapley_matches_captum_with_the_same_seed(kw):
    net, x = small_cnn(), torch.randn(2, 3, 8, 8)
    kw = {"target": 1, "feature_mask": block_mask(8, 8, 2), **kw}
    torch.manual_seed(11)
    ours = ShapleyValueSampling(net).attribute(x, **kw)
    after_ours = torch.rand(1)
    torch.manual_seed(11)
    theirs = ca.ShapleyValueSampling(net).attribute(x, **kw)
    close(ours, theirs)
    assert torch.equal(after_ours, torch.rand(1))  # the generator advanced exactly as Captum advances it


def test_shapley_missing_ids_and_cross_tensor_match_captum():
    torch.manual_seed(5)
    net, x, y = TwoInputs().eval(), torch.randn(2, 6), torch.randn(2, 4)
    masks = (torch.tensor([[0, 0, 1, 1, 2, 2]]), torch.tensor([[2, 3, 3, 6]]))  # ids 4, 5 absent
    kw = dict(feature_mask=masks, target=2, n_samples=6)
    torch.manual_seed(8)
    ours = ShapleyValueSampling(net).attribute((x, y), **kw)
    torch.manual_seed(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ca.ShapleyValueSampling(net).attribute((x, y), **kw)
    for a, b in zip(ours, theirs):
        close(a, b)


def test_shapley_resnet18_matches_captum():
    net, x = resnet18(), torch.randn(1, 3, 32, 32)
    kw = dict(target=7, feature_mask=block_mask(32, 32, 16), n_samples=2)
    torch.manual_seed(0)
    ours = ShapleyValueSampling(net).attribute(x, **kw)
    torch.manual_seed(0)
    close(ours, ca.ShapleyValueSampling(net).attribute(x, perturbations_per_eval=4, **kw), tol=1e-4)


def test_shapley_exact_for_additive_and_interaction_models():
    # additive model: every permutation gives w_i (x_i - b_i); f = x0 * x1 splits the product equally on average
    torch.manual_seed(6)
    w, x = torch.randn(5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(ShapleyValueSampling(lambda t: t @ w).attribute(x, n_samples=3).double(),
                               (w * x).float().double(), rtol=1e-5, atol=1e-6)
    x = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    attr = ShapleyValueSampling(lambda t: t[:, 0] * t[:, 1]).attribute(x, n_samples=400)
    assert attr.sum().item() == pytest.approx(6.0)
    assert attr[0, 0].item() == pytest.approx(3.0, abs=0.6)  # sampled: 0 or 6 per permutation, mean 3


def test_shapley_bad_arguments():
    net = small_cnn()
    with pytest.raises(ValueError, match="n_samples"):
        ShapleyValueSampling(net).attribute(torch.randn(1, 3, 8, 8), target=0, n_samples=0)
    with pytest.raises(TypeError, match="integer feature ids"):
        ShapleyValueSampling(net).attribute(torch.randn(1, 3, 8, 8), target=0, feature_mask=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="does not broadcast"):
        ShapleyValueSampling(net).attribute(torch.randn(1, 3, 8, 8), target=0, feature_mask=torch.zeros(1, 2, 8, 8, dtype=torch.long))


def test_cli_wrapper_square_window_and_segments():
    net, x = small_cnn(), torch.randn(1, 3, 8, 8)
    wrapped = WithDefaults(Occlusion(net), {"window": "sliding_window_shapes", "stride": "strides"},
                           square_window=True, window=4, stride=2)
    close(wrapped.attribute(x, target=1), Occlusion(net).attribute(x, (3, 4, 4), (1, 2, 2), target=1))
    ablated = WithDefaults(FeatureAblation(net), n_segments=4).attribute(x, target=1)
    assert ablated.shape == x.shape and len(torch.unique(ablated)) <= 4
