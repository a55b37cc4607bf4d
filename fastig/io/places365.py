"""Places365 validation data: the official layout and small subsets of it, with the 365 class names.

The official validation release (http://places2.csail.mit.edu/download.html):

- ``val_256/`` (256x256 images) or ``val_large/`` (the same images, shorter side >= 512): ``Places365_val_00000001.jpg``
  ... ``Places365_val_00036500.jpg``;
- ``places365_val.txt`` (in the devkit ``filelist_places365-standard``): one ``<file> <class index>`` line per image;
- ``categories_places365.txt``: one ``/<letter>/<name>[/<sub>] <index>`` line per class, e.g. ``/a/airfield 0``,
  ``/a/apartment_building/outdoor 8``. Class names drop the ``/<letter>/`` prefix (``apartment_building/outdoor``).

``open_places365(root, labels=None)`` accepts ``root`` as the folder holding ``val_256/`` or ``val_large/`` (with
the two text files there or in its parent), one of those image folders itself, or a *subset folder*: any folder of
images with its own label file in the same ``<file> <index>`` format, named ``places365_val.txt``, ``labels.txt``,
``val.txt`` or ``<folder name>.txt`` (inside the folder or next to it), or given with ``labels=`` (``--labels``).
``categories_places365.txt`` is looked for in the image folder, the root, their parents and beside the label file.
Images the label file does not name get no label (``None``); lines naming missing images are left out; the order
is that of the sorted file names, as everywhere in :mod:`fastig.io.datasets` (layout ``places365``).

Preprocessing for ``sascenenet_rgb`` (see :func:`fastig.models.info`): the whole image resized to 256x256, then
the 224x224 center crop. This is what the classifier was trained and validated on: Places365's 256x256 images are
full scenes squashed to a square, and SASceneNet validates on their center 224 crop. On ``val_256`` the resize
does nothing; on ``val_large`` or any non-square photo it keeps the whole scene at the scale the network expects,
where a plain center crop of the large image (SASceneNet's transform applied to it) would see a small central
patch and a shorter-side resize would cut off the sides.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastig.io import datasets
from fastig.io.datasets import DatasetError, ImageDataset, Sample, _image_files, _read_lines

LAYOUT = "places365"
CATEGORIES = "categories_places365.txt"
VAL_LABELS = "places365_val.txt"
IMAGE_FOLDERS = ("val_256", "val_large")
SUBSET_LABELS = (VAL_LABELS, "labels.txt", "val.txt")
_CATEGORY_LINE = re.compile(r"^/[a-z]/(\S+)(?:\s+(\d+))?$")


def class_name(category: str) -> str:
    """``/a/apartment_building/outdoor`` -> ``apartment_building/outdoor``."""
    match = _CATEGORY_LINE.match(category.strip())
    return match.group(1) if match else category.strip()


def read_categories(path: Path) -> list[str]:
    """The class names of ``categories_places365.txt`` by index (the index on each line, else the line order)."""
    names: dict[int, str] = {}
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        match = _CATEGORY_LINE.match(line.strip())
        if match is None:
            raise DatasetError(f"{path}:{number}: expected '/<letter>/<class name> <index>', got {line.strip()!r}")
        index = int(match.group(2)) if match.group(2) is not None else len(names)
        if index in names:
            raise DatasetError(f"{path}:{number}: class index {index} appears twice")
        names[index] = match.group(1)
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"{path}: class indices are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def read_labels(path: Path, n_classes: int | None = None) -> dict[str, int]:
    """``<file> <index>`` lines -> {file name: class index}."""
    labels = {}
    for number, line in enumerate(_read_lines(path), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not re.fullmatch(r"\d+", parts[1]):
            raise DatasetError(f"{path}:{number}: expected '<image file> <class index>', got {line.strip()!r}")
        label = int(parts[1])
        if n_classes is not None and label >= n_classes:
            raise DatasetError(f"{path}:{number}: class index {label} is not below the {n_classes} categories")
        labels[Path(parts[0]).name] = label
    return labels


def _image_folder(root: Path) -> tuple[Path, list[str]]:
    present = [root / name for name in IMAGE_FOLDERS if (root / name).is_dir()]
    if not present:
        return root, []
    notes = [f"using {present[0].name}/ ({present[1].name}/ is also there: pass {present[1]} to use it)"] \
        if len(present) > 1 else []
    return present[0], notes


def _label_file(root: Path, images: Path) -> Path | None:
    candidates = []
    for folder in dict.fromkeys((images, root, root.parent, images.parent)):
        candidates += [folder / name for name in SUBSET_LABELS] + [folder / f"{images.name}.txt"]
    return next((p for p in candidates if p.is_file()), None)


def _categories_file(root: Path, images: Path, labels: Path | None) -> Path | None:
    folders = [images, root, images.parent, root.parent] + ([labels.parent] if labels is not None else [])
    return next((f / CATEGORIES for f in dict.fromkeys(folders) if (f / CATEGORIES).is_file()), None)


def detect(root: Path, labels: Path | None = None) -> bool:
    """Whether ``root`` looks like Places365 validation data (for ``open_dataset``'s ``auto`` layout)."""
    if not root.is_dir():
        return False
    images, _ = _image_folder(root)
    if labels is not None and labels.name != VAL_LABELS:
        return False
    label_file = labels or _label_file(root, images)
    return label_file is not None and _categories_file(root, images, label_file) is not None


def open_places365(root, labels=None) -> ImageDataset:
    """The Places365 validation images under ``root`` (see the module docstring) with their labels and the 365
    class names as ``classes``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Places365: {root} is not a folder")
    images, notes = _image_folder(root)
    label_file = Path(labels) if labels is not None else _label_file(root, images)
    if label_file is None:
        raise DatasetError(f"Places365: no label file ({', '.join(SUBSET_LABELS)} or {images.name}.txt) in "
                           f"{images} or beside it; pass it with --labels")
    categories = _categories_file(root, images, label_file)
    if categories is None:
        raise DatasetError(f"Places365: {CATEGORIES} not found in {images}, {root} or their parents (it comes "
                           "with the devkit filelist_places365-standard)")
    classes = read_categories(categories)
    by_name = read_labels(label_file, len(classes))
    files = _image_files(images)
    samples = [Sample(p, by_name.get(p.name), p.name) for p in files]
    unlabelled = sum(s.label is None for s in samples)
    if unlabelled:
        notes.append(f"{unlabelled} of {len(samples)} image(s) are not in {label_file.name}: no label")
    missing = len(set(by_name) - {p.name for p in files})
    if missing:
        notes.append(f"{label_file.name} names {missing} image(s) not in {images} (left out: a subset)")
    return ImageDataset(samples, images, LAYOUT, classes, notes)


datasets.READERS[LAYOUT] = (detect, open_places365)
