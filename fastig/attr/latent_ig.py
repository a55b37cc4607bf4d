"""Latent Integrated Gradients: integrated gradients along a path through the DALL-E dVAE's latent space.

The baseline and the input are encoded, interpolated in the latent space (lerp or slerp), and every point is
decoded back to an image; straight pixel-space segments join the real baseline to the decoded baseline and the
decoded input to the real input, so the path runs from the baseline to the input exactly and the attributions
explain f(input) - f(baseline). See :class:`fastig.core.paths.LatentPath` for the points.
"""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from fastig.core.inputs import format_baselines, format_inputs, format_output
from fastig.attr._path_common import PathAttribution, check_flag, check_steps
from fastig.core import quadrature
from fastig.core.engine import integrate_idgi, integrate_moves
from fastig.core.paths import INTERPOLATIONS, LatentPath
from fastig.errors import CheckpointError, check_int
from fastig.io.images import IMAGENET_MEAN, IMAGENET_STD
from fastig.models.dvae import LATENTS, DVAEImageSpace

RULES = ("riemann_left", "riemann_trapezoid")
OPENAI_FILES = ("encoder.pkl", "decoder.pkl")  # OpenAI's originals, also accepted (converted files are preferred)
OPENAI_URL = "https://cdn.openai.com/dall-e/"


def dvae_files(folder: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The dVAE weight files in ``folder`` (default: the checkpoints folder, ``$FASTIG_CHECKPOINTS``):
    ``dvae_encoder.pt`` / ``dvae_decoder.pt`` (``fastig convert-dvae``), else OpenAI's ``encoder.pkl`` /
    ``decoder.pkl``. A missing file raises :class:`~fastig.errors.CheckpointError` naming it."""
    from fastig.models.checkpoints import checkpoint_dir
    from fastig.models.dvae import DECODER_FILE, ENCODER_FILE

    root = Path(folder).expanduser() if folder is not None else checkpoint_dir()
    if root.is_file():
        raise CheckpointError(f"the dVAE location must be a folder holding {ENCODER_FILE} and {DECODER_FILE}, "
                              f"got the file {root}")
    found = []
    for converted, original in zip((ENCODER_FILE, DECODER_FILE), OPENAI_FILES):
        if (root / converted).is_file():
            found.append(root / converted)
        elif (root / original).is_file():
            found.append(root / original)
        else:
            raise CheckpointError(
                f"latent IG needs the dVAE weight file {converted} in {root}: download OpenAI's {OPENAI_FILES[0]} "
                f"and {OPENAI_FILES[1]} ({OPENAI_URL}) and run `fastig convert-dvae encoder.pkl decoder.pkl --out "
                f"{root}` (or pass another folder with --dvae / dvae=)"
            )
    return found[0], found[1]


def check_options(options: dict) -> None:
    """Check the CLI/functional options of latent IG that can fail without a model (``rule``, ``dvae_size``,
    ``gap_steps``) and find the dVAE files (``dvae``), so a run names the problem before it starts any work."""
    if options.get("rule", RULES[0]) not in RULES:
        raise ValueError(f"latent IG's rule is one of {', '.join(RULES)}, got {options['rule']!r}")
    _check_dvae_size(options.get("dvae_size"))
    _check_gap_steps(options.get("gap_steps"))
    dvae_files(options.get("dvae"))


def _check_dvae_size(dvae_size) -> None:
    if dvae_size is not None and (isinstance(dvae_size, bool) or not isinstance(dvae_size, int)
                                  or dvae_size < 8 or dvae_size % 8):
        raise ValueError(f"dvae_size must be a positive multiple of 8 (e.g. 256) or None, got {dvae_size!r}")


def _check_gap_steps(gap_steps) -> None:
    check_int("gap_steps", gap_steps, none_ok=True, why="the gaps to the decoded endpoints must be closed")


def load_dvae(folder: str | os.PathLike | None = None):
    """(encoder, decoder) from :func:`dvae_files` ``(folder)``, read once per file version (cached by path, size
    and modification time, so building the method for every batch of a run does not reload ~400 MB)."""
    encoder_path, decoder_path = dvae_files(folder)
    return _load_cached(*(_identity(p) for p in (encoder_path, decoder_path)))


def _identity(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=1)
def _load_cached(encoder_id: tuple, decoder_id: tuple):
    from fastig.models.dvae import load_decoder, load_encoder

    return load_encoder(encoder_id[0]), load_decoder(decoder_id[0])


class LatentIntegratedGradients(PathAttribution):
    """Integrated gradients along a path decoded from the DALL-E dVAE's latent space, w.r.t. the classifier's input.

    ``LatentIntegratedGradients(model, dvae=None, mean=IMAGENET_MEAN, std=IMAGENET_STD)``: ``dvae`` is a folder
    holding the dVAE's weight files (:func:`dvae_files`; None = the checkpoints folder) or an ``(encoder,
    decoder)`` pair of :class:`fastig.models.dvae.Encoder` / ``Decoder``. ``mean``/``std`` describe how the
    classifier's inputs are normalized (``(pixels - mean) / std``, pixels in [0, 1]; for a zoo model,
    ``fastig.models.info(name).mean`` / ``.std``; the CLI's RGB models all use ImageNet's); the path converts between
    that space and the dVAE's (unnormalize, clamp to [0, 1], resize to the dVAE's size, ``map_pixels``; and back
    after decoding), so attributions are w.r.t. the classifier's input, whatever its size.

    The path (:class:`~fastig.core.paths.LatentPath`): ``gap_steps`` straight steps from the baseline to the
    decoded baseline, ``n_steps`` steps along the decoded latent interpolation, ``gap_steps`` straight steps from
    the decoded input to the input; points x_0 = baseline .. x_M = input, ``M = n_steps + 2 * gap_steps``.
    ``gap_steps=None`` takes ``ceil(n_steps / 4)``, so the whole path is refined as ``n_steps`` grows (the gap
    steps need classifier passes only, no decoder pass).

    Quadrature (``method``, Captum's name): ``"riemann_left"`` (default) is ``sum_k grad f(x_k) * (x_{k+1} -
    x_k)`` over k = 0 .. M-1; ``"riemann_trapezoid"`` averages the gradients at both ends of each segment
    (``sum_k (grad f(x_k) + grad f(x_{k+1})) / 2 * (x_{k+1} - x_k)``): one more gradient (at the input), and
    an error that falls as 1/M^2 instead of 1/M on the polyline through the points. Rules that evaluate between
    the decoded points (midpoint, Gauss-Legendre) are not offered: the decoded curve is only known at its
    points, and its tangent there would need a forward-mode pass through the decoder.

    ``interpolation``: ``"lerp"`` or ``"slerp"`` (great circle per latent position, lerp where the two vectors
    are nearly parallel). ``latent``: ``"embedding"`` (default; the decoder's first 1x1 conv of the soft codes,
    linear in them and 64x smaller), ``"probs"`` or ``"logits"`` (see
    :class:`~fastig.models.dvae.DVAEImageSpace`). ``dvae_size``: side of the square the dVAE sees (a multiple of
    8, e.g. 256, its training size); None = the classifier's size rounded up to a multiple of 8.

    ``alphas=``: non-uniform positions of the latent points (the interpolation parameter t of each decoded point,
    in (0, 1); 0 and 1 are added), replacing ``n_steps`` (``gap_steps`` then defaults to a quarter of their
    number): for example a :func:`~fastig.core.adaptive.fit_schedule` rule's alphas fitted on IG's straight line.
    The quadrature (``method``) and IDGI run over the polyline through the points, as with uniform steps, so
    weights are not used. ``n_steps="auto"`` is not offered: the decoded path is known only at its points, and
    the integrand the error estimate needs (the gradient times the path's tangent) would need a forward-mode or
    finite-difference pass through the decoder (which costs more than the classifier) at every point; refining
    the points also changes the polyline that is integrated.

    ``idgi=True``: IDGI over the same points (attributions sum to f(input) - f(baseline) up to rounding; the
    quadrature rule does not apply). ``output="probability"`` explains the softmax probability. Inputs: one image
    tensor [N, 3, H, W]; baselines as Captum's (default zeros, i.e. the mean image for ImageNet normalization).
    ``precision="bf16"|"fp16"`` autocasts the classifier's passes (the dVAE runs in fp32), as in
    :class:`~fastig.attr.IntegratedGradients`.

    After each call ``last_timings`` holds the seconds spent in the encoder, the decoder and in total (the rest
    is the classifier's passes and the accumulation), with the decoder's pass and image counts.
    """

    def __init__(
        self,
        forward_func: Callable,
        dvae: Any = None,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(forward_func)
        if isinstance(dvae, tuple) and len(dvae) == 2:
            self.encoder, self.decoder = dvae
        elif dvae is None or isinstance(dvae, (str, os.PathLike)):
            self.encoder, self.decoder = load_dvae(dvae)
        else:
            raise TypeError(f"dvae must be a folder, None (the checkpoints folder) or an (encoder, decoder) pair, "
                            f"got {type(dvae).__name__}")
        from fastig.models.dvae import Decoder, Encoder

        if not isinstance(self.encoder, Encoder) or not isinstance(self.decoder, Decoder):
            raise TypeError("dvae must hold a fastig.models.dvae.Encoder and Decoder")
        if self.encoder.vocab_size != self.decoder.vocab_size:
            raise ValueError(f"the dVAE encoder has {self.encoder.vocab_size} codes but the decoder "
                             f"{self.decoder.vocab_size}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.last_timings: dict[str, float] = {}

    def attribute(
        self,
        inputs: Any,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        n_steps: int = 50,
        method: str = "riemann_left",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        *,
        interpolation: str = "lerp",
        latent: str = "embedding",
        gap_steps: int | None = None,
        dvae_size: int | None = None,
        idgi: bool = False,
        output: str = "logit",
        alphas: Any = None,
        precision: str = "fp32",
    ) -> Any:
        started = time.perf_counter()
        check_flag("idgi", idgi)
        if n_steps == "auto":
            raise ValueError("latent IG has no n_steps='auto': its decoded path is known only at its points (give "
                             "n_steps or alphas=)")
        rule = method  # Captum's name in the signature, fastig's inside
        if rule not in RULES:
            raise ValueError(f"latent IG's quadrature (method=) is one of {', '.join(RULES)}, got {rule!r}: the "
                             "decoded path is known only at its points")
        xs, is_tuple = format_inputs(inputs)
        path = self.path(xs, baselines, n_steps=n_steps, interpolation=interpolation, latent=latent,
                         gap_steps=gap_steps, dvae_size=dvae_size, rule=rule, alphas=alphas)
        x, b = path.inputs, path.baselines
        tgt, args, engine = self._setup((x,), target, additional_forward_args, output, internal_batch_size, precision)

        if idgi:
            totals, outputs = integrate_idgi(engine, path, tgt, args)
        else:
            evaluated = path.n_steps - 1 if rule == "riemann_left" else path.n_steps
            totals, outputs = integrate_moves(engine, path, tgt, args, n_steps=evaluated)
        attributions = (totals[0].to(x.dtype),)
        f_end = outputs[-1] if outputs.shape[0] == path.n_steps else None
        result = format_output(attributions, is_tuple)
        if return_convergence_delta:
            result = (result, self._delta(engine, attributions, (x,), (b,), tgt, args, outputs[0], f_end))
        space = path.space
        self.last_timings = {"encoder_s": space.seconds["encoder"], "decoder_s": space.seconds["decoder"],
                             "total_s": time.perf_counter() - started, "decoder_passes": space.decoder_passes,
                             "decoded_images": space.decoded_images}
        return result

    def path(
        self,
        inputs: Any,
        baselines: Any = None,
        *,
        n_steps: int = 50,
        interpolation: str = "lerp",
        latent: str = "embedding",
        gap_steps: int | None = None,
        dvae_size: int | None = None,
        rule: str = "riemann_left",
        alphas: Any = None,
    ) -> LatentPath:
        """The :class:`~fastig.core.paths.LatentPath` that :meth:`attribute` integrates along (same arguments),
        e.g. to look at its decoded images: ``path.points(slice(0, path.n_steps), slice(0, n))``."""
        xs, _ = format_inputs(inputs)
        if len(xs) != 1:
            raise ValueError(f"latent IG explains one image tensor [N, 3, H, W], got {len(xs)} input tensors")
        x = xs[0]
        channels = self.encoder.input_channels
        if not x.is_floating_point() or x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"latent IG needs floating-point images [N, {channels}, H, W] (the dVAE's channels), "
                             f"got {x.dtype} of shape {tuple(x.shape)}")
        b = format_baselines(baselines, xs)[0]
        latent_alphas = None
        if alphas is not None:  # positions of the decoded points; the polyline's differences are the weights
            inner = [a for a in quadrature.custom_rule(alphas).alphas if 0.0 < a < 1.0]
            latent_alphas = [0.0, *inner, 1.0]
            n_steps = len(latent_alphas) - 1
        check_steps(n_steps)
        _check_gap_steps(gap_steps)
        gap_steps = math.ceil(n_steps / 4) if gap_steps is None else gap_steps
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        if latent not in LATENTS:
            raise ValueError(f"latent must be one of {', '.join(LATENTS)}, got {latent!r}")
        _check_dvae_size(dvae_size)
        self.encoder.to(x.device)
        self.decoder.to(x.device)
        space = DVAEImageSpace(self.encoder, self.decoder, self.mean, self.std, latent,
                               None if dvae_size is None else (dvae_size, dvae_size))
        return LatentPath(x, b, space, interpolation, n_steps, gap_steps, rule, latent_alphas)
