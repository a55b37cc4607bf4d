"""fastig.run: selection and filters vs a plain per-image reference, bad data, resume, refusal to mix, shards,
SIGKILL at several moments followed by a restart, progress output."""

import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
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
from fastig.run import PARTS_NAME, STORE_NAME, RunError, RunSpec, preprocess_for, run

IG = {"n_steps": 8}


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
                             workers=0, batch_size=3, fsync=False), **kwargs})


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


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_at_random_moments_then_restart_gives_the_uninterrupted_store(tmp_path):
    n = 14
    listing = write_list_dataset(tmp_path / "data", n, seed=3)
    run(spec(tmp_path / "ref", listing, options={"n_steps": 32}, batch_size=2, correct_only=True),
        echo=lambda _: None)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fastig", "attribute", "--model", "centerpixel", "--method", "ig",
               "--steps", "32", "--dataset", str(listing), "--correct-only", "--images-per-batch", "2",
               "--workers", "0", "--out", str(out)]
    journal = out / PARTS_NAME / "rank-00000.journal"
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    kills = []
    # Kill once the journal holds a random number of records of the first run (0: mid first batch), then once it
    # holds them all (the process is merging or about to), each after a random delay of up to a batch or two.
    for wanted in (rng.randrange(0, n // 2), n):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if journal.exists() and len(read_journal(journal).records) >= wanted:
                time.sleep(rng.uniform(0.0, 0.3))
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills.append(len(read_journal(journal).records) if journal.exists() else None)
        proc.wait(timeout=30)
    assert kills, f"the runs finished before they could be killed (seed {seed})"
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    context = f"seed {seed}, killed with {kills} journal records"
    assert_same_store(tmp_path / "ref" / STORE_NAME, out / STORE_NAME)
    assert not list(out.glob("*.merging-*")) and not (out / PARTS_NAME).exists(), context


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
