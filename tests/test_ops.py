"""fastig's compiled ops against their pure-torch references (and PAIR saliency's Guided IG loop).

Masking and path points must match exactly; sums to fp32 rounding (and to an fp64 sum of the same terms); the
Guided IG step to rounding of its L1 sums. CUDA tests run the CUDA kernels against the CPU references and skip
without a GPU.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from fastig import _ops, ops

KERNELS = _ops.extension_available() and hasattr(torch.ops.fastig, "guided_step")
needs_kernels = pytest.mark.skipif(not KERNELS, reason="fastig._C is not built (FASTIG_BUILD_EXT=0)")
needs_cuda = pytest.mark.skipif(not (KERNELS and torch.cuda.is_available()), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def kernel(name):
    return getattr(torch.ops.fastig, name)


def layouts(t: torch.Tensor):
    """The tensor as contiguous, channels_last (4-D) and non-contiguous (a strided view) versions."""
    yield "contiguous", t.contiguous()
    if t.dim() == 4:
        yield "channels_last", t.contiguous(memory_format=torch.channels_last)
    wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
    wide[..., ::2] = t
    yield "strided", wide[..., ::2]


def test_extension_is_built_unless_disabled():
    if os.environ.get("FASTIG_BUILD_EXT") == "0":
        pytest.skip("the build was disabled on purpose")
    assert KERNELS, f"fastig._C failed to load: {_ops._EXTENSION_ERROR}"


def test_backends_names_every_op():
    b = ops.backends()
    assert set(b) == {"path_points", "accumulate", "squared_norms", "accumulate_idgi", "perturb", "guided_step"}
    assert set(b.values()) <= {"cpu-kernel", "cuda-kernel", "reference"}
    if KERNELS and not torch.cuda.is_available():
        assert set(b.values()) == {"cpu-kernel"}


# --- path_points ------------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3, 5, 7), (3, 4, 6), (1, 3, 8, 8)])
def test_path_points_kernel_equals_reference_exactly(dtype, shape):
    gen = torch.Generator().manual_seed(hash((str(dtype), shape)) % 2**31)
    x = torch.randn(shape, generator=gen).to(dtype)
    alphas = torch.rand(5, generator=gen, dtype=torch.float64)
    for baseline_batch in (1, shape[0]):
        b = torch.randn((baseline_batch,) + shape[1:], generator=gen).to(dtype)
        expected = _ops.path_points_reference(x, b, alphas)
        for name, xv in layouts(x):
            got = ops.path_points(xv, b, alphas)
            assert got.shape == (5 * shape[0],) + shape[1:]
            assert torch.equal(got, expected), name
            if name == "channels_last" and shape[1] > 1:
                assert got.is_contiguous(memory_format=torch.channels_last)


@needs_kernels
def test_path_points_is_step_major_and_handles_empty():
    x, b = torch.randn(2, 3), torch.zeros(1, 3)
    out = ops.path_points(x, b, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.equal(out[:2], torch.zeros(2, 3)) and torch.equal(out[2:], x)
    assert ops.path_points(x, b, torch.empty(0, dtype=torch.float64)).shape == (0, 3)
    assert ops.path_points(torch.empty(0, 3), b, torch.rand(4, dtype=torch.float64)).shape == (0, 3)


@pytest.mark.parametrize("bad, error", [
    (dict(baseline=torch.zeros(2, 4)), ValueError),
    (dict(baseline=torch.zeros(1, 3, dtype=torch.float64)), TypeError),
    (dict(input=torch.zeros(2, 3, dtype=torch.int64), baseline=torch.zeros(1, 3, dtype=torch.int64)), TypeError),
    (dict(alphas=torch.zeros(2, 2, dtype=torch.float64)), ValueError),
])
def test_path_points_bad_arguments(bad, error):
    args = dict(input=torch.zeros(2, 3), baseline=torch.zeros(1, 3), alphas=torch.zeros(4, dtype=torch.float64)) | bad
    with pytest.raises(error):
        ops.path_points(**args)


@needs_kernels
def test_direct_kernel_calls_raise_clear_errors():
    with pytest.raises(ValueError, match="baseline must be expanded"):
        kernel("path_points")(torch.zeros(2, 3), torch.zeros(1, 3), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="alphas must be float64"):
        kernel("path_points")(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="weights must have shape"):
        kernel("accumulate")(torch.zeros(3, 2, 4), torch.zeros(2))
    with pytest.raises(TypeError, match="rank must be int64"):
        kernel("perturb")(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1).long())
    with pytest.raises(ValueError, match="fraction"):
        z = torch.zeros(1, 4)
        kernel("guided_step")(z, z, z, z, 1.5, 0.0, 1.0, torch.zeros(1, dtype=torch.float64))


# --- accumulate, squared_norms, accumulate_idgi ------------------------------------------------------------------


def grads_in_layouts(k, shape, dtype, gen):
    g = torch.randn((k,) + shape, generator=gen).to(dtype)
    yield "contiguous", g
    if len(shape) == 4:  # grads of a channels_last batch, reshaped [k, n, ...] as the engine does
        flat = g.reshape((k * shape[0],) + shape[1:]).contiguous(memory_format=torch.channels_last)
        yield "channels_last", flat.reshape(g.shape)
    yield "strided", g.transpose(-1, -2).contiguous().transpose(-1, -2)


def fp32_tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype != torch.float64 else dict(rtol=1e-12, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3, 5, 7), (3, 2000), (2, 3, 31, 33)])
def test_accumulate_kernel_matches_reference(dtype, shape):
    gen = torch.Generator().manual_seed(7)
    w = torch.rand(6, generator=gen, dtype=torch.float64)
    for name, g in grads_in_layouts(6, shape, dtype, gen):
        got = ops.accumulate(g, w)
        ref = ops.accumulate_reference(g, w)
        assert got.dtype == _ops.accumulation_dtype(dtype) and got.shape == shape
        torch.testing.assert_close(got, ref, **fp32_tolerance(dtype), msg=name)
        # An fp64 sum of exactly the same fp32 terms bounds the rounding of the accumulation.
        terms = g.to(got.dtype) * w.to(got.dtype).reshape((-1,) + (1,) * len(shape))
        exact = terms.double().sum(0)
        bound = 6 * torch.finfo(got.dtype).eps * terms.double().abs().sum(0) + 1e-30
        assert ((got.double() - exact).abs() <= bound).all(), name


@needs_kernels
def test_accumulate_is_bitwise_deterministic_across_runs_and_threads():
    gen = torch.Generator().manual_seed(3)
    g, w = torch.randn(13, 2, 3, 40, 40, generator=gen), torch.rand(13, generator=gen, dtype=torch.float64)
    o, sq = torch.randn(14, 2, generator=gen), torch.rand(13, 2, generator=gen)
    threads = torch.get_num_threads()
    first = (ops.accumulate(g, w), ops.accumulate_idgi(g, o, sq), ops.squared_norms(g))
    try:
        torch.set_num_threads(1)
        single = (ops.accumulate(g, w), ops.accumulate_idgi(g, o, sq), ops.squared_norms(g))
    finally:
        torch.set_num_threads(threads)
    again = (ops.accumulate(g, w), ops.accumulate_idgi(g, o, sq), ops.squared_norms(g))
    for a, b, c in zip(first, single, again):
        assert torch.equal(a, b) and torch.equal(a, c)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3, 5, 7), (3, 2000)])
def test_idgi_kernels_match_reference(dtype, shape):
    gen = torch.Generator().manual_seed(11)
    k = 5
    outputs = torch.randn(k + 1, shape[0], generator=gen).to(dtype)
    for name, g in grads_in_layouts(k, shape, dtype, gen):
        g = g.clone() if name != "channels_last" else g
        sq = ops.squared_norms(g)
        torch.testing.assert_close(sq, ops.squared_norms_reference(g), **fp32_tolerance(dtype), msg=name)
        got = ops.accumulate_idgi(g, outputs, sq)
        ref = ops.accumulate_idgi_reference(g, outputs, sq)
        torch.testing.assert_close(got, ref, **fp32_tolerance(dtype), msg=name)


@needs_kernels
def test_idgi_zero_norm_step_contributes_nothing():
    g = torch.randn(3, 2, 4, 4)
    g[1, 0] = 0
    sq = ops.squared_norms(g)
    assert sq[1, 0] == 0
    outputs = torch.randn(4, 2)
    out = ops.accumulate_idgi(g, outputs, sq)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ops.accumulate_idgi_reference(g, outputs, sq))
    by_hand = sum(g[k, 0] ** 2 * (outputs[k + 1, 0] - outputs[k, 0]) / sq[k, 0] for k in (0, 2))
    torch.testing.assert_close(out[0], by_hand)


@needs_kernels
def test_accumulate_edge_cases():
    assert ops.accumulate(torch.empty(0, 2, 3), torch.empty(0)).eq(0).all()  # no steps: zeros
    assert ops.accumulate(torch.empty(3, 0, 3), torch.ones(3)).shape == (0, 3)
    assert ops.squared_norms(torch.empty(2, 0, 5)).shape == (2, 0)
    one = torch.tensor([[[2.0]]])
    assert ops.accumulate(one, torch.tensor([0.5])).item() == 1.0
    assert ops.accumulate_idgi(one, torch.tensor([[1.0], [3.0]]), torch.tensor([[4.0]])).item() == 2.0


@pytest.mark.parametrize("call, error", [
    (lambda: ops.accumulate(torch.zeros(3, 2, 4), torch.zeros(2)), ValueError),
    (lambda: ops.accumulate(torch.zeros(3, 2, 4, dtype=torch.int32), torch.zeros(3)), TypeError),
    (lambda: ops.accumulate(torch.zeros(3), torch.zeros(3)), ValueError),
    (lambda: ops.accumulate_idgi(torch.zeros(3, 2, 4), torch.zeros(3, 2), torch.zeros(3, 2)), ValueError),
    (lambda: ops.accumulate_idgi(torch.zeros(3, 2, 4), torch.zeros(4, 2), torch.zeros(2, 3)), ValueError),
    (lambda: ops.squared_norms(torch.zeros(3, 2, dtype=torch.int64)), TypeError),
])
def test_accumulate_bad_arguments(call, error):
    with pytest.raises(error):
        call()


# --- perturb ----------------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (3, 1, 4, 4), (1, 3, 16, 16)])
def test_perturb_kernel_equals_reference_exactly(dtype, shape):
    gen = torch.Generator().manual_seed(5)
    n, c, h, w = shape
    image = torch.randn(shape, generator=gen).to(dtype)
    rank = torch.stack([torch.randperm(h * w, generator=gen).reshape(h, w) for _ in range(n)])
    counts = torch.tensor([0, 1, h * w // 2, h * w, h * w + 5, 1])
    for substrate in (torch.randn(shape, generator=gen).to(dtype), torch.zeros(1, c, h, w, dtype=dtype)):
        expected = ops.perturb_reference(image, substrate, rank, counts)
        for name, img in layouts(image):
            got = ops.perturb(img, substrate, rank, counts)
            assert torch.equal(got, expected), name
        # Semantics, independently of the reference: image-major rows, channels move together.
        view = expected.view(n, len(counts), c, h, w)
        assert torch.equal(view[:, 3], image) and torch.equal(view[:, 0], substrate.expand_as(image))
        shown = (rank < counts[2]).unsqueeze(1).expand(n, c, h, w)
        assert torch.equal(view[:, 2][shown], image[shown])


@needs_kernels
def test_perturb_edge_cases():
    image, rank = torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.int64)
    assert ops.perturb(image, image, rank, torch.empty(0, dtype=torch.int64)).shape == (0, 3, 4, 4)
    assert ops.perturb(image[:0], image[:0], rank[:0], torch.tensor([1])).shape == (0, 3, 4, 4)
    ties = ops.perturb(image, torch.zeros(1, 3, 4, 4), rank, torch.tensor([0, 1]))  # equal ranks move together
    assert torch.equal(ties[1], image[0]) and torch.equal(ties[0], torch.zeros(3, 4, 4))


@pytest.mark.parametrize("bad, error", [
    (dict(substrate=torch.zeros(2, 3, 4, 5)), ValueError),
    (dict(substrate=torch.zeros(2, 3, 4, 4, dtype=torch.float64)), TypeError),
    (dict(rank=torch.zeros(2, 4, 4, dtype=torch.int32)), TypeError),
    (dict(rank=torch.zeros(2, 4, 5, dtype=torch.int64)), ValueError),
    (dict(counts=torch.zeros(2, 2, dtype=torch.int64)), ValueError),
    (dict(counts=torch.zeros(2)), TypeError),
    (dict(image=torch.zeros(3, 4, 4), substrate=torch.zeros(3, 4, 4)), ValueError),
])
def test_perturb_bad_arguments(bad, error):
    args = dict(image=torch.zeros(2, 3, 4, 4), substrate=torch.zeros(2, 3, 4, 4),
                rank=torch.zeros(2, 4, 4, dtype=torch.int64), counts=torch.zeros(3, dtype=torch.int64)) | bad
    for fn in (ops.perturb, ops.perturb_reference):
        with pytest.raises(error):
            fn(**args)


# --- guided_step ------------------------------------------------------------------------------------------------


def pair_step(x, x_input, x_baseline, grad_actual, fraction, alpha_min, alpha_max, l1_target):
    """One step of PAIR saliency's guided_ig_impl loop (float64 numpy, written from its published algorithm)."""
    x, grad = x.copy(), grad_actual.copy()
    x_min = x_baseline + (x_input - x_baseline) * alpha_min
    x_max = x_baseline + (x_input - x_baseline) * alpha_max
    gamma = np.inf
    while gamma > 1.0:
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where(x_input - x_baseline != 0, (x - x_baseline) / (x_input - x_baseline), np.nan)
        alpha[np.isnan(alpha)] = alpha_max
        x[alpha < alpha_min] = x_min[alpha < alpha_min]
        l1 = np.abs(x - x_input).sum()
        if math.isclose(l1_target, l1, rel_tol=1e-9, abs_tol=1e-9):
            break
        grad[x == x_max] = np.inf
        threshold = np.quantile(np.abs(grad), fraction, method="lower")
        s = np.logical_and(np.abs(grad) <= threshold, grad != np.inf)
        l1_s = (np.abs(x - x_max) * s).sum()
        gamma = (l1 - l1_target) / l1_s if l1_s > 0 else np.inf
        x[s] = x_max[s] if gamma > 1.0 else (x + (x_max - x) * gamma)[s]
    return x


def guided_path(step_fn, x_input, x_baseline, grads, fraction, max_dist):
    """Run PAIR's step schedule with the given step function and pre-drawn gradients; returns every point."""
    steps = len(grads)
    l1_total = (x_input - x_baseline).abs().flatten(1).sum(1).double()
    x, points = x_baseline.clone(), []
    for s in range(steps):
        alpha = (s + 1.0) / steps
        x = step_fn(x, x_input, x_baseline, grads[s], fraction, max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0),
                    l1_total * (1 - (s + 1) / steps))
        points.append(x)
    return points


@pytest.mark.parametrize("fraction, max_dist", [(0.25, 0.02), (0.1, 0.3), (1.0, 0.1), (0.0, 0.05)])
def test_guided_step_reference_follows_pair_saliency(fraction, max_dist):
    gen = torch.Generator().manual_seed(17)
    x_input = torch.randn(1, 3, 6, 6, generator=gen, dtype=torch.float64)
    x_baseline = torch.zeros_like(x_input)
    x_baseline[0, 0, :2] = x_input[0, 0, :2]  # features with input == baseline
    grads = [torch.randn(x_input.shape, generator=gen, dtype=torch.float64) for _ in range(12)]
    grads[3][0, 1] = grads[3][0, 1, 0, 0]  # ties in |grad|
    got = guided_path(ops.guided_step_reference, x_input, x_baseline, grads, fraction, max_dist)

    def pair(x, xi, xb, g, *rest):
        return torch.from_numpy(pair_step(x[0].numpy(), xi[0].numpy(), xb[0].numpy(), g[0].numpy(), *rest[:3],
                                          float(rest[3][0])))[None]

    expected = guided_path(pair, x_input, x_baseline, grads, fraction, max_dist)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.allclose(got[-1], x_input)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3, 7, 5), (3, 500)])
@pytest.mark.parametrize("fraction", [0.25, 0.0, 1.0])
def test_guided_step_kernel_matches_reference(dtype, shape, fraction):
    gen = torch.Generator().manual_seed(23)
    x_input = torch.randn(shape, generator=gen, dtype=dtype)
    x_baseline = torch.randn(shape, generator=gen, dtype=dtype) * 0.1
    x_baseline.view(shape[0], -1)[:, :1] = x_input.view(shape[0], -1)[:, :1]
    grads = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(8)]
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    ref = guided_path(ops.guided_step_reference, x_input, x_baseline, grads, fraction, 0.1)
    for name, xi in layouts(x_input):
        got = guided_path(ops.guided_step, xi, x_baseline, grads, fraction, 0.1)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **tol, msg=name)


@needs_kernels
def test_guided_step_single_step_edge_cases():
    z = torch.zeros(2, 4)
    target = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(ops.guided_step(z, z, z, z, 0.25, 0.0, 1.0, target), z)  # input == baseline: nothing moves
    e = torch.zeros(0, 4)
    assert ops.guided_step(e, e, e, e, 0.25, 0.0, 1.0, target[:0]).shape == (0, 4)
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    inp = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    grad = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    # fraction 0.25 of 4 features -> index floor(0.75) = 0: the lowest |grad| (feature 3) moves first, fully, then
    # feature 2 moves part of the way: L1 10 -> 5.
    out = ops.guided_step(x, inp, torch.zeros_like(x), grad, 0.25, 0.0, 1.0, torch.tensor([5.0], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 1.0, 4.0]]))
    torch.testing.assert_close(out, ops.guided_step_reference(x, inp, torch.zeros_like(x), grad, 0.25, 0.0, 1.0,
                                                              torch.tensor([5.0], dtype=torch.float64)))


@pytest.mark.parametrize("bad, error", [
    (dict(grad=torch.zeros(2, 5)), ValueError),
    (dict(grad=torch.zeros(2, 4, dtype=torch.float64)), TypeError),
    (dict(x=torch.zeros(2, 4, dtype=torch.float16), input=torch.zeros(2, 4, dtype=torch.float16),
          baseline=torch.zeros(2, 4, dtype=torch.float16), grad=torch.zeros(2, 4, dtype=torch.float16)), TypeError),
    (dict(l1_target=torch.zeros(3, dtype=torch.float64)), ValueError),
    (dict(fraction=-0.1), ValueError),
    (dict(alpha_min=0.6, alpha_max=0.5), ValueError),
])
def test_guided_step_bad_arguments(bad, error):
    z = torch.zeros(2, 4)
    args = dict(x=z, input=z, baseline=z, grad=z, fraction=0.25, alpha_min=0.0, alpha_max=1.0,
                l1_target=torch.zeros(2, dtype=torch.float64)) | bad
    for fn in (ops.guided_step, ops.guided_step_reference):
        with pytest.raises(error):
            fn(**args)


# --- torch.compile ----------------------------------------------------------------------------------------------


@needs_kernels
def test_fake_implementations_match_the_kernels():
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, 2, 3, 6, 6)
    z = torch.zeros(2, 3, 6, 6)
    cases = {
        "path_points": (x, torch.zeros(1, 3, 6, 6).expand_as(x), torch.rand(4, dtype=torch.float64)),
        "accumulate": (g, torch.rand(3)),
        "squared_norms": (g,),
        "accumulate_idgi": (g, torch.randn(4, 2), torch.rand(3, 2)),
        "perturb": (x, z, torch.randint(0, 36, (2, 6, 6)), torch.tensor([1, 5, 36])),
        "guided_step": (z, x, z, torch.randn(2, 3, 6, 6), 0.25, 0.0, 0.2, torch.full((2,), 10.0, dtype=torch.float64)),
    }
    for name, args in cases.items():
        result = torch.library.opcheck(kernel(name).default, args, test_utils=("test_schema", "test_faketensor"))
        assert set(result.values()) == {"SUCCESS"}, (name, result)


@needs_kernels
def test_ops_work_under_torch_compile():
    def insertion_batch(image, blurred, saliency, counts):
        rank = saliency.flatten(1).argsort(dim=1, descending=True).argsort(dim=1).reshape(saliency.shape)
        return ops.perturb(image, blurred, rank, counts) * 2

    compiled = torch.compile(insertion_batch, backend="eager", fullgraph=True)
    image, blurred, sal = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5), torch.randn(2, 5, 5)
    counts = torch.tensor([0, 3, 25])
    torch.testing.assert_close(compiled(image, blurred, sal, counts), insertion_batch(image, blurred, sal, counts))


# --- CUDA (skip without a GPU) ------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_path_points_and_perturb_equal_reference(dtype):
    x = torch.randn(3, 3, 9, 11).to(dtype)
    b = torch.randn(1, 3, 9, 11).to(dtype)
    alphas = torch.rand(7, dtype=torch.float64)
    for name, xv in layouts(x):
        got = ops.path_points(xv.cuda(), b.cuda(), alphas.cuda())
        assert torch.equal(got.cpu(), ops.path_points_reference(x, b, alphas)), name
    rank = torch.stack([torch.randperm(99).reshape(9, 11) for _ in range(3)])
    counts = torch.tensor([0, 10, 50, 99])
    expected = ops.perturb_reference(x, b, rank, counts)
    for name, xv in layouts(x):
        assert torch.equal(ops.perturb(xv.cuda(), b.cuda(), rank.cuda(), counts.cuda()).cpu(), expected), name


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_accumulations_match_reference_and_are_deterministic(dtype):
    g = torch.randn(9, 2, 3, 17, 19).to(dtype)
    w = torch.rand(9, dtype=torch.float64)
    outputs = torch.randn(10, 2).to(dtype)
    gc = g.cuda()
    torch.testing.assert_close(ops.accumulate(gc, w.cuda()).cpu(), ops.accumulate_reference(g, w),
                               **fp32_tolerance(dtype))
    sq = ops.squared_norms(gc)
    torch.testing.assert_close(sq.cpu(), ops.squared_norms_reference(g), **fp32_tolerance(dtype))
    got = ops.accumulate_idgi(gc, outputs.cuda(), sq)
    torch.testing.assert_close(got.cpu(), ops.accumulate_idgi_reference(g, outputs, sq.cpu()), **fp32_tolerance(dtype))
    assert torch.equal(got, ops.accumulate_idgi(gc, outputs.cuda(), ops.squared_norms(gc)))
    assert torch.equal(ops.accumulate(gc, w.cuda()), ops.accumulate(gc, w.cuda()))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_guided_step_matches_reference(dtype):
    gen = torch.Generator().manual_seed(29)
    x_input = torch.randn(2, 3, 20, 20, generator=gen, dtype=dtype)
    x_baseline = torch.zeros_like(x_input)
    grads = [torch.randn(x_input.shape, generator=gen, dtype=dtype) for _ in range(10)]
    ref = guided_path(ops.guided_step_reference, x_input, x_baseline, grads, 0.25, 0.05)

    def on_gpu(x, xi, xb, g, f, lo, hi, t):
        return ops.guided_step(x.cuda(), xi.cuda(), xb.cuda(), g.cuda(), f, lo, hi, t.cuda()).cpu()

    got = guided_path(on_gpu, x_input, x_baseline, grads, 0.25, 0.05)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **tol)
