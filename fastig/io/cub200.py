"""CUB-200-2011 (Wah et al. 2011): images, classes, the train/test split, the 15 part locations, the attribute
annotations, and the class-pair table of shared parts that deliberative explanations are evaluated with.

Layout (``root`` is the ``CUB_200_2011`` folder or a folder holding it)::

    images.txt                  <image_id> <path under images/>
    image_class_labels.txt      <image_id> <class_id>            (1-based)
    train_test_split.txt        <image_id> <is_training_image>   (1 train, 0 test)
    classes.txt                 <class_id> <name>                ("001.Black_footed_Albatross")
    parts/parts.txt             <part_id> <name>                 (15 parts)
    parts/part_locs.txt         <image_id> <part_id> <x> <y> <visible>
    attributes/class_attribute_labels_continuous.txt   one row per class: 312 percentages
    attributes/image_attribute_labels.txt              <image_id> <attribute_id> <is_present> <certainty> [time]

Only one of the two attribute files is needed: the class table is read from the first, or computed from the second
as the percentage of each class's images with the attribute present (how CUB's class table is defined).

Shared parts (the released code's ``create_similarityMatrix_cls_part_cub.py``): each part is described by groups
of attributes (:data:`PART_ATTRIBUTES`); per group the class's attribute values are turned into a distribution by a
softmax, two classes are compared by ``sum P log(2P / (P + Q)) + Q log(2Q / (P + Q))`` (Endres & Schindelin's
metric, twice the Jensen-Shannon divergence), averaged over the part's groups; the 20% smallest values of the
whole [C, C, 15] table (the diagonal's zeros included) mark the parts two classes share.

Every missing or malformed file is a :class:`~fastig.io.datasets.DatasetError` naming the file (and the line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastig.io.datasets import DatasetError

N_PARTS = 15
N_ATTRIBUTES = 312
SHARED_FRACTION = 0.2  # the released code's threshold: the 20% most similar (class, class, part) triples

# The attributes (1-based, inclusive ranges of CUB's attributes.txt) that describe each of the 15 parts (back,
# beak, belly, breast, crown, forehead, left eye, left leg, left wing, nape, right eye, right leg, right wing,
# tail, throat), as the released code slices them.
PART_ATTRIBUTES = [
    [(59, 73), (237, 240)],
    [(1, 9), (150, 152), (279, 293)],
    [(198, 212), (245, 248)],
    [(55, 58), (106, 120)],
    [(95, 105), (153, 167), (294, 308)],
    [(95, 105), (153, 167)],
    [(136, 149), (95, 105)],
    [(264, 278)],
    [(10, 24), (213, 217), (309, 312)],
    [(183, 197)],
    [(136, 149), (95, 105)],
    [(264, 278)],
    [(10, 24), (213, 217), (309, 312)],
    [(74, 79), (80, 94), (168, 182), (241, 244)],
    [(95, 105), (121, 135)],
]


def read_rows(path: Path, fields: int, layout: str, at_least: bool = False) -> list[list[str]]:
    """The whitespace-separated rows of a text file, each with ``fields`` fields (the last one keeps its spaces);
    ``at_least``: extra fields are allowed and dropped. Blank lines are skipped."""
    if not path.is_file():
        raise DatasetError(f"missing file {path} (expected lines '{layout}')")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split() if at_least else line.split(None, fields - 1)
        if len(parts) < fields or (not at_least and len(parts) != fields):
            raise DatasetError(f"{path}:{number}: expected '{layout}', got {line.strip()!r}")
        rows.append(parts[:fields])
    return rows


def _ints(rows: list[list[str]], path: Path, layout: str, columns) -> list[list[int]]:
    out = []
    for number, row in enumerate(rows, 1):
        try:
            out.append([int(row[c]) for c in columns])
        except ValueError:
            raise DatasetError(f"{path}: row {number}: expected integers in '{layout}', got {' '.join(row)!r}") from None
    return out


class Split:
    """What both dataset readers share: the train/test split (``is_train`` [N]) and each image's file."""

    is_train: np.ndarray

    def __len__(self) -> int:
        return len(self.is_train)

    @property
    def test_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.is_train)

    @property
    def train_indices(self) -> np.ndarray:
        return np.flatnonzero(self.is_train)

    def image_path(self, index: int) -> Path:
        raise NotImplementedError


@dataclass
class Cub200(Split):
    """A CUB-200-2011 tree, read by :meth:`read`. ``labels`` are 0-based; ``parts`` is [N, 15, 3]: x, y (pixels of
    the original image) and visibility (1 visible, 0 not) of each part of each image."""

    root: Path
    ids: list[int]
    paths: list[Path]
    labels: np.ndarray
    is_train: np.ndarray
    class_names: list[str]
    part_names: list[str]
    parts: np.ndarray
    _attributes: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def read(cls, root) -> "Cub200":
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"CUB-200-2011 root not found: {root}")
        if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").exists():
            root = root / "CUB_200_2011"
        images = read_rows(root / "images.txt", 2, "<image_id> <image_name>")
        ids = [i for (i,) in _ints(images, root / "images.txt", "<image_id> <image_name>", [0])]
        index = {image_id: n for n, image_id in enumerate(ids)}
        if len(index) != len(ids):
            raise DatasetError(f"{root / 'images.txt'}: an image id is listed twice")
        paths = [root / "images" / name for _, name in images]

        def per_image(name: str, layout: str) -> np.ndarray:
            path = root / name
            values = np.full(len(ids), -1, dtype=np.int64)
            for image_id, value in _ints(read_rows(path, 2, layout), path, layout, [0, 1]):
                if image_id not in index:
                    raise DatasetError(f"{path}: image id {image_id} is not in images.txt")
                values[index[image_id]] = value
            if (values < 0).any():
                raise DatasetError(f"{path}: no entry for image id {ids[int(np.argmax(values < 0))]}")
            return values

        labels = per_image("image_class_labels.txt", "<image_id> <class_id>") - 1
        is_train = per_image("train_test_split.txt", "<image_id> <is_training_image>") == 1
        classes = read_rows(root / "classes.txt", 2, "<class_id> <class_name>")
        class_names = [name for _, name in classes]
        if labels.min() < 0 or labels.max() >= len(class_names):
            raise DatasetError(f"{root / 'image_class_labels.txt'}: class ids must lie in 1..{len(class_names)} "
                               "(the lines of classes.txt)")
        part_names = [name for _, name in read_rows(root / "parts" / "parts.txt", 2, "<part_id> <part_name>")]
        parts = _part_locations(root / "parts" / "part_locs.txt", index, len(part_names))
        return cls(root, ids, paths, labels, is_train, class_names, part_names, parts)

    def image_path(self, index: int) -> Path:
        return self.paths[index]

    def display_name(self, label: int) -> str:
        """A class name for pictures: "001.Black_footed_Albatross" -> "Black footed Albatross"."""
        name = self.class_names[label]
        return name.split(".", 1)[1].replace("_", " ") if "." in name else name.replace("_", " ")

    def class_attributes(self) -> np.ndarray:
        """[classes, 312] attribute percentages per class (see the module docstring for where they come from)."""
        if self._attributes is None:
            self._attributes = _class_attributes(self.root / "attributes", self.labels, self.ids, len(self.class_names))
        return self._attributes

    def shared_parts(self) -> "PartTable":
        """The class-pair table of shared parts, built from :meth:`class_attributes` as the released code does."""
        return PartTable(shared_parts(self.class_attributes()))


def _part_locations(path: Path, index: dict[int, int], n_parts: int) -> np.ndarray:
    layout = "<image_id> <part_id> <x> <y> <visible>"
    parts = np.full((len(index), n_parts, 3), np.nan)
    for number, row in enumerate(read_rows(path, 5, layout, at_least=True), 1):
        try:
            image_id, part_id = int(row[0]), int(row[1])
            x, y, visible = float(row[2]), float(row[3]), float(row[4])
        except ValueError:
            raise DatasetError(f"{path}: row {number}: expected '{layout}', got {' '.join(row)!r}") from None
        if image_id not in index or not 1 <= part_id <= n_parts:
            raise DatasetError(f"{path}: row {number}: unknown image id {image_id} or part id {part_id}")
        parts[index[image_id], part_id - 1] = (x, y, visible)
    missing = np.argwhere(np.isnan(parts[:, :, 0]))
    if len(missing):
        raise DatasetError(f"{path}: no location of part {missing[0][1] + 1} of image id "
                           f"{list(index)[missing[0][0]]}")
    return parts


def _class_attributes(folder: Path, labels: np.ndarray, ids: list[int], n_classes: int) -> np.ndarray:
    continuous = folder / "class_attribute_labels_continuous.txt"
    per_image = folder / "image_attribute_labels.txt"
    if continuous.is_file():
        try:
            table = np.loadtxt(continuous, ndmin=2)
        except ValueError as e:
            raise DatasetError(f"{continuous}: expected {n_classes} rows of {N_ATTRIBUTES} numbers ({e})") from None
        if table.shape != (n_classes, N_ATTRIBUTES):
            raise DatasetError(f"{continuous}: expected {n_classes} rows of {N_ATTRIBUTES} numbers, got "
                               f"{table.shape[0]} rows of {table.shape[1]}")
        return table
    if not per_image.is_file():
        raise DatasetError(f"missing file {continuous} (or {per_image.name} to compute it from)")
    layout = "<image_id> <attribute_id> <is_present> <certainty_id> <time>"
    index = {image_id: n for n, image_id in enumerate(ids)}
    present = np.zeros((len(ids), N_ATTRIBUTES))
    for image_id, attribute, is_present in _ints(read_rows(per_image, 3, layout, at_least=True), per_image, layout,
                                                 [0, 1, 2]):
        if image_id not in index or not 1 <= attribute <= N_ATTRIBUTES:
            raise DatasetError(f"{per_image}: unknown image id {image_id} or attribute id {attribute}")
        present[index[image_id], attribute - 1] = is_present
    table = np.zeros((n_classes, N_ATTRIBUTES))
    for c in range(n_classes):
        rows = labels == c
        if rows.any():
            table[c] = 100.0 * present[rows].mean(0)
    return table


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def part_dissimilarity(class_attributes: np.ndarray) -> np.ndarray:
    """[C, C, 15]: the mean over each part's attribute groups of the Endres-Schindelin metric between the classes'
    softmax-normalized attribute values (zero on the diagonal, as the released code leaves it)."""
    c = class_attributes.shape[0]
    table = np.zeros((c, c, N_PARTS))
    for part, groups in enumerate(PART_ATTRIBUTES):
        for first, last in groups:
            p = _softmax(class_attributes[:, first - 1:last])[:, None, :]  # [C, 1, G]
            q = p.transpose(1, 0, 2)  # [1, C, G]
            m = p + q
            table[:, :, part] += (p * np.log(2 * p / m) + q * np.log(2 * q / m)).sum(-1)
        table[:, :, part] /= len(groups)
    table[np.arange(c), np.arange(c)] = 0.0
    return table


def shared_parts(class_attributes: np.ndarray, fraction: float = SHARED_FRACTION) -> np.ndarray:
    """bool [C, C, 15]: the parts two classes share, the ``fraction`` most similar entries of the whole table
    (``<=`` the value at index ``int(fraction * C * C * 15)`` of its ascending sort)."""
    table = part_dissimilarity(class_attributes)
    flat = table.ravel()
    k = min(int(fraction * flat.size), flat.size - 1)
    threshold = np.partition(flat, k)[k]
    return table <= threshold


@dataclass
class PartTable:
    """The shared parts of class pairs: ``shared(a, b)`` lists the part indices (0-based) classes a and b share."""

    table: np.ndarray

    def shared(self, a: int, b: int) -> np.ndarray:
        return np.flatnonzero(self.table[a, b])
