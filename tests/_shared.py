"""Small models and a comparison helper that several test files share (import: ``from _shared import ...``)."""

import torch


class SmallCNN(torch.nn.Module):
    """Conv 3->6 (3x3), ReLU, 2x2 max-pool, Linear: output [N, classes] for 8x8 images."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(6 * 3 * 3, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


class TwoInputNet(torch.nn.Module):
    """Two inputs ([N, 12] after flattening and [N, 5]), a scale argument, output [N, 3]."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(12, 3)
        self.b = torch.nn.Linear(5, 3)

    def forward(self, x1, x2, scale=1.0):
        return torch.tanh(self.a(x1.flatten(1))) * scale + self.b(x2) ** 2


def assert_close(ours, theirs, tol=1e-6):
    """Same structure, shape and dtype; max abs difference within ``tol`` of the reference's largest entry."""
    if isinstance(theirs, tuple):
        assert isinstance(ours, tuple) and len(ours) == len(theirs)
        for o, t in zip(ours, theirs):
            assert_close(o, t, tol)
        return
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    scale = max(theirs.abs().max().item(), 1e-12)
    assert (ours - theirs).abs().max().item() <= tol * scale, (ours - theirs).abs().max()


def relative_error(ours, theirs):
    """The largest absolute difference, relative to the reference's largest entry (in float64)."""
    ours, theirs = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()
