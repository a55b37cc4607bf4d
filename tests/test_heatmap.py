"""fastig.io.heatmap: colour values (not just that it runs), PNG writing and grid layout arithmetic."""

import cv2
import numpy as np
import pytest
import torch

from fastig.errors import FastigError
from fastig.io.heatmap import GAP, grid, render_heatmap, save_png

LUMA = np.array([0.299, 0.587, 0.114])


def brightness(rgb):
    return rgb.astype(np.float64) @ LUMA


def test_hottest_pixel_is_brightest():
    rng = np.random.default_rng(0)
    a = rng.normal(scale=0.1, size=(3, 24, 32))
    a[:, 5, 7] = 10.0
    out = render_heatmap(a)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    b = brightness(out)
    # at the default 99.5th percentile a few noise pixels saturate too (0.5% of 768): the spike is among them
    assert b[5, 7] == b.max() and (b == b.max()).sum() <= 5
    b = brightness(render_heatmap(a, clip_percentile=100))
    assert np.unravel_index(b.argmax(), b.shape) == (5, 7)
    assert b[5, 7] > np.delete(b.ravel(), 5 * 32 + 7).max()


def test_brightness_is_monotonic_in_magnitude():
    ramp = np.linspace(0, 1, 64)[None, :].repeat(4, axis=0)  # 4 x 64, rising left to right
    b = brightness(render_heatmap(ramp, clip_percentile=100))[0]
    assert np.all(np.diff(b) >= 0) and b[-1] > b[0] + 100


def test_channels_are_summed():
    a = np.zeros((3, 4, 4))
    a[0, 1, 1], a[1, 1, 1], a[2, 1, 1] = 1.0, 2.0, -3.0  # sums to zero
    a[0, 2, 2] = 1.0
    out = render_heatmap(a, clip_percentile=100)
    np.testing.assert_array_equal(out, render_heatmap(a.sum(0), clip_percentile=100))
    assert brightness(out)[1, 1] == brightness(out)[0, 0] < brightness(out)[2, 2]


def test_positive_mode_ignores_negatives():
    a = np.zeros((8, 8))
    a[2, 2] = -50.0
    a[5, 5] = 1.0
    out = render_heatmap(a, sign="positive", clip_percentile=100)
    zero_colour = out[0, 0]
    np.testing.assert_array_equal(out[2, 2], zero_colour)  # the big negative shows as zero
    assert brightness(out)[5, 5] == brightness(out).max() > brightness(out)[0, 0]
    # ...and negative mode shows only it
    neg = render_heatmap(a, sign="negative", clip_percentile=100)
    np.testing.assert_array_equal(neg[5, 5], neg[0, 0])
    assert brightness(neg)[2, 2] == brightness(neg).max() > brightness(neg)[0, 0]


def test_absolute_mode_treats_signs_alike():
    a = np.zeros((4, 4))
    a[1, 1], a[2, 2] = -3.0, 3.0
    out = render_heatmap(a, sign="absolute")
    np.testing.assert_array_equal(out[1, 1], out[2, 2])


def test_percentile_clipping_saturates_the_top_values():
    a = np.arange(1, 101, dtype=np.float64).reshape(10, 10)  # 1..100
    out = render_heatmap(a, clip_percentile=90)
    top = render_heatmap(np.array([[1.0]]), clip_percentile=100)[0, 0]  # the colour of the maximum
    flat = out.reshape(-1, 3)
    p90 = np.percentile(np.arange(1, 101), 90)
    saturated = np.all(flat == top, axis=1)
    # every value at or above the 90th percentile gets the top colour; values clearly below do not
    assert saturated[np.arange(1, 101) >= p90].all()
    assert not saturated[np.arange(1, 101) < p90 - 1].any()
    # with no clipping only the maximum is saturated
    assert np.all(render_heatmap(a, clip_percentile=100).reshape(-1, 3) == top, axis=1).sum() == 1


def test_all_mode_is_diverging_with_zero_in_the_middle():
    a = np.array([[-2.0, 0.0, 2.0]])
    out = render_heatmap(a, sign="all", clip_percentile=100).astype(int)
    neg, zero, pos = out[0]
    assert neg[2] > neg[0] + 50  # negative: blue
    assert pos[0] > pos[2] + 50  # positive: red
    assert zero.min() > 230  # zero: (near) white
    assert brightness(neg) < 80 and brightness(pos) < 80  # full magnitude: the dark ends of the map
    half = render_heatmap(np.array([[-2.0, -1.0, 1.0, 2.0]]), sign="all", clip_percentile=100)
    assert 80 < brightness(half[0, 1]) < brightness(zero) and 80 < brightness(half[0, 2]) < brightness(zero)


@pytest.mark.parametrize("sign", ["absolute", "positive", "negative", "all"])
@pytest.mark.parametrize("value", [0.0, 3.5, -1.0])
def test_constant_map_renders_without_nan(sign, value):
    out = render_heatmap(torch.full((3, 5, 6), value), sign=sign)
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8
    assert (out == out[0, 0]).all()  # one colour everywhere


def test_all_zero_is_the_colour_of_zero():
    zero = render_heatmap(np.zeros((4, 4)))
    sparse = np.zeros((4, 4))
    sparse[0, 0] = 1.0
    np.testing.assert_array_equal(zero[0, 0], render_heatmap(sparse)[1, 1])


def test_blend_over_image():
    image = np.full((6, 6, 3), 200, np.uint8)
    a = np.random.default_rng(1).normal(size=(6, 6))
    heat = render_heatmap(a)
    for alpha in (0.0, 0.3, 1.0):
        out = render_heatmap(a, image=image, alpha=alpha)
        expected = np.round((1 - alpha) * 200 + alpha * heat.astype(np.float64)).astype(np.uint8)
        np.testing.assert_array_equal(out, expected)
    grey = render_heatmap(a, image=np.full((6, 6), 200, np.uint8), alpha=0.3)
    np.testing.assert_array_equal(grey, render_heatmap(a, image=image, alpha=0.3))


@pytest.mark.parametrize("kwargs,message", [
    (dict(sign="both"), "sign must be one of"),
    (dict(clip_percentile=0), "clip_percentile"),
    (dict(clip_percentile=101), "clip_percentile"),
    (dict(alpha=1.5), "alpha"),
    (dict(image=np.zeros((5, 6, 3), np.uint8)), "must match"),
    (dict(image=np.zeros((6, 6, 3), np.float32)), "uint8"),
])
def test_render_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_heatmap(np.ones((6, 6)), **kwargs)


def test_render_bad_attributions():
    with pytest.raises(ValueError, match=r"\[C, H, W\] or \[H, W\]"):
        render_heatmap(np.ones((1, 3, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        render_heatmap(np.array([[1.0, np.nan]]))


def test_save_png_round_trip(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = save_png(tmp_path / "deep" / "er" / "h.png", rgb)
    assert path.exists()
    np.testing.assert_array_equal(cv2.imread(str(path))[:, :, ::-1], rgb)


def test_save_png_cannot_write(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(FastigError, match="cannot write PNG.*file/h.png"):
        save_png(blocker / "h.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "x.png", np.zeros((2, 2, 3)))


def test_grid_shape_arithmetic_and_placement():
    red = np.zeros((5, 5, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((10, 10, 3), np.uint8)
    blue[..., 2] = 255
    cell = 20
    out = grid([[red, blue, red], [blue]], cell=cell)
    assert out.shape == (2 * (cell + GAP) + GAP, 3 * (cell + GAP) + GAP, 3)
    y, x = GAP, GAP + 1 * (cell + GAP)  # row 0, column 1
    assert (out[y:y + cell, x:x + cell] == [0, 0, 255]).all()
    y = GAP + (cell + GAP)  # row 1, column 0
    assert (out[y:y + cell, GAP:GAP + cell] == [0, 0, 255]).all()
    assert (out[y:y + cell, GAP + cell + GAP:] == 255).all()  # missing cells in a short row stay background
    assert (out[:GAP] == 255).all() and (out[:, :GAP] == 255).all()  # margins


def test_grid_nearest_keeps_small_crops_crisp():
    crop = np.zeros((5, 5, 3), np.uint8)
    crop[2, 2] = 255  # a single white pixel in the center
    out = grid([[crop]], cell=50)
    tile = out[GAP:GAP + 50, GAP:GAP + 50]
    assert set(np.unique(tile)) == {0, 255}  # no interpolated greys
    assert (tile[20:30, 20:30] == 255).all() and (tile[:20] == 0).all()


def test_grid_keeps_aspect_ratio():
    wide = np.full((10, 20, 3), 50, np.uint8)
    out = grid([[wide]], cell=40)
    tile = out[GAP:GAP + 40, GAP:GAP + 40]
    assert (tile[10:30] == 50).all() and (tile[:10] == 255).all() and (tile[30:] == 255).all()


def test_grid_labels_add_space_and_ink():
    images = [[np.zeros((4, 4, 3), np.uint8)] * 2] * 2
    cell = 32
    plain = grid(images, cell=cell)
    labelled = grid(images, row_labels=["heatmap", "crop"], col_labels=["ig", "a much longer label"], cell=cell)
    extra_h, extra_w = labelled.shape[0] - plain.shape[0], labelled.shape[1] - plain.shape[1]
    assert extra_h > 0 and extra_w > 0
    header = labelled[:extra_h, extra_w:]
    assert (header < 128).any()  # the column labels were drawn
    label_column = labelled[extra_h:, :extra_w]
    assert (label_column < 128).any()
    # the images sit exactly where the layout says
    y, x = extra_h + GAP, extra_w + GAP + (cell + GAP)
    assert (labelled[y:y + cell, x:x + cell] == 0).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(rows=[]), "at least one image"),
    (dict(rows=[[np.zeros((2, 2, 3), np.uint8)]], row_labels=["a", "b"]), "2 row labels for 1 rows"),
    (dict(rows=[[np.zeros((2, 2, 3), np.uint8)]], col_labels=[]), "0 column labels"),
    (dict(rows=[[np.zeros((2, 2, 3), np.uint8)]], cell=2), "cell"),
    (dict(rows=[[np.zeros((2, 2, 3), np.float64)]]), "row 0, column 0"),
])
def test_grid_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        grid(**kwargs)
