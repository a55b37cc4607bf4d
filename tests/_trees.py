"""Miniature CUB-200-2011 and ADE20K trees written by the tests (import: ``from _trees import ...``)."""

from pathlib import Path

import cv2
import numpy as np

CUB_PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
             "right eye", "right leg", "right wing", "tail", "throat"]


def make_cub_tree(root: Path, n_classes: int = 4, per_class: int = 4, size=(48, 36), attributes: str = "continuous",
                  seed: int = 0) -> Path:
    """A CUB_200_2011 folder under ``root``: ``per_class`` images per class (half of them test images), 15 parts
    (a few invisible), attribute labels per image and (``attributes="continuous"``) the class table computed from
    them as CUB defines it. Returns the CUB_200_2011 folder."""
    rng = np.random.default_rng(seed)
    cub = root / "CUB_200_2011"
    (cub / "parts").mkdir(parents=True)
    (cub / "attributes").mkdir()
    width, height = size
    images, labels, split, locs, attrs = [], [], [], [], []
    present = np.zeros((n_classes * per_class, 312))
    for c in range(n_classes):
        folder = cub / "images" / f"{c + 1:03d}.Bird_{c}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 3, size=312)  # each class has its own likely attributes
        for k in range(per_class):
            image_id = len(images) + 1
            w, h = width + 4 * k, height + 2 * c  # different sizes and aspect ratios
            image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            name = f"{c + 1:03d}.Bird_{c}/Bird_{c}_{k:04d}.jpg"
            cv2.imwrite(str(cub / "images" / name), image)
            images.append(f"{image_id} {name}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {int(k % 2 == 0)}")
            for part in range(15):
                visible = rng.random() > 0.15
                x, y = (rng.uniform(0, w - 1), rng.uniform(0, h - 1)) if visible else (0.0, 0.0)
                locs.append(f"{image_id} {part + 1} {x:.1f} {y:.1f} {int(visible)}")
            on = (rng.random(312) < 0.25 + 0.25 * base).astype(int)
            present[image_id - 1] = on
            for attribute in range(312):
                attrs.append(f"{image_id} {attribute + 1} {on[attribute]} 3 12.5")
    (cub / "images.txt").write_text("\n".join(images) + "\n")
    (cub / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (cub / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (cub / "classes.txt").write_text("\n".join(f"{c + 1} {c + 1:03d}.Bird_{c}" for c in range(n_classes)) + "\n")
    (cub / "parts" / "parts.txt").write_text("\n".join(f"{i + 1} {n}" for i, n in enumerate(CUB_PARTS)) + "\n")
    (cub / "parts" / "part_locs.txt").write_text("\n".join(locs) + "\n")
    (cub / "attributes" / "image_attribute_labels.txt").write_text("\n".join(attrs) + "\n")
    if attributes == "continuous":
        table = np.stack([100 * present[c * per_class:(c + 1) * per_class].mean(0) for c in range(n_classes)])
        np.savetxt(cub / "attributes" / "class_attribute_labels_continuous.txt", table, fmt="%.6f")
    return cub


ADE_OBJECTS = ["wall", "building;edifice", "sky", "floor;flooring", "tree"] + [f"thing{i}" for i in range(6, 151)]


def make_ade_tree(root: Path, scenes=("kitchen", "bathroom", "street"), train_per_scene: int = 3,
                  val_per_scene: int = 2, size=(40, 32), seed: int = 0) -> Path:
    """An ADEChallengeData2016 folder under ``root``: images and annotations whose objects depend on the scene, a
    validation image of a scene with no training image, objectInfo150.txt and sceneCategories.txt."""
    rng = np.random.default_rng(seed)
    ade = root / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        for split in ("training", "validation"):
            (ade / kind / split).mkdir(parents=True)
    lines = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i}\t0.01\t10\t1\t{name}" for i, name in enumerate(ADE_OBJECTS, 1)]
    (ade / "objectInfo150.txt").write_text("\n".join(lines) + "\n")
    categories = []
    width, height = size
    for split, prefix, count, names in (("training", "train", train_per_scene, scenes),
                                        ("validation", "val", val_per_scene, tuple(scenes) + ("unseen_scene",))):
        n = 0
        for s, scene in enumerate(names):
            for k in range(count if scene != "unseen_scene" else 1):
                n += 1
                name = f"ADE_{prefix}_{n:08d}"
                w, h = width + 6 * k, height + 3 * s
                cv2.imwrite(str(ade / "images" / split / f"{name}.jpg"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
                labels = np.zeros((h, w), dtype=np.uint8)
                objects = [1, 3 + s, 10 + s] + ([20] if k % 2 else [])  # wall everywhere, scene-specific objects
                for obj in objects:
                    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
                    labels[y0:y0 + h // 2, x0:x0 + w // 2] = obj
                cv2.imwrite(str(ade / "annotations" / split / f"{name}.png"), labels)
                categories.append(f"{name} {scene}")
    (ade / "sceneCategories.txt").write_text("\n".join(categories) + "\n")
    return ade
