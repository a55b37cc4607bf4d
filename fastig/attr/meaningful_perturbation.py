"""Meaningful Perturbation (Fong & Vedaldi, ICCV 2017, "Interpretable Explanations of Black Boxes by Meaningful
Perturbation"): the smallest, smoothest blur mask that deletes the evidence for a class."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from fastig.attr._base import Attribution
from fastig.core.inputs import format_inputs
from fastig.attr._path_common import check_output
from fastig.core.engine import Engine, grid
from fastig.core.targets import Target, args_for_batch, format_additional_args
from fastig.errors import InvalidArgumentError, check_int


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W] images (kernel radius ceil(3 sigma), edges replicated)."""
    if sigma <= 0:
        return images.clone()
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class MeaningfulPerturbation(Attribution):
    """Deletion-game masks, optimized for a whole batch at once (each image has its own mask and loss).

    For an image ``x`` and class ``c`` the mask ``m`` (1 = keep, 0 = blur) minimizes

        ``l1_coeff * ||1 - m||_1 + tv_coeff * sum_u ||grad m(u)||_beta^beta + f_c(m * x + (1 - m) * blur(x))``

    where ``f_c`` is the softmax probability of the class (``output="probability"``; ``"logit"``: the raw output)
    and ``m`` is a ``mask_size x mask_size`` grid, bilinearly upsampled to the image and clamped to [0, 1] after
    every Adam step. Defaults, those stated in the paper for ImageNet (blur perturbation, deletion game):
    ``l1_coeff=1e-4``, ``tv_coeff=1e-2``, ``tv_beta=3``, a 28x28 mask, blur ``sigma=10``, Adam with learning rate
    0.1 for 500 iterations, the mask initialised to 1 (nothing deleted). The paper's expectation over random
    jitter of the input is available as ``jitter`` (pixels of random shift per iteration; 0 = off, the default).

    ``attribute()`` returns the deletion map ``1 - m`` upsampled to the image and repeated over the channels
    (the input's shape): large where deleting evidence lowers the class score.

    The model's passes go through the engine (:mod:`fastig.core.engine`): images in batches of the engine's size
    (each image's loss and mask gradient depend on that image only, so batching changes no number), ``precision``
    autocast (``"bf16"``/``"fp16"``).

    ``score=`` is the old name of ``output=`` (``"softmax"`` for ``"probability"``), kept working with a
    DeprecationWarning.
    """

    multiplies_by_inputs = False

    def attribute(
        self,
        inputs: torch.Tensor,
        target: Any = None,
        additional_forward_args: Any = None,
        n_iter: int = 500,
        learning_rate: float = 0.1,
        l1_coeff: float = 1e-4,
        tv_coeff: float = 1e-2,
        tv_beta: float = 3.0,
        mask_size: int = 28,
        blur_sigma: float = 10.0,
        output: str = "probability",
        jitter: int = 0,
        return_mask_history: bool = False,
        precision: str = "fp32",
        score: str | None = None,
    ) -> Any:
        xs, is_tuple = format_inputs(inputs)
        if is_tuple or xs[0].dim() != 4:
            raise ValueError("MeaningfulPerturbation explains image batches: inputs must be one [N, C, H, W] tensor")
        if score is not None:
            output = _output_from_score(score)
        check_output(output)
        check_int("n_iter", n_iter, 0)
        check_int("mask_size", mask_size)
        x = xs[0].detach()
        n, _, h, w = x.shape
        tgt = Target(target, n)
        args = format_additional_args(additional_forward_args)
        blurred = gaussian_blur(x, blur_sigma)
        mask = torch.ones((n, 1, mask_size, mask_size), dtype=x.dtype, device=x.device, requires_grad=True)
        optimizer = torch.optim.Adam([mask], lr=learning_rate)
        engine = Engine(self.forward_func, precision=precision)
        bytes_per_image = x[0].numel() * x.element_size()
        chunks = list(grid(1, n, 1, engine.rows_per_batch(bytes_per_image, n)))
        losses = []
        for _ in range(n_iter):
            image, base = x, blurred
            if jitter:
                dy, dx = (int(v) for v in torch.randint(0, jitter + 1, (2,)))
                image, base = torch.roll(x, (dy, dx), (2, 3)), torch.roll(blurred, (dy, dx), (2, 3))

            def evaluate(chunk, image=image, base=base) -> torch.Tensor:
                e = chunk.examples
                with torch.enable_grad():
                    part = mask[e]
                    upsampled = F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False)
                    composite = upsampled * image[e] + (1 - upsampled) * base[e]
                    scores = engine.call((composite,), args_for_batch(args, n, e, 1))
                    if output == "probability":
                        scores = torch.softmax(scores, dim=1)
                    class_score = tgt.for_batch(e, 1).select(scores)
                    loss = (class_score + l1_coeff * (1 - part).abs().flatten(1).sum(1)
                            + tv_coeff * total_variation(part, tv_beta))
                    loss.sum().backward()  # images are independent: the sum gives each mask its own gradient
                return loss.detach()

            optimizer.zero_grad()
            loss = torch.empty(n, dtype=x.dtype, device=x.device)
            for chunk, part_loss in engine.run_chunks(chunks, evaluate, bytes_per_row=bytes_per_image):
                loss[chunk.examples] = part_loss.to(loss.dtype)
            optimizer.step()
            with torch.no_grad():
                mask.clamp_(0, 1)
            losses.append(loss)
        with torch.no_grad():
            deletion = 1 - F.interpolate(mask.detach(), size=(h, w), mode="bilinear", align_corners=False)
        result = deletion.expand_as(x).contiguous()
        if return_mask_history:
            return result, torch.stack(losses) if losses else torch.empty(0, n)
        return result


def total_variation(mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-image ``sum_u |m(u+dy) - m(u)|^beta + |m(u+dx) - m(u)|^beta`` of [N, 1, h, w] masks."""
    dy = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).abs().pow(beta).flatten(1).sum(1)
    dx = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).abs().pow(beta).flatten(1).sum(1)
    return dy + dx


_SCORES = {"softmax": "probability", "logit": "logit"}  # score= (deprecated) -> output=


def _output_from_score(score: str) -> str:
    if score not in _SCORES:
        raise InvalidArgumentError(f"score (deprecated: use output=) must be 'softmax' or 'logit', got {score!r}")
    warnings.warn(f"MeaningfulPerturbation's score={score!r} is deprecated: use output={_SCORES[score]!r}",
                  DeprecationWarning, stacklevel=3)
    return _SCORES[score]
