"""Places365 readers on miniature trees (official layout, subsets, label-file errors) and the scene classifier's
preprocessing of non-square images."""

import json

import cv2
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fastig.cli import cli
from fastig.io.datasets import DatasetError, open_dataset
from fastig.io.images import Preprocess
from fastig.io.places365 import class_name, open_places365
from fastig.run import preprocess_for

CATEGORIES = "/a/airfield 0\n/a/apartment_building/outdoor 1\n/b/bakery/shop 2\n/b/beach 3\n/c/canyon 4\n"


def write_image(path, h=256, w=256, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def official_tree(root, folders=("val_256",)):
    for folder in folders:
        for k in range(1, 5):
            write_image(root / folder / f"Places365_val_{k:08d}.jpg", seed=k)
    (root / "places365_val.txt").write_text("".join(f"Places365_val_{k:08d}.jpg {k % 5}\n" for k in range(1, 6)))
    (root / "categories_places365.txt").write_text(CATEGORIES)
    return root


def test_official_layout_with_class_names(tmp_path):
    root = official_tree(tmp_path / "places")
    dataset = open_dataset(root)  # auto-detected
    assert dataset.layout == "places365" and len(dataset) == 4
    assert [s.label for s in dataset.samples] == [1, 2, 3, 4]
    assert dataset.samples[0].id == "Places365_val_00000001.jpg"
    assert dataset.classes == ["airfield", "apartment_building/outdoor", "bakery/shop", "beach", "canyon"]
    assert any("names 1 image(s) not in" in note for note in dataset.notes)  # line 5 has no image: a subset
    inner = open_dataset(root / "val_256")  # the image folder itself, label files in its parent
    assert inner.layout == "places365" and [s.label for s in inner.samples] == [1, 2, 3, 4]
    assert class_name("/a/apartment_building/outdoor") == "apartment_building/outdoor"


def test_val_256_is_preferred_over_val_large(tmp_path):
    root = official_tree(tmp_path / "places", folders=("val_256", "val_large"))
    dataset = open_dataset(root)
    assert dataset.root.name == "val_256" and any("val_large" in note for note in dataset.notes)
    assert open_dataset(root / "val_large").root.name == "val_large"


def test_subset_folder_with_its_own_label_file(tmp_path):
    (tmp_path / "categories_places365.txt").write_text(CATEGORIES)
    subset = tmp_path / "validation_small"
    for name in ("b.jpg", "a.jpg", "c.jpg"):
        write_image(subset / name, 64, 96)
    (subset / "validation_small.txt").write_text("a.jpg 4\nb.jpg 0\n")
    dataset = open_dataset(subset)
    assert dataset.layout == "places365"
    assert [(s.id, s.label) for s in dataset.samples] == [("a.jpg", 4), ("b.jpg", 0), ("c.jpg", None)]
    assert any("1 of 3 image(s) are not in" in note for note in dataset.notes)
    other = tmp_path / "mine.txt"
    other.write_text("c.jpg 2\n")
    given = open_dataset(subset, layout="places365", labels=other)
    assert [s.label for s in given.samples] == [None, None, 2]


@pytest.mark.parametrize("categories,labels,message", [
    ("airfield 0\n", "a.jpg 0\n", "expected '/<letter>/<class name> <index>'"),
    ("/a/airfield 0\n/b/beach 0\n", "a.jpg 0\n", "appears twice"),
    (CATEGORIES, "a.jpg 7\n", "not below the 5 categories"),
    (CATEGORIES, "a.jpg beach\n", "expected '<image file> <class index>'"),
])
def test_malformed_label_files_are_named(tmp_path, categories, labels, message):
    write_image(tmp_path / "a.jpg", 32, 32)
    (tmp_path / "categories_places365.txt").write_text(categories)
    (tmp_path / "labels.txt").write_text(labels)
    with pytest.raises(DatasetError, match=message):
        open_places365(tmp_path)


def test_scene_classifier_sees_the_whole_non_square_scene(tmp_path):
    pre = preprocess_for("sascenenet_rgb")
    assert pre.resize == (256, 256) and pre.crop == 224
    wide = np.zeros((200, 400, 3), np.uint8)
    wide[:, :40] = (255, 0, 0)  # a red band over the left 10% of the scene
    x = pre(wide)
    assert x.shape == (3, 224, 224)
    display = pre.to_display(x)
    # squashed to 256 wide, the band is 25.6 px; the center crop drops 16: about 9.6 red columns remain
    red = (display[:, :, 0] > 200) & (display[:, :, 1] < 50)
    assert red[:, :9].all() and not red[:, 11:].any()
    # the shorter-side resize + crop of the ImageNet models would have cut the band off entirely
    imagenet = Preprocess(resize=256, crop=224, mean=pre.mean, std=pre.std)
    assert not ((imagenet.to_display(imagenet(wide))[:, :, 0] > 200)).any()
    # a val_256 image (256x256) is exactly SASceneNet's own transform: the 224 center crop, no resize
    square = (np.random.default_rng(1).random((256, 256, 3)) * 255).astype(np.uint8)
    expected = (torch.from_numpy(square[16:240, 16:240].astype(np.float32) / 255).permute(2, 0, 1)
                - torch.tensor(pre.mean).reshape(3, 1, 1)) / torch.tensor(pre.std).reshape(3, 1, 1)
    torch.testing.assert_close(pre(square), expected.float())
    with pytest.raises(ValueError, match="height, width"):
        Preprocess(resize=(256, 0))


def test_attribute_on_a_places_tree_records_labels(tmp_path):
    root = official_tree(tmp_path / "places")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["attribute", "--model", "sascenenet_rgb", "--weights", "none", "--method",
                                      "saliency", "--dataset", str(root), "--end", "2", "--workers", "0",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    with h5py.File(out / "attributions.h5") as f:
        assert f["attributions/saliency"].shape == (2, 224, 224)
        assert json.loads(f.attrs["run"])["inputs"]["layout"] == "places365"
        assert list(f["inputs/labels"][:]) == [1, 2]
