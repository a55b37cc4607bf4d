"""Datasets of image files: class folders, the ImageNet validation layouts, plain lists; index selection; decoding.

A dataset is a fixed, ordered list of :class:`Sample` (file, label or None, id). Its order never depends on the
file system's listing order (names are sorted), so index ``i`` means the same image on every machine and in every
run: that is what ``--start/--stride/--end`` select and what shards of a many-GPU run split.

Layouts (``open_dataset(root, layout)``; ``"auto"`` detects them in this order):

- ``list``: ``root`` is a text file, one image path per line (relative to the file's folder), optionally followed
  by whitespace and an integer label; empty lines and lines starting with ``#`` are ignored.
- ``imagenet_loc``: a flat folder of images and ``LOC_val_solution.csv`` (Kaggle's ImageNet localization
  challenge; the first synset of each row's PredictionString is the label). Class indices follow
  ``LOC_synset_mapping.txt`` when it sits in the folder or its parent, else the ImageNet class list that ships
  with fastig (:mod:`fastig.io.imagenet_classes`) when the CSV names only ImageNet synsets, else the sorted
  synsets of the CSV.
- ``imagenet_devkit``: a flat folder of ``ILSVRC2012_val_XXXXXXXX.JPEG`` images and the devkit's
  ``ILSVRC2012_validation_ground_truth.txt`` (line k is the label of image k). The devkit numbers classes by
  ILSVRC2012_ID, which is *not* the class order of torchvision models (sorted synsets); the devkit's ``meta.mat``,
  found next to the ground-truth file, converts them. Without it the layout is refused rather than mislabelled.
- ``tiny_imagenet``: ``val/images`` + ``val/val_annotations.txt`` (Tiny ImageNet); ``root`` is the dataset folder
  or its ``val`` folder. Class indices: the sorted synsets of ``wnids.txt`` (or of ``train/``'s folders, or of the
  annotations), as ``ImageFolder`` over ``train/`` numbers them.
- ``places365``: Places365's validation images (``val_256/`` or ``val_large/``, ``places365_val.txt``,
  ``categories_places365.txt``) or a subset folder with its own label file: see :mod:`fastig.io.places365`.
- ``folder``: one sub-folder per class, images anywhere below it (``ImageFolder``). When every folder is named by
  an ImageNet wnid (``n02123045``), the class index is that class's ImageNet index (281), so a subset of the
  classes keeps the labels an ImageNet model predicts; otherwise it is the rank of the folder name in sorted order.
- ``flat``: a folder of images without labels.

Only files with an image extension are listed; a listed file that turns out unreadable is not an error here: the
run skips it and records why (see :func:`decode`). Labels that cannot be found are ``None``. Each dataset says how
its class indices were assigned (``class_mapping``) and which folder its images' relative paths start from
(``image_root``; see :meth:`ImageDataset.relative_path`).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from fastig.errors import FastigError, ImageReadError, check_int
from fastig.io import imagenet_classes

LAYOUTS = ("auto", "list", "imagenet_loc", "imagenet_devkit", "tiny_imagenet", "places365", "folder", "flat")
# Layouts read by modules of their own, which register here when fastig.io is imported (fastig.io.places365):
# name -> (detect(root, labels) -> bool, open(root, labels) -> ImageDataset), checked before "folder"
READERS: dict[str, tuple[Callable, Callable]] = {}
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                              ".pbm", ".pnm"})
LOC_CSV = "LOC_val_solution.csv"
LOC_SYNSETS = "LOC_synset_mapping.txt"
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
TINY_ANNOTATIONS = "val_annotations.txt"


class DatasetError(FastigError):
    """A dataset root that is missing, of an unknown layout, or whose label files are malformed."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: its file, its class index (None when unknown) and a stable id (relative path)."""

    path: Path
    label: int | None
    id: str


@dataclass
class ImageDataset:
    """An ordered, indexable list of samples. ``notes``: facts about the labels worth telling the user;
    ``class_mapping``: how class indices were assigned (None: no labels); ``image_root``: the folder relative
    image paths start from (None for a list of files named one by one)."""

    samples: list[Sample]
    root: Path
    layout: str
    classes: list[str] | None = None  # class names (synsets, folder names) by index, when known
    notes: list[str] = field(default_factory=list)
    class_mapping: str | None = None
    image_root: Path | None = None

    def __post_init__(self) -> None:
        if self.image_root is None and self.layout != "images":
            self.image_root = self.root if self.root.is_dir() else self.root.parent

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def relative_path(self, sample: Sample) -> str:
        """The sample's file relative to ``image_root`` (POSIX separators), or its absolute path when it lies
        outside it (or the dataset has no ``image_root``)."""
        path = Path(os.path.abspath(sample.path))
        if self.image_root is not None:
            try:
                return path.relative_to(os.path.abspath(self.image_root)).as_posix()
            except ValueError:
                pass
        return path.as_posix()


# ---- opening --------------------------------------------------------------------------------------------------


def open_dataset(root, layout: str = "auto", labels=None) -> ImageDataset:
    """Open the dataset at ``root`` in ``layout`` (see the module docstring); ``labels``: the label file to use
    instead of the one the layout looks for (the CSV, ground-truth or annotations file)."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    if not root.exists():
        raise DatasetError(f"dataset not found: {root}")
    labels = None if labels is None else Path(labels)
    if labels is not None and not labels.is_file():
        raise DatasetError(f"label file not found: {labels}")
    if layout == "auto":
        layout = detect_layout(root, labels)
    if layout != "list" and not root.is_dir():
        raise DatasetError(f"layout {layout!r} needs a folder, got the file {root}")
    opener = {"list": _open_list, "imagenet_loc": _open_loc, "imagenet_devkit": _open_devkit,
              "tiny_imagenet": _open_tiny, "folder": _open_folder, "flat": _open_flat,
              **{name: reader for name, (_, reader) in READERS.items()}}[layout]
    dataset = opener(root, labels)
    if not dataset.samples:
        raise DatasetError(f"no image files found in {root} (layout {layout})")
    return dataset


def image_list(paths: Sequence) -> ImageDataset:
    """A dataset of the given image files, in the given order, without labels; ids are the paths as given."""
    samples = [Sample(Path(p), None, str(p)) for p in paths]
    return ImageDataset(samples, Path("."), "images")


def detect_layout(root: Path, labels: Path | None = None) -> str:
    """The layout of ``root`` (see the module docstring for the order of the checks)."""
    if root.is_file():
        return "list"
    name = labels.name if labels is not None else None
    if name == LOC_CSV or (name is None and (root / LOC_CSV).is_file()):
        return "imagenet_loc"
    if name == DEVKIT_TRUTH or (name is None and _find_devkit_truth(root) is not None):
        return "imagenet_devkit"
    if name == TINY_ANNOTATIONS or (name is None and _tiny_val_dir(root) is not None):
        return "tiny_imagenet"
    for name, (detect, _) in READERS.items():
        if detect(root, labels):
            return name
    if labels is not None:
        raise DatasetError(f"cannot tell the layout from the label file {labels}; give --layout")
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return "folder"
    return "flat"


def _image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` sorted by name (below it when ``recursive``); hidden files are left out."""
    if recursive:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath) / f for f in filenames if _is_image_name(f)]
        return sorted(found, key=lambda p: p.relative_to(folder).as_posix())
    return sorted((p for p in folder.iterdir() if p.is_file() and _is_image_name(p.name)), key=lambda p: p.name)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _relative_id(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _open_folder(root: Path, _labels) -> ImageDataset:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if folders and all(name in imagenet_classes.INDEX for name in folders):
        label_of, classes = imagenet_classes.INDEX, list(imagenet_classes.WNIDS)
        mapping = "imagenet"
        notes = [f"class folders are ImageNet wnids: labels are their ImageNet class indices ({len(folders)} of "
                 "1000 classes present)"]
    else:
        label_of, classes = {name: k for k, name in enumerate(folders)}, folders
        mapping = "sorted folder names"
        notes = [f"class folders: labels 0..{len(folders) - 1} in sorted folder-name order"]
    samples = [Sample(path, label_of[name], _relative_id(path, root))
               for name in folders for path in _image_files(root / name, recursive=True)]
    return ImageDataset(samples, root, "folder", classes, notes, mapping)


def _open_flat(root: Path, _labels) -> ImageDataset:
    samples = [Sample(p, None, p.name) for p in _image_files(root)]
    return ImageDataset(samples, root, "flat", notes=["flat folder: images have no labels"])  # (no mapping)


def _open_list(root: Path, _labels) -> ImageDataset:
    if not root.is_file():
        raise DatasetError(f"layout 'list' needs a text file of image paths, got the folder {root}")
    samples = []
    for number, line in enumerate(_read_lines(root), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        label = None
        if len(parts) == 2 and re.fullmatch(r"-?\d+", parts[1]):
            line, label = parts[0], int(parts[1])
            if label < 0:
                raise DatasetError(f"{root}:{number}: negative label {label}")
        path = Path(line) if Path(line).is_absolute() else root.parent / line
        samples.append(Sample(path, label, line))
    return ImageDataset(samples, root, "list", class_mapping="labels of the list file")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None


def _synset_index(synsets: Sequence[str]) -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(synsets)}


def _open_loc(root: Path, labels: Path | None) -> ImageDataset:
    csv_path = labels or root / LOC_CSV
    first_synset = {}
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"cannot read {csv_path}: {e}") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise DatasetError(f"{csv_path} is not a LOC_val_solution.csv (expected the header ImageId,PredictionString)")
    for number, row in enumerate(rows[1:], 2):
        if len(row) < 2 or not row[1].split():
            raise DatasetError(f"{csv_path}:{number}: expected 'ImageId,PredictionString', got {row}")
        first_synset[row[0].strip()] = row[1].split()[0]
    notes = []
    mapping = next((p for p in (root / LOC_SYNSETS, root.parent / LOC_SYNSETS) if p.is_file()), None)
    named = set(first_synset.values())
    if mapping is not None:
        classes = [line.split()[0] for line in _read_lines(mapping) if line.strip()]
        class_mapping = str(mapping.resolve())
    elif named <= set(imagenet_classes.INDEX):
        classes, class_mapping = list(imagenet_classes.WNIDS), "imagenet"
        notes.append(f"no {LOC_SYNSETS} found: class indices are the ImageNet indices of fastig's class list")
    else:
        classes, class_mapping = sorted(named), f"sorted synsets of {csv_path.name}"
        notes.append(f"no {LOC_SYNSETS} found and {csv_path.name} names synsets outside ImageNet: class indices are "
                     f"its {len(classes)} sorted synsets (check the labels)")
    index = _synset_index(classes)
    unknown = sorted(set(first_synset.values()) - set(index))
    if unknown:
        raise DatasetError(f"{csv_path} names synsets missing from {mapping}: {', '.join(unknown[:5])}")
    samples = [Sample(p, index[first_synset[p.stem]] if p.stem in first_synset else None, p.name)
               for p in _image_files(root)]
    return ImageDataset(samples, root, "imagenet_loc", classes, notes, class_mapping)


def _find_devkit_truth(root: Path) -> Path | None:
    candidates = [root / DEVKIT_TRUTH, root.parent / DEVKIT_TRUTH]
    for base in (root, root.parent):
        candidates += sorted(base.glob(f"ILSVRC2012_devkit*/data/{DEVKIT_TRUTH}"))
    return next((p for p in candidates if p.is_file()), None)


def _open_devkit(root: Path, labels: Path | None) -> ImageDataset:
    truth = labels or _find_devkit_truth(root)
    if truth is None:
        raise DatasetError(f"no {DEVKIT_TRUTH} found in {root}, its parent or a devkit's data/ folder; "
                           "pass it with --labels")
    ids = []
    for number, line in enumerate(_read_lines(truth), 1):
        if line.strip():
            if not line.strip().isdigit() or not 1 <= int(line) <= 1000:
                raise DatasetError(f"{truth}:{number}: expected an ILSVRC2012_ID from 1 to 1000, got {line.strip()!r}")
            ids.append(int(line))
    meta = truth.parent / DEVKIT_META
    if not meta.is_file():
        raise DatasetError(
            f"{truth.name} numbers classes by the devkit's ILSVRC2012_ID, which is not the class order of torchvision "
            f"models; the devkit's {DEVKIT_META} converts them: place it next to {truth}")
    wnid_of_id = _devkit_synsets(meta)
    classes = sorted(wnid_of_id.values())
    index = _synset_index(classes)
    samples = []
    for path in _image_files(root):
        match = re.search(r"(\d+)$", path.stem)
        k = int(match.group(1)) if match else 0
        label = index[wnid_of_id[ids[k - 1]]] if 1 <= k <= len(ids) else None
        samples.append(Sample(path, label, path.name))
    return ImageDataset(samples, root, "imagenet_devkit", classes, class_mapping=f"sorted synsets of {meta.name}")


def _devkit_synsets(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> synset of the 1000 leaf classes, from the devkit's meta.mat."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(meta, squeeze_me=True)["synsets"]
        leaves = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except Exception as e:  # scipy raises many kinds for a malformed file
        raise DatasetError(f"cannot read the synsets of {meta}: {e}") from None
    if not leaves:
        raise DatasetError(f"{meta} lists no leaf synsets")
    return leaves


def _tiny_val_dir(root: Path) -> Path | None:
    for folder in (root, root / "val"):
        if (folder / TINY_ANNOTATIONS).is_file() and (folder / "images").is_dir():
            return folder
    return None


def _open_tiny(root: Path, labels: Path | None) -> ImageDataset:
    val = labels.parent if labels is not None else _tiny_val_dir(root)
    if val is None:
        raise DatasetError(f"no val/images and val/{TINY_ANNOTATIONS} in {root}")
    annotations = labels or val / TINY_ANNOTATIONS
    synset_of = {}
    for number, line in enumerate(_read_lines(annotations), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DatasetError(f"{annotations}:{number}: expected 'file<TAB>synset ...', got {line!r}")
        synset_of[parts[0]] = parts[1]
    base = val.parent
    if (base / "wnids.txt").is_file():
        classes = sorted(line.strip() for line in _read_lines(base / "wnids.txt") if line.strip())
    elif (base / "train").is_dir():
        classes = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    else:
        classes = sorted(set(synset_of.values()))
    index = _synset_index(classes)
    samples = [Sample(p, index.get(synset_of.get(p.name)), p.name) for p in _image_files(val / "images")]
    return ImageDataset(samples, val, "tiny_imagenet", classes, class_mapping="sorted Tiny ImageNet wnids")


# ---- selection ------------------------------------------------------------------------------------------------


def select(n: int, start: int = 0, stride: int = 1, end: int | None = None) -> range:
    """The dataset indices ``start, start + stride, ...`` below ``end`` (default: all ``n``); Python slice rules,
    without negative values."""
    for name, value in (("start", start), ("stride", stride), ("end", end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    check_int("start", start, 0)
    check_int("stride", stride)
    check_int("end", end, 0, none_ok=True)
    return range(int(start), min(n, n if end is None else int(end)), int(stride))


def shard(positions: Sequence, rank: int, world_size: int) -> list:
    """The share of process ``rank`` of ``world_size``: every world_size-th item, starting at ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(positions[rank::world_size])


# ---- decoding -------------------------------------------------------------------------------------------------


@dataclass
class Decoded:
    """One sample after decoding: the model input, or the reason it could not be made; ``note``: a conversion."""

    index: int
    sample: Sample
    input: torch.Tensor | None
    reason: str | None = None
    note: str | None = None


def decode(sample: Sample, preprocess) -> tuple[torch.Tensor, str | None]:
    """Decode and preprocess one image: (model input [C, H, W], a note naming any conversion, or None).

    Grey, grey+alpha, RGBA, 16-bit and float images are converted (see fastig.io.images); images smaller than
    the model's crop are upscaled. Raises ``ImageReadError`` with the reason for a file that cannot be used.
    """
    from fastig.io import images

    path = sample.path
    raw = _read_raw(path)
    notes = []
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    if channels in (1, 2):
        notes.append("grey image")  # repeated into RGB, or used as is by a grey model
    if channels in (2, 4):
        notes.append("alpha channel dropped")
    if raw.dtype != np.uint8:
        notes.append(f"{raw.dtype} pixels mapped to 8 bits")
    try:
        rgb = images._to_rgb8(raw)
    except ValueError as e:
        raise ImageReadError(f"unsupported image {path}: {e}") from None
    h, w = rgb.shape[:2]
    crop = preprocess.crop or 0
    if min(h, w) < crop:
        notes.append(f"upscaled from {w}x{h}")
    try:
        return preprocess(rgb), "; ".join(notes) or None
    except (cv2.error, MemoryError) as e:  # e.g. a resize whose result cannot be allocated
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ImageReadError(f"cannot resize image {path} ({w}x{h}): {reason}") from None


def _read_raw(path: Path) -> np.ndarray:
    """The file decoded by OpenCV as stored (BGR/BGRA/grey, any depth), within fastig.io.images' memory bounds;
    ImageReadError naming the problem."""
    from fastig.io.images import read_raw

    return read_raw(path)


class DecodingDataset(torch.utils.data.Dataset):
    """The samples at ``indices`` of ``dataset``, decoded on access (in DataLoader workers): items are Decoded,
    never exceptions, so one bad file does not stop a run."""

    def __init__(self, dataset: ImageDataset, indices: Sequence[int], preprocess):
        self.dataset, self.indices, self.preprocess = dataset, list(indices), preprocess

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Decoded:
        index = self.indices[k]
        sample = self.dataset[index]
        try:
            tensor, note = decode(sample, self.preprocess)
        except ImageReadError as e:
            return Decoded(index, sample, None, reason=str(e))
        except Exception as e:  # noqa: BLE001  (decoding untrusted files: any failure is a skip, not a crash)
            return Decoded(index, sample, None, reason=f"cannot decode {sample.path}: {type(e).__name__}: {e}")
        return Decoded(index, sample, tensor, note=note)


def batches(dataset: ImageDataset, indices: Sequence[int], preprocess, batch_size: int, workers: int = 0,
            pin_memory: bool = False):
    """Iterate over lists of at most ``batch_size`` Decoded samples, in index order, decoded by ``workers``
    processes (0: in this process)."""
    check_int("batch_size", batch_size)
    check_int("workers", workers, 0)
    loader = torch.utils.data.DataLoader(
        DecodingDataset(dataset, indices, preprocess), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=list, pin_memory=pin_memory, prefetch_factor=4 if workers else None,
        persistent_workers=False)
    return iter(loader)
