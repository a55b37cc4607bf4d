"""fastig.io.images: decoding every kind of file to uint8 RGB, clear errors, and the preprocessing transform."""

import os
import struct
import sys
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastig.errors import FastigError, ImageReadError
from fastig.io.images import (IMAGENET_MEAN, IMAGENET_STD, MAX_ASPECT, MAX_PIXELS, Preprocess, _is_truncated_jpeg,
                              _resize_kept, load_image, load_images, read_image)
from fastig.io.imagesize import image_size

sys.path.insert(0, str(Path(__file__).parent))
from _limits import memory_limit  # noqa: E402


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

    def refuse(*args, **kwargs):  # what opening a file without read permission raises
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ImageReadError, match="cannot read.*locked.png.*Permission denied"):
        read_image(path)


def test_jpeg_end_marker_check(rgb):
    ok, data = cv2.imencode(".jpg", rgb)
    data = data.tobytes()
    as_array = bytes
    assert not _is_truncated_jpeg(as_array(data))
    assert not _is_truncated_jpeg(as_array(data + b"trailing bytes after the end marker"))
    assert _is_truncated_jpeg(as_array(data[:-2]))
    assert _is_truncated_jpeg(as_array(data[: len(data) // 2]))
    ok, png = cv2.imencode(".png", rgb)
    assert not _is_truncated_jpeg(png.tobytes())


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


@pytest.mark.parametrize("shape", [(40, 60), (64, 48), (33, 33), (20, 90), (3, 200), (300, 4)])
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


# ---- bounded memory: header checks before decoding, crop before resizing (issue 16, item 5) ----


def _png(width, height, bit_depth=8, colour_type=2, rows=b""):
    """A PNG file with the given IHDR and ``rows`` (raw scanlines, filter bytes included) as its zlib data."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _huge_blank_png(side):
    """A valid side x side 1-bit grey PNG of zeros (a few tens of kB that decode to side^2 bytes or more)."""
    line = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(line * 1000) for _ in range(side // 1000)) + packer.compress(line * (side % 1000))
    data += packer.flush()

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_a_huge_image_is_refused_from_its_header_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_huge_blank_png(20000))  # ~60 kB; decoding it would take 400 MB grey, 1.2 GB as RGB
    assert path.stat().st_size < 200_000
    with memory_limit(300 << 20):
        with pytest.raises(ImageReadError, match=r"huge.png is 20000x20000 \(400,000,000 pixels\), more than"):
            read_image(path)


@pytest.mark.parametrize("shape", [(1, 20000), (60000, 1)])
def test_a_long_thin_image_is_refused_for_its_aspect_ratio(tmp_path, shape):
    path = write(tmp_path / "thin.png", np.zeros(shape + (3,), np.uint8))  # 1x20000: 3.7 GB once resized before
    with memory_limit(300 << 20):
        with pytest.raises(ImageReadError, match=f"thin.png.*{shape[1]}x{shape[0]}.*aspect ratio"):
            load_image(path)


def test_the_bounds_are_configurable_and_an_image_within_them_loads(tmp_path, rgb):
    path = write(tmp_path / "a.png", rgb[:, :, ::-1])  # 30x20
    with pytest.raises(ImageReadError, match="600 pixels"):
        read_image(path, max_pixels=599)
    with pytest.raises(ImageReadError, match="aspect ratio 1.5:1"):
        read_image(path, max_aspect=1.4)
    np.testing.assert_array_equal(read_image(path, max_pixels=600, max_aspect=1.5), rgb)
    assert MAX_PIXELS == 1 << 26 and MAX_ASPECT == 256


def test_preprocess_crops_before_resizing_a_long_thin_array():
    """A 1 x 20000 row resized to 256 x 5,120,000 and center-cropped: only the crop is ever computed."""
    row = np.random.default_rng(0).integers(0, 256, (1, 20000, 3), dtype=np.uint8)
    with memory_limit(200 << 20):
        out = Preprocess(resize=256, crop=224)(row)
    assert out.shape == (3, 224, 224)
    # float64 reference: every resized row is the input row (one source row); columns are bilinear at the crop's
    # pixel centres, src = (j + left + 0.5) * w / new_w - 0.5, clamped at the ends (np.interp clamps)
    new_w = 256 * 20000
    left = int(round((new_w - 224) / 2.0))
    src = (np.arange(224) + left + 0.5) * (20000 / new_w) - 0.5
    expected = np.stack([np.interp(src, np.arange(20000), row[0, :, c].astype(np.float64)) for c in range(3)])
    assert np.abs(out[:, 0, :].numpy() * 255 - expected).max() <= 0.5 + 1e-3
    assert torch.equal(out, out[:, :1, :].expand_as(out))


def test_preprocess_without_crop_bounds_its_output():
    with memory_limit(200 << 20):
        with pytest.raises(ValueError, match="resize=256 makes.*pixels"):
            Preprocess(resize=256)(np.zeros((1, 20000, 3), np.uint8))


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = {}

    def read():
        try:
            read_image(fifo)
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked in open(): release it by opening the write end, then fail
        os.close(os.open(fifo, os.O_WRONLY))
        reader.join(10)
        pytest.fail("read_image blocked on a FIFO")
    assert isinstance(result.get("error"), ImageReadError)
    assert "not a regular file" in str(result["error"]) and "pipe.png" in str(result["error"])


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_device_file_is_refused():
    with memory_limit(200 << 20):
        with pytest.raises(ImageReadError, match="not a regular file.*/dev/zero"):
            read_image("/dev/zero")


def test_an_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.png"
    with open(path, "wb") as f:  # sparse: no disk used
        f.write(_png(4, 4, rows=b"\x00" * 13 * 4))
        f.truncate(8 << 30)
    with memory_limit(200 << 20):
        with pytest.raises(ImageReadError, match="big.png.*8.0 GiB.*larger than"):
            read_image(path)


# Every format this OpenCV build encodes: the size read from the header is the image's.
FORMATS = [".png", ".jpg", ".bmp", ".tif", ".webp", ".ppm", ".pgm", ".pbm", ".pam", ".pfm", ".ras", ".hdr", ".jp2",
           ".avif", ".gif"]


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("height,width", [(41, 67), (70, 33)])
def test_header_size_of_every_format(tmp_path, ext, height, width):
    image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if ext in (".pgm", ".pbm"):
        image = image[:, :, 0]
    if ext in (".pfm", ".hdr"):
        image = image.astype(np.float32) / 255
    try:
        ok, data = cv2.imencode(ext, image)
    except cv2.error:
        ok = False
    if not ok:
        pytest.skip(f"this OpenCV build cannot write {ext}")
    assert image_size(data.tobytes()) == (width, height)
    path = tmp_path / f"image{ext}"
    path.write_bytes(data.tobytes())
    assert read_image(path).shape == (height, width, 3)


def test_header_variants_and_garbage():
    assert image_size(_png(7, 5)) == (7, 5)
    assert image_size(b"P6 # a comment\n 12 # another\n 9\n255\n") == (12, 9)
    assert image_size(b"BM" + bytes(12) + struct.pack("<Iii", 40, 30, -20)) == (30, 20)  # top-down BMP
    assert image_size(b"BM" + bytes(12) + struct.pack("<Ihh", 12, 30, 20)) == (30, 20)  # OS/2 core header
    bigtiff = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + struct.pack("<Q", 2)
    bigtiff += struct.pack("<HHQQ", 256, 16, 1, 5000) + struct.pack("<HHQQ", 257, 3, 1, 7)
    assert image_size(bigtiff) == (5000, 7)
    j2k = b"\xff\x4f\xff\x51" + struct.pack(">HHIIII", 41, 0, 110, 60, 10, 20)
    assert image_size(j2k) == (100, 40)
    for garbage in [b"", b"not an image", b"\x89PNG\r\n\x1a\n\x00", b"\xff\xd8\xff\xe0\x00", b"II*\x00\xff\xff\xff\x7f",
                    b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"P6\n12", b"\x00\x00\x00\x0cjP  \r\n\x87\n\x00\x00\x00\x01",
                    np.random.default_rng(1).bytes(64)]:
        assert image_size(garbage) is None, garbage


def test_header_of_jpeg_variants_and_lossy_webp():
    image = np.random.default_rng(3).integers(0, 256, (37, 52, 3), dtype=np.uint8)
    ok, progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert image_size(progressive.tobytes()) == (52, 37)
    # an APP1 (EXIF) segment holding a thumbnail with its own frame header comes first: it must be skipped
    ok, thumbnail = cv2.imencode(".jpg", image[:8, :9])
    app1 = b"Exif\x00\x00" + thumbnail.tobytes()
    with_exif = b"\xff\xd8\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + progressive.tobytes()[2:]
    assert image_size(with_exif) == (52, 37)
    for params in ([cv2.IMWRITE_WEBP_QUALITY, 80], []):  # lossy VP8 and lossless VP8L
        ok, webp = cv2.imencode(".webp", image, params)
        assert image_size(webp.tobytes()) == (52, 37)
    ok, webp_alpha = cv2.imencode(".webp", np.dstack([image, image[:, :, :1]]), [cv2.IMWRITE_WEBP_QUALITY, 80])
    assert image_size(webp_alpha.tobytes()) == (52, 37)


@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (256, 256), (100, 700), (60, 50), (3000, 40)])
def test_resizing_only_the_kept_pixels_agrees_with_opencv(shape):
    """The pixels a crop keeps, interpolated alone: within one grey level of OpenCV's resize, then crop."""
    rgb = cv2.GaussianBlur(np.random.default_rng(shape[0]).integers(0, 256, shape + (3,), dtype=np.uint8), (3, 3), 0)
    h, w = shape
    new_h, new_w = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
    kept = _resize_kept(rgb, (new_h, new_w), (top, 224), (left, 224))
    assert kept.dtype == np.uint8 and kept.shape == (224, 224, 3)
    assert np.abs(kept.astype(int) - resized[top:top + 224, left:left + 224]).max() <= 1
