"""Baselines made from the image itself: the image with a random subset of its segments replaced.

A path method explains ``f(input) - f(baseline)``; with the default black (zero) baseline the question is "what
makes this image differ from nothing". A *segment baseline* asks what makes the image differ from the same image
with some of its regions removed. :class:`SegmentBaselines` describes how such baselines are drawn:

- **segments**: ``"slic"`` (fastig's SLIC-like superpixels, :func:`fastig.core.superpixels.superpixels`),
  ``"cv2"`` (OpenCV's SLICO from ``cv2.ximgproc``, needs ``opencv-contrib-python-headless``), ``"grid"``, or the
  user's own label maps: an integer tensor [N, H, W] / [N, 1, H, W] (or [1, ...] shared by all images), e.g. a
  semantic segmentation, or a callable ``images [N, C, H, W] -> labels``;
- **which**: for each baseline, ``round(fraction * K)`` of the image's K segments (at least one), drawn uniformly
  without replacement;
- **fill**: what replaces them: ``"blur"`` (the image blurred with a Gaussian of ``blur_sigma`` pixels),
  ``"mean"`` (the image's per-channel mean), ``"noise"`` (Gaussian noise with the image's per-channel mean and
  standard deviation), ``"telea"`` / ``"navier_stokes"`` (OpenCV's inpainting of the removed segments from the
  rest of the image), or any inpainting model ``inpaint(image, mask) -> image`` (:func:`inpaint`);
- **how many**: ``n_samples`` baselines per image. A path method given ``baselines=SegmentBaselines(...)`` (or
  ``baselines="segments"`` for the defaults) explains each image against each of its baselines in one batched
  call and returns the mean attribution (and mean convergence delta), as expected gradients averages over a
  baseline distribution. Every pixel outside the removed segments equals the image exactly.

Draws are seeded: the generator of image i is seeded with a hash of ``seed`` and the image's bytes, so an image
gets the same baselines whatever batch it is in, in any run, on any machine with the same inputs; different
images get different draws. :meth:`SegmentBaselines.describe` is the JSON record of the settings (what a run
store records); the draw itself (segments, masks, per-image seeds) is kept on the attribution object as
``last_baselines`` after each call.

The hook: :func:`sampled_baselines` wraps every path method's ``attribute()`` (:class:`fastig.attr._path_common.
PathAttribution` applies it to each subclass), so IG, its IDGI form, GNL-IG, Guided IG and latent IG all take
these baselines without code of their own. The CLI's ``--baselines segments --baseline-*`` flags become a spec in
:func:`from_options` (called by :func:`fastig.attribute`).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from fastig.core.superpixels import opencv_slic, superpixels
from fastig.errors import check_int

SEGMENTATIONS = ("slic", "grid", "cv2")
FILLS = ("blur", "mean", "noise", "telea", "navier_stokes")
INPAINTINGS = ("telea", "navier_stokes")
# the CLI / functional flat options and the SegmentBaselines field each sets
FLAT_OPTIONS = {"baseline_segmentation": "segments", "baseline_segments": "n_segments",
                "baseline_fraction": "fraction", "baseline_fill": "fill", "baseline_samples": "n_samples",
                "baseline_seed": "seed"}
BASELINE_KINDS = ("zeros", "segments")


@dataclass(frozen=True)
class SegmentBaselines:
    """How segment baselines are drawn (see the module docstring); validated on construction."""

    segments: Any = "slic"
    n_segments: int = 32
    fraction: float = 0.5
    fill: Any = "blur"
    n_samples: int = 4
    seed: int = 0
    blur_sigma: float = 10.0
    inpaint_radius: float = 3.0
    compactness: float = 1.0  # of the "slic" superpixels (larger: more grid-like)

    def __post_init__(self):
        if isinstance(self.segments, str):
            if self.segments not in SEGMENTATIONS:
                raise ValueError(f"segments must be one of {', '.join(SEGMENTATIONS)}, a label map tensor or a "
                                 f"callable, got {self.segments!r}")
        elif isinstance(self.segments, torch.Tensor):
            if self.segments.is_floating_point() or self.segments.dim() not in (3, 4):
                raise ValueError(f"a segments label map must be an integer tensor [N, H, W] or [N, 1, H, W], got "
                                 f"{self.segments.dtype} of shape {tuple(self.segments.shape)}")
        elif not callable(self.segments):
            raise TypeError(f"segments must be a name, a label map tensor or a callable, got "
                            f"{type(self.segments).__name__}")
        if isinstance(self.fill, str):
            if self.fill not in FILLS:
                raise ValueError(f"fill must be one of {', '.join(FILLS)} or a callable inpaint(image, mask) -> "
                                 f"image, got {self.fill!r}")
        elif not callable(self.fill):
            raise TypeError(f"fill must be a name or a callable inpaint(image, mask) -> image, got "
                            f"{type(self.fill).__name__}")
        check_int("n_segments", self.n_segments)
        check_int("n_samples", self.n_samples)
        check_int("seed", self.seed, 0)
        for name, low, high in (("fraction", 0.0, 1.0), ("blur_sigma", 0.0, None), ("inpaint_radius", 0.0, None),
                                ("compactness", 0.0, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low or (
                    high is not None and value > high):
                raise ValueError(f"{name} must be a number in ({low}, {'inf' if high is None else high}], "
                                 f"got {value!r}")

    def describe(self) -> dict:
        """The settings as plain JSON values (a label map or a callable is named by its type)."""
        record = asdict(self)
        for key in ("segments", "fill"):
            value = getattr(self, key)
            if isinstance(value, torch.Tensor):
                record[key] = f"label map {tuple(value.shape)}"
            elif not isinstance(value, str):
                record[key] = f"callable {getattr(value, '__qualname__', type(value).__name__)}"
        return record

    def draw(self, images: torch.Tensor) -> "SegmentDraw":
        """``n_samples`` baselines per image of ``images`` [N, C, H, W], image-major: row ``i * n_samples + s``
        is baseline s of image i."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"segment baselines need one floating-point image batch [N, C, H, W], got "
                             f"{getattr(images, 'dtype', type(images).__name__)} of shape "
                             f"{tuple(getattr(images, 'shape', ()))}")
        n, s = images.shape[0], self.n_samples
        labels = segment_labels(images, self.segments, self.n_segments, self.compactness)
        seeds = [image_seed(self.seed, x) for x in images]
        masks = torch.zeros((n * s, 1) + tuple(images.shape[2:]), dtype=torch.bool, device=images.device)
        noise_generators = []
        for i in range(n):
            generator = torch.Generator().manual_seed(seeds[i])
            ids = torch.unique(labels[i])
            count = min(len(ids), max(1, round(self.fraction * len(ids))))
            for k in range(s):
                chosen = ids[torch.randperm(len(ids), generator=generator)[:count].to(ids.device)]
                masks[i * s + k] = torch.isin(labels[i], chosen)
            noise_generators.append(generator)
        repeated = images.repeat_interleave(s, 0)
        filled = self._filled(images, repeated, masks, noise_generators)
        baselines = torch.where(masks, filled.to(images.dtype), repeated)
        return SegmentDraw(baselines, masks, labels, seeds, self.describe())

    def _filled(self, images, repeated, masks, generators) -> torch.Tensor:
        """What replaces the removed segments, for every baseline [N * S, C, H, W]."""
        s = self.n_samples
        if self.fill == "blur":
            return gaussian_blur_image(images, self.blur_sigma).repeat_interleave(s, 0)
        if self.fill == "mean":
            return images.mean((2, 3), keepdim=True).expand_as(images).repeat_interleave(s, 0)
        if self.fill == "noise":
            mean = images.mean((2, 3), keepdim=True)
            std = images.std((2, 3), keepdim=True)
            noise = torch.cat([torch.randn((s,) + tuple(images.shape[1:]), generator=g, dtype=torch.float64)
                               for g in generators]).to(images.device)
            return (mean.repeat_interleave(s, 0) + std.repeat_interleave(s, 0) * noise).to(images.dtype)
        inpainter = builtin_inpainter(self.fill, self.inpaint_radius) if isinstance(self.fill, str) else self.fill
        return torch.stack([inpaint(inpainter, x, m[0]) for x, m in zip(repeated, masks)])


@dataclass
class SegmentDraw:
    """One draw: ``baselines`` [N * S, C, H, W] (image-major), ``masks`` [N * S, 1, H, W] (True: replaced),
    ``labels`` [N, 1, H, W] (the segments), ``seeds`` (per image), ``settings`` (:meth:`SegmentBaselines.describe`)."""

    baselines: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    seeds: list[int]
    settings: dict = field(default_factory=dict)


def image_seed(seed: int, image: torch.Tensor) -> int:
    """A 63-bit seed from ``seed`` and the image's bytes: the same image always draws the same baselines."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(int(seed).to_bytes(8, "little"))
    data = image.detach().to("cpu").contiguous()
    digest.update(str((tuple(data.shape), str(data.dtype))).encode())
    digest.update(data.numpy().tobytes() if data.dtype != torch.bfloat16 else data.float().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


# ---- segments -----------------------------------------------------------------------------------------------


def segment_labels(images: torch.Tensor, segments: Any = "slic", n_segments: int = 32,
                   compactness: float = 1.0) -> torch.Tensor:
    """Integer label maps [N, 1, H, W] of ``images`` [N, C, H, W] by ``segments`` (see the module docstring)."""
    n, _, h, w = images.shape
    if isinstance(segments, str):
        if segments == "cv2":
            return opencv_slic(images, n_segments)
        return superpixels(images, n_segments, method=segments, compactness=compactness)
    labels = segments(images) if callable(segments) and not isinstance(segments, torch.Tensor) else segments
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        raise ValueError(f"segment labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
    labels = labels.unsqueeze(1) if labels.dim() == 3 else labels
    if labels.dim() != 4 or labels.shape[1] != 1 or tuple(labels.shape[2:]) != (h, w) or labels.shape[0] not in (1, n):
        raise ValueError(f"segment labels must have shape [{n} or 1, 1, {h}, {w}] (or without the 1), got "
                         f"{tuple(labels.shape)}")
    return labels.expand(n, 1, h, w).to(images.device)


# ---- fills --------------------------------------------------------------------------------------------------


def gaussian_blur_image(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-channel Gaussian blur over H and W (fastig's blur, :func:`fastig.core.paths.gaussian_blur`), with the
    zero padding's darkening at the borders undone: each pixel is divided by the weight its kernel had inside the
    image, so a constant image blurs to itself."""
    from fastig.core.paths import gaussian_blur

    ones = torch.ones((1, 1) + tuple(images.shape[2:]), dtype=torch.float64, device=images.device)
    weight = gaussian_blur(ones, sigma)
    return (gaussian_blur(images.to(torch.float64), sigma) / weight).to(images.dtype)


def builtin_inpainter(name: str, radius: float = 3.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A built-in inpainting as an ``inpaint(image, mask) -> image`` function, neighbourhood ``radius`` pixels.

    ``"navier_stokes"``: OpenCV's ``cv2.inpaint(..., cv2.INPAINT_NS)`` (Bertalmio et al. 2001), each channel in
    float32 as it is (no rounding to 8 bits, no colour conversion). ``"telea"``: Telea's method (2004),
    :func:`telea_inpaint`. OpenCV's own ``INPAINT_TELEA`` is not used: in the OpenCV installed here (5.0) it does
    not even reproduce a constant image (off by up to 1.4 grey levels in float32 and 8 bits; OpenCV issues #25404
    and #28648), where a weighted average of equal values must give that value.
    """
    import cv2

    if name not in INPAINTINGS:
        raise ValueError(f"the built-in inpaintings are {', '.join(INPAINTINGS)}, got {name!r}")
    if name == "telea":
        return functools.partial(telea_inpaint, radius=radius)

    def navier_stokes(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hole = mask.detach().to("cpu").numpy().astype(np.uint8)
        channels = [cv2.inpaint(np.ascontiguousarray(c), hole, float(radius), cv2.INPAINT_NS)
                    for c in image.detach().to("cpu", torch.float32).numpy()]
        return torch.from_numpy(np.stack(channels)).to(image.device, image.dtype)

    return navier_stokes


def telea_inpaint(image: torch.Tensor, mask: torch.Tensor, radius: float = 3.0) -> torch.Tensor:
    """Telea's inpainting (J. Telea, "An image inpainting technique based on the fast marching method", 2004) of
    ``image`` [C, H, W] where ``mask`` [H, W] is True, in float64.

    Each hole pixel p gets ``sum_q w(p, q) (I(q) + grad I(q) . (p - q)) / sum_q w(p, q)`` over the known pixels q
    within ``radius``, with Telea's weights: direction ``|(p - q) / |p - q| . N(p)|`` (N the unit normal of the
    distance field), distance ``1 / |p - q|^2`` and level set ``1 / (1 + |T(p) - T(q)|)``; ``grad I`` are finite
    differences over known pixels only. Pixels are filled in order of their distance T to the known region, in
    bands one pixel wide (``cv2.distanceTransform``) instead of the fast-marching heap, so a whole band is computed
    at once; a filled band counts as known for the next. A constant image, and a linear ramp, inpaint to
    themselves exactly (up to float64 rounding).
    """
    import cv2

    hole = mask.detach().to("cpu").numpy().astype(bool)
    x = image.detach().to("cpu", torch.float64).clone()
    c, h, w = x.shape
    distance = torch.from_numpy(cv2.distanceTransform(hole.astype(np.uint8), cv2.DIST_L2, 5)).double()
    normal_y, normal_x = torch.gradient(distance)
    length = torch.sqrt(normal_y ** 2 + normal_x ** 2).clamp_min(1e-12)
    normal_y, normal_x = normal_y / length, normal_x / length
    r = max(int(radius), 2)
    offsets = torch.tensor([(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
                            if 0 < dy * dy + dx * dx <= radius * radius or 0 < dy * dy + dx * dx <= 2])
    known = torch.from_numpy(~hole)
    band_of = torch.ceil(distance).long()
    hy, hx = torch.nonzero(torch.from_numpy(hole), as_tuple=True)
    bands = band_of[hy, hx]
    order = torch.argsort(bands, stable=True)
    hy, hx, bands = hy[order], hx[order], bands[order]
    starts = torch.searchsorted(bands, torch.unique(bands)).tolist() + [len(bands)]
    fallback = x[:, known].mean(1, keepdim=True) if bool(known.any()) else torch.zeros(c, 1, dtype=x.dtype)
    for first, stop in zip(starts[:-1], starts[1:]):
        py, px = hy[first:stop], hx[first:stop]
        qy, qx = py[:, None] + offsets[None, :, 0], px[:, None] + offsets[None, :, 1]  # [P, K]
        inside = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
        qy, qx = qy.clamp(0, h - 1), qx.clamp(0, w - 1)
        valid = inside & known[qy, qx]
        ry, rx = (py[:, None] - qy).double(), (px[:, None] - qx).double()
        squared = ry ** 2 + rx ** 2
        direction = ((ry * normal_y[py, px, None] + rx * normal_x[py, px, None]).abs() / squared.sqrt()).clamp_min(1e-6)
        level = 1.0 / (1.0 + (distance[py, px, None] - distance[qy, qx]).abs())
        weight = torch.where(valid, direction * level / squared, 0.0)
        value = (x[:, qy, qx] + _known_difference(x, known, qy, qx, 0) * ry
                 + _known_difference(x, known, qy, qx, 1) * rx)  # [C, P, K]: first-order extrapolation to p
        total = weight.sum(1)
        filled = (value * weight).sum(2) / total.clamp_min(1e-300)
        x[:, py, px] = torch.where(total > 0, filled, fallback)
        known[py, px] = True
    return x.to(image.device, image.dtype)


def _known_difference(x: torch.Tensor, known: torch.Tensor, qy: torch.Tensor, qx: torch.Tensor, axis: int):
    """The derivative of ``x`` [C, H, W] along H (axis 0) or W (axis 1) at the pixels (qy, qx), from known
    pixels only: central where both neighbours are known, one-sided where one is, 0 where none is."""
    h, w = known.shape
    size = (h, w)[axis]
    at = (qy, qx)[axis]
    ahead = (at + 1).clamp(max=size - 1)
    behind = (at - 1).clamp(min=0)
    if axis == 0:
        ya, xa, yb, xb = ahead, qx, behind, qx
    else:
        ya, xa, yb, xb = qy, ahead, qy, behind
    has_ahead = (at + 1 < size) & known[ya, xa]
    has_behind = (at > 0) & known[yb, xb]
    centre = x[:, qy, qx]
    forward = torch.where(has_ahead, x[:, ya, xa] - centre, 0.0)
    backward = torch.where(has_behind, centre - x[:, yb, xb], 0.0)
    count = has_ahead.double() + has_behind.double()
    return (forward + backward) / count.clamp_min(1.0)


def inpaint(inpainter: Callable, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``inpainter(image, mask)`` with its answer checked: ``image`` [C, H, W] (a model input), ``mask`` [H, W]
    bool (True: to fill); the result must be a tensor of the image's shape. Pixels outside the mask are kept from
    ``image`` whatever the inpainter returns there."""
    if not bool(mask.any()):
        return image
    if bool(mask.all()):
        raise ValueError("inpainting needs pixels outside the mask to fill it from: every segment was removed "
                         "(use a fraction below 1)")
    out = inpainter(image, mask)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(image.shape):
        raise ValueError(f"inpaint(image, mask) must return a tensor of the image's shape {tuple(image.shape)}, got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if out.is_floating_point() and not torch.isfinite(out).all():
        raise ValueError("inpaint(image, mask) returned NaN or infinite values")
    return torch.where(mask, out.to(image.device, image.dtype), image)


def pixel_space(inpainter: Callable, mean, std) -> Callable:
    """Wrap an inpainting model that works on pixels in [0, 1] (most do, e.g. DeepFill) so that it takes and
    returns model inputs normalized as ``(pixels - mean) / std``."""
    def in_pixels(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = torch.as_tensor(mean, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        s = torch.as_tensor(std, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        return (inpainter((image * s + m).clamp(0, 1), mask) - m) / s

    in_pixels.__qualname__ = f"pixel_space[{getattr(inpainter, '__qualname__', type(inpainter).__name__)}]"
    return in_pixels


# ---- the hook in the path methods ----------------------------------------------------------------------------


def as_spec(baselines: Any) -> SegmentBaselines | None:
    """The spec that ``baselines`` asks for, or None for ordinary (tensor / number / None) baselines."""
    if isinstance(baselines, SegmentBaselines):
        return baselines
    if isinstance(baselines, str):
        if baselines == "segments":
            return SegmentBaselines()
        raise ValueError(f"baselines given as a name must be 'segments' (or a SegmentBaselines spec), got "
                         f"{baselines!r}")
    return None


def from_options(options: dict) -> dict:
    """The functional/CLI form: ``baselines="segments"|"zeros"`` and the flat ``baseline_*`` options of
    :data:`FLAT_OPTIONS` -> ``baselines=SegmentBaselines(...)`` (or None for zeros). Other options pass through."""
    options = dict(options)
    flat = {key: options.pop(key) for key in list(options) if key in FLAT_OPTIONS}
    flat = {key: value for key, value in flat.items() if value is not None}  # None: not given (the CLI's default)
    kind = options.get("baselines")
    named = ", ".join(f"{key} (--{key.replace('_', '-')})" for key in sorted(flat))
    if not isinstance(kind, str):
        if flat:
            raise ValueError(f"{named} set how segment baselines are drawn: they need baselines='segments' "
                             "(--baselines segments)")
        return options
    if kind not in BASELINE_KINDS:
        raise ValueError(f"baselines must be one of {', '.join(BASELINE_KINDS)}, got {kind!r}")
    if kind == "zeros":
        if flat:
            raise ValueError(f"{named} need baselines='segments' (--baselines segments), not 'zeros'")
        options["baselines"] = None
    else:
        options["baselines"] = SegmentBaselines(**{FLAT_OPTIONS[k]: v for k, v in flat.items()})
    return options


# Captum's leading arguments of every path method's attribute(), by position
_LEADING = ("inputs", "baselines", "target", "additional_forward_args")


def sampled_baselines(attribute: Callable) -> Callable:
    """Let ``attribute(self, inputs, baselines=SegmentBaselines(...) | "segments", target, ...)`` explain each
    image against ``n_samples`` drawn baselines in one call and return the mean (see the module docstring).
    Ordinary baselines pass straight through."""

    @functools.wraps(attribute)
    def with_sampled_baselines(self, *args, **kwargs):
        spec = as_spec(args[1] if len(args) > 1 else kwargs.get("baselines"))
        if spec is None:
            return attribute(self, *args, **kwargs)
        leading = dict(zip(_LEADING, args))
        kwargs = dict(kwargs)
        for key in _LEADING:
            if key in kwargs:
                if key in leading:
                    raise TypeError(f"attribute() got multiple values for argument {key!r}")
                leading[key] = kwargs.pop(key)
        inputs = leading.get("inputs")
        if not isinstance(inputs, torch.Tensor):
            raise ValueError("segment baselines explain one image tensor [N, C, H, W]; inputs is "
                             f"{type(inputs).__name__}")
        n, s = inputs.shape[0], spec.n_samples
        draw = spec.draw(inputs)
        expanded = {"inputs": inputs.repeat_interleave(s, 0), "baselines": draw.baselines,
                    "target": _repeat_target(leading.get("target"), n, s),
                    "additional_forward_args": _repeat_args(leading.get("additional_forward_args"), n, s)}
        result = _call(attribute, self, expanded, args[len(_LEADING):], kwargs)
        self.last_baselines = draw
        if isinstance(result, tuple):  # (attributions, convergence delta)
            attributions, delta = result
            return _mean_over_samples(attributions, n, s), _mean_over_samples(delta, n, s)
        return _mean_over_samples(result, n, s)

    return with_sampled_baselines


def _call(attribute, self, leading: dict, rest: tuple, kwargs: dict):
    if rest:  # positional arguments after Captum's four: pass all of them by position
        return attribute(self, *(leading.get(k) for k in _LEADING), *rest, **kwargs)
    return attribute(self, **leading, **kwargs)


def _repeat_target(target: Any, n: int, s: int) -> Any:
    """A per-example target repeated for each example's ``s`` baselines (image-major)."""
    if isinstance(target, torch.Tensor) and target.dim() == 1 and target.numel() == n:
        return target.repeat_interleave(s)
    if isinstance(target, list) and len(target) == n:
        return [t for t in target for _ in range(s)]
    return target


def _repeat_args(args: Any, n: int, s: int) -> Any:
    def one(arg):
        if isinstance(arg, torch.Tensor) and arg.dim() > 0 and arg.shape[0] == n:
            return arg.repeat_interleave(s, 0)
        return arg

    if args is None:
        return None
    return tuple(one(a) for a in args) if isinstance(args, tuple) else one(args)


def _mean_over_samples(values: torch.Tensor, n: int, s: int) -> torch.Tensor:
    grouped = values.reshape((n, s) + tuple(values.shape[1:]))
    return grouped.to(torch.float64).mean(1).to(values.dtype) if values.is_floating_point() else grouped[:, 0]
