"""Several targets per pass: K classes per example (a list of lists, an [N, K] tensor, or top_k=K) give [N, K, ...]
attributions equal to K single-target calls (<= 1e-6 relative), from one forward pass per batch; Captum's list of
tuples keeps its meaning; bad targets get clear errors."""

import pytest
import torch

from fastig.attr import (
    BlurIntegratedGradients,
    GuidedIntegratedGradients,
    InputXGradient,
    IntegratedGradients,
    NoiseTunnel,
    Saliency,
    SecondOrderGradients,
)
from fastig.core.engine import count_calls, target_vjps
from fastig.core.targets import Target

TARGETS = [[1, 4], [0, 0], [3, 2]]  # K = 2 per example, with a repeated class


class Net(torch.nn.Module):
    """Smooth (softplus) conv net on [N, 3, 8, 8] images, 5 classes; 2ndG's layer is ``head``."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Softplus())
        self.tail = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                                        torch.nn.Linear(4 * 8 * 8, 5))

    def forward(self, x):
        return self.tail(self.head(x))


def assert_rel(ours, ref, tol=1e-6):
    scale = max(ref.abs().max().item(), 1e-12)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert (ours - ref).abs().max().item() <= tol * scale, (ours - ref).abs().max().item() / scale


def single_calls(run, targets):
    """Stack K single-target runs: ``run(per-example targets)`` -> [N, ...] (or a tuple with the delta)."""
    k = len(targets[0])
    results = [run([t[j] for t in targets]) for j in range(k)]
    if isinstance(results[0], tuple):
        return tuple(torch.stack(parts, dim=1) for parts in zip(*results))
    return torch.stack(results, dim=1)


CASES = {
    "ig": lambda m: (IntegratedGradients(m), dict(n_steps=6, internal_batch_size=7, return_convergence_delta=True)),
    "ig_trapezoid": lambda m: (IntegratedGradients(m), dict(n_steps=5, method="riemann_trapezoid",
                                                            return_convergence_delta=True)),
    "idgi": lambda m: (IntegratedGradients(m), dict(n_steps=6, idgi=True, internal_batch_size=5,
                                                    return_convergence_delta=True)),
    "ig_probability": lambda m: (IntegratedGradients(m), dict(n_steps=4, output="probability")),
    "guided_ig": lambda m: (GuidedIntegratedGradients(m), dict(n_steps=5, return_convergence_delta=True)),
    "guided_ig_idgi": lambda m: (GuidedIntegratedGradients(m), dict(n_steps=5, idgi=True)),
    "blur_ig": lambda m: (BlurIntegratedGradients(m), dict(n_steps=5, max_sigma=2.0, return_convergence_delta=True)),
    "blur_ig_idgi": lambda m: (BlurIntegratedGradients(m), dict(n_steps=5, max_sigma=2.0, idgi=True)),
    "saliency": lambda m: (Saliency(m), dict(internal_batch_size=2)),
    "input_x_gradient": lambda m: (InputXGradient(m), {}),
    "second_order": lambda m: (SecondOrderGradients(m, "head"), dict(internal_batch_size=50)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_k_targets_equal_k_single_target_calls(case):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(3, 3, 8, 8)
    method, options = CASES[case](model)
    with count_calls() as together:
        ours = method.attribute(x, target=TARGETS, **options)
    with count_calls() as alone:
        reference = single_calls(lambda t: method.attribute(x, target=t, **options), TARGETS)
    for o, r in zip(ours if isinstance(ours, tuple) else (ours,), reference if isinstance(reference, tuple)
                    else (reference,)):
        assert_rel(o, r)
    if not case.startswith("guided_ig"):  # one forward per batch serves every target (Guided IG: a path each)
        assert together.calls * 2 == alone.calls
    as_tensor = method.attribute(x, target=torch.tensor(TARGETS), **options)
    for o, t in zip(ours if isinstance(ours, tuple) else (ours,), as_tensor if isinstance(as_tensor, tuple)
                    else (as_tensor,)):
        torch.testing.assert_close(o, t, rtol=0, atol=0)


def test_smoothgrad_with_k_targets_equals_k_calls_with_the_same_noise():
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    targets = [[1, 3], [2, 0]]
    nt = NoiseTunnel(Saliency(model))
    torch.manual_seed(5)
    ours = nt.attribute(x, nt_type="smoothgrad_sq", nt_samples=3, stdevs=0.2, target=targets)
    reference = []
    for j in range(2):
        torch.manual_seed(5)
        reference.append(nt.attribute(x, nt_type="smoothgrad_sq", nt_samples=3, stdevs=0.2, target=[t[j] for t in targets]))
    assert_rel(ours, torch.stack(reference, dim=1))


def test_top_k_is_the_k_largest_outputs_at_the_inputs():
    torch.manual_seed(1)
    model = Net().eval()
    x = torch.randn(3, 3, 8, 8)
    top = model(x).topk(3, dim=1).indices
    ig = IntegratedGradients(model)
    torch.testing.assert_close(ig.attribute(x, top_k=3, n_steps=4), ig.attribute(x, target=top, n_steps=4),
                               rtol=0, atol=0)
    torch.testing.assert_close(Saliency(model).attribute(x, top_k=3), Saliency(model).attribute(x, target=top),
                               rtol=0, atol=0)
    # NoiseTunnel: the classes come from the clean inputs, so every noisy copy explains the same classes
    nt = NoiseTunnel(Saliency(model))
    torch.manual_seed(2)
    a = nt.attribute(x, nt_samples=2, stdevs=0.5, top_k=3)
    torch.manual_seed(2)
    b = nt.attribute(x, nt_samples=2, stdevs=0.5, target=top)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    maps = SecondOrderGradients(model, "head").attribute(x, top_k=2, upsample_to_input=True)
    assert maps.shape == (3, 2, 1, 8, 8)


def test_captum_list_of_tuples_still_means_one_index_per_example():
    target = Target([(1,), (2,)], 2)
    assert target.k is None and target.tuples == [(1,), (2,)]
    assert Target([[1], [2]], 2).k == 1


@pytest.mark.parametrize("target,error", [
    ([[1, 2], [3]], "same number"),
    ([[1, 2], [3, True]], "same number"),
    ([[1, 2], (3, 4)], "only ints, only tuples or only lists"),
    (torch.zeros(3, 2, dtype=torch.long), "one integer per example"),
])
def test_bad_multi_targets_are_clear_errors(target, error):
    with pytest.raises((ValueError, TypeError), match=error):
        IntegratedGradients(Net()).attribute(torch.randn(2, 3, 8, 8), target=target, n_steps=2)


def test_top_k_errors():
    ig = IntegratedGradients(Net())
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="either target or top_k"):
        ig.attribute(x, target=1, top_k=2)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        ig.attribute(x, top_k=0)
    with pytest.raises(ValueError, match="at least 6 classes"):
        ig.attribute(x, top_k=6)


def test_target_vjps_of_a_layer_from_one_forward():
    """The reusable core: K class maps at a layer from one forward pass (what deliberative explanations need)."""
    torch.manual_seed(3)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    acts = model.head(x).detach().requires_grad_()
    scores = model.tail(acts)[:, [0, 2, 4]]  # [B, K]
    (grads,) = target_vjps(scores, (acts,))
    assert grads.shape == (2, 3, 4, 8, 8)
    for j, c in enumerate([0, 2, 4]):
        a = acts.detach().requires_grad_()
        (g,) = torch.autograd.grad(model.tail(a)[:, c].sum(), a)
        torch.testing.assert_close(grads[:, j], g, rtol=0, atol=0)
