"""Insecurity maps (Wang & Vasconcelos, "Deliberative Explanations: visualizing network insecurities", NeurIPS 2019).

For an image, the classifier's top-K classes (K = 5) each get an attribution map over the spatial positions of a
layer, and a difficulty score gets one too. At every position the three classes with the largest maps form the
candidate ambiguities ("atoms"): their pairs (i < j), deduplicated over the image. The insecurity map of a pair
(a, b) is ``map_a * map_b * difficulty_map``, resized to the input size; its top fraction r of positions is the
insecurity's region.

What is computed follows the authors' released code (``insecurity_*.py``), where it is more precise than the
paper's text:

- class maps: ``sum_c a_c * g_c`` (gradient x activation summed over channels) with ``g`` the gradient of the
  class logit; then negative values are replaced by 1e-7 (zeros stay zero);
- difficulty map, ``attribution="gradient"``: ``sum_c a_c * max(g_c, 0)`` with ``g`` the gradient of the score;
- ``attribution="ig"``: the path runs in the input space from ``baselines`` to the input in ``ig_steps`` equal
  steps (``ig_steps + 1`` points, alpha = k / ig_steps, gradients averaged with equal weights); class maps
  ``sum_c (a_c(x) - a_c(x0)) * mean g_c``; the difficulty map clamps each channel's product at 0 before the sum;
- ``attribution="2ndg"``: 2ndG only for the difficulty map (``sum_c a_c max(g_c, 0) + 0.5 |a_p^T H_pp a_p|``,
  :mod:`fastig.attr.second_order`); the class maps are the gradient ones. (The classifier's logits are
  piecewise linear in a ReLU network's activations, so their Hessian vanishes; the released code applies 2ndG to
  the difficulty score only.)
- difficulty scores: ``"hp"`` the hardness predictor's sigmoid output (its trunk holds a layer of the same name),
  ``"cs"`` 1 - the top softmax probability, ``"entropy"`` the softmax entropy divided by log(number of classes).
- the three classes per position are the last three of a stable ascending sort of the K maps (numpy's argsort on
  K <= 16 values, as the released code sorts them), so ties are broken the same way.

Speed: all K class maps (and, for ``cs``/``entropy``, the difficulty map) come from one forward pass per batch of
images, as vector-Jacobian products of one backward graph that stops at the layer
(:func:`layer_gradients_of_scores`); the released code runs one backward pass per class through the whole network,
and 2ndG with one backward pass per channel and position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastig import _ops
from fastig.attr._layers import batched_vjp, capture, resolve_layer
from fastig.attr.second_order import second_order_terms
from fastig.core import progress
from fastig.core.engine import CPU_BATCH_BYTES
from fastig.errors import check_int

ATTRIBUTIONS = ("gradient", "ig", "2ndg")
DIFFICULTIES = ("hp", "cs", "entropy")
CLASS_MAP_FLOOR = 1e-7  # the released code's value for negative class attributions
CLASSES_PER_LOCATION = 3  # the released code's topKcls


# --- difficulty scores -------------------------------------------------------------------------------------


def confidence_difficulty(logits: torch.Tensor) -> torch.Tensor:
    """``cs``: 1 - the largest softmax probability, per row of [N, classes] logits."""
    return 1 - torch.softmax(logits, dim=1).max(dim=1).values


def entropy_difficulty(logits: torch.Tensor) -> torch.Tensor:
    """``entropy``: the softmax entropy divided by log(classes) (so in [0, 1]), per row of [N, classes] logits."""
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(1) / math.log(logits.shape[1])


SCORES = {"cs": confidence_difficulty, "entropy": entropy_difficulty}  # logits -> [N] difficulty


class DifficultyScore(torch.nn.Module):
    """``x -> [N]``: the ``cs`` or ``entropy`` difficulty of the classifier's prediction (for 2ndG's HVPs)."""

    def __init__(self, classifier: torch.nn.Module, kind: str):
        super().__init__()
        self.classifier, self.kind = classifier, kind

    def forward(self, *inputs):
        return SCORES[self.kind](self.classifier(*inputs))


# --- K maps from one forward pass --------------------------------------------------------------------------


def layer_gradients_of_scores(
    model: Callable, layer: torch.nn.Module, inputs: torch.Tensor, scores: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass of ``model`` and the gradients of several scores per example w.r.t. the layer's output.

    ``scores(outputs) -> [n, J]`` picks each example's ``J`` scores from the model's outputs. Returns the layer's
    activations [n, C, ...], the scores [n, J] (detached) and their gradients [n, J, C, ...]: ``J``
    vector-Jacobian products of one backward graph that stops at the layer (:func:`fastig.attr._layers.batched_vjp`).
    This is the one place where the K class maps come from one pass; the engine's several-targets-per-pass can
    take its place.
    """
    with torch.enable_grad():
        with capture(layer) as found:
            values = scores(model(inputs))
        acts = found[0][0]
        n, j = values.shape
        cotangents = torch.eye(j, dtype=values.dtype, device=values.device).unsqueeze(1).expand(j, n, j)
        grads = batched_vjp(values, acts, cotangents)
    progress.pulse()
    return acts.detach(), values.detach(), grads.transpose(0, 1)


# --- results -----------------------------------------------------------------------------------------------


@dataclass
class Insecurities:
    """The insecurities of one image.

    ``classes`` [K] the top-K classes by probability (most probable first) and ``probabilities`` [K];
    ``difficulty`` the difficulty score; ``class_maps`` [K, h, w] and ``difficulty_map`` [h, w] at the layer's
    resolution (class maps after the 1e-7 floor); ``pair_ranks`` [P, 2] the ambiguous pairs as positions in
    ``classes`` (i < j, in lexicographic order) and ``pairs`` [P, 2] as class ids; ``maps`` [P, H, W] their
    insecurity maps at the input's size.
    """

    classes: torch.Tensor
    probabilities: torch.Tensor
    difficulty: float
    class_maps: torch.Tensor
    difficulty_map: torch.Tensor
    pair_ranks: torch.Tensor
    pairs: torch.Tensor
    maps: torch.Tensor

    def strongest(self, n: int | None = None) -> list[int]:
        """Indices of the pairs, strongest insecurity (largest sum of its map) first."""
        order = torch.argsort(self.maps.flatten(1).sum(1), descending=True, stable=True).tolist()
        return order if n is None else order[:n]

    def masks(self, fraction: float) -> torch.Tensor:
        """[P, H, W] bool: each map's top ``fraction`` of positions (:func:`top_fraction_mask`)."""
        return top_fraction_mask(self.maps, fraction)


def ambiguous_pairs(class_maps: torch.Tensor, per_location: int = CLASSES_PER_LOCATION) -> torch.Tensor:
    """[P, 2] positions (i < j) in the top-K list of the pairs among the ``per_location`` largest class maps at
    each position, deduplicated over the image and sorted lexicographically. ``class_maps``: [K, *spatial]."""
    k = class_maps.shape[0]
    per_location = min(per_location, k)
    top = torch.sort(class_maps.reshape(k, -1), dim=0, stable=True).indices[k - per_location:]
    top = top.sort(dim=0).values  # [per_location, positions], ascending rank at each position
    pairs = [torch.stack([top[i], top[j]], 1) for i in range(per_location) for j in range(i + 1, per_location)]
    if not pairs:
        return torch.zeros(0, 2, dtype=torch.long)
    return torch.unique(torch.cat(pairs), dim=0)


def top_fraction_mask(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """The positions of each map [..., H, W] strictly above its m-th largest value, m = int(fraction * H * W): the
    released code's threshold ``np.sort(map.flatten())[int(-r * H * W)]``. (Where m = 0 that index would be the
    smallest value and keep nearly everything; here the mask is then empty.)"""
    if not 0 < fraction < 1:
        raise ValueError(f"the mask fraction must lie in (0, 1), got {fraction!r}")
    flat = maps.flatten(-2)
    m = int(fraction * flat.shape[-1])
    if m < 1:
        return torch.zeros(maps.shape, dtype=torch.bool, device=maps.device)
    threshold = torch.topk(flat, m, dim=-1).values[..., -1:]
    return (flat > threshold).reshape(maps.shape)


def insecurity_maps(class_maps: torch.Tensor, difficulty_map: torch.Tensor, pair_ranks: torch.Tensor,
                    size: tuple[int, int]) -> torch.Tensor:
    """[P, H, W]: ``map_a * map_b * difficulty_map`` for each pair, bilinearly resized to ``size`` (OpenCV's
    INTER_LINEAR, which the released code uses: half-pixel centers, no antialiasing)."""
    products = class_maps[pair_ranks[:, 0]] * class_maps[pair_ranks[:, 1]] * difficulty_map
    if products.shape[0] == 0:
        return products.new_zeros((0,) + tuple(size))
    return F.interpolate(products.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


# --- the method --------------------------------------------------------------------------------------------


class InsecurityMaps:
    """Deliberative explanations: the ambiguous class pairs of each image, their insecurity maps and its
    difficulty score (see the module docstring for exactly what is computed).

    ``model``: the classifier (``nn.Module``, eval mode: batched rows must be independent); ``layer``: one of its
    modules or a dotted name (``"features.42"`` for VGG16-BN's conv5_3 ReLU, the paper's layer); ``attribution``:
    ``"gradient"``, ``"ig"`` or ``"2ndg"``; ``difficulty``: ``"hp"`` (needs ``hardness_predictor``, a
    :class:`~fastig.deliberative.hardness.HardnessPredictor` whose trunk has the same layer name), ``"cs"`` or
    ``"entropy"``; ``top_k``: the classes considered (5 in the paper); ``ig_steps``: IG's steps (50 in the
    released code).
    """

    def __init__(self, model: torch.nn.Module, layer: torch.nn.Module | str, attribution: str = "gradient",
                 difficulty: str = "hp", hardness_predictor: torch.nn.Module | None = None, top_k: int = 5,
                 ig_steps: int = 50) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"InsecurityMaps needs a torch.nn.Module, got {type(model).__name__}")
        if attribution not in ATTRIBUTIONS:
            raise ValueError(f"attribution must be one of {', '.join(ATTRIBUTIONS)}, got {attribution!r}")
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
        check_int("top_k", top_k, 2, why="pairs of classes")
        check_int("ig_steps", ig_steps)
        self.model, self.attribution, self.difficulty = model, attribution, difficulty
        self.top_k, self.ig_steps = top_k, ig_steps
        self.layer = resolve_layer(model, layer)
        if difficulty == "hp":
            if hardness_predictor is None:
                raise ValueError("difficulty='hp' needs a hardness_predictor (see fastig.deliberative.hardness)")
            trunk = getattr(hardness_predictor, "trunk", None)
            if not isinstance(trunk, torch.nn.Module):
                raise TypeError("hardness_predictor must be a HardnessPredictor (a module with a .trunk)")
            name = next(n for n, m in model.named_modules() if m is self.layer)
            self.difficulty_module: torch.nn.Module = hardness_predictor
            self.difficulty_layer = resolve_layer(trunk, name)
        else:
            self.difficulty_module = DifficultyScore(model, difficulty)
            self.difficulty_layer = self.layer

    def attribute(self, images: torch.Tensor, baselines: Any = None, batch_size: int | None = None
                  ) -> list[Insecurities]:
        """The :class:`Insecurities` of each image of ``images`` [N, C, H, W], computed ``batch_size`` images at a
        time (None: about 8 MiB of input per batch). ``baselines`` (IG only): the path's start, a number or a
        tensor [1 or N, C, H, W]; None is zeros (the CLI passes the normalized black image, as the released code)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor [N, C, H, W], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        n = images.shape[0]
        if batch_size is None:
            batch_size = max(1, CPU_BATCH_BYTES // (images[0].numel() * images.element_size()))
        check_int("batch_size", batch_size, none_ok=True)
        base = _baselines(baselines, images)
        results: list[Insecurities] = []
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            results += self._batch(images[rows], base if base.shape[0] == 1 else base[rows])
        return results

    # -- one batch of images -------------------------------------------------------------------------------

    def _batch(self, x: torch.Tensor, baseline: torch.Tensor) -> list[Insecurities]:
        shared_pass = self.difficulty != "hp" and self.attribution != "2ndg"  # difficulty from the classifier's pass
        top: dict[str, torch.Tensor] = {}

        def pick(outputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
            """Each row's class logits (and its difficulty score, when it comes from the same pass)."""
            picked = outputs.gather(1, classes.to(outputs.device))
            if shared_pass:
                picked = torch.cat([picked, SCORES[self.difficulty](outputs).unsqueeze(1)], 1)
            return picked

        def top_classes(logits: torch.Tensor) -> torch.Tensor:
            if logits.dim() != 2 or logits.shape[1] < self.top_k:
                raise ValueError(f"the model must return [N, classes] logits with at least top_k={self.top_k} "
                                 f"classes, got shape {tuple(logits.shape)}")
            top["logits"] = logits.detach()
            top["probabilities"], top["classes"] = torch.softmax(top["logits"], 1).topk(self.top_k, dim=1)
            return top["classes"]

        if self.attribution == "ig":  # the classes are needed before the path: one more forward pass
            with torch.no_grad():
                top_classes(self.model(x))
            progress.pulse()
            acts, start, grads = _path_gradients(self.model, self.layer, x, baseline, self.ig_steps,
                                                 lambda out, rows: pick(out, top["classes"][rows]))
            class_maps = ((acts - start).unsqueeze(1) * grads[:, : self.top_k]).sum(2)
        else:  # the top classes from the same forward pass as their gradients
            acts, _, grads = layer_gradients_of_scores(self.model, self.layer, x,
                                                       lambda out: pick(out, top_classes(out)))
            class_maps = (acts.unsqueeze(1) * grads[:, : self.top_k]).sum(2)
        class_maps = torch.where(class_maps < 0, torch.full_like(class_maps, CLASS_MAP_FLOOR), class_maps)
        logits, probabilities, classes = top["logits"], top["probabilities"], top["classes"]

        scores = None if self.difficulty == "hp" else SCORES[self.difficulty](logits)
        if shared_pass:
            score_grad = grads[:, self.top_k]
        elif self.attribution == "ig":
            acts, start, score_grad = _path_gradients(self.difficulty_module, self.difficulty_layer, x, baseline,
                                                      self.ig_steps, lambda out, rows: out.reshape(-1, 1))
            score_grad = score_grad[:, 0]
        elif self.attribution == "gradient":
            acts, values, score_grad = layer_gradients_of_scores(self.difficulty_module, self.difficulty_layer, x,
                                                                 lambda out: out.reshape(-1, 1))
            score_grad, scores = score_grad[:, 0], values[:, 0]
        if self.attribution == "2ndg":
            first, quad = second_order_terms(self.difficulty_module, self.difficulty_layer, (x,))
            difficulty_map = first + 0.5 * quad.abs()
        elif self.attribution == "ig":
            difficulty_map = ((acts - start) * score_grad).clamp(min=0).sum(1)
        else:
            difficulty_map = (acts * score_grad.clamp(min=0)).sum(1)

        if scores is None:  # the hardness predictor's output at the images, where no pass above gave it
            with torch.no_grad():
                scores = self.difficulty_module(x).reshape(-1)
            progress.pulse()
        size = tuple(x.shape[2:])
        results = []
        for i in range(x.shape[0]):
            ranks = ambiguous_pairs(class_maps[i]).to(classes.device)
            results.append(Insecurities(
                classes=classes[i].cpu(), probabilities=probabilities[i].cpu(), difficulty=float(scores[i]),
                class_maps=class_maps[i].cpu(), difficulty_map=difficulty_map[i].cpu(), pair_ranks=ranks.cpu(),
                pairs=classes[i][ranks].cpu(),
                maps=insecurity_maps(class_maps[i], difficulty_map[i], ranks.to(class_maps.device), size).cpu(),
            ))
        return results


def _baselines(baselines: Any, images: torch.Tensor) -> torch.Tensor:
    if baselines is None:
        baselines = 0.0
    if isinstance(baselines, (int, float)) and not isinstance(baselines, bool):
        return torch.full((1,) + tuple(images.shape[1:]), float(baselines), dtype=images.dtype, device=images.device)
    if not isinstance(baselines, torch.Tensor) or baselines.dim() != 4 or baselines.shape[1:] != images.shape[1:] \
            or baselines.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"baselines must be None, a number or a tensor [1 or N, C, H, W] matching the images "
                         f"{tuple(images.shape)}")
    return baselines.to(device=images.device, dtype=images.dtype)


def _path_gradients(model: Callable, layer: torch.nn.Module, x: torch.Tensor, baseline: torch.Tensor, steps: int,
                    scores: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The released code's IG at a layer: the layer's activations at the input and at the baseline, and the mean
    over the ``steps + 1`` points ``x0 + (k / steps) (x - x0)`` of the gradients of each example's scores
    ([m, J, C, ...]), a batch of points per forward pass."""
    m = x.shape[0]
    alphas = torch.tensor([k / steps for k in range(steps + 1)], dtype=torch.float64)
    per_pass = max(1, CPU_BATCH_BYTES // (x[0].numel() * x.element_size()))
    steps_per_pass = max(1, per_pass // m)
    total = at_input = at_baseline = None
    for s0 in range(0, steps + 1, steps_per_pass):
        chunk = alphas[s0:s0 + steps_per_pass]
        points = _ops.path_points(x, baseline.expand_as(x), chunk)
        rows = torch.arange(m).repeat(len(chunk))  # step-major
        acts, _, grads = layer_gradients_of_scores(model, layer, points, lambda out: scores(out, rows))
        grads = grads.reshape((len(chunk), m) + tuple(grads.shape[1:]))
        acts = acts.reshape((len(chunk), m) + tuple(acts.shape[1:]))
        total = grads.sum(0) if total is None else total + grads.sum(0)
        if s0 == 0:
            at_baseline = acts[0]
        at_input = acts[-1]
    return at_input, at_baseline, total / (steps + 1)

