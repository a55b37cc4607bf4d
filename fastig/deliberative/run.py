"""A deliberative-explanations run over a dataset (``fastig deliberate``), and hardness-predictor training on one
(``fastig train-hardness``).

A run: (1) the difficulty score of every test image; (2) the ``hard`` most difficult ones; (3) their insecurity
maps, evaluated against the dataset's ground truth and class-pair table (:mod:`fastig.deliberative.evaluation`),
with a picture for the first ``pictures`` of them; (4) one HDF5 file ``OUT/deliberative.h5`` and the curve plots.

Resume: every finished step is written atomically under ``OUT/deliberative.parts/`` (``run.json`` holds the run's
identity: everything that changes its numbers, weight files by their sha256, the seed of random weights). A rerun
with the same settings skips what is done; one with other settings is refused (``overwrite=True`` starts over).
A kill loses at most the image in flight. The final store is rewritten from the parts, atomically, at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

import fastig
from fastig import models
from fastig.core import progress
from fastig.deliberative import evaluation
from fastig.deliberative.hardness import HardnessPredictor, load_hardness, save_hardness, train_hardness
from fastig.deliberative.insecurity import ATTRIBUTIONS, DIFFICULTIES, InsecurityMaps, SCORES
from fastig.deliberative.pictures import hard_image_picture, save_curves, save_png
from fastig.errors import FastigError, check_int
from fastig.io.ade20k import Ade20k, ObjectTable, read_label_map
from fastig.io.cub200 import Cub200
from fastig.io.datasets import DatasetError
from fastig.io.images import Preprocess, read_image
from fastig.models.checkpoints import file_sha256, load_checkpoint

STORE = "deliberative.h5"
PARTS = "deliberative.parts"
FORMAT = "fastig-deliberative/1"


class DeliberateError(FastigError):
    """A deliberative run that cannot start as asked (settings that conflict with what ``--out`` holds, ...)."""


@dataclass
class Settings:
    """Everything a run depends on. ``weights``/``hardness``: ``"none"`` (random, seeded by ``seed``) or a file."""

    model: str
    layer: str
    dataset: str
    weights: str = "none"
    attribution: str = "gradient"
    difficulty: str = "cs"
    hardness: str = "none"
    hard: int = 100
    top_k: int = 5
    ig_steps: int = 50
    input_size: int | None = None
    batch_size: int = 8
    seed: int = 0
    pictures: int = 10
    picture_fraction: float = 0.1
    device: str = "cpu"

    def check(self) -> None:
        if self.attribution not in ATTRIBUTIONS:
            raise DeliberateError(f"attribution must be one of {', '.join(ATTRIBUTIONS)}, got {self.attribution!r}")
        if self.difficulty not in DIFFICULTIES:
            raise DeliberateError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {self.difficulty!r}")
        for name in ("hard", "ig_steps", "batch_size"):
            check_int(name, getattr(self, name), error=DeliberateError)
        check_int("top_k", self.top_k, 2, why="pairs of classes", error=DeliberateError)
        check_int("pictures", self.pictures, 0, error=DeliberateError)
        check_int("input_size", self.input_size, 8, none_ok=True, why="pixels", error=DeliberateError)
        if not 0 < self.picture_fraction < 1:
            raise DeliberateError(f"picture_fraction must lie in (0, 1), got {self.picture_fraction}")
        for name in ("weights", "hardness"):
            value = getattr(self, name)
            if value != "none" and not Path(value).is_file():
                raise DeliberateError(f"{name}: no such file {value!r} (give a checkpoint file or 'none')")


# --- datasets ----------------------------------------------------------------------------------------------


def open_dataset(root) -> Cub200 | Ade20k:
    """The CUB-200-2011 or ADE20K tree at ``root`` (or in the folder it names), told apart by their index files."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root}")
    if (root / "images.txt").exists() or (root / "CUB_200_2011").is_dir():
        return Cub200.read(root)
    if (root / "sceneCategories.txt").exists() or (root / "ADEChallengeData2016").is_dir():
        return Ade20k.read(root)
    raise DatasetError(f"{root} is neither a CUB-200-2011 tree (images.txt, or a CUB_200_2011 folder) nor an "
                       "ADE20K tree (sceneCategories.txt, or an ADEChallengeData2016 folder)")


def _image_id(dataset, index: int) -> str:
    return str(dataset.image_path(index).relative_to(dataset.root))


# --- models ------------------------------------------------------------------------------------------------


def build_classifier(name: str, num_classes: int, weights: str, seed: int) -> torch.nn.Module:
    """A zoo architecture with ``num_classes`` outputs: random (seeded) for ``weights="none"``, else the file's
    weights (safe loader; keys and shapes checked)."""
    spec = models.info(name)
    torch.manual_seed(seed)
    try:
        model = spec.builder(num_classes=num_classes)
    except TypeError:
        raise DeliberateError(f"model {name!r} has a fixed number of classes; choose another model") from None
    if weights != "none":
        load_checkpoint(model, weights)
    return model.eval()


def _preprocess(settings: Settings) -> Preprocess:
    spec = models.info(settings.model)
    if settings.input_size is not None:
        return Preprocess(resize=settings.input_size, crop=settings.input_size, mean=spec.mean, std=spec.std)
    return Preprocess(resize=spec.resize_size, crop=spec.input_size, mean=spec.mean, std=spec.std)


def _identity(settings: Settings, dataset) -> dict:
    """What makes a run's numbers: the settings, weight files by sha256, the dataset and its size."""
    identity = asdict(settings)
    for name in ("weights", "hardness"):
        if identity[name] != "none":
            identity[name] = "sha256:" + file_sha256(identity[name])
    identity["dataset"] = str(Path(dataset.root).resolve())
    identity["dataset_kind"] = type(dataset).__name__
    identity["dataset_images"] = len(dataset)
    if settings.difficulty != "hp":
        identity["hardness"] = "unused"
    if settings.attribution != "ig":
        identity["ig_steps"] = "unused"
    for name in ("batch_size", "pictures", "picture_fraction"):  # they do not change the numbers
        identity.pop(name)
    identity["fastig"] = fastig.__version__
    return identity


# --- resume parts ------------------------------------------------------------------------------------------


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_npz(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError):
        return None  # a part that cannot be read is redone


def _open_parts(out: Path, identity: dict, overwrite: bool) -> Path:
    parts = out / PARTS
    if overwrite:
        shutil.rmtree(parts, ignore_errors=True)
        (out / STORE).unlink(missing_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    header = parts / "run.json"
    if header.exists():
        try:
            held = json.loads(header.read_text())
        except (OSError, ValueError):
            raise DeliberateError(f"{header} is unreadable; delete it or pass --overwrite") from None
        if held != identity:
            diff = ", ".join(f"{k}: {held.get(k)!r} there vs {identity.get(k)!r} now"
                             for k in sorted(set(held) | set(identity)) if held.get(k) != identity.get(k))
            raise DeliberateError(f"{out} holds a run with other settings ({diff}); use another --out or --overwrite")
    else:
        tmp = header.with_suffix(".tmp")
        tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
        os.replace(tmp, header)
    return parts


# --- the run -----------------------------------------------------------------------------------------------


@dataclass
class Summary:
    store: Path
    test_images: int
    hard_images: int
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    areas: dict[str, float] = field(default_factory=dict)
    pictures: list[Path] = field(default_factory=list)


def run(settings: Settings, out, overwrite: bool = False, show_progress: bool = True) -> Summary:
    """Run deliberative explanations as the module docstring describes; returns where the results are and the
    mean curves and their areas (precision-recall AUC, and the mean over r of each measure)."""
    settings.check()
    out = Path(out)
    dataset = open_dataset(settings.dataset)
    device = torch.device(settings.device)
    n_classes = len(dataset.class_names)
    if settings.top_k > n_classes:
        raise DeliberateError(f"top_k={settings.top_k} exceeds the dataset's {n_classes} classes")
    classifier = build_classifier(settings.model, n_classes, settings.weights, settings.seed).to(device)
    predictor = None
    if settings.difficulty == "hp":
        if settings.hardness == "none":
            torch.manual_seed(settings.seed + 1)
            predictor = HardnessPredictor.from_classifier(classifier)
        else:
            predictor = load_hardness(settings.hardness, classifier)
        predictor = predictor.to(device).eval()
    maps = InsecurityMaps(classifier, settings.layer, settings.attribution, settings.difficulty, predictor,
                          settings.top_k, settings.ig_steps)
    preprocess = _preprocess(settings)
    geometry = evaluation.InputGeometry(preprocess.resize, preprocess.crop)
    parts = _open_parts(out, _identity(settings, dataset), overwrite)
    test = dataset.test_indices
    if len(test) == 0:
        raise DeliberateError(f"{dataset.root} has no test images")

    with progress.task(f"deliberate {settings.attribution}/{settings.difficulty}", total=3, unit="stages",
                       show=show_progress) as stages:
        scores = _scores(parts, dataset, test, classifier, predictor, settings, preprocess, device)
        stages.advance()
        hard = test[np.argsort(-scores["difficulty"], kind="stable")[: settings.hard]]
        table = _pair_table(parts, dataset)
        stages.advance()
        black = ((torch.zeros(1, 3, 1, 1) - torch.tensor(preprocess.mean).reshape(1, 3, 1, 1))
                 / torch.tensor(preprocess.std).reshape(1, 3, 1, 1))
        with progress.task("insecurity maps", total=len(hard), unit="images") as task:
            for position in range(0, len(hard), settings.batch_size):
                batch = [(p, int(i)) for p, i in enumerate(hard[position:position + settings.batch_size], position)
                         if _load_npz(parts / f"hard-{p:06d}.npz") is None]
                if batch:
                    _hard_batch(batch, dataset, maps, table, geometry, preprocess, black, parts, out, settings, device)
                task.advance(min(settings.batch_size, len(hard) - position))
        stages.advance()
    return _write_store(out, parts, dataset, scores, hard, settings)


def _load(dataset, index: int, preprocess: Preprocess) -> tuple[torch.Tensor, tuple[int, int]]:
    rgb = read_image(dataset.image_path(index))
    return preprocess(rgb), rgb.shape[:2]


def _scores(parts, dataset, test, classifier, predictor, settings, preprocess, device) -> dict:
    """Every test image's prediction, confidence and difficulty score (saved as one part)."""
    done = _load_npz(parts / "scores.npz")
    if done is not None and len(done["difficulty"]) == len(test):
        return done
    predictions, confidences, difficulty = [], [], []
    with progress.task("difficulty scores", total=len(test), unit="images") as task:
        for start in range(0, len(test), settings.batch_size):
            rows = test[start:start + settings.batch_size]
            x = torch.stack([_load(dataset, int(i), preprocess)[0] for i in rows]).to(device)
            with torch.no_grad():
                logits = classifier(x)
                probabilities = torch.softmax(logits, 1)
                score = predictor(x) if predictor is not None else SCORES[settings.difficulty](logits)
            progress.pulse()
            predictions.append(probabilities.argmax(1).cpu().numpy())
            confidences.append(probabilities.max(1).values.cpu().numpy())
            difficulty.append(score.reshape(-1).double().cpu().numpy())
            task.advance(len(rows))
    scores = {"index": np.asarray(test), "predictions": np.concatenate(predictions),
              "confidences": np.concatenate(confidences), "difficulty": np.concatenate(difficulty)}
    _save_npz(parts / "scores.npz", **scores)
    return scores


def _pair_table(parts: Path, dataset):
    if isinstance(dataset, Cub200):
        return dataset.shared_parts()
    cached = _load_npz(parts / "object_presence.npz")
    presence = cached["presence"] if cached is not None else dataset.object_presence()
    if cached is None:
        _save_npz(parts / "object_presence.npz", presence=presence)
    return ObjectTable.build(presence)


def _hard_batch(batch, dataset, maps, table, geometry, preprocess, black, parts, out, settings, device) -> None:
    """Insecurity maps, evaluation and pictures of a batch of hard images; one part file per image."""
    loaded = [_load(dataset, index, preprocess) for _, index in batch]
    x = torch.stack([t for t, _ in loaded]).to(device)
    results = maps.attribute(x, baselines=black.expand(1, 3, *x.shape[2:]).to(device), batch_size=len(batch))
    for (position, index), (tensor, (h, w)), result in zip(batch, loaded, results):
        insecurity = result.maps.double().numpy()
        pairs = result.pairs.numpy()
        arrays = dict(index=np.int64(index), difficulty=np.float64(result.difficulty),
                      classes=result.classes.numpy(), probabilities=result.probabilities.double().numpy(),
                      pairs=pairs, pair_ranks=result.pair_ranks.numpy(),
                      class_maps=result.class_maps.float().numpy(), difficulty_map=result.difficulty_map.float().numpy())
        if isinstance(dataset, Cub200):
            xy, inside = geometry.points(dataset.parts[index, :, :2], h, w)
            visible = (dataset.parts[index, :, 2] > 0) & inside
            arrays["recall"], arrays["precision"] = evaluation.part_curves(insecurity, pairs, xy, visible, table)
            truth = {"parts": (xy, visible)}
        else:
            labels = geometry.label_map(read_label_map(dataset.annotations[index]))
            arrays["recall"], arrays["precision"], arrays["iou"] = evaluation.object_curves(insecurity, pairs, labels,
                                                                                             table)
            truth = {"labels": labels}
        if position < settings.pictures:
            _picture(out, position, index, dataset, tensor, result, table, truth, preprocess, settings)
        _save_npz(parts / f"hard-{position:06d}.npz", **arrays)


def _picture(out, position, index, dataset, tensor, result, table, truth, preprocess, settings) -> Path:
    names = [dataset.display_name(int(c)) for c in result.classes]
    ambiguities = []
    masks = result.masks(settings.picture_fraction)
    for p in result.strongest(3):
        a, b = result.pair_ranks[p].tolist()
        ambiguities.append(dict(names=(names[a], names[b]),
                                probabilities=(float(result.probabilities[a]), float(result.probabilities[b])),
                                map=result.maps[p].numpy(), mask=masks[p].numpy(),
                                shared=table.shared(int(result.classes[a]), int(result.classes[b]))))
    label = dataset.display_name(int(dataset.labels[index]))
    title = (f"#{position + 1} {_image_id(dataset, index)}: true {label}, predicted {names[0]}, "
             f"{settings.difficulty} difficulty {result.difficulty:.3f} ({settings.attribution})")
    image = preprocess.to_display(tensor)
    scale = max(1, 224 // image.shape[0])
    picture = hard_image_picture(image, title, ambiguities, settings.picture_fraction, scale=scale, **truth)
    return save_png(out / "pictures" / f"hard_{position + 1:04d}.png", picture)


def _write_store(out: Path, parts: Path, dataset, scores: dict, hard: np.ndarray, settings: Settings) -> Summary:
    rows = [_load_npz(parts / f"hard-{p:06d}.npz") for p in range(len(hard))]
    if any(r is None for r in rows):
        raise DeliberateError(f"some hard images have no results in {parts}; rerun to finish them")
    measures = ["recall", "precision"] + (["iou"] if isinstance(dataset, Ade20k) else [])
    curves = {m: evaluation.mean_curve(np.stack([r[m] for r in rows])) for m in measures}
    areas = {"precision_recall": evaluation.area_under(curves["recall"], curves["precision"])}
    areas.update({f"mean_{m}": float(np.nanmean(curves[m])) if np.isfinite(curves[m]).any() else float("nan")
                  for m in measures})
    tmp = out / (STORE + ".tmp")
    string = h5py.string_dtype()
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["settings"] = (parts / "run.json").read_text()
        f.attrs["fastig_version"] = fastig.__version__
        f.create_dataset("classes/names", data=[dataset.display_name(c) for c in range(len(dataset.class_names))],
                         dtype=string)
        s = f.create_group("scores")
        s["index"] = scores["index"]
        s.create_dataset("ids", data=[_image_id(dataset, int(i)) for i in scores["index"]], dtype=string)
        s["labels"] = dataset.labels[scores["index"]]
        for name in ("predictions", "confidences", "difficulty"):
            s[name] = scores[name]
        g = f.create_group("hard")
        g["index"] = hard
        g.create_dataset("ids", data=[_image_id(dataset, int(i)) for i in hard], dtype=string)
        g["labels"] = dataset.labels[hard]
        for name in ("difficulty", "classes", "probabilities", "class_maps", "difficulty_map"):
            g.create_dataset(name, data=np.stack([r[name] for r in rows]), compression="gzip")
        g["pair_offsets"] = np.concatenate([[0], np.cumsum([len(r["pairs"]) for r in rows])])
        g["pairs"] = np.concatenate([r["pairs"].reshape(-1, 2) for r in rows]).astype(np.int64)
        for m in measures:
            g[m] = np.stack([r[m] for r in rows])
        c = f.create_group("curves")
        c["fractions"] = evaluation.FRACTIONS
        for m in measures:
            c[m] = curves[m]
        for name, value in areas.items():
            c.attrs[name] = value
    os.replace(tmp, out / STORE)
    title = f"{settings.model} {settings.layer}: {settings.attribution}, {settings.difficulty}"
    save_curves(out, evaluation.FRACTIONS, curves, title)
    done = sorted((out / "pictures").glob("hard_*.png")) if (out / "pictures").exists() else []
    return Summary(out / STORE, len(scores["index"]), len(hard), curves, areas, done)


# --- hardness-predictor training ----------------------------------------------------------------------------


class _ShuffledBatches:
    """Batches of (images, labels) of the given dataset indices, reshuffled (seeded) on every pass."""

    def __init__(self, dataset, indices, preprocess, batch_size, seed, device):
        self.dataset, self.indices, self.preprocess = dataset, np.asarray(indices), preprocess
        self.batch_size, self.device = batch_size, device
        self.generator = np.random.default_rng(seed)

    def __iter__(self):
        order = self.indices[self.generator.permutation(len(self.indices))]
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            x = torch.stack([_load(self.dataset, int(i), self.preprocess)[0] for i in rows]).to(self.device)
            yield x, torch.as_tensor(self.dataset.labels[rows]).to(self.device)


def train_on_dataset(model: str, weights: str, dataset_root, out, epochs: int = 1, batch_size: int = 16,
                     lr: float = 1e-5, weight_decay: float = 1e-3, seed: int = 0, input_size: int | None = None,
                     device: str = "cpu", show_progress: bool = True) -> list[float]:
    """Train a hardness predictor for the classifier on the dataset's training images; writes the checkpoint
    ``out`` (a state_dict) and returns the mean loss of each epoch."""
    settings = Settings(model=model, layer="", dataset=str(dataset_root), weights=weights, input_size=input_size,
                        batch_size=batch_size, seed=seed)
    if weights != "none" and not Path(weights).is_file():
        raise DeliberateError(f"weights: no such file {weights!r} (give a checkpoint file or 'none')")
    check_int("epochs", epochs, error=DeliberateError)
    check_int("batch_size", batch_size, 2, why="the predictor's BatchNorm trains on batches", error=DeliberateError)
    dataset = open_dataset(dataset_root)
    train = dataset.train_indices
    if len(train) < 2:
        raise DeliberateError(f"{dataset.root} has fewer than two training images")
    classifier = build_classifier(model, len(dataset.class_names), weights, seed).to(device)
    torch.manual_seed(seed + 1)
    predictor = HardnessPredictor.from_classifier(classifier).to(device)
    batches = _ShuffledBatches(dataset, train, _preprocess(settings), batch_size, seed, device)
    with progress.task("train-hardness", total=None, unit="stages", show=show_progress):
        history = train_hardness(classifier, predictor, batches, epochs, lr, weight_decay)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_hardness(predictor.cpu(), out)
    return history
