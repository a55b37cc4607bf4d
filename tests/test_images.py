"""fastig.io.images: decoding every kind of file to uint8 RGB, clear errors, and the preprocessing transform."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastig.errors import FastigError, ImageReadError
from fastig.io.images import (IMAGENET_MEAN, IMAGENET_STD, Preprocess, _is_truncated_jpeg, load_image, load_images,
                              read_image)


@pytest.fixture
def rgb():
    """A small random RGB image (H=20, W=30) whose three channels differ, so channel order mistakes show."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image[..., 0] = 200  # constant red, so a BGR/RGB swap is unmistakable
    image[..., 2] = 10
    return image


def write(path, array_bgr):
    assert cv2.imwrite(str(path), array_bgr)
    return path


def test_png_round_trip_is_exact_and_rgb(tmp_path, rgb):
    path = write(tmp_path / "a.png", rgb[:, :, ::-1])  # OpenCV writes BGR
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_is_close_and_rgb(tmp_path, rgb):
    smooth = cv2.GaussianBlur(rgb, (5, 5), 0)
    path = tmp_path / "a.jpg"
    assert cv2.imwrite(str(path), smooth[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 98])
    out = read_image(path)
    assert out.shape == (20, 30, 3)
    assert np.abs(out.astype(int) - smooth.astype(int)).mean() < 4
    assert out[..., 0].mean() > 150 and out[..., 2].mean() < 60  # red stays red


def test_grey_becomes_three_equal_channels(tmp_path, rgb):
    grey = rgb[..., 1]
    out = read_image(write(tmp_path / "g.png", grey))
    assert out.shape == (20, 30, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_rgba_drops_alpha_and_keeps_colours(tmp_path, rgb):
    alpha = np.zeros((20, 30), np.uint8)
    alpha[:, 15:] = 255  # left half fully transparent: its colours must survive (no compositing over black)
    bgra = np.dstack([rgb[:, :, ::-1], alpha])
    out = read_image(write(tmp_path / "rgba.png", bgra))
    np.testing.assert_array_equal(out, rgb)


def test_16_bit_maps_to_8_bit(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535]], np.uint16)
    image16 = np.dstack([values, values // 2, values // 4])  # BGR order in the file
    out = read_image(write(tmp_path / "deep.png", image16))
    expected = np.round(image16[:, :, ::-1] / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 4, 2] == 255 and out[0, 1, 2] == 1


def test_16_bit_grey(tmp_path):
    grey = np.linspace(0, 65535, 12, dtype=np.uint16).reshape(3, 4)
    out = read_image(write(tmp_path / "g16.png", grey))
    np.testing.assert_array_equal(out[..., 1], np.round(grey / 257.0).astype(np.uint8))


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="not found.*nope.png"):
        read_image(tmp_path / "nope.png")


def test_directory(tmp_path):
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageReadError, match="fake.png"):
        read_image(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.*empty.jpg"):
        read_image(path)


@pytest.mark.parametrize("keep", [0.3, 0.7, 0.98])
def test_truncated_jpeg(tmp_path, rgb, keep):
    ok, data = cv2.imencode(".jpg", cv2.resize(rgb, (120, 80)))
    data = data.tobytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        read_image(path)


def test_truncated_png(tmp_path, rgb):
    ok, data = cv2.imencode(".png", rgb)
    path = tmp_path / "cut.png"
    path.write_bytes(data.tobytes()[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(path)


def test_unreadable_file(tmp_path, rgb, monkeypatch):
    path = write(tmp_path / "locked.png", rgb)

    def refuse(*args, **kwargs):  # what np.fromfile raises on a file without read permission
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(np, "fromfile", refuse)
    with pytest.raises(ImageReadError, match="cannot read.*locked.png.*Permission denied"):
        read_image(path)


def test_jpeg_end_marker_check(rgb):
    ok, data = cv2.imencode(".jpg", rgb)
    data = data.tobytes()
    as_array = lambda b: np.frombuffer(b, np.uint8)  # noqa: E731
    assert not _is_truncated_jpeg(as_array(data))
    assert not _is_truncated_jpeg(as_array(data + b"trailing bytes after the end marker"))
    assert _is_truncated_jpeg(as_array(data[:-2]))
    assert _is_truncated_jpeg(as_array(data[: len(data) // 2]))
    ok, png = cv2.imencode(".png", rgb)
    assert not _is_truncated_jpeg(png.ravel())


def test_image_read_error_is_a_fastig_error():
    assert issubclass(ImageReadError, FastigError)


def test_non_ascii_path(tmp_path, rgb):
    path = tmp_path / "bild_ä_猫.png"
    ok, data = cv2.imencode(".png", rgb[:, :, ::-1])
    path.write_bytes(data.tobytes())
    np.testing.assert_array_equal(read_image(path), rgb)


# ---- Preprocess ----


def reference_preprocess(rgb, resize, crop, mean, std):
    """float64 reference: torch bilinear (align_corners=False, no antialias), torchvision's size/crop arithmetic."""
    h, w = rgb.shape[:2]
    new_h, new_w = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
    x = torch.from_numpy(rgb.astype(np.float64)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    x = x[:, top:top + crop, left:left + crop] / 255.0
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (mean, std))
    return (x - mean) / std


@pytest.mark.parametrize("shape", [(40, 60), (64, 48), (33, 33), (20, 90)])
@pytest.mark.parametrize("resize,crop", [(32, 28), (80, 64), (24, 24)])
def test_preprocess_matches_reference(shape, resize, crop):
    rng = np.random.default_rng(sum(shape) + resize)
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    pre = Preprocess(resize=resize, crop=crop, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out = pre(rgb)
    assert out.dtype == torch.float32 and out.shape == (3, crop, crop)
    ref = reference_preprocess(rgb, resize, crop, IMAGENET_MEAN, IMAGENET_STD)
    # OpenCV interpolates uint8 in fixed point and rounds back to uint8: within one grey level of the reference.
    tol = 1.0 / 255.0 / min(IMAGENET_STD) + 1e-6
    assert (out.double() - ref).abs().max().item() <= tol


def test_imagenet_shape_arithmetic_on_a_wide_image():
    rgb = np.zeros((300, 400, 3), np.uint8)
    rgb[:, 200:] = 255
    out = Preprocess.imagenet()(rgb)
    assert out.shape == (3, 224, 224)
    # 300x400 -> 256x341; crop left = round((341-224)/2) = 58, so the white half starts at column 170-58 = 112.
    display = Preprocess.imagenet().to_display(out)
    assert display[100, 105:110].max() == 0 and display[100, 114:120].min() == 255


def test_no_resize_no_crop_is_a_plain_scaling(rgb):
    out = Preprocess()(rgb)
    torch.testing.assert_close(out, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255, rtol=0, atol=0)


def test_crop_larger_than_image_pads_with_zeros():
    rgb = np.full((4, 6, 3), 255, np.uint8)
    out = Preprocess(crop=8)(rgb)
    assert out.shape == (3, 8, 8)
    assert out.sum().item() == pytest.approx(3 * 4 * 6)  # the padding is zero
    assert out[:, 2:6, 1:7].min().item() == 1.0


def test_grayscale_uses_luma_and_one_channel():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (0, 0, 255)
    pre = Preprocess(grayscale=True, mean=(0.5,), std=(0.25,))
    out = pre(rgb)
    assert out.shape == (1, 2, 2)
    assert out[0, 0, 0].item() == pytest.approx((0.299 - 0.5) / 0.25, abs=1e-6)
    assert out[0, 1, 1].item() == pytest.approx((0.114 - 0.5) / 0.25, abs=1e-6)
    display = pre.to_display(out)
    assert display.shape == (2, 2, 3) and display[0, 0].tolist() == [76, 76, 76]  # round(0.299 * 255)


def test_to_display_inverts_normalization(rgb):
    pre = Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    np.testing.assert_array_equal(pre.to_display(pre(rgb)), rgb)
    np.testing.assert_array_equal(pre.to_display(pre(rgb)[None]), rgb)  # a batch of one works too


def test_to_display_clips():
    pre = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = torch.tensor([-5.0, 0.0, 5.0]).view(3, 1, 1).expand(3, 2, 2)
    assert pre.to_display(x)[0, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("kwargs,message", [
    (dict(resize=0), "resize"),
    (dict(crop=-3), "crop"),
    (dict(crop=2.5), "crop"),
    (dict(mean=(0.5, 0.5, 0.5)), "both"),
    (dict(mean=(0.5,), std=(0.5,)), "3 value"),
    (dict(mean=(0, 0, 0), std=(1, 0, 1)), "positive"),
    (dict(grayscale=True, mean=IMAGENET_MEAN, std=IMAGENET_STD), "1 value"),
])
def test_bad_preprocess_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preprocess(**kwargs)


def test_preprocess_rejects_non_uint8_rgb():
    with pytest.raises(TypeError, match="uint8 RGB"):
        Preprocess()(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="uint8 RGB"):
        Preprocess()(np.zeros((4, 4), np.uint8))


def test_load_image_and_load_images(tmp_path, rgb):
    a = write(tmp_path / "a.png", rgb[:, :, ::-1])
    b = write(tmp_path / "b.png", rgb[::-1, :, ::-1].copy())
    pre = Preprocess(resize=16, crop=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    batch = load_images([a, b], pre)
    assert batch.shape == (2, 3, 16, 16)
    torch.testing.assert_close(batch[0], load_image(a, pre))
    torch.testing.assert_close(batch[1], pre(rgb[::-1].copy()))
    assert load_image(a).shape == (3, 224, 224)  # default: ImageNet transform


def test_load_images_errors(tmp_path, rgb):
    a = write(tmp_path / "a.png", rgb)
    b = write(tmp_path / "b.png", rgb[:10])
    with pytest.raises(ValueError, match="differ in size.*b.png"):
        load_images([a, b], Preprocess())
    with pytest.raises(ValueError, match="at least one"):
        load_images([], Preprocess())
    with pytest.raises(ImageReadError, match="missing.png"):
        load_images([a, tmp_path / "missing.png"], Preprocess())
