"""CUB-200-2011 and ADE20K readers on miniature trees, the class-pair tables against literal transcriptions of the
released code's loops, the input geometry against Preprocess, and the precision/recall/IoU curves against a
per-pair, per-fraction reference of the released code's evaluation loop."""


import numpy as np
import pytest

from _trees import make_ade_tree, make_cub_tree
from fastig.deliberative.evaluation import FRACTIONS, InputGeometry, mean_curve, object_curves, part_curves
from fastig.io.ade20k import Ade20k, ObjectTable
from fastig.io.cub200 import PART_ATTRIBUTES, Cub200, PartTable, shared_parts
from fastig.io.datasets import DatasetError
from fastig.io.images import Preprocess

# --- CUB -----------------------------------------------------------------------------------------------------


def test_cub_reader(tmp_path):
    make_cub_tree(tmp_path, n_classes=3, per_class=4)
    cub = Cub200.read(tmp_path)  # the folder holding CUB_200_2011 works too
    assert len(cub) == 12 and cub.root.name == "CUB_200_2011"
    assert cub.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert cub.test_indices.tolist() == [1, 3, 5, 7, 9, 11]
    assert cub.display_name(2) == "Bird 2" and len(cub.part_names) == 15 and cub.part_names[6] == "left eye"
    assert cub.parts.shape == (12, 15, 3) and set(np.unique(cub.parts[:, :, 2])) <= {0.0, 1.0}
    assert all(p.is_file() for p in cub.paths)
    rows = (cub.root / "parts" / "part_locs.txt").read_text().split("\n")[16].split()
    assert cub.parts[1, 1].tolist() == [float(rows[2]), float(rows[3]), float(rows[4])]


def _released_code_shared_parts(attributes):
    """The released create_similarityMatrix_cls_part_cub.py, transcribed: pair loops, softmax, threshold."""
    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def metric(p, q):
        return np.sum(p * np.log(2.0 * p / (p + q)) + q * np.log(2.0 * q / (p + q)))

    c = attributes.shape[0]
    table = np.zeros((c, c, 15))
    for part, groups in enumerate(PART_ATTRIBUTES):
        for first, last in groups:
            dist = softmax(attributes[:, first - 1:last])
            for i in range(c):
                for j in range(i + 1, c):
                    table[i, j, part] += metric(dist[i], dist[j])
                    table[j, i, part] = table[i, j, part]
        table[:, :, part] /= len(groups)
    threshold = np.sort(table.flatten())[int(0.2 * c * c * 15)]
    return table <= threshold


def test_cub_shared_parts_follow_the_released_code(tmp_path):
    cub = Cub200.read(make_cub_tree(tmp_path, n_classes=5, per_class=2))
    attributes = cub.class_attributes()
    assert attributes.shape == (5, 312)
    expected = _released_code_shared_parts(attributes)
    assert np.array_equal(shared_parts(attributes), expected)
    table = cub.shared_parts()
    assert table.shared(1, 3).tolist() == np.flatnonzero(expected[1, 3]).tolist()
    assert 0 < expected.sum() < expected.size


def test_cub_class_attributes_from_image_labels(tmp_path):
    """Without the continuous class table, it is computed from the per-image labels: the same numbers."""
    with_table = Cub200.read(make_cub_tree(tmp_path / "a", n_classes=3, per_class=4)).class_attributes()
    without = Cub200.read(make_cub_tree(tmp_path / "b", n_classes=3, per_class=4, attributes="image"))
    np.testing.assert_allclose(without.class_attributes(), with_table, atol=1e-6)


@pytest.mark.parametrize("damage,message", [
    (lambda cub: (cub / "images.txt").unlink(), "missing file .*images.txt"),
    (lambda cub: (cub / "parts" / "part_locs.txt").unlink(), "missing file .*part_locs.txt"),
    (lambda cub: (cub / "train_test_split.txt").write_text("1 1\n2\n"), r"train_test_split.txt:2: expected"),
    (lambda cub: (cub / "image_class_labels.txt").write_text("1 x\n"), "expected integers"),
    (lambda cub: (cub / "image_class_labels.txt").write_text("1 1\n"), "no entry for image id 2"),
    (lambda cub: (cub / "image_class_labels.txt").write_text(
        "\n".join(f"{i} 9" for i in range(1, 9)) + "\n"), "class ids must lie in 1..2"),
    (lambda cub: (cub / "parts" / "part_locs.txt").write_text("1 1 3.0 4.0 1\n"), "no location of part 2"),
])
def test_cub_bad_trees_are_named(tmp_path, damage, message):
    cub = make_cub_tree(tmp_path, n_classes=2, per_class=4)
    damage(cub)
    with pytest.raises(DatasetError, match=message):
        Cub200.read(cub)


def test_cub_bad_attribute_files(tmp_path):
    cub = make_cub_tree(tmp_path, n_classes=2, per_class=4)
    np.savetxt(cub / "attributes" / "class_attribute_labels_continuous.txt", np.zeros((2, 300)))
    with pytest.raises(DatasetError, match="expected 2 rows of 312 numbers"):
        Cub200.read(cub).class_attributes()
    for name in ("class_attribute_labels_continuous.txt", "image_attribute_labels.txt"):
        (cub / "attributes" / name).unlink()
    with pytest.raises(DatasetError, match="missing file .*class_attribute_labels_continuous.txt"):
        Cub200.read(cub).class_attributes()
    with pytest.raises(DatasetError, match="root not found"):
        Cub200.read(tmp_path / "nowhere")


# --- ADE -----------------------------------------------------------------------------------------------------


def test_ade_reader_and_object_presence(tmp_path):
    make_ade_tree(tmp_path)
    ade = Ade20k.read(tmp_path)
    assert ade.class_names == ["kitchen", "bathroom", "street"]
    assert len(ade.train_indices) == 9 and len(ade.test_indices) == 6  # the unseen scene's image is left out
    assert ade.object_names[:3] == ["wall", "building", "sky"] and len(ade.object_names) == 150
    presence = ade.object_presence()
    assert presence.shape == (3, 150)
    for c in range(3):
        assert presence[c, 0] == 1.0 and presence[c, 2 + c] == 1.0 and presence[c, 9 + c] == 1.0
        assert presence[c, 19] == pytest.approx(1 / 3)  # object 20 in one of the three training images
        assert presence[c].sum() == pytest.approx(3 + 1 / 3)


def _released_code_shared_objects(presence):
    """The released create_similarityMatrix_cls_object_ade.py, transcribed (with its dense table)."""
    presence = presence.copy()
    presence[presence < 0.3] = 0
    c = presence.shape[0]
    table = np.zeros((c, c, 150))
    for o in range(150):
        for i in range(c):
            for j in range(i + 1, c):
                if presence[i, o] > 0 and presence[j, o] > 0:
                    table[i, j, o] = table[j, i, o] = (presence[i, o] + presence[j, o]) / 2.0
    threshold = np.sort(table.flatten())[int(0.99 * c * c * 150)]
    return (table >= threshold) & (table > 0)


def test_ade_shared_objects_follow_the_released_code():
    rng = np.random.default_rng(0)
    presence = np.where(rng.random((12, 150)) < 0.2, rng.random((12, 150)), 0.0)
    expected = _released_code_shared_objects(presence)
    table = ObjectTable.build(presence)
    for a in range(12):
        for b in range(12):
            assert table.shared(a, b).tolist() == (np.flatnonzero(expected[a, b]) + 1).tolist()
    assert 0 < expected.sum()


@pytest.mark.parametrize("damage,message", [
    (lambda ade: (ade / "objectInfo150.txt").unlink(), "missing file .*objectInfo150.txt"),
    (lambda ade: (ade / "objectInfo150.txt").write_text("Idx\n1\twall\n"), r"objectInfo150.txt:2: expected"),
    (lambda ade: (ade / "sceneCategories.txt").write_text("ADE_train_00000001\n"), "sceneCategories.txt:1: expected"),
    (lambda ade: (ade / "annotations" / "validation" / "ADE_val_00000002.png").unlink(),
     "missing annotation file .*ADE_val_00000002.png"),
    (lambda ade: (ade / "sceneCategories.txt").write_text("ADE_val_00000001 kitchen\n"), "no training image"),
])
def test_ade_bad_trees_are_named(tmp_path, damage, message):
    ade = make_ade_tree(tmp_path)
    damage(ade)
    with pytest.raises(DatasetError, match=message):
        Ade20k.read(ade)


def test_ade_unreadable_annotation(tmp_path):
    ade = make_ade_tree(tmp_path)
    (ade / "annotations" / "training" / "ADE_train_00000001.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="ADE_train_00000001.png: not a single-channel"):
        Ade20k.read(ade).object_presence()


# --- geometry and curves --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,resize,crop", [((37, 53), 30, 24), ((61, 29), 40, 32), ((20, 20), 64, 64),
                                               ((30, 44), None, 24)])
def test_geometry_matches_preprocess(shape, resize, crop):
    """A bright pixel lands where InputGeometry maps its coordinates (within the resize's blur: one pixel)."""
    h, w = shape
    preprocess = Preprocess(resize=resize, crop=crop)
    geometry = InputGeometry(resize, crop)
    for x, y in [(w // 2, h // 2), (w // 3, 2 * h // 3)]:
        image = np.zeros((h, w, 3), dtype=np.uint8)
        image[y, x] = 255
        out = preprocess(image)[0].numpy()
        peak = np.unravel_index(np.argmax(out), out.shape)
        points, inside = geometry.points(np.array([[x, y]], float), h, w)
        assert inside[0] and abs(points[0, 0] - peak[1]) <= 1 and abs(points[0, 1] - peak[0]) <= 1
    labels = np.ones((h, w), dtype=np.uint8)
    labels[:, w // 2:] = 2  # left half 1, right half 2
    mapped = geometry.label_map(labels)
    assert mapped.shape == tuple(preprocess(np.zeros((h, w, 3), np.uint8)).shape[1:])
    boundary = geometry.points(np.array([[w // 2, 0]], float), h, w)[0][0, 0]
    columns = np.arange(mapped.shape[1])
    far = np.abs(columns - boundary) > 1
    assert np.all(mapped[:, far] == np.where(columns[far] < boundary, 1, 2))


def _reference_mask(insecurity, r):
    threshold = np.sort(insecurity.flatten())[int(-r * insecurity.size)]
    return insecurity > threshold


def _reference_part_curves(maps, pairs, xy, visible, table):
    """The released insecurity_extraction loop (recall and precision) for one image."""
    recall, precision = np.zeros(len(FRACTIONS)), np.zeros(len(FRACTIONS))
    h, w = maps.shape[1:]
    for k, r in enumerate(FRACTIONS):
        noeffect, total_recall, total_precision, effective = 0, 0.0, 0.0, 0
        for values, (a, b) in zip(maps, pairs):
            mask = _reference_mask(values, r) if int(r * h * w) >= 1 else np.zeros((h, w), bool)
            shared = table.shared(a, b)
            if len(shared) == 0:
                continue
            everything, common = np.zeros((h, w)), np.zeros((h, w))
            everything[xy[visible, 1], xy[visible, 0]] = 1
            keep = shared[visible[shared]]
            common[xy[keep, 1], xy[keep, 0]] = 1
            if common.sum() < 1:
                noeffect += 1
                continue
            total_recall += np.sum(mask * common) / np.sum(common)
            if np.sum(mask * everything) > 0:
                total_precision += np.sum(mask * common) / np.sum(mask * everything)
                effective += 1
        recall[k] = total_recall / (len(pairs) - noeffect) if len(pairs) > noeffect else np.nan
        precision[k] = total_precision / effective if effective else np.nan
    return recall, precision


def test_part_curves_follow_the_released_loop():
    rng = np.random.default_rng(4)
    table = PartTable(rng.random((6, 6, 15)) < 0.3)
    table.table[0, 1] = False
    table.table[1, 0] = False  # one pair shares nothing: counted with recall 0
    for trial in range(4):
        maps = rng.random((5, 20, 16)) ** 3
        maps[0, :5] = maps[0, 5, 0]  # ties
        pairs = np.array([[0, 1], [0, 2], [2, 3], [1, 4], [3, 5]])
        xy = np.stack([rng.integers(0, 16, 15), rng.integers(0, 20, 15)], 1)
        xy[3] = xy[4]  # two parts on one pixel
        visible = rng.random(15) > 0.2
        recall, precision = part_curves(maps, pairs, xy, visible, table)
        ref_recall, ref_precision = _reference_part_curves(maps, pairs, xy, visible, table)
        np.testing.assert_allclose(recall, ref_recall, rtol=1e-12)
        np.testing.assert_allclose(precision, ref_precision, rtol=1e-12)
        assert np.isfinite(recall).all() and recall[-1] >= recall[0]


def test_object_curves_follow_the_released_iou():
    rng = np.random.default_rng(5)
    presence = np.where(rng.random((5, 150)) < 0.5, 0.3 + 0.7 * rng.random((5, 150)), 0.0)
    table = ObjectTable.build(presence, quantile=0.5)
    labels = rng.integers(0, 8, (18, 14)).astype(np.uint8)
    maps = rng.random((4, 18, 14))
    pairs = np.array([[0, 1], [1, 2], [2, 4], [3, 4]])
    recall, precision, iou = object_curves(maps, pairs, labels, table)
    for k, r in enumerate(FRACTIONS):
        ious, recalls, precisions = [], [], []
        for values, (a, b) in zip(maps, pairs):
            mask = _reference_mask(values, r).astype(float)
            shared = np.isin(labels, table.shared(a, b)).astype(float)
            if not table.shared(a, b).size:
                ious.append(0.0)
                recalls.append(0.0)
                continue
            ious.append(np.sum(mask * shared) / np.sum(mask + shared - mask * shared))
            if shared.sum():
                recalls.append(np.sum(mask * shared) / shared.sum())
                if np.sum(mask * (labels > 0)):
                    precisions.append(np.sum(mask * shared) / np.sum(mask * (labels > 0)))
        assert iou[k] == pytest.approx(np.mean(ious), rel=1e-12)
        assert recall[k] == pytest.approx(np.mean(recalls), rel=1e-12)
        assert precision[k] == pytest.approx(np.mean(precisions), rel=1e-12)
    np.testing.assert_allclose(mean_curve(np.stack([iou, np.full_like(iou, np.nan), iou])), iou)
