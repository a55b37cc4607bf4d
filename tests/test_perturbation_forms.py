"""The perturbation family called as Captum users call it: every output form (aggregated, multi-output, int and
float), futures, sparse and empty inputs, every baseline form, FeaturePermutation, the exception types and
show_progress — each compared with captum 0.9 in the same run."""

import io

import pytest
import torch

import captum.attr as ca
from captum._utils.common import _construct_future_forward
from captum.testing.helpers.basic_models import BasicModelWithSparseInputs

import fastig.attr as fa
from fastig.attr.surrogate import Lasso, LinearRegression
from fastig.core import progress

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

torch.manual_seed(0)
LINEAR = torch.nn.Linear(3, 2)
X = torch.randn(4, 3)


def captum_class(name):
    """Captum's class; Lime/KernelShap with fastig's numpy surrogates (same objectives, solver rounding aside)."""
    if name == "Lime":
        return lambda f: ca.Lime(f, interpretable_model=Lasso(alpha=0.01))
    if name == "KernelShap":
        def kernel_shap(f):
            explainer = ca.KernelShap(f)
            explainer.interpretable_model = LinearRegression()
            return explainer
        return kernel_shap
    return getattr(ca, name)


def both(name, forward, *args, seed=1, **kwargs):
    """(fastig's, Captum's) result of ``name(forward).attribute(*args, **kwargs)`` from the same seed."""
    out = []
    for make in (getattr(fa, name), captum_class(name)):
        torch.manual_seed(seed)
        explainer = make(forward)
        out.append(explainer.attribute(*args, **kwargs))
    return out


def same(ours, theirs, tol=1e-5):
    ours = ours if isinstance(ours, tuple) else (ours,)
    theirs = theirs if isinstance(theirs, tuple) else (theirs,)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        b = b.detach()
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max()) if b.numel() else 1.0))


OUTPUTS = {  # Captum's aggregated output forms: one value (or a fixed-size tensor) for the whole batch
    "0-d": lambda x: LINEAR(x)[:, 0].sum(),
    "[1]": lambda x: LINEAR(x)[:, 0].sum().reshape(1),
    "float": lambda x: float(LINEAR(x)[:, 0].sum()),
    "int": lambda x: int(LINEAR(x)[:, 0].sum() * 10),
    "fixed [2]": lambda x: LINEAR(x).sum(0),
}
SAMPLED = dict(ShapleyValueSampling={"n_samples": 5}, Lime={"n_samples": 40}, KernelShap={"n_samples": 40})


@pytest.mark.parametrize("output", list(OUTPUTS))
@pytest.mark.parametrize("name", ["FeatureAblation", "ShapleyValueSampling", "FeaturePermutation", "Occlusion",
                                  "Lime", "KernelShap"])
def test_aggregated_outputs_match_captum(name, output):
    forward = OUTPUTS[output]
    kwargs = {"sliding_window_shapes": (1,)} if name == "Occlusion" else SAMPLED.get(name, {})
    if name in ("Lime", "KernelShap") and output == "fixed [2]":  # Captum: one scalar per example or per batch
        with pytest.raises(AssertionError):
            captum_class(name)(forward).attribute(X, **kwargs)
        with pytest.raises(AssertionError, match="one scalar per example or one for the whole batch"):
            getattr(fa, name)(forward).attribute(X, **kwargs)
        return
    ours, theirs = both(name, forward, X, **kwargs)
    assert ours.shape[0] == (2 if output == "fixed [2]" else 1)
    same(ours, theirs, tol=1e-4 if name == "KernelShap" else 1e-5)
    if name in ("FeatureAblation", "ShapleyValueSampling", "FeaturePermutation"):
        # more than one copy per model call is impossible: Captum's AssertionError, fastig's clear message
        # (Captum's ShapleyValueSampling misses a fixed-size output and fails inside instead)
        with pytest.raises(RuntimeError if (name, output) == ("ShapleyValueSampling", "fixed [2]") else AssertionError):
            getattr(ca, name)(forward).attribute(X, perturbations_per_eval=2)
        with pytest.raises(AssertionError, match="perturbations_per_eval=2"):
            getattr(fa, name)(forward).attribute(X, perturbations_per_eval=2)


@pytest.mark.parametrize("name", ["FeatureAblation", "ShapleyValueSampling", "Lime", "KernelShap"])
@pytest.mark.parametrize("output", ["0-d", "float"])
def test_aggregated_output_of_a_batch_of_one(name, output):
    same(*both(name, OUTPUTS[output], X[:1], **SAMPLED.get(name, {})), tol=1e-4)


def test_automatic_batching_falls_back_to_one_copy_when_the_output_does_not_grow():
    # [N] outputs that are a fixed-size aggregate (N = 4 here) look per-example at first: the first batch of
    # copies shows they are not, and is evaluated again one copy per call
    calls = []

    def aggregate(x):
        calls.append(x.shape[0])
        return LINEAR(x).sum(0).repeat(2)  # shape [4] whatever the batch
    ours = fa.FeatureAblation(aggregate).attribute(X)
    same(ours, ca.FeatureAblation(aggregate).attribute(X))
    assert calls[1] > 4 and set(calls[2:]) == {4}


@pytest.mark.parametrize("ppe", [1, 3, None])
@pytest.mark.parametrize("name", ["FeatureAblation", "ShapleyValueSampling", "FeaturePermutation"])
def test_multi_output_without_target(name, ppe):
    torch.manual_seed(1)
    ours = getattr(fa, name)(LINEAR).attribute(X, perturbations_per_eval=ppe, **SAMPLED.get(name, {}))
    torch.manual_seed(1)
    theirs = getattr(ca, name)(LINEAR).attribute(X, perturbations_per_eval=ppe or 1, **SAMPLED.get(name, {}))
    assert ours.shape == ((4, 2, 3) if name == "ShapleyValueSampling" else (8, 3))  # one per output element
    same(ours, theirs)


def test_multi_output_occlusion_and_int_outputs():
    same(fa.Occlusion(LINEAR).attribute(X, sliding_window_shapes=(2,)),
         ca.Occlusion(LINEAR).attribute(X, sliding_window_shapes=(2,)))
    integer = lambda x: (LINEAR(x)[:, 0] * 10).long()  # noqa: E731
    for name in ("FeatureAblation", "ShapleyValueSampling", "FeaturePermutation"):
        ours, theirs = both(name, integer, X, **SAMPLED.get(name, {}))
        assert ours.dtype == (torch.float32 if name == "ShapleyValueSampling" else torch.int64)
        same(ours, theirs)
    same(fa.Occlusion(integer).attribute(X, sliding_window_shapes=(1,)),
         ca.Occlusion(integer).attribute(X, sliding_window_shapes=(1,)))


def sum_forward(*inputs):
    return torch.cat([x.flatten(1) for x in inputs], dim=1).sum(1)


def test_float_baselines_for_integer_inputs_are_not_rounded():
    # Captum's own test: baselines (0.2, 3.1, 0.4) for int inputs give fractional attributions
    inputs = (torch.tensor([[0, 1], [3, 4]]), torch.tensor([[[0.1, 0.2], [0.3, 0.2]], [[0.4, 0.5], [0.3, 0.2]]]),
              torch.tensor([[0], [1]]))
    expected = (torch.tensor([[-0.2, 0.8], [2.8, 3.8]]), None, torch.tensor([[-0.4], [0.6]]))
    for name in ("FeatureAblation", "Lime", "KernelShap"):
        ours, theirs = both(name, sum_forward, inputs, baselines=(0.2, 3.1, 0.4))
        same(ours, theirs, tol=2e-2 if name == "Lime" else 1e-4)  # Lime: the Lasso shrinks a little
    for name in ("FeatureAblation", "ShapleyValueSampling"):
        ours = getattr(fa, name)(sum_forward).attribute(inputs, baselines=(0.2, 3.1, 0.4))
        torch.testing.assert_close(ours[0], expected[0])
        torch.testing.assert_close(ours[2], expected[2])
    tensor_baseline = torch.tensor([[0.2, 3.1, 0.4]])
    x = torch.tensor([[1, 4, 2], [3, 0, 5]])
    weighted = lambda t: (t.float() * torch.tensor([1.0, 2.0, 3.0])).sum(1)  # noqa: E731
    for name in ("FeatureAblation", "ShapleyValueSampling"):
        same(*both(name, weighted, x, baselines=tensor_baseline))
    same(fa.Occlusion(weighted).attribute(x, sliding_window_shapes=(1,), baselines=tensor_baseline),
         ca.Occlusion(weighted).attribute(x, sliding_window_shapes=(1,), baselines=tensor_baseline))


def test_baselines_that_broadcast_and_bool_baselines():
    first = lambda t: LINEAR(t)[:, 0]  # noqa: E731
    per_example, no_batch = torch.arange(4.0).reshape(4, 1), torch.tensor([1.0, 2.0, 3.0])
    for name in ("FeatureAblation", "Lime"):
        same(*both(name, first, X, baselines=per_example), tol=1e-4)
        same(*both(name, first, X[:1], baselines=no_batch), tol=1e-4)
    for baselines, x in ((per_example, X), (no_batch, X[:1])):
        same(fa.Occlusion(first).attribute(x, sliding_window_shapes=(1,), baselines=baselines),
             ca.Occlusion(first).attribute(x, sliding_window_shapes=(1,), baselines=baselines))
    flags = torch.tensor([[True, False, True], [False, False, True]])
    weighted = lambda t: (t.float() * torch.tensor([1.0, 2.0, 3.0])).sum(1)  # noqa: E731
    for name in ("FeatureAblation", "ShapleyValueSampling", "KernelShap"):
        for baselines in (True, None):
            same(*both(name, weighted, flags, baselines=baselines), tol=1e-4)
    same(fa.Occlusion(weighted).attribute(flags, sliding_window_shapes=(1,), baselines=True),
         ca.Occlusion(weighted).attribute(flags, sliding_window_shapes=(1,), baselines=True))


@pytest.mark.parametrize("name", ["FeatureAblation", "ShapleyValueSampling", "FeaturePermutation", "Lime",
                                  "KernelShap"])
def test_sparse_and_empty_inputs(name):
    model = BasicModelWithSparseInputs()
    dense = torch.tensor([[1.0, -2.0, 3.0], [2.0, -1.0, 3.0]])
    index_list = torch.tensor([1, 7, 2, 4, 5, 3, 6])  # first dimension is not the batch
    ours, theirs = both(name, model, (dense, index_list), **SAMPLED.get(name, {}))
    same(ours, theirs, tol=1e-4)
    if name == "FeatureAblation":  # Captum's expected values
        torch.testing.assert_close(ours[0], torch.tensor([[9.0, -3.0, 12.0]]))
        torch.testing.assert_close(ours[1], torch.tensor([2.0]))
        ours = fa.FeatureAblation(model).attribute((dense, torch.tensor([])))
        same(ours, ca.FeatureAblation(model).attribute((dense, torch.tensor([]))))
    two = lambda a, b: LINEAR(a)[:, 0] + b.sum(1)  # noqa: E731
    same(*both(name, two, (X[:2], torch.zeros(2, 0)), **SAMPLED.get(name, {})), tol=1e-4)


def test_empty_input_with_occlusion():
    two = lambda a, b: LINEAR(a)[:, 0] + b.sum(1)  # noqa: E731
    kwargs = dict(sliding_window_shapes=((1,), (0,)))
    same(fa.Occlusion(two).attribute((X[:1], torch.zeros(1, 0)), **kwargs),
         ca.Occlusion(two).attribute((X[:1], torch.zeros(1, 0)), **kwargs))


@pytest.mark.parametrize("name", ["FeatureAblation", "ShapleyValueSampling", "FeaturePermutation"])
def test_futures(name):
    future_forward = _construct_future_forward(lambda t: LINEAR(t)[:, 1])
    results = []
    for make in (getattr(fa, name), getattr(ca, name)):
        torch.manual_seed(2)
        future = make(future_forward).attribute_future(X, **SAMPLED.get(name, {}))
        assert isinstance(future, torch._C.Future)
        results.append(future.wait())
    same(*results)
    for make in (getattr(fa, name), getattr(ca, name)):  # attribute() on a Future model, and the reverse
        with pytest.raises(AssertionError):
            make(future_forward).attribute(X)
        with pytest.raises(AssertionError):
            make(LINEAR).attribute_future(X).wait()
    with pytest.raises(AssertionError, match="attribute_future"):
        getattr(fa, name)(future_forward).attribute(X)


@pytest.mark.parametrize("name", ["Occlusion", "Lime", "KernelShap", "IntegratedGradients", "Saliency",
                                  "InputXGradient", "GradientShap", "DeepLift", "DeepLiftShap", "LRP",
                                  "GuidedBackprop", "Deconvolution", "NoiseTunnel"])
def test_attribute_future_is_not_implemented_where_captum_lacks_it(name):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    for module in (fa, ca):
        argument = module.Saliency(model) if name == "NoiseTunnel" else model
        with pytest.raises(NotImplementedError):
            getattr(module, name)(argument).attribute_future()


def test_multiplies_by_inputs_as_captum_reports_it():
    for name in ("FeatureAblation", "Occlusion", "ShapleyValueSampling", "FeaturePermutation", "Lime", "KernelShap"):
        assert getattr(fa, name)(LINEAR).multiplies_by_inputs == getattr(ca, name)(LINEAR).multiplies_by_inputs


# -- FeaturePermutation -------------------------------------------------------------------------------------------

def small_cnn():
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()


@pytest.mark.parametrize("ppe", [None, 1, 3])
def test_feature_permutation_matches_captum_with_the_same_seed(ppe):
    net, x = small_cnn(), torch.randn(5, 3, 6, 6)
    mask = (torch.arange(36).reshape(1, 1, 6, 6) // 9)
    for forward, kw in ((net, dict(target=2)), (lambda t: net(t)[:, 2].sum(), {})):  # per example, aggregated
        if ppe == 3 and not kw:
            continue  # aggregated outputs allow one copy per call
        torch.manual_seed(6)
        ours = fa.FeaturePermutation(forward).attribute(x, feature_mask=mask, perturbations_per_eval=ppe, **kw)
        after = torch.rand(1)
        torch.manual_seed(6)
        theirs = ca.FeaturePermutation(forward).attribute(x, feature_mask=mask, perturbations_per_eval=ppe or 1, **kw)
        same(ours, theirs)
        assert torch.equal(after, torch.rand(1))  # the generator advanced exactly as Captum's did


def test_feature_permutation_tuple_inputs_custom_perm_func_and_a_batch_of_one():
    torch.manual_seed(7)
    net = torch.nn.Bilinear(3, 2, 4)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    masks = (torch.tensor([[0, 1, 1]]), torch.tensor([[2, 1]]))  # feature 1 spans both inputs

    def reverse(t, mask):
        return torch.where(mask, t.flip(0), t)
    ours = fa.FeaturePermutation(net, reverse).attribute((x, y), target=1, feature_mask=masks)
    theirs = ca.FeaturePermutation(net, reverse).attribute((x, y), target=1, feature_mask=masks)
    same(ours, theirs)
    for ppe in (None, 2):  # Captum's draw order across inputs, one feature per call and batched
        torch.manual_seed(8)
        ours = fa.FeaturePermutation(net).attribute((x, y), target=1, feature_mask=masks, perturbations_per_eval=ppe)
        torch.manual_seed(8)
        theirs = ca.FeaturePermutation(net).attribute((x, y), target=1, feature_mask=masks,
                                                      perturbations_per_eval=ppe or 1)
        same(ours, theirs)
    with pytest.warns(UserWarning, match="fewer than 2 examples"):
        zeros = fa.FeaturePermutation(net).attribute((x[:1], y[:1]), target=0)
    same(zeros, ca.FeaturePermutation(net).attribute((x[:1], y[:1]), target=0))


# -- errors and progress ------------------------------------------------------------------------------------------

def test_captum_assertion_errors_are_caught_as_captum_raises_them():
    net, x = small_cnn(), torch.randn(1, 3, 6, 6)
    cases = [
        lambda m: m.Occlusion(net).attribute(x, sliding_window_shapes=(3, 7, 7), target=0),  # exceeds the input
        lambda m: m.Occlusion(net).attribute(x, sliding_window_shapes=(3, 2, 2), strides=(1, 3, 3), target=0),
        lambda m: m.Occlusion(net).attribute(x, sliding_window_shapes=(2, 2), target=0),  # wrong length
        lambda m: m.Occlusion(net).attribute(x, sliding_window_shapes=(3, 2, 2), strides=((1, 1), 2), target=0),
        lambda m: m.FeatureAblation(net).attribute(x, perturbations_per_eval=0, target=0),
        lambda m: m.FeatureAblation(net).attribute(torch.randn(2, 3, 6, 6), target=[1, 2, 3]),  # target length
        lambda m: m.FeatureAblation(net).attribute(x, target="cat"),  # invalid target type
        lambda m: m.IntegratedGradients(net).attribute(x),  # missing target on a multi-output model
        lambda m: m.Saliency(net).attribute(x),
        lambda m: m.GradientShap(net).attribute(x, 0.0, target=0),  # baselines must be a distribution
    ]
    for case in cases:
        with pytest.raises(AssertionError):
            case(ca)
        with pytest.raises(AssertionError) as caught:
            case(fa)
        assert isinstance(caught.value, (ValueError, TypeError)) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name,kwargs,work", [
    ("FeatureAblation", {}, "features"),
    ("FeaturePermutation", {}, "features"),
    ("Occlusion", {"sliding_window_shapes": (3, 3, 3), "strides": 3}, "windows"),
    ("ShapleyValueSampling", {"n_samples": 2}, "coalitions"),
    ("Lime", {"n_samples": 6}, "examples"),
    ("KernelShap", {"n_samples": 6}, "examples"),
])
def test_show_progress_names_the_method_and_the_work(name, kwargs, work, capsys):
    net = small_cnn()
    getattr(fa, name)(net).attribute(torch.randn(2, 3, 6, 6), target=1, show_progress=True, **kwargs)
    err = capsys.readouterr().err
    assert name in err and f" {work} (100%)" in err


def test_show_progress_nests_inside_an_open_display():
    stream = io.StringIO()
    with progress.task("run", 1, "images", show=True, stream=stream, interval=0.0):
        fa.FeatureAblation(small_cnn()).attribute(torch.randn(1, 3, 6, 6), target=0, perturbations_per_eval=9)
    assert "FeatureAblation" in stream.getvalue() and "features" in stream.getvalue()
