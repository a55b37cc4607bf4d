"""MeaningfulPerturbation: blur and TV against plain references, batching, and a mask that finds the evidence."""

import pytest
import torch
import torch.nn.functional as F

from fastig.attr import MeaningfulPerturbation
from fastig.attr.meaningful_perturbation import gaussian_blur, total_variation


class RegionDetector(torch.nn.Module):
    """Class 0's logit: correlation with a checkerboard inside the top-left quadrant (blur removes it)."""

    def forward(self, x):
        h, w = x.shape[2:]
        board = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 * 2 - 1).to(x.dtype)
        score = (x[:, :, : h // 2, : w // 2] * board[: h // 2, : w // 2]).mean((1, 2, 3)) * 4
        return torch.stack([score, torch.zeros_like(score)], 1)


def checkerboards(n, h=16, w=16):
    board = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 * 2 - 1).float()
    return board.expand(n, 3, h, w).clone()


@pytest.mark.parametrize("sigma,shape", [(1.0, (2, 3, 9, 11)), (2.5, (1, 1, 16, 16))])
def test_gaussian_blur_matches_2d_convolution(sigma, shape):
    x = torch.randn(shape, dtype=torch.float64)
    radius = int(torch.tensor(3 * sigma).ceil())
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = (g[:, None] * g[None, :]) / g.sum() ** 2
    padded = F.pad(x, (radius,) * 4, mode="replicate")
    reference = F.conv2d(padded, kernel.expand(shape[1], 1, -1, -1), groups=shape[1])
    torch.testing.assert_close(gaussian_blur(x, sigma), reference)


def test_total_variation_by_hand():
    mask = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]]])
    # vertical: |0.5-0|^3 + |0.5-1|^3 ; horizontal: |1-0|^3 + 0
    assert total_variation(mask, 3.0).item() == pytest.approx(0.125 + 0.125 + 1.0)


def test_mask_deletes_the_region_that_holds_the_evidence():
    x = checkerboards(1)
    deletion = MeaningfulPerturbation(RegionDetector()).attribute(x, target=0, n_iter=60, mask_size=8, blur_sigma=2.0)
    assert deletion.shape == x.shape and 0 <= deletion.min() and deletion.max() <= 1
    inside, outside = deletion[0, 0, :8, :8].mean(), deletion[0, 0, 8:, 8:].mean()
    assert inside > 0.9 and inside - outside > 0.25


def test_batch_equals_one_image_at_a_time():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).double()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    kw = dict(n_iter=15, mask_size=6, blur_sigma=1.5)
    together = MeaningfulPerturbation(net).attribute(x, target=[0, 2, 1], **kw)
    for i, t in enumerate([0, 2, 1]):
        torch.testing.assert_close(together[i : i + 1], MeaningfulPerturbation(net).attribute(x[i : i + 1], target=t, **kw))


def test_bad_arguments():
    mp = MeaningfulPerturbation(RegionDetector())
    with pytest.raises(ValueError, match="N, C, H, W"):
        mp.attribute(torch.randn(2, 16), target=0)
    with pytest.raises(ValueError, match="score"):
        mp.attribute(checkerboards(1), target=0, score="prob")


def test_output_is_the_one_spelling_of_what_is_explained_and_score_still_works():
    """``output="probability"|"logit"`` as on the path methods; the old ``score="softmax"|"logit"`` gives the same
    masks with a DeprecationWarning."""
    x, kw = checkerboards(2) * 0.5, dict(target=0, n_iter=5, mask_size=4, blur_sigma=1.0)
    mp = MeaningfulPerturbation(RegionDetector())
    probability, logit = mp.attribute(x, **kw), mp.attribute(x, output="logit", **kw)
    torch.testing.assert_close(mp.attribute(x, output="probability", **kw), probability, rtol=0, atol=0)
    assert not torch.equal(probability, logit)
    for old, new in (("softmax", probability), ("logit", logit)):
        with pytest.warns(DeprecationWarning, match="output="):
            torch.testing.assert_close(mp.attribute(x, score=old, **kw), new, rtol=0, atol=0)
    with pytest.raises(ValueError, match="output must be one of 'logit', 'probability'"):
        mp.attribute(x, output="softmax", **kw)
