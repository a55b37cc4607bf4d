r"""The center-pixel toy model: a sanity check for attribution methods whose right answer is known.

Input: a grey image ``x`` of shape [N, 1, 227, 227] with values in [0, 1]. Output: 256 logits; the predicted class
is the intensity of the center pixel, ``round(255 * x[:, 0, 113, 113])``, whatever the other pixels are. The model
is one ``nn.Linear(227 * 227, 256)`` followed by a ReLU; ``forward`` returns these (non-negative) logits and the
caller applies ``softmax`` if it wants probabilities. Nothing is trained: the weights are set in closed form,
deterministically.

Closed form. Let ``v = 255 * x_center`` be the center intensity on the 0..255 scale. The class nearest to ``v`` is
the one that maximizes ``-(v - c)^2 = -v^2 + 2 v c - c^2``. The term ``-v^2`` is the same for every class, so the
argmax is unchanged when it is dropped, which leaves an expression *linear* in the input::

    logit_c = 2 * 255 * c * x_center  -  c^2  +  K  +  b * sum_{p != center} x_p

- weight of the center pixel for class c: ``510 * c``; bias of class c: ``K - c^2``;
- every other pixel has the same weight ``b = 1 / (227 * 227)`` for all classes, so it adds the same amount to
  every logit: it cannot change the argmax, and its gradient is identical across classes;
- ``K = 255^2 + 1`` keeps every logit >= 1 for inputs in [0, 1] (the smallest, at ``x_center = 0`` and ``c = 255``,
  is ``-255^2 + K = 1``; the background term is >= 0), so the ReLU is the identity there: it never changes the
  argmax and never blocks a gradient.

At an exact intensity ``x_center = i / 255`` the winning logit beats its neighbours by exactly 1
(``-(i - c)^2`` at ``c = i +- 1``), far above float32 rounding (logits are at most 130051 + 1, spacing 1/128).
"""

from __future__ import annotations

import torch
from torch import nn

SIZE = 227
CENTER = SIZE // 2  # 113: the middle row and column
NUM_CLASSES = 256
BACKGROUND_WEIGHT = 1.0 / (SIZE * SIZE)
OFFSET = 255.0**2 + 1.0


class CenterPixelNet(nn.Module):
    """Predicts the center pixel's intensity (0..255) of a [N, 1, 227, 227] image in [0, 1]; returns logits."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(SIZE * SIZE, NUM_CLASSES)
        self.relu = nn.ReLU()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Set the closed-form weights (see the module docstring); computed in float64, stored in float32."""
        classes = torch.arange(NUM_CLASSES, dtype=torch.float64)
        weight = torch.full((NUM_CLASSES, SIZE * SIZE), BACKGROUND_WEIGHT, dtype=torch.float64)
        weight[:, CENTER * SIZE + CENTER] = 2.0 * 255.0 * classes
        self.linear.weight.copy_(weight)
        self.linear.bias.copy_(OFFSET - classes**2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, SIZE, SIZE):
            raise ValueError(
                f"centerpixel expects grey images of shape [N, 1, {SIZE}, {SIZE}] with values in [0, 1], "
                f"got {tuple(x.shape)}"
            )
        return self.relu(self.linear(x.flatten(1)))


def centerpixel() -> CenterPixelNet:
    """The center-pixel toy model with its closed-form weights."""
    return CenterPixelNet()
