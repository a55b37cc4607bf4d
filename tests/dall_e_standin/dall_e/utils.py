"""Stand-in for dall_e/utils.py: the convolution module and the pixel maps."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

logit_laplace_eps = 0.1


class Conv2d(nn.Module):
    """Holds ``w``, ``b`` and the same bookkeeping attributes as OpenAI's attrs-based Conv2d."""

    def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device("cpu"), requires_grad=False):
        super().__init__()
        assert n_in >= 1 and n_out >= 1 and kw >= 1 and kw % 2 == 1
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16, self.device, self.requires_grad = use_float16, device, requires_grad
        w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32, device=device, requires_grad=requires_grad)
        w.normal_(std=1 / math.sqrt(n_in * kw**2))
        b = torch.zeros((n_out,), dtype=torch.float32, device=device, requires_grad=requires_grad)
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        if self.use_float16 and "cuda" in self.w.device.type:
            x = x.half() if x.dtype != torch.float16 else x
            w, b = self.w.half(), self.b.half()
        else:
            x = x.float() if x.dtype != torch.float32 else x
            w, b = self.w, self.b
        return F.conv2d(x, w, b, padding=(self.kw - 1) // 2)


def map_pixels(x):
    return (1 - 2 * logit_laplace_eps) * x + logit_laplace_eps


def unmap_pixels(x):
    return torch.clamp((x - logit_laplace_eps) / (1 - 2 * logit_laplace_eps), 0, 1)
