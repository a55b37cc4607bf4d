"""Prediction Difference Analysis (Zintgraf, Cohen, Adel & Welling, ICLR 2017, "Visualizing Deep Neural Network
Decisions: Prediction Difference Analysis") with marginal sampling, batched over windows and samples."""

from __future__ import annotations

from typing import Any

import torch

from fastig.attr._base import Attribution
from fastig.core.inputs import format_inputs
from fastig.attr.perturbation import check_perturbations_per_eval, evaluate_copies
from fastig.core.engine import Engine
from fastig.core.targets import Target, format_additional_args
from fastig.errors import check_int


def weight_of_evidence(p_full: torch.Tensor, p_marginal: torch.Tensor, n_train: int, n_classes: int) -> torch.Tensor:
    """``log2 odds(p_full) - log2 odds(p_marginal)`` after the Laplace correction ``p -> (p n + 1) / (n + K)``."""
    def log2_odds(p):
        p = (p * n_train + 1) / (n_train + n_classes)
        return torch.log2(p / (1 - p))

    return log2_odds(p_full) - log2_odds(p_marginal)


class PredictionDifferenceAnalysis(Attribution):
    """Relevance of each pixel: how much the class's evidence drops when a window around it is unknown.

    For every ``window_size`` x ``window_size`` window (all channels; windows start every ``stride`` pixels,
    the last row and column of windows flush with the far edge), the window's values are replaced by
    ``n_samples`` samples from their marginal distribution, giving ``p(c | x without the window)`` as the mean
    class probability. The window's weight of evidence is
    ``log2 odds p(c|x) - log2 odds p(c|x without the window)`` with the Laplace correction
    ``p -> (p * laplace_n + 1) / (laplace_n + K)`` (K classes), and each pixel gets the mean over the windows
    covering it (repeated over the channels: the input's shape).

    Marginal samples: with ``reference`` images [M, C, H, W] (e.g. training images), sample ``s`` of every
    window is the same window of ``reference[s % M]`` (as the authors' marginal sampler, which takes the first
    ``n_samples`` images). Without ``reference`` (fastig's data-free fallback) each sample is a window of the
    image itself at a uniformly random position (torch's global generator).

    Defaults: those of the paper's ImageNet experiments and the authors' code: ``window_size=10``,
    ``n_samples=10``, overlapping windows (``stride=1``), ``laplace_n=100000`` (the code's training-set size),
    softmax applied to the model output (``apply_softmax``; set False for a model that returns probabilities).
    Cost: ``n_windows * n_samples`` model inputs per image (about 462,000 for 224x224 at the defaults): all are
    evaluated in large batches; ``stride`` > 1 divides the work by about ``stride**2``. ``precision``:
    ``"bf16"``/``"fp16"`` autocast of the model's passes (:mod:`fastig.core.engine`).
    """

    multiplies_by_inputs = False

    def attribute(
        self,
        inputs: torch.Tensor,
        target: Any = None,
        additional_forward_args: Any = None,
        window_size: int = 10,
        n_samples: int = 10,
        stride: int = 1,
        reference: torch.Tensor | None = None,
        laplace_n: int = 100000,
        apply_softmax: bool = True,
        perturbations_per_eval: int | None = None,
        show_progress: bool = False,
        precision: str = "fp32",
    ) -> torch.Tensor:
        xs, is_tuple = format_inputs(inputs)
        if is_tuple or xs[0].dim() != 4:
            raise ValueError("PredictionDifferenceAnalysis explains image batches: inputs must be one [N, C, H, W] tensor")
        x = xs[0]
        n, c, h, w = x.shape
        for name, value in (("window_size", window_size), ("n_samples", n_samples), ("stride", stride)):
            check_int(name, value)
        if window_size > min(h, w):
            raise ValueError(f"window_size {window_size} exceeds the image size {h}x{w}")
        if reference is not None:
            if not isinstance(reference, torch.Tensor) or reference.dim() != 4 or reference.shape[1:] != x.shape[1:]:
                raise ValueError(f"reference must be images [M, {c}, {h}, {w}], got {getattr(reference, 'shape', reference)}")
            reference = reference.to(device=x.device, dtype=x.dtype)
        check_perturbations_per_eval(perturbations_per_eval)
        tgt = Target(target, n)
        args = format_additional_args(additional_forward_args)
        k = window_size

        def probabilities(*model_inputs):
            out = self.forward_func(*model_inputs)
            return torch.softmax(out, dim=1) if apply_softmax else out

        probabilities.__wrapped__ = self.forward_func  # batch sizes that fit are remembered per model
        engine = Engine(probabilities, precision=precision)
        with torch.no_grad():
            full = engine.call((x,), args)  # [n, classes] probabilities: one pass gives K and p(c | x)
        n_classes = full.shape[1] if full.dim() == 2 else 1
        p_full = tgt.select(full).double()

        rows, cols = _starts(h, k, stride), _starts(w, k, stride)
        corners = torch.cartesian_prod(rows, cols).to(x.device)  # [n_windows, 2]
        n_windows = corners.shape[0]
        if reference is None:
            sources = torch.stack([torch.randint(0, h - k + 1, (n_windows, n_samples)),
                                   torch.randint(0, w - k + 1, (n_windows, n_samples))], -1).to(x.device)
        offsets = torch.arange(k, device=x.device)

        def build(start: int, stop: int):
            j = torch.arange(start, stop, device=x.device)
            window, sample = torch.div(j, n_samples, rounding_mode="floor"), j % n_samples
            ys = (corners[window, 0, None] + offsets)[:, :, None]  # [m, k, 1] target rows
            xs_ = (corners[window, 1, None] + offsets)[:, None, :]  # [m, 1, k] target columns
            copies = x.unsqueeze(0).repeat(stop - start, 1, 1, 1, 1)  # [m, n, C, H, W]
            m_index = torch.arange(stop - start, device=x.device)[:, None, None]
            if reference is not None:
                patch = reference[(sample % reference.shape[0])[:, None, None], :, ys, xs_]  # [m, k, k, C]
                patch = patch.unsqueeze(1).expand(-1, n, -1, -1, -1)  # same for every example
            else:
                src_y = (sources[window, sample, 0, None] + offsets)[:, :, None]
                src_x = (sources[window, sample, 1, None] + offsets)[:, None, :]
                patch = x.permute(0, 2, 3, 1)[:, src_y, src_x].transpose(0, 1)  # [m, n, k, k, C]
            copies = copies.permute(0, 1, 3, 4, 2)  # [m, n, H, W, C]
            copies[m_index.unsqueeze(1), torch.arange(n, device=x.device)[None, :, None, None],
                   ys.unsqueeze(1), xs_.unsqueeze(1)] = patch
            return (copies.permute(0, 1, 4, 2, 3).reshape(-1, c, h, w),), None

        p_marginal = torch.zeros((n_windows, n), dtype=torch.float64, device=x.device)
        for part, out, _ in evaluate_copies(engine, build, n_windows * n_samples, (x,), tgt, args,
                                            perturbations_per_eval, show_progress, "PredictionDifferenceAnalysis"):
            j = torch.arange(part.start, part.stop, device=x.device)
            p_marginal.index_add_(0, torch.div(j, n_samples, rounding_mode="floor"), out.double())
        p_marginal /= n_samples
        evidence = weight_of_evidence(p_full.unsqueeze(0), p_marginal, laplace_n, n_classes)  # [n_windows, n]

        totals = torch.zeros((n, h, w), dtype=torch.float64, device=x.device)
        counts = torch.zeros((h, w), dtype=torch.float64, device=x.device)
        for (r, q), value in zip(corners.tolist(), evidence):
            totals[:, r : r + k, q : q + k] += value[:, None, None]
            counts[r : r + k, q : q + k] += 1
        relevance = (totals / counts).float()
        return relevance.unsqueeze(1).expand(n, c, h, w).contiguous()


def _starts(size: int, k: int, stride: int) -> torch.Tensor:
    starts = list(range(0, size - k + 1, stride))
    if starts[-1] != size - k:
        starts.append(size - k)
    return torch.tensor(starts)
