"""fastig.io.datasets: every layout written by the test, index selection and sharding, decoding of odd files."""

import cv2
import numpy as np
import pytest
import scipy.io
import torch

from fastig.errors import ImageReadError
from fastig.io import datasets
from fastig.io.datasets import DatasetError, Sample, decode, open_dataset, select, shard
from fastig.io.images import Preprocess, read_image


def write_png(path, seed=0, shape=(12, 10, 3), dtype=np.uint8):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    high = 65535 if dtype == np.uint16 else 255
    assert cv2.imwrite(str(path), rng.integers(0, high + 1, size=shape).astype(dtype))
    return path


SYNSETS = ["n01440764", "n01443537", "n01484850"]  # sorted


def test_folder_layout_sorted_classes_and_recursive_files(tmp_path):
    for name, files in (("zebra", ["b.png", "a.png"]), ("ant", ["x.jpg"]), ("moth", ["sub/c.png", "d.PNG"])):
        for f in files:
            write_png(tmp_path / name / f)
    (tmp_path / "moth" / "README.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    ds = open_dataset(tmp_path)
    assert ds.layout == "folder" and ds.classes == ["ant", "moth", "zebra"]
    assert [s.id for s in ds.samples] == ["ant/x.jpg", "moth/d.PNG", "moth/sub/c.png", "zebra/a.png", "zebra/b.png"]
    assert [s.label for s in ds.samples] == [0, 1, 1, 2, 2]
    assert ds[3].path == tmp_path / "zebra" / "a.png"


def write_loc(root, n=6, with_mapping=True, unlabelled=()):
    rows = ["ImageId,PredictionString"]
    for i in range(n):
        write_png(root / f"ILSVRC2012_val_{i + 1:08d}.JPEG".replace(".JPEG", ".png"), seed=i)
        if i not in unlabelled:
            wnid = SYNSETS[i % 3]
            rows.append(f"ILSVRC2012_val_{i + 1:08d},{wnid} 1 2 30 40 {wnid} 3 4 5 6")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    if with_mapping:
        (root.parent / "LOC_synset_mapping.txt").write_text(
            "\n".join(f"{w} class {k}" for k, w in enumerate(["n00000001"] + SYNSETS)) + "\n")


def test_imagenet_loc_layout(tmp_path):
    root = tmp_path / "val"
    write_loc(root, unlabelled=(4,))
    ds = open_dataset(root)
    assert ds.layout == "imagenet_loc" and len(ds) == 6
    # LOC_synset_mapping.txt (in the parent) puts n00000001 first: labels are 1 + position among SYNSETS
    assert [s.label for s in ds.samples] == [1, 2, 3, 1, None, 3]
    assert ds[0].id == "ILSVRC2012_val_00000001.png"


def test_imagenet_loc_without_mapping_uses_the_imagenet_class_list_and_says_so(tmp_path):
    root = tmp_path / "val"
    write_loc(root, with_mapping=False)
    csv = root / "LOC_val_solution.csv"
    csv.write_text(csv.read_text().replace("n01484850", "n02123045"))  # a subset: tench, goldfish, tabby
    ds = open_dataset(root, layout="imagenet_loc")
    assert [s.label for s in ds.samples] == [0, 1, 281, 0, 1, 281]  # ImageNet's indices, not 0..2
    assert ds.class_mapping == "imagenet" and "ImageNet indices" in ds.notes[0]
    csv.write_text(csv.read_text().replace("n02123045", "n99999999"))  # not an ImageNet synset: sorted, said so
    ds = open_dataset(root, layout="imagenet_loc")
    assert [s.label for s in ds.samples] == [0, 1, 2, 0, 1, 2]
    assert "sorted synsets" in ds.notes[0] and "outside ImageNet" in ds.notes[0]


def test_the_shipped_imagenet_class_list():
    from fastig.io.imagenet_classes import INDEX, WNIDS

    assert len(WNIDS) == len(set(WNIDS)) == 1000 and list(WNIDS) == sorted(WNIDS)
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in WNIDS)
    assert (INDEX["n01440764"], INDEX["n02123045"], INDEX["n15075141"]) == (0, 281, 999)  # tench, tabby, toilet tissue


def test_wnid_class_folders_get_imagenet_indices_and_other_folders_sorted_ranks(tmp_path):
    """Issue 16.17: ImageNet class folders got labels 0..K-1, so --correct-only was wrong on any subset."""
    for name in ("n02123045", "n01443537"):
        write_png(tmp_path / "imagenet" / name / "a.png")
    ds = open_dataset(tmp_path / "imagenet")
    assert [(s.id, s.label) for s in ds.samples] == [("n01443537/a.png", 1), ("n02123045/a.png", 281)]
    assert ds.class_mapping == "imagenet" and "ImageNet class indices (2 of 1000" in ds.notes[0]
    for name in ("n02123045", "cats"):  # not all wnids: sorted ranks, said so
        write_png(tmp_path / "mixed" / name / "a.png")
    ds = open_dataset(tmp_path / "mixed")
    assert [s.label for s in ds.samples] == [0, 1] and ds.class_mapping == "sorted folder names"
    assert "sorted folder-name order" in ds.notes[0]


def test_imagenet_loc_bad_csv(tmp_path):
    root = tmp_path / "val"
    write_png(root / "a.png")
    (root / "LOC_val_solution.csv").write_text("foo,bar\n")
    with pytest.raises(DatasetError, match="ImageId,PredictionString"):
        open_dataset(root)


def write_devkit(tmp_path, meta=True):
    images = tmp_path / "val"
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    for k in range(1, 6):
        write_png(images / f"ILSVRC2012_val_{k:08d}.png", seed=k)
    write_png(images / "stray.png")  # no number -> no label
    # devkit ids: 1 -> n01484850, 2 -> n01440764, 3 -> n01443537 (not sorted order); 1001 is not a leaf
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n3\n2\n")  # image 5 has no line
    if meta:
        dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")]
        synsets = np.array([(1, "n01484850", 0), (2, "n01440764", 0), (3, "n01443537", 0), (1001, "n00001740", 3)],
                           dtype=dt)
        scipy.io.savemat(data / "meta.mat", {"synsets": synsets})
    return images


def test_imagenet_devkit_layout_converts_ids_to_sorted_synset_order(tmp_path):
    ds = open_dataset(write_devkit(tmp_path))
    assert ds.layout == "imagenet_devkit" and ds.classes == SYNSETS
    labels = {s.id: s.label for s in ds.samples}
    assert labels == {"ILSVRC2012_val_00000001.png": 2, "ILSVRC2012_val_00000002.png": 0,
                      "ILSVRC2012_val_00000003.png": 1, "ILSVRC2012_val_00000004.png": 0,
                      "ILSVRC2012_val_00000005.png": None, "stray.png": None}


def test_imagenet_devkit_without_meta_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="meta.mat"):
        open_dataset(write_devkit(tmp_path, meta=False))


def test_tiny_imagenet_layout_from_root_or_val(tmp_path):
    val = tmp_path / "val"
    lines = []
    for k in range(5):
        write_png(val / "images" / f"val_{k}.png", seed=k)
        lines.append(f"val_{k}.png\t{SYNSETS[(k + 1) % 3]}\t0\t0\t10\t10")
    (val / "val_annotations.txt").write_text("\n".join(lines[:4]) + "\n")  # val_4 has no annotation
    (tmp_path / "wnids.txt").write_text("\n".join(reversed(SYNSETS)) + "\n")  # unsorted in the file
    for root in (tmp_path, val):
        ds = open_dataset(root)
        assert ds.layout == "tiny_imagenet" and ds.classes == SYNSETS
        assert [s.label for s in ds.samples] == [1, 2, 0, 1, None]


def test_list_layout_relative_paths_and_labels(tmp_path):
    write_png(tmp_path / "imgs" / "a b.png")
    write_png(tmp_path / "imgs" / "c.png")
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nimgs/a b.png 7\n\nimgs/c.png\n" + str(tmp_path / "imgs" / "c.png") + " 2\n")
    ds = open_dataset(listing)
    assert ds.layout == "list"
    assert [(s.path, s.label) for s in ds.samples] == [
        (tmp_path / "imgs" / "a b.png", 7), (tmp_path / "imgs" / "c.png", None), (tmp_path / "imgs" / "c.png", 2)]


def test_flat_folder_has_no_labels(tmp_path):
    write_png(tmp_path / "b.png")
    write_png(tmp_path / "a.png")
    ds = open_dataset(tmp_path)
    assert ds.layout == "flat" and [s.id for s in ds.samples] == ["a.png", "b.png"]
    assert all(s.label is None for s in ds.samples)


@pytest.mark.parametrize("call,message", [
    (lambda p: open_dataset(p / "missing"), "not found"),
    (lambda p: open_dataset(p, layout="coco"), "unknown dataset layout"),
    (lambda p: open_dataset(p), "no image files"),
    (lambda p: open_dataset(p, layout="list"), "text file"),
])
def test_bad_roots(tmp_path, call, message):
    with pytest.raises(DatasetError, match=message):
        call(tmp_path)


@pytest.mark.parametrize("n,start,stride,end", [
    (10, 0, 1, None), (10, 3, 1, None), (10, 0, 3, None), (10, 2, 4, 9), (10, 0, 1, 100), (10, 12, 1, None),
    (10, 5, 1, 3), (1, 0, 7, 1), (50000, 17, 1000, 30000),
])
def test_select_is_python_slicing(n, start, stride, end):
    assert list(select(n, start, stride, end)) == list(range(n))[start:end:stride]


@pytest.mark.parametrize("kwargs,error", [
    (dict(start=-1), ValueError), (dict(stride=0), ValueError), (dict(end=-2), ValueError),
    (dict(start=1.5), TypeError), (dict(stride=True), TypeError),
])
def test_select_bad_arguments(kwargs, error):
    with pytest.raises(error):
        select(10, **kwargs)


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shards_partition_the_selection(world):
    selection = select(50, 3, 2, 47)
    parts = [shard(selection, r, world) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(selection)
    assert all(len(p) in (len(selection) // world, len(selection) // world + 1) for p in parts)
    with pytest.raises(ValueError, match="rank"):
        shard(selection, world, world)


PRE = Preprocess(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def sample(path):
    return Sample(path, None, path.name)


def test_decode_matches_the_image_pipeline_and_notes_conversions(tmp_path):
    rgb = write_png(tmp_path / "rgb.png", shape=(20, 24, 3))
    tensor, note = decode(sample(rgb), PRE)
    assert note is None
    torch.testing.assert_close(tensor, PRE(read_image(rgb)), rtol=0, atol=0)
    cases = {
        "grey.png": ((20, 24), np.uint8, "grey image"),
        "rgba.png": ((20, 24, 4), np.uint8, "alpha channel dropped"),
        "deep.png": ((20, 24, 3), np.uint16, "uint16 pixels mapped to 8 bits"),
        "small.png": ((5, 7, 3), np.uint8, "upscaled from 7x5"),
    }
    for name, (shape, dtype, expected) in cases.items():
        path = write_png(tmp_path / name, shape=shape, dtype=dtype)
        tensor, note = decode(sample(path), PRE)
        assert tensor.shape == (3, 16, 16) and expected in note, (name, note)
        torch.testing.assert_close(tensor, PRE(read_image(path)), rtol=0, atol=0)


def test_a_resize_that_cannot_be_allocated_is_a_read_error_naming_the_image(tmp_path, monkeypatch):
    """Issue 16.9: cv2.error escaped with a traceback for an image whose resize could not be allocated."""
    from fastig.io import images

    path = write_png(tmp_path / "huge.png", shape=(20, 24, 3))

    def out_of_memory(*args, **kwargs):
        raise cv2.error("OpenCV(4.10.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to allocate 9 GB")

    monkeypatch.setattr(images.cv2, "resize", out_of_memory)
    with pytest.raises(ImageReadError, match=r"cannot resize image .*huge.png \(24x20\): .*Insufficient memory"):
        decode(sample(path), PRE)
    item = datasets.DecodingDataset(datasets.ImageDataset([sample(path)], tmp_path, "flat"), [0], PRE)[0]
    assert item.input is None and "cannot resize image" in item.reason  # in a dataset run: a skip, with the reason


def test_relative_paths_start_at_the_image_folder(tmp_path):
    write_png(tmp_path / "data" / "cls" / "a.png")
    ds = open_dataset(tmp_path / "data")
    assert ds.image_root == tmp_path / "data" and ds.relative_path(ds[0]) == "cls/a.png"
    listing = tmp_path / "data" / "list.txt"
    listing.write_text(f"cls/a.png 1\n{tmp_path / 'outside.png'} 2\n")
    ds = open_dataset(listing)
    assert ds.image_root == tmp_path / "data"
    assert [ds.relative_path(s) for s in ds.samples] == ["cls/a.png", str(tmp_path / "outside.png")]


def bad_files(tmp_path):
    good = write_png(tmp_path / "good.png")
    (tmp_path / "text.png").write_text("not an image at all")
    (tmp_path / "empty.jpg").write_bytes(b"")
    ok, jpeg = cv2.imencode(".jpg", np.full((32, 32, 3), 128, np.uint8))
    (tmp_path / "cut.jpg").write_bytes(jpeg.tobytes()[:-10])  # the scan starts, the end marker is gone
    return {"good.png": None, "text.png": "corrupt", "empty.jpg": "empty", "cut.jpg": "truncated",
            "missing.png": "not found"}, good


def test_decoding_dataset_reports_bad_files_instead_of_raising(tmp_path):
    expected, _ = bad_files(tmp_path)
    ds = datasets.ImageDataset([sample(tmp_path / name) for name in expected], tmp_path, "flat")
    decoded = datasets.DecodingDataset(ds, range(len(ds)), PRE)
    for k, (name, reason) in enumerate(expected.items()):
        item = decoded[k]
        assert item.index == k and item.sample.id == name
        if reason is None:
            assert item.input is not None and item.reason is None
        else:
            assert item.input is None and reason in item.reason and name in item.reason
            with pytest.raises(ImageReadError, match=reason):
                decode(sample(tmp_path / name), PRE)


def test_worker_decoding_gives_the_same_batches(tmp_path):
    expected, _ = bad_files(tmp_path)
    for k in range(7):
        write_png(tmp_path / f"img{k}.png", seed=k, shape=(10 + k, 14, 3))
    ds = datasets.open_dataset(tmp_path, layout="flat")
    indices = [5, 0, 3, 1, 2, 4, 6, 7, 8, 10, 9]  # 11 files, in any order: batches keep it
    plain = [b for b in datasets.batches(ds, indices, PRE, batch_size=3, workers=0)]
    workers = [b for b in datasets.batches(ds, indices, PRE, batch_size=3, workers=2)]
    assert [len(b) for b in plain] == [3, 3, 3, 2]
    flat = [d for b in plain for d in b]
    assert [d.index for d in flat] == indices
    for a, b in zip(flat, (d for b in workers for d in b)):
        assert (a.index, a.reason, a.note) == (b.index, b.reason, b.note)
        if a.input is not None:
            assert torch.equal(a.input, b.input)
    assert sum(d.input is None for d in flat) == 3  # text.png, empty.jpg, cut.jpg (the flat folder lists files)
