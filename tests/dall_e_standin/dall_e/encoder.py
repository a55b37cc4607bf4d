"""Stand-in for dall_e/encoder.py."""

from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn

from dall_e.utils import Conv2d


class EncoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
        super().__init__()
        assert n_out % 4 == 0
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.device, self.requires_grad = device, requires_grad
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        conv = partial(Conv2d, device=device, requires_grad=requires_grad)
        self.id_path = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", conv(n_in, self.n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", conv(self.n_hid, self.n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", conv(self.n_hid, self.n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", conv(self.n_hid, n_out, 1)),
        ]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    group_count = 4  # a class constant in OpenAI's code too (not an attrs field, so not pickled)

    def __init__(self, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192,
                 device=torch.device("cpu"), requires_grad=False, use_mixed_precision=True):
        super().__init__()
        self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        self.device, self.requires_grad, self.use_mixed_precision = device, requires_grad, use_mixed_precision
        blocks = range(n_blk_per_group)
        conv = partial(Conv2d, device=device, requires_grad=requires_grad)
        block = partial(EncoderBlock, n_layers=self.group_count * n_blk_per_group, device=device,
                        requires_grad=requires_grad)

        def group(n_first_in, width, pool):
            layers = [(f"block_{i + 1}", block(n_first_in if i == 0 else width, width)) for i in blocks]
            if pool:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            return nn.Sequential(OrderedDict(layers))

        self.blocks = nn.Sequential(OrderedDict([
            ("input", conv(input_channels, n_hid, 7)),
            ("group_1", group(n_hid, n_hid, True)),
            ("group_2", group(n_hid, 2 * n_hid, True)),
            ("group_3", group(2 * n_hid, 4 * n_hid, True)),
            ("group_4", group(4 * n_hid, 8 * n_hid, False)),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()),
                ("conv", conv(8 * n_hid, vocab_size, 1, use_float16=False)),
            ]))),
        ]))

    def forward(self, x):
        assert x.dim() == 4 and x.shape[1] == self.input_channels and x.dtype == torch.float32
        return self.blocks(x)
