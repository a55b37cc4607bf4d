"""IntegratedGradients: Captum's numbers over a grid of arguments, analytic cases, batching, bad input."""

import itertools

import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG

from fastig.attr import IntegratedGradients
from fastig.core import quadrature

from _shared import SmallCNN, TwoInputNet


def close(ours, theirs, tol=1e-5):
    """Max abs difference relative to the attribution's scale (the issue's criterion)."""
    scale = max(theirs.abs().max().item(), 1e-12)
    return (ours - theirs).abs().max().item() / scale <= tol


def assert_same(ours, theirs, tol=1e-5):
    if isinstance(theirs, tuple):
        assert isinstance(ours, tuple) and len(ours) == len(theirs)
        for o, t in zip(ours, theirs):
            assert_same(o, t, tol)
        return
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert close(ours, theirs, tol), (ours - theirs).abs().max()


def assert_same_delta(ours, theirs, attributions):
    """Deltas agree to 1e-5 of the attributions' scale (summed over all of an example's features)."""
    attributions = attributions if isinstance(attributions, tuple) else (attributions,)
    scale = max(a.reshape(a.shape[0], -1).abs().sum(1).max().item() for a in attributions)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5 * max(scale, 1e-6), (ours, theirs)


BASELINES = {
    "none": lambda x: None,
    "scalar": lambda x: 0.25,
    "tensor": lambda x: torch.randn_like(x) * 0.1,
    "broadcast": lambda x: torch.rand(1, *x.shape[1:]),
}
TARGETS = {
    "int": lambda n: 2,
    "list": lambda n: [i % 5 for i in range(n)],
    "tensor": lambda n: torch.arange(n) % 5,
    "scalar_tensor": lambda n: torch.tensor(1),
}


@pytest.mark.parametrize(
    "rule,baseline,target,batch,multiply",
    [
        (m, b, t, ibs, mult)
        for (m, b, t), (ibs, mult) in zip(
            itertools.product(quadrature.RULES, BASELINES, TARGETS),
            itertools.cycle([(None, True), (7, True), (3, False), (64, True), (1, True)]),
        )
    ],
)
def test_matches_captum_grid(rule, baseline, target, batch, multiply):
    model = SmallCNN().eval()
    x = torch.randn(4, 3, 8, 8)
    b = BASELINES[baseline](x)
    t = TARGETS[target](4)
    kwargs = dict(baselines=b, target=t, n_steps=13, method=rule, return_convergence_delta=True)
    captum_batch = None if batch is None else max(batch, 4)  # captum cannot go below the number of examples
    theirs, their_delta = CaptumIG(model, multiply_by_inputs=multiply).attribute(
        x, internal_batch_size=captum_batch, **kwargs
    )
    ours, our_delta = IntegratedGradients(model, multiply_by_inputs=multiply).attribute(
        x, internal_batch_size=batch, **kwargs
    )
    assert_same(ours, theirs)
    assert_same_delta(our_delta, their_delta, theirs)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid", "riemann_right"])
@pytest.mark.parametrize("batch", [None, 5])
def test_tuple_inputs_additional_args_and_tuple_baselines(rule, batch):
    model = TwoInputNet()
    x1, x2 = torch.randn(3, 3, 2, 2), torch.randn(3, 5)
    baselines = (torch.zeros(1, 3, 2, 2), 0.5)
    args = (torch.tensor([[1.0], [2.0], [3.0]]),)  # a per-example scale, repeated per step
    kw = dict(baselines=baselines, target=1, additional_forward_args=args, n_steps=20, method=rule)
    theirs, d1 = CaptumIG(model).attribute((x1, x2), internal_batch_size=None if batch is None else 6, **kw,
                                           return_convergence_delta=True)
    ours, d2 = IntegratedGradients(model).attribute((x1, x2), internal_batch_size=batch, **kw,
                                                    return_convergence_delta=True)
    assert_same(ours, theirs)
    assert_same_delta(d2, d1, theirs)


def test_non_tensor_additional_arg_and_tuple_target():
    def model(x, power):
        return (x**power).reshape(x.shape[0], 2, 3)

    x = torch.rand(2, 6) + 0.5
    theirs = CaptumIG(model).attribute(x, target=(1, 2), additional_forward_args=(3,), n_steps=8)
    ours = IntegratedGradients(model).attribute(x, target=(1, 2), additional_forward_args=(3,), n_steps=8)
    assert_same(ours, theirs)


def test_list_of_tuple_targets():
    def model(x):
        return x.reshape(x.shape[0], 2, 3) ** 2

    x = torch.rand(2, 6)
    target = [(0, 1), (1, 2)]
    assert_same(IntegratedGradients(model).attribute(x, target=target, n_steps=6),
                CaptumIG(model).attribute(x, target=target, n_steps=6))


def test_float64_inputs_stay_float64_and_match():
    model = SmallCNN().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ours = IntegratedGradients(model).attribute(x, target=0, n_steps=10)
    theirs = CaptumIG(model).attribute(x, target=0, n_steps=10)
    assert ours.dtype == torch.float64
    assert_same(ours, theirs, 1e-7)


def test_linear_model_attribution_is_exact():
    w = torch.randn(10, dtype=torch.float64)
    model = lambda x: x @ w  # noqa: E731
    x, b = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    for rule in quadrature.RULES:
        attr, delta = IntegratedGradients(model).attribute(x, b, n_steps=4, method=rule,
                                                           return_convergence_delta=True)
        weight_sum = quadrature.named_rule(rule, 4).weights.double().sum()  # 1 - 1/n for the trapezoid rule
        torch.testing.assert_close(attr, (x - b) * w * weight_sum, rtol=1e-6, atol=1e-9)
        if rule != "riemann_trapezoid":
            assert delta.abs().max() < 1e-6


def test_completeness_delta_shrinks_with_steps():
    smooth = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                 torch.nn.Linear(4 * 6 * 6, 3)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ig = IntegratedGradients(smooth)
    for rule in ("gausslegendre", "riemann_middle"):
        deltas = [ig.attribute(x, target=1, n_steps=n, method=rule, return_convergence_delta=True)[1].abs().max()
                  for n in (2, 8, 64)]
        assert deltas[0] > deltas[1] > deltas[2] and deltas[2] < 1e-4, (rule, deltas)


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 17, 1000])
def test_batched_equals_unbatched(batch):
    model = SmallCNN()
    x = torch.randn(5, 3, 8, 8)
    whole = IntegratedGradients(model).attribute(x, target=[0, 1, 2, 3, 4], n_steps=9, internal_batch_size=1000)
    parts = IntegratedGradients(model).attribute(x, target=[0, 1, 2, 3, 4], n_steps=9, internal_batch_size=batch)
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    one_by_one = torch.cat([
        IntegratedGradients(model).attribute(x[i:i + 1], target=i, n_steps=9) for i in range(5)
    ])
    torch.testing.assert_close(one_by_one, whole, rtol=1e-5, atol=1e-6)


def test_never_holds_all_path_points_at_once():
    seen = []

    def model(x):
        seen.append(x.shape[0])
        return x.flatten(1).sum(1, keepdim=True)

    IntegratedGradients(model).attribute(torch.randn(2, 3, 4, 4), target=0, n_steps=50, internal_batch_size=8)
    assert max(seen) <= 8 and sum(seen) == 100


def test_convergence_delta_reuses_path_endpoints():
    calls = []

    def model(x):
        calls.append(x.shape[0])
        return (x**2).flatten(1).sum(1, keepdim=True)

    x = torch.randn(3, 4)
    IntegratedGradients(model).attribute(x, target=0, n_steps=10, method="riemann_trapezoid",
                                         return_convergence_delta=True, internal_batch_size=30)
    assert sum(calls) == 30  # no extra passes: alpha=0 and alpha=1 are on the path
    calls.clear()
    IntegratedGradients(model).attribute(x, target=0, n_steps=10, return_convergence_delta=True,
                                         internal_batch_size=30)
    assert sum(calls) == 36  # gausslegendre has neither endpoint: one pass each over the 3 examples


def test_compute_convergence_delta_matches_captum():
    model = SmallCNN()
    x = torch.randn(2, 3, 8, 8)
    attr = torch.randn(2, 3, 8, 8)
    ours = IntegratedGradients(model).compute_convergence_delta(attr, 0.1, x, target=3)
    theirs = CaptumIG(model).compute_convergence_delta(attr, 0.1, x, target=3)
    torch.testing.assert_close(ours, theirs)


def test_runs_under_no_grad_and_leaves_model_grads_alone():
    model = SmallCNN()
    with torch.no_grad():
        attr = IntegratedGradients(model).attribute(torch.randn(1, 3, 8, 8), target=0, n_steps=4)
    assert attr.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(inputs=torch.full((1, 3, 8, 8), float("nan"))), "NaN"),
        (dict(baselines=torch.zeros(2, 3, 4, 4)), "baselines"),
        (dict(baselines=(0, 0)), "2 baselines for 1 inputs"),
        (dict(n_steps=0), "n_steps"),
        (dict(method="simpson"), "simpson"),
        (dict(target=7), "out of range"),
        (dict(target=[0, 1, 2]), "3 entries"),
        (dict(target=None), "give a target"),
        (dict(internal_batch_size=0), "internal_batch_size"),
        (dict(inputs=[1, 2]), "torch.Tensor"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, error):
    model = SmallCNN()
    args = dict(inputs=torch.randn(1, 3, 8, 8), target=0)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=error):
        IntegratedGradients(model).attribute(**args)
