"""fastig.run: selection and filters vs a plain per-image reference, bad data, resume, refusal to mix (weights,
seeds), shards, seeded methods per image, damaged journals and stores, progress output.

Crash safety (SIGKILL, full disks) is in test_crash_safety.py, which uses the helpers here."""

import dataclasses
import hashlib
import io
import os
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fastig
from fastig import models
from fastig.cli import cli
from fastig.core import progress
from fastig.io.images import load_image
from fastig.io.journal import read_journal
from fastig.io.store import Store, StoreError
from fastig.run import PARTS_NAME, STORE_NAME, RunError, RunSpec, image_seed, preprocess_for, run

from _shared import SmallCNN

IG = {"n_steps": 8}
TINY = "tinycnn"


@pytest.fixture
def tiny_model(monkeypatch):
    """A zoo entry for a small randomly initialized CNN on 8x8 images (its weight file never exists, so it runs
    with weights="none"): dataset runs of a real conv net in milliseconds."""
    entry = models.ModelInfo(TINY, "tinycnn.pth", None, None, input_size=8, resize_size=8,
                             mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD, channels=3, num_classes=5,
                             builder=SmallCNN, description="test model")
    monkeypatch.setitem(models._REGISTRY, TINY, entry)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only lose by waking a second thread (much, on a busy machine)
    yield TINY
    torch.set_num_threads(threads)


def write_list_dataset(root: Path, n: int, seed: int = 0, unlabelled=()):
    """n small random RGB images and a list file; label = the centerpixel model's prediction for every 3rd image,
    a wrong class otherwise (so --correct-only keeps about a third)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    model = models.get("centerpixel")
    pre = preprocess_for("centerpixel")
    lines = []
    for i in range(n):
        path = root / f"img{i:03d}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, size=(24, 30, 3)).astype(np.uint8))
        predicted = int(model(load_image(path, pre)[None]).argmax())
        label = predicted if i % 3 == 0 else (predicted + 1) % 256
        lines.append(path.name if i in unlabelled else f"{path.name} {label}")
    listing = root / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


@pytest.fixture(scope="module")
def listing(tmp_path_factory):
    return write_list_dataset(tmp_path_factory.mktemp("data"), 16)


def spec(out, dataset, **kwargs):
    return RunSpec(**{**dict(model="centerpixel", method="ig", out_dir=out, options=dict(IG), dataset=dataset,
                             workers=0, images_per_batch=3, fsync=False), **kwargs})


def reference(path: Path, target=None):
    """A plain per-image pass: prediction, confidence, and the attribution summed over channels."""
    model = models.get("centerpixel")
    x = load_image(path, preprocess_for("centerpixel"))[None]
    with torch.no_grad():
        p = torch.softmax(model(x), 1)[0]
    predicted, confidence = int(p.argmax()), float(p.max())
    a = fastig.attribute(model, x, target=predicted if target is None else target, method="ig", **IG)
    return predicted, confidence, a[0].sum(0).numpy()


def read(path):
    with Store.open(path) as store:
        out = {"attributions": store.attributions(), "ids": store.ids(), "targets": store.targets(),
               "done": store.done_indices(), "attrs": store.attrs, "skipped": store.skipped()}
        for name in store.column_names():
            out[name] = store.column(name)
    return out


def assert_same_store(a, b):
    a, b = read(a), read(b)
    assert a.keys() == b.keys()
    for key in a:
        if key == "skipped":
            assert a[key].keys() == b[key].keys()
            for k in a[key]:
                if k == "confidences":  # (see below)
                    np.testing.assert_allclose(a[key][k], b[key][k], rtol=0, atol=5e-3, equal_nan=True)
                else:
                    np.testing.assert_array_equal(a[key][k], b[key][k], err_msg=f"skipped {k}")
        elif key == "attrs":
            assert a[key] == b[key]
        elif key == "confidences":
            # The centerpixel model's logits are ~1e5: in float32 a batch of another make-up (resumed, another
            # rank's share) rounds them differently by ~1e-2, which moves a softmax probability by ~1e-3.
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=5e-3)
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_selection_and_filters_match_a_plain_reference(tmp_path, listing):
    selected = list(range(16))[1:15:2]
    labels = [int(line.split()[1]) for line in listing.read_text().splitlines()]
    refs = {i: reference(listing.parent / f"img{i:03d}.png") for i in selected}
    # The model's logits are ~1e5, so batched and single passes differ by float32 rounding (~1e-2) in the logits
    # and ~1e-3 in the confidences: the threshold is put in the middle of a wide gap between confidences.
    confidences = sorted(c for i, (p, c, _) in refs.items() if p == labels[i])
    gap, threshold = max(((b - a, (a + b) / 2) for a, b in zip(confidences, confidences[1:])))
    assert gap > 0.02
    summary = run(spec(tmp_path / "out", listing, start=1, stride=2, end=15, correct_only=True,
                       min_confidence=threshold), echo=lambda _: None)
    expected_rows, expected_skips = [], {}
    for i in selected:
        predicted, confidence, _ = refs[i]
        if predicted != labels[i]:
            expected_skips[i] = "misclassified"
        elif confidence < threshold:
            expected_skips[i] = "low confidence"
        else:
            expected_rows.append(i)
    assert expected_rows and {"misclassified", "low confidence"} <= set(expected_skips.values())  # all outcomes

    store = read(tmp_path / "out" / STORE_NAME)
    assert list(store["index"]) == expected_rows
    assert store["ids"] == [f"img{i:03d}.png" for i in expected_rows]
    for row, i in enumerate(expected_rows):
        predicted, confidence, attribution = refs[i]
        assert store["targets"][row] == predicted == store["predictions"][row] == store["labels"][row]
        assert store["confidences"][row] == pytest.approx(confidence, abs=5e-3)
        np.testing.assert_allclose(store["attributions"][row], attribution, rtol=1e-5, atol=1e-6)
    skipped = store["skipped"]
    assert list(skipped["index"]) == sorted(expected_skips)
    for i, reason, prediction, confidence in zip(skipped["index"], skipped["reasons"], skipped["predictions"],
                                                 skipped["confidences"]):
        assert reason.startswith(expected_skips[i]) and prediction == refs[i][0]
        assert confidence == pytest.approx(refs[i][1], abs=5e-3)
    assert summary.done == len(expected_rows) and len(summary.skipped) == len(expected_skips)
    assert summary.merged.rows == len(expected_rows)
    assert not (tmp_path / "out" / PARTS_NAME).exists()  # journals are removed after the merge


def test_target_label_and_fixed_class(tmp_path, listing):
    run(spec(tmp_path / "a", listing, end=4, target="label"), echo=lambda _: None)
    labels = [int(line.split()[1]) for line in listing.read_text().splitlines()[:4]]
    store = read(tmp_path / "a" / STORE_NAME)
    np.testing.assert_array_equal(store["targets"], labels)
    _, _, expected = reference(listing.parent / "img001.png", target=labels[1])
    np.testing.assert_allclose(store["attributions"][1], expected, rtol=1e-5, atol=1e-6)
    run(spec(tmp_path / "b", listing, end=2, target=7, dtype="float16"), echo=lambda _: None)
    store = read(tmp_path / "b" / STORE_NAME)
    assert list(store["targets"]) == [7, 7] and store["attributions"].dtype == np.float16


def write_odd_images(root: Path):
    """Odd and bad files in a class folder, with what the run must do with each."""
    folder = root / "cls"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    cv2.imwrite(str(folder / "a_rgb.png"), rng.integers(0, 256, (240, 250, 3)).astype(np.uint8))  # no conversion
    cv2.imwrite(str(folder / "b_grey.png"), rng.integers(0, 256, (30, 30)).astype(np.uint8))
    cv2.imwrite(str(folder / "c_rgba.png"), rng.integers(0, 256, (30, 30, 4)).astype(np.uint8))
    cv2.imwrite(str(folder / "d_deep.png"), rng.integers(0, 65536, (30, 30, 3)).astype(np.uint16))
    cv2.imwrite(str(folder / "e_tiny.png"), rng.integers(0, 256, (3, 5, 3)).astype(np.uint8))
    cv2.imwrite(str(folder / "f_wide.png"), rng.integers(0, 256, (4, 400, 3)).astype(np.uint8))
    (folder / "g_text.png").write_text("this is not a picture")
    (folder / "h_empty.jpg").write_bytes(b"")
    ok, jpeg = cv2.imencode(".jpg", rng.integers(0, 256, (40, 40, 3)).astype(np.uint8))
    (folder / "i_cut.jpg").write_bytes(jpeg.tobytes()[:-50])
    return {"cls/a_rgb.png": None, "cls/b_grey.png": "grey image", "cls/c_rgba.png": "alpha channel dropped",
            "cls/d_deep.png": "uint16 pixels mapped to 8 bits", "cls/e_tiny.png": "upscaled from 5x3",
            "cls/f_wide.png": "upscaled from 400x4"}, {
            "cls/g_text.png": "corrupt", "cls/h_empty.jpg": "empty", "cls/i_cut.jpg": "truncated"}


def test_bad_and_odd_images_are_skipped_or_converted_with_the_reason(tmp_path):
    converted, broken = write_odd_images(tmp_path / "data")
    summary = run(spec(tmp_path / "out", tmp_path / "data", workers=2), echo=lambda _: None)
    store = read(tmp_path / "out" / STORE_NAME)
    assert store["ids"] == list(converted)
    for name, note in zip(store["ids"], store["notes"]):
        assert (note == "") if converted[name] is None else converted[name] in note, (name, note)
    assert np.isfinite(store["attributions"]).all()
    assert list(store["skipped"]["ids"]) == list(broken)
    for name, reason in zip(store["skipped"]["ids"], store["skipped"]["reasons"]):
        assert reason.startswith("unreadable image:") and broken[name] in reason and name.split("/")[1] in reason
    text = "\n".join(summary.lines())
    assert "3 unreadable image" in text and "6 attributed, 3 skipped, 0 failed" in text


def test_missing_labels_are_skipped_only_when_a_label_is_needed(tmp_path):
    listing = write_list_dataset(tmp_path / "data", 4, unlabelled=(0, 3))
    run(spec(tmp_path / "a", listing), echo=lambda _: None)
    store = read(tmp_path / "a" / STORE_NAME)
    assert list(store["index"]) == [0, 1, 2, 3] and list(store["labels"][[0, 3]]) == [-1, -1]
    run(spec(tmp_path / "b", listing, target="label"), echo=lambda _: None)
    store = read(tmp_path / "b" / STORE_NAME)
    assert list(store["index"]) == [1, 2]
    assert [r.split(":")[0] for r in store["skipped"]["reasons"]] == ["missing label", "missing label"]


def test_failed_images_are_reported_and_retried_by_the_next_run(tmp_path, listing, monkeypatch):
    real = fastig.attribute

    def flaky(model, x, target=None, **kw):  # any batch holding image 2 fails with a runtime error
        if any(torch.equal(row, bad[0]) for row in x):
            raise RuntimeError("out of memory (simulated)")
        return real(model, x, target=target, **kw)

    bad = load_image(listing.parent / "img002.png", preprocess_for("centerpixel"))[None]
    monkeypatch.setattr(fastig, "attribute", flaky)
    summary = run(spec(tmp_path / "out", listing, end=5), echo=lambda _: None)
    assert summary.done == 4
    assert summary.failed == [("img002.png", "out of memory: RuntimeError: out of memory (simulated)")]
    assert "1 failed (1 out of memory)" in summary.lines()[0] and summary.exit_code == 0
    assert list(read(tmp_path / "out" / STORE_NAME)["index"]) == [0, 1, 3, 4]
    monkeypatch.setattr(fastig, "attribute", real)
    summary = run(spec(tmp_path / "out", listing, end=5), echo=lambda _: None)
    assert summary.done == 1 and summary.already_done == 4
    full = read(tmp_path / "out" / STORE_NAME)
    assert list(full["index"]) == [0, 1, 2, 3, 4]
    run(spec(tmp_path / "ref", listing, end=5), echo=lambda _: None)
    assert_same_store(tmp_path / "out" / STORE_NAME, tmp_path / "ref" / STORE_NAME)


def test_argument_errors_stop_the_run_before_any_work(tmp_path, listing):
    for target, message in ((999, "out of range: centerpixel has classes 0..255"), (-1, "out of range"),
                            (True, "class index")):
        with pytest.raises(RunError, match=message):
            run(spec(tmp_path / "out", listing, target=target), echo=lambda _: None)
    with pytest.raises(RunError, match="--target label needs labelled images"):
        run(spec(tmp_path / "out", None, images=[listing.parent / "img000.png"], target="label"), echo=print)
    with pytest.raises(RunError, match="empty path"):
        run(spec("", listing), echo=lambda _: None)
    assert not (tmp_path / "out").exists()
    with pytest.raises(RunError, match="holds no image"):
        run(spec(tmp_path / "o2", listing, start=20), echo=lambda _: None)
    with pytest.raises(RunError, match="min-confidence"):
        run(spec(tmp_path / "o3", listing, min_confidence=1.5), echo=lambda _: None)


def test_resume_skips_finished_rows_and_refuses_other_settings(tmp_path, listing):
    out = tmp_path / "out"
    first = run(spec(out, listing, end=6), echo=lambda _: None)
    assert first.done == 6
    lines = []
    again = run(spec(out, listing, end=6), echo=lines.append)
    assert again.done == 0 and again.already_done == 6 and "6 of 6 image(s) already done" in lines[0]
    for other in (dict(end=7), dict(options={"n_steps": 4}), dict(method="saliency", options={}),
                  dict(correct_only=True), dict(dtype="float16"), dict(stride=2)):
        with pytest.raises(StoreError, match="other settings"):
            run(spec(out, listing, **{"end": 6, **other}), echo=lambda _: None)
    replaced = run(spec(out, listing, end=7, overwrite=True), echo=lambda _: None)
    assert replaced.done == 7 and len(read(out / STORE_NAME)["ids"]) == 7


def test_manual_shards_and_a_rerun_alone_give_the_single_process_store(tmp_path, listing):
    run(spec(tmp_path / "one", listing, end=11), echo=lambda _: None)
    lines = []
    first = run(spec(tmp_path / "two", listing, end=11, shard=(1, 2)), echo=lines.append)
    assert first.assigned == 5 and first.merged is None and "merge is left" in lines[-1]
    assert not (tmp_path / "two" / STORE_NAME).exists()
    second = run(spec(tmp_path / "two", listing, end=11, shard=(0, 2)), echo=lambda _: None)
    assert second.assigned == 6 and second.merged.rows == 11  # the last shard to finish merges
    assert_same_store(tmp_path / "one" / STORE_NAME, tmp_path / "two" / STORE_NAME)
    # a rank that died: its shard is done by a plain rerun, which merges
    run(spec(tmp_path / "three", listing, end=11, shard=(0, 2)), echo=lambda _: None)
    rerun = run(spec(tmp_path / "three", listing, end=11), echo=lambda _: None)
    assert rerun.done == 5 and rerun.already_done == 6
    assert_same_store(tmp_path / "one" / STORE_NAME, tmp_path / "three" / STORE_NAME)


def tiny_spec(out, dataset, **kwargs):
    return spec(out, dataset, **{"model": TINY, "weights": "none", **kwargs})


def test_weights_none_is_seeded_recorded_and_never_mixed(tmp_path, listing, tiny_model):
    """Issue 16.2: --weights none drew another model in every process, and the weights were not recorded."""
    first = run(tiny_spec(tmp_path / "a", listing, end=5), echo=lambda _: None)
    torch.rand(10)  # the global generator is elsewhere, as in another process
    run(tiny_spec(tmp_path / "b", listing, end=5), echo=lambda _: None)
    a, b = read(first.store), read(tmp_path / "b" / STORE_NAME)
    np.testing.assert_array_equal(a["attributions"], b["attributions"])
    assert a["attrs"]["run"]["weights"] == "random:0" and a["attrs"]["run"]["seed"] == 0
    run(tiny_spec(tmp_path / "c", listing, end=5, seed=1), echo=lambda _: None)
    assert not np.array_equal(a["attributions"], read(tmp_path / "c" / STORE_NAME)["attributions"])
    with pytest.raises(StoreError, match='other settings: seed: 0 there, 1 now; weights: "random:0" there, '
                                         '"random:1" now'):
        run(tiny_spec(tmp_path / "a", listing, end=5, seed=1), echo=lambda _: None)


def test_weight_files_are_identified_by_their_sha256(tmp_path, listing):
    """Issue 16.2: a rerun into the same --out with other weights said "2 of 2 already done"."""
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    weights = models.get("centerpixel").state_dict()
    torch.save(weights, first)
    torch.save({k: v * 2 for k, v in weights.items()}, second)
    out = tmp_path / "out"
    summary = run(spec(out, listing, end=2, weights=str(first)), echo=lambda _: None)
    sha = hashlib.sha256(first.read_bytes()).hexdigest()
    assert read(summary.store)["attrs"]["run"]["weights"] == f"sha256:{sha}"
    assert run(spec(out, listing, end=2, weights=str(first)), echo=lambda _: None).already_done == 2
    with pytest.raises(StoreError, match="other settings: weights: "):
        run(spec(out, listing, end=2, weights=str(second)), echo=lambda _: None)


SMOOTHGRAD = {"nt_samples": 3, "stdevs": 0.2}


def test_seeded_methods_give_the_same_rows_whatever_the_batches_shards_or_resumes(tmp_path, listing, tiny_model):
    """Issue 16.3: SmoothGrad & co. drew from an unseeded generator, so a resumed or sharded run mixed streams."""
    one = run(tiny_spec(tmp_path / "one", listing, method="smoothgrad", options=SMOOTHGRAD, end=7, images_per_batch=3),
              echo=lambda _: None)
    for shard, batch in (((1, 2), 2), ((0, 2), 1)):  # other batches, two shards: the last one merges
        run(tiny_spec(tmp_path / "two", listing, method="smoothgrad", options=SMOOTHGRAD, end=7, images_per_batch=batch,
                      shard=shard), echo=lambda _: None)
    a, b = read(one.store), read(tmp_path / "two" / STORE_NAME)
    np.testing.assert_array_equal(a["attributions"], b["attributions"])
    assert a["attrs"]["run"]["seed"] == 0 and a["attrs"]["run"]["options"]["nt_type"] == "smoothgrad"
    model = models.get(TINY, weights="none", seed=0)
    for row, index in enumerate(a["index"].tolist()):  # each row: the image alone, under its own seed
        x = load_image(listing.parent / f"img{index:03d}.png", preprocess_for(TINY))[None]
        torch.manual_seed(image_seed(0, index))
        expected = fastig.attribute(model, x, target=int(a["targets"][row]), method="smoothgrad", **SMOOTHGRAD)
        np.testing.assert_array_equal(a["attributions"][row], expected[0].sum(0).numpy())
    other = run(tiny_spec(tmp_path / "seed1", listing, method="smoothgrad", options=SMOOTHGRAD, end=7, seed=1),
                echo=lambda _: None)
    assert not np.array_equal(a["attributions"], read(other.store)["attributions"])


def test_the_run_sees_which_methods_draw_random_numbers(tiny_model):
    """The run attributes a method image by image under per-image seeds when it draws random numbers; every
    method that does (and none that does not) must be seen to."""
    from fastig import methods
    from fastig.run import _RandomState

    model = models.get(TINY, weights="none", seed=0)
    x = torch.rand(2, 3, 8, 8)
    small = {"n_steps": 2, "nt_samples": 2, "n_samples": 2, "n_segments": 4, "n_iter": 2, "window": 4, "stride": 4}
    drawing = set()
    for name in methods.names():
        if name == "latent_ig":  # needs the dVAE's files; its path is deterministic
            continue
        options = {k: v for k, v in small.items() if k in methods.get(name).options}
        state = _RandomState(x.device)
        fastig.attribute(model, x, target=0, method=name, **options)
        if not state.same_as(_RandomState(x.device)):
            drawing.add(name)
        state.restore()
    assert drawing == {"smoothgrad", "gradient_shap", "lime", "kernel_shap", "shapley", "pda"}


def interrupted_before_the_merge(monkeypatch, spec_):
    """Run ``spec_`` and stop it (as a kill would) after the last batch was journaled, before the merge."""
    from fastig.io.journal import RunFolder

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(RunFolder, "merge", killed)
        with pytest.raises(KeyboardInterrupt):
            run(spec_, echo=lambda _: None)


def test_a_damaged_journal_record_is_redone_and_every_other_row_kept(tmp_path, listing, monkeypatch, tiny_model):
    """Issue 16.1: a byte flipped in record 6 lost it and every later record ("12 of 30 already done")."""
    run(tiny_spec(tmp_path / "ref", listing, images_per_batch=1), echo=lambda _: None)
    out = tmp_path / "out"
    interrupted_before_the_merge(monkeypatch, tiny_spec(out, listing, images_per_batch=1))
    journal = out / PARTS_NAME / "rank-00000.journal"
    record = read_journal(journal).records[6]
    data = bytearray(journal.read_bytes())
    data[record.data_offset + 100] ^= 0x10
    journal.write_bytes(bytes(data))
    lines = []
    summary = run(tiny_spec(out, listing, images_per_batch=1), echo=lines.append)
    assert "15 of 16 image(s) already done" in lines[0] and lines[1] == "1 damaged row(s) will be redone"
    assert summary.done == 1
    assert_same_store(tmp_path / "ref" / STORE_NAME, out / STORE_NAME)


def test_a_damaged_store_row_is_noticed_on_resume_and_redone(tmp_path, listing, tiny_model):
    """Issue 16.4: a complete store damaged in the middle was "30 of 30 already done"."""
    run(tiny_spec(tmp_path / "ref", listing, images_per_batch=1), echo=lambda _: None)
    out = tmp_path / "out"
    run(tiny_spec(out, listing, images_per_batch=1), echo=lambda _: None)
    with h5py.File(out / STORE_NAME, "r") as f:
        chunk = f["attributions/ig"].id.get_chunk_info(3)  # row 3
    data = bytearray((out / STORE_NAME).read_bytes())
    data[chunk.byte_offset + chunk.size // 2] ^= 0xFF
    (out / STORE_NAME).write_bytes(bytes(data))
    lines = []
    summary = run(tiny_spec(out, listing, images_per_batch=1), echo=lines.append)
    assert "15 of 16 image(s) already done" in lines[0] and lines[1] == "1 damaged row(s) will be redone"
    assert summary.done == 1 and summary.merged.damaged == 0  # redone: nothing left out
    assert_same_store(tmp_path / "ref" / STORE_NAME, out / STORE_NAME)


def test_an_unreadable_store_next_to_journals_says_which_rows_are_safe_and_how_to_keep_them(tmp_path, listing,
                                                                                            monkeypatch, tiny_model):
    """Issue 16.4: the refusal did not say the journaled rows were safe, and its --overwrite deleted them too."""
    out = tmp_path / "out"
    interrupted_before_the_merge(monkeypatch, tiny_spec(out, listing, end=6))
    (out / STORE_NAME).write_bytes(b"not a store" * 100)
    with pytest.raises(StoreError) as refused:
        run(tiny_spec(out, listing, end=6), echo=lambda _: None)
    message = str(refused.value)
    assert "attributions.h5 is damaged and cannot be read" in message
    assert f"the 6 row(s) journaled in {out / PARTS_NAME} are intact and will be kept" in message
    assert "mv " in message and "--overwrite would delete the journals too" in message
    os.rename(out / STORE_NAME, out / "attributions.h5.damaged")  # the advice
    summary = run(tiny_spec(out, listing, end=6), echo=lambda _: None)
    assert summary.already_done == 6 and summary.done == 0 and summary.merged.rows == 6


def test_a_run_that_attributes_nothing_says_why_fails_and_claims_nothing(tmp_path, listing, monkeypatch):
    """Issues 16.11 and 16.18: every image failed and the run exited 0; a rejected run claimed --out."""
    monkeypatch.setattr(fastig, "attribute", lambda model, x, target=None, **kw: torch.full_like(x, float("nan")))
    out = tmp_path / "out"
    summary = run(spec(out, listing, end=3), echo=lambda _: None)
    assert summary.exit_code == 1
    assert summary.lines()[0].startswith("0 attributed, 0 skipped, 3 failed (3 non-finite attribution) of 3")
    assert summary.lines()[-1] == "  nothing was attributed, so no store was written"
    assert not (out / STORE_NAME).exists() and not (out / PARTS_NAME).exists()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="n_steps"):  # rejected at the first batch, after the model was loaded
        run(spec(out, listing, end=3, options={"n_steps": 0}), echo=lambda _: None)
    assert not (out / STORE_NAME).exists() and not (out / PARTS_NAME).exists()
    assert run(spec(out, listing, end=3), echo=lambda _: None).done == 3  # the corrected command runs


def test_cli_dataset_options(tmp_path, listing):
    result = CliRunner().invoke(cli, ["attribute", "--model", "centerpixel", "--method", "ig", "--steps", "4",
                                      "--dataset", str(listing), "--start", "2", "--stride", "3", "--end", "12",
                                      "--correct-only", "--images-per-batch", "2", "--workers", "0",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    store = read(tmp_path / "o" / STORE_NAME)
    assert set(store["index"]) | set(store["skipped"]["index"]) == {2, 5, 8, 11}
    assert store["attrs"]["run"]["inputs"]["stride"] == 3
    assert not list((tmp_path / "o").glob("*.png"))  # no heatmaps for datasets unless asked
    assert "attributed" in result.output and "skipped" in result.output
    for args, message in ((["--window-stride", "2"], "does not apply"), (["--image", str(listing)], "not both"),
                          (["--shard", "x"], "RANK/WORLD"), (["--target", "cat"], "not a class index")):
        bad = CliRunner().invoke(cli, ["attribute", "--model", "centerpixel", "--dataset", str(listing),
                                       "--out", str(tmp_path / "bad"), *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output


def test_progress_lines_when_not_a_terminal_and_a_bar_on_one():
    stream = io.StringIO()
    with progress.task("ig on m", 10, "images", show=True, stream=stream, interval=0.0) as images:
        for _ in range(5):
            images.advance(2)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("ig on m: 10/10 images (100%)") and "images/s" in lines[0]
    assert "ETA" in lines[0]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    with progress.task("ig", 4, "images", show=True, stream=tty) as images:
        images.advance(4)
    assert tty.getvalue().startswith("\rig [") and "4/4 images" in tty.getvalue() and tty.getvalue().endswith("\n")


def test_progress_keeps_moving_with_an_eta_during_one_long_image(tmp_path, capsys, tiny_model):
    """Issue 16.19: Guided IG on resnet50 ran 25 minutes for 3 photos without a line: progress moved per batch.
    Now every model pass refreshes the line (here: every pass, interval 0) and the ETA counts the path steps done
    inside the image under way."""
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (24, 24, 3)).astype(np.uint8))
    run(RunSpec(model=TINY, method="guided_ig", out_dir=tmp_path / "out", weights="none", images=[image],
                options={"n_steps": 4}, heatmaps=False, fsync=False, log_interval=0.0))
    during = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"guided_ig on {TINY}: 0/1")]
    assert len(during) >= 4, during  # one line per model pass at least
    assert any("| path 2/4 steps" in line for line in during), during
    eta = [line for line in during if "path 3/4" in line][0]
    assert "ETA ?" not in eta and "ETA 0:" in eta, eta  # a quarter of the path left: an ETA, not "?"


class _BatchNormCNN(torch.nn.Module):
    """Conv -> BatchNorm (random statistics, drawn from the seeded generator) -> ReLU -> Linear, for 8x8 images."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6 * 6 * 6, classes)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_prepare_folds_the_model_is_recorded_and_never_mixed(tmp_path, listing, tiny_model, monkeypatch):
    monkeypatch.setitem(models._REGISTRY, TINY, dataclasses.replace(models._REGISTRY[TINY], builder=_BatchNormCNN))
    plain = run(tiny_spec(tmp_path / "plain", listing, end=6), echo=lambda _: None)
    prepared = run(tiny_spec(tmp_path / "prepared", listing, end=6, prepare=True), echo=lambda _: None)
    a, b = read(plain.store), read(prepared.store)
    assert "prepared" not in a["attrs"]["run"] and b["attrs"]["run"]["prepared"] is True
    # the same function up to float32 rounding (BatchNorm folded into the convolution, channels_last)
    scale = np.abs(a["attributions"]).max()
    np.testing.assert_allclose(b["attributions"], a["attributions"], rtol=0, atol=1e-5 * scale)
    assert not np.array_equal(a["attributions"], b["attributions"])  # it did run another model
    with pytest.raises(StoreError, match="other settings: prepared: null there, true now"):
        run(tiny_spec(tmp_path / "plain", listing, end=6, prepare=True), echo=lambda _: None)
    with pytest.raises(StoreError, match="prepared: true there, null now"):
        run(tiny_spec(tmp_path / "prepared", listing, end=6), echo=lambda _: None)
    with pytest.raises(RunError, match="changes lrp's layer rules: run it without --prepare"):
        run(tiny_spec(tmp_path / "lrp", listing, method="lrp", options={}, prepare=True), echo=lambda _: None)
    assert not (tmp_path / "lrp").exists()
    bad = CliRunner().invoke(cli, ["attribute", "--model", TINY, "--weights", "none", "--method", "lrp",
                                   "--prepare", "--dataset", str(listing), "--out", str(tmp_path / "lrp")])
    assert bad.exit_code == 2 and "without --prepare" in bad.output, bad.output
