"""ADE20K scene parsing (``ADEChallengeData2016``, Zhou et al. 2017): images, scene classes, per-pixel object
annotations, and the class-pair table of shared objects that deliberative explanations are evaluated with.

Layout (``root`` is the ``ADEChallengeData2016`` folder or a folder holding it)::

    images/training/ADE_train_00000001.jpg ...       images/validation/ADE_val_00000001.jpg ...
    annotations/training/ADE_train_00000001.png ...  (uint8: 0 = unlabelled, 1..150 = the objects)
    objectInfo150.txt       a header line, then <Idx> <Ratio> <Train> <Val> <Name> (tab separated)
    sceneCategories.txt     <image name> <scene>, for training and validation images

The scene classes are the scenes of the training images, numbered in order of first appearance (as the released
code's ``make_ade_list.py`` numbers them); validation images of scenes with no training image are left out; the
validation images are the test set.

Shared objects (the released code's ``create_similarityMatrix_cls_object_ade.py``): for every class, the fraction
of its training images in which each object appears (any pixel), set to 0 below 0.3; two classes share object o
with the value ``(f_a + f_b) / 2`` when both fractions are positive; the largest 1% of the whole
[classes, classes, 150] table mark the objects two classes share (the value at index ``int(0.99 * size)`` of its
ascending sort is the threshold; entries must also be positive, which the released code leaves implicit).

Every missing or malformed file is a :class:`~fastig.io.datasets.DatasetError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fastig.core import progress
from fastig.io.cub200 import Split, read_rows
from fastig.io.datasets import DatasetError

N_OBJECTS = 150
MIN_PRESENCE = 0.3  # the released code drops object frequencies below this
SHARED_QUANTILE = 0.99  # and keeps the top 1% of the class-pair table


def read_label_map(path: Path) -> np.ndarray:
    """An annotation PNG as a uint8 [H, W] array of object indices (0 = unlabelled)."""
    if not path.is_file():
        raise DatasetError(f"missing annotation file {path}")
    try:
        labels = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except (OSError, cv2.error):
        labels = None
    if labels is None or labels.ndim != 2 or labels.dtype != np.uint8:
        raise DatasetError(f"{path}: not a single-channel 8-bit annotation PNG")
    return labels


@dataclass
class Ade20k(Split):
    """An ADEChallengeData2016 tree, read by :meth:`read`. ``images``/``annotations``/``labels``/``is_train`` are
    per image (training images first); ``labels`` index ``class_names`` (scenes)."""

    root: Path
    names: list[str]
    images: list[Path]
    annotations: list[Path]
    labels: np.ndarray
    is_train: np.ndarray
    class_names: list[str]
    object_names: list[str]

    @classmethod
    def read(cls, root) -> "Ade20k":
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"ADE20K root not found: {root}")
        if not (root / "sceneCategories.txt").exists() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        object_names = _object_names(root / "objectInfo150.txt")
        scenes = read_rows(root / "sceneCategories.txt", 2, "<image name> <scene>")
        classes: dict[str, int] = {}
        rows = []
        for split, folder in (("train", "training"), ("val", "validation")):
            for name, scene in scenes:
                if not name.startswith(f"ADE_{split}_"):
                    continue
                if split == "train":
                    classes.setdefault(scene, len(classes))
                elif scene not in classes:
                    continue  # a scene never seen in training: the released code leaves these images out
                rows.append((name, folder, classes[scene], split == "train"))
        if not any(train for *_, train in rows):
            raise DatasetError(f"{root / 'sceneCategories.txt'} lists no training image (names ADE_train_...)")
        names = [name for name, *_ in rows]
        images = [root / "images" / folder / f"{name}.jpg" for name, folder, *_ in rows]
        annotations = [root / "annotations" / folder / f"{name}.png" for name, folder, *_ in rows]
        for kind, paths in (("image", images), ("annotation", annotations)):
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise DatasetError(f"missing {kind} file {missing[0]} (listed in sceneCategories.txt"
                                   f"{f'; {len(missing) - 1} more missing' if len(missing) > 1 else ''})")
        labels = np.array([label for *_, label, _ in rows], dtype=np.int64)
        is_train = np.array([train for *_, train in rows], dtype=bool)
        return cls(root, names, images, annotations, labels, is_train, list(classes), object_names)

    def image_path(self, index: int) -> Path:
        return self.images[index]

    def display_name(self, label: int) -> str:
        return self.class_names[label].replace("_", " ")

    def object_presence(self) -> np.ndarray:
        """[classes, 150]: the fraction of each class's training images in which each object appears."""
        counts = np.zeros((len(self.class_names), N_OBJECTS))
        totals = np.zeros(len(self.class_names))
        train = self.train_indices
        with progress.task("ADE20K object statistics", total=len(train), unit="annotations") as task:
            for i in train:
                present = np.unique(read_label_map(self.annotations[i]))
                present = present[(present > 0) & (present <= N_OBJECTS)]
                counts[self.labels[i], present - 1] += 1
                totals[self.labels[i]] += 1
                task.advance()
        return counts / np.maximum(totals, 1)[:, None]


def _object_names(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"missing file {path} (expected a header, then '<Idx> <Ratio> <Train> <Val> <Name>')")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    names = {}
    for number, line in enumerate(lines[1:], 2):
        fields = line.split("\t") if "\t" in line else line.split(None, 4)
        try:
            index = int(fields[0])
            name = fields[4].strip().split(";")[0]
        except (ValueError, IndexError):
            raise DatasetError(f"{path}:{number}: expected '<Idx> <Ratio> <Train> <Val> <Name>', got "
                               f"{line.strip()!r}") from None
        names[index] = name
    if sorted(names) != list(range(1, N_OBJECTS + 1)):
        raise DatasetError(f"{path}: expected the objects 1..{N_OBJECTS}, got {len(names)} entries")
    return [names[i] for i in range(1, N_OBJECTS + 1)]


@dataclass
class ObjectTable:
    """The shared objects of class pairs: ``shared(a, b)`` lists the object labels (1..150) classes a and b share.

    Built from the thresholded presence fractions [classes, 150] and the table's threshold, without holding the
    [classes, classes, 150] table itself (1040 classes would need 1.3 GB)."""

    presence: np.ndarray
    threshold: float

    @classmethod
    def build(cls, presence: np.ndarray, min_presence: float = MIN_PRESENCE,
              quantile: float = SHARED_QUANTILE) -> "ObjectTable":
        presence = np.where(presence < min_presence, 0.0, presence)
        c, o = presence.shape
        values = []  # the table's positive entries: (f_a + f_b) / 2 for ordered pairs a != b that both have o
        for obj in range(o):
            f = presence[presence[:, obj] > 0, obj]
            if len(f) > 1:
                pair = (f[:, None] + f[None, :]) / 2
                values.append(pair[~np.eye(len(f), dtype=bool)])
        values = np.concatenate(values) if values else np.zeros(0)
        k = int(quantile * c * c * o)  # index into the ascending sort of the whole table, zeros first
        zeros = c * c * o - len(values)
        threshold = 0.0 if k < zeros else float(np.partition(values, k - zeros)[k - zeros])
        return cls(presence, threshold)

    def shared(self, a: int, b: int) -> np.ndarray:
        fa, fb = self.presence[a], self.presence[b]
        value = (fa + fb) / 2
        return np.flatnonzero((fa > 0) & (fb > 0) & (value >= self.threshold) & (a != b)) + 1
