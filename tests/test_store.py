"""fastig.io.store: the HDF5 layout, out-of-order rows, dtypes, metrics, attrs, done flags, matches, errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

import fastig
from fastig.errors import FastigError, UnknownNameError
from fastig.io.journal import (Journal, encode_record, merge, read_journal, read_record_data, require_same_run,
                               run_header, stored_header)
from fastig.io.store import Store, StoreError

OPTIONS = {"n_steps": 32, "method": "riemann_trapezoid", "baselines": [0.0, 0.5]}


def make(tmp_path, name="run.h5", shape=(6, 5), **kwargs):
    return Store.create(tmp_path / name, model="resnet18", method="ig", options=OPTIONS, shape=shape, **kwargs)


def random_rows(n, shape=(6, 5), seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def test_round_trip_rows_written_out_of_order(tmp_path):
    data = random_rows(7)
    ids = [f"img_{i}.jpg" for i in range(7)]
    targets = np.arange(7) * 10
    with make(tmp_path) as store:
        for start, stop in [(4, 7), (0, 2), (2, 4)]:  # last rows first, then the first, then the middle
            store.write_rows(start, ids[start:stop], targets[start:stop], data[start:stop])
    with Store.open(tmp_path / "run.h5") as store:
        assert len(store) == 7
        np.testing.assert_array_equal(store.attributions(), data)
        assert store.attributions().dtype == np.float32
        assert store.ids() == ids
        np.testing.assert_array_equal(store.targets(), targets)
        np.testing.assert_array_equal(store.done_indices(), np.arange(7))


def test_layout_is_the_documented_one(tmp_path):
    with make(tmp_path) as store:
        store.write_rows(0, ["a", "b"], [1, 2], random_rows(2))
        store.write_metric("insertion", [0.5, 0.25], curves=np.ones((2, 4)))
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["attributions/ig"].shape == (2, 6, 5)
        assert f["attributions/ig"].chunks == (1, 6, 5)  # one chunk per row
        assert f["attributions/ig"].compression == "gzip"
        assert f["attributions/ig"].maxshape == (None, 6, 5)
        assert list(f["inputs/ids"].asstr()[...]) == ["a", "b"]
        assert f["inputs/targets"].dtype == np.int64
        assert f["metrics/insertion"].shape == (2,) and f["metrics/insertion_curve"].shape == (2, 4)
        assert f.attrs["model"] == "resnet18" and f.attrs["method"] == "ig"
        assert json.loads(f.attrs["options"]) == OPTIONS
        assert f.attrs["fastig_version"] == fastig.__version__


def test_gaps_read_as_not_done(tmp_path):
    with make(tmp_path) as store:
        store.write_rows(3, ["d"], [7], random_rows(1))
        assert len(store) == 4
        np.testing.assert_array_equal(store.done_indices(), [3])
        a = store.attributions()
        assert np.isnan(a[:3]).all() and np.isfinite(a[3]).all()
        assert store.ids() == ["", "", "", "d"]
        np.testing.assert_array_equal(store.targets(), [-1, -1, -1, 7])


def test_rewriting_a_row_replaces_it(tmp_path):
    with make(tmp_path) as store:
        store.write_rows(0, ["a", "b"], [1, 2], random_rows(2, seed=1))
        new = random_rows(1, seed=2)
        store.write_rows(1, ["b2"], [5], new)
        assert len(store) == 2 and store.ids() == ["a", "b2"]
        np.testing.assert_array_equal(store.attributions()[1], new[0])


def test_float16_storage(tmp_path):
    data = random_rows(3) * 100
    with make(tmp_path, dtype="float16", compression="lzf") as store:
        store.write_rows(0, ["a", "b", "c"], [0, 1, 2], torch.from_numpy(data))  # a tensor works too
    with Store.open(tmp_path / "run.h5") as store:
        out = store.attributions()
        assert out.dtype == np.float16 and store.attrs["dtype"] == "float16"
        np.testing.assert_array_equal(out, data.astype(np.float16))
        np.testing.assert_allclose(out.astype(np.float32), data, rtol=1e-3)


def test_float16_overflow_is_an_error(tmp_path):
    with make(tmp_path, dtype="float16") as store:
        data = random_rows(1)
        data[0, 0, 0] = 1e6
        with pytest.raises(ValueError, match="overflow float16"):
            store.write_rows(0, ["a"], [0], data)
        assert len(store) == 0  # nothing was written


def test_uncompressed_and_bfloat16_tensor(tmp_path):
    data = torch.randn(2, 6, 5, dtype=torch.bfloat16)
    with make(tmp_path, compression=None) as store:
        store.write_rows(0, ["a", "b"], torch.tensor([3, 4]), data)
        np.testing.assert_array_equal(store.attributions(), data.float().numpy())
        np.testing.assert_array_equal(store.targets(), [3, 4])


def test_metrics_and_curves(tmp_path):
    with make(tmp_path) as store:
        store.write_rows(0, list("abc"), [0, 1, 2], random_rows(3))
        curves = np.linspace(0, 1, 12).reshape(3, 4)
        store.write_metric("deletion", np.array([0.1, 0.2, 0.3]), curves=curves)
        store.write_metric("completeness", torch.tensor([1.0, 2.0, 3.0]))
    with Store.open(tmp_path / "run.h5") as store:
        np.testing.assert_array_equal(store.metric("deletion"), [0.1, 0.2, 0.3])
        assert store.metric("deletion").dtype == np.float64
        np.testing.assert_allclose(store.curve("deletion"), curves, rtol=1e-6)
        np.testing.assert_array_equal(store.metric("completeness"), [1, 2, 3])
        assert store.metric_names() == ["completeness", "deletion"]
        with pytest.raises(UnknownNameError, match="without curves"):
            store.curve("completeness")
        with pytest.raises(UnknownNameError, match="no metric 'pic'.*completeness, deletion"):
            store.metric("pic")


def test_rewriting_a_metric_replaces_values_and_stale_curves(tmp_path):
    with make(tmp_path) as store:
        store.write_rows(0, ["a", "b"], [0, 1], random_rows(2))
        store.write_metric("insertion", [1.0, 2.0], curves=np.ones((2, 3)))
        store.write_metric("insertion", [3.0, 4.0])
        np.testing.assert_array_equal(store.metric("insertion"), [3, 4])
        with pytest.raises(UnknownNameError):
            store.curve("insertion")


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="bad/name", values=[1.0, 2.0]), "metric name"),
    (dict(name="x_curve", values=[1.0, 2.0]), "metric name"),
    (dict(name="x", values=[1.0]), "one value per row"),
    (dict(name="x", values=[1.0, 2.0], curves=np.ones((3, 4))), r"\[2, K\]"),
])
def test_bad_metrics(tmp_path, kwargs, message):
    with make(tmp_path) as store:
        store.write_rows(0, ["a", "b"], [0, 1], random_rows(2))
        with pytest.raises(ValueError, match=message):
            store.write_metric(**kwargs)


def test_attrs(tmp_path):
    with make(tmp_path, shape=(4, 3)) as store:
        attrs = store.attrs
    assert attrs == {"format_version": 1, "fastig_version": fastig.__version__, "model": "resnet18",
                     "method": "ig", "options": OPTIONS, "shape": (4, 3), "dtype": "float32", "run": None}
    attrs["options"]["n_steps"] = 1  # a copy: changing it does not change the store
    with Store.open(tmp_path / "run.h5") as store:
        assert store.attrs["options"] == OPTIONS


def test_done_flags_survive_reopening_and_resume(tmp_path):
    data = random_rows(6)
    with make(tmp_path) as store:
        store.write_rows(0, ["a", "b"], [0, 1], data[:2])
        store.write_rows(4, ["e"], [4], data[4:5])
    with Store.open(tmp_path / "run.h5", mode="a") as store:
        done = set(store.done_indices().tolist())
        assert done == {0, 1, 4}
        for i in range(6):  # a resumed run writes only the missing rows
            if i not in done:
                store.write_rows(i, [f"r{i}"], [i], data[i:i + 1])
    with Store.open(tmp_path / "run.h5") as store:
        np.testing.assert_array_equal(store.done_indices(), np.arange(6))
        np.testing.assert_array_equal(store.attributions(), data)
        assert store.ids() == ["a", "b", "r2", "r3", "e", "r5"]


def header(**changes):
    fields = dict(model="resnet18", weights="random:0", seed=0, method="ig", options=dict(OPTIONS), target=None,
                  inputs={"images": 1}, filters=None, shape=(6, 5), dtype="float32")
    return run_header(**{**fields, **changes})


def test_run_headers_are_compared_as_json_values_and_differences_named(tmp_path):
    recorded = header()
    with make(tmp_path, run=recorded) as store:
        assert stored_header(store) == recorded
    require_same_run(recorded, header(options={"baselines": (0.0, 0.5), "method": "riemann_trapezoid",
                                               "n_steps": 32.0}), "here")  # key order, tuple vs list, 32 vs 32.0
    require_same_run({**recorded, "kind": "run"}, recorded, "here")  # the journal's record kind is no setting
    for change, named in ((dict(model="resnet50"), "model"), (dict(weights="sha256:ab"), "weights"),
                          (dict(seed=1), "seed"), (dict(method="latent_ig"), "method"),
                          (dict(options={**OPTIONS, "idgi": True}), "options.idgi"), (dict(target=3), "target"),
                          (dict(dtype="float16"), "dtype")):
        with pytest.raises(StoreError, match=f"other settings: {named}: .* there, .* now"):
            require_same_run(recorded, header(**change), "here")
    with make(tmp_path, name="old.h5") as store:  # a store of an older fastig: no run header
        with pytest.raises(StoreError, match="older fastig.*weights"):
            require_same_run(stored_header(store), recorded, "old.h5")


def test_read_only_store_refuses_writes(tmp_path):
    make(tmp_path).close()
    with Store.open(tmp_path / "run.h5") as store:
        with pytest.raises(StoreError, match="read-only.*mode='a'"):
            store.write_rows(0, ["a"], [0], random_rows(1))
        with pytest.raises(StoreError, match="read-only"):
            store.write_metric("x", [])
    with pytest.raises(StoreError, match="closed"):
        store.write_rows(0, ["a"], [0], random_rows(1))
    store.close()  # idempotent


@pytest.mark.parametrize("args,error,message", [
    ((-1, ["a"], [0], random_rows(1)), ValueError, "start_index"),
    ((0, ["a", "b"], [0], random_rows(2)), ValueError, "2 ids but targets"),
    ((0, ["a"], [0], random_rows(1, shape=(5, 6))), ValueError, r"\[1, 6, 5\]"),
    ((0, ["a"], [0.5], random_rows(1)), TypeError, "integers"),
])
def test_bad_rows(tmp_path, args, error, message):
    with make(tmp_path) as store:
        with pytest.raises(error, match=message):
            store.write_rows(*args)


def test_empty_write_is_a_no_op(tmp_path):
    with make(tmp_path) as store:
        store.write_rows(5, [], np.zeros(0, int), np.zeros((0, 6, 5)))
        store.write_rows(5, [], [], np.zeros((0, 6, 5)))
        assert len(store) == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="a/b"), "method"),
    (dict(model=""), "model"),
    (dict(dtype="float64"), "dtype"),
    (dict(compression="zstd"), "compression"),
    (dict(shape=(6,)), "shape"),
    (dict(shape=(0, 5)), "shape"),
    (dict(options=["n_steps"]), "dict"),
    (dict(options={"baseline": object()}), "JSON"),
])
def test_bad_create_arguments(tmp_path, kwargs, message):
    args = {**dict(model="m", method="ig", options={}, shape=(2, 2)), **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        Store.create(tmp_path / "x.h5", **args)
    assert not (tmp_path / "x.h5").exists()


def test_create_refuses_an_existing_file_unless_told(tmp_path):
    make(tmp_path).close()
    with pytest.raises(StoreError, match="already exists.*run.h5"):
        make(tmp_path)
    with make(tmp_path, overwrite=True, shape=(2, 2)) as store:
        assert store.attrs["shape"] == (2, 2)


def test_create_makes_parent_directories(tmp_path):
    with Store.create(tmp_path / "a" / "b" / "s.h5", model="m", method="ig", options={}, shape=(2, 2)) as store:
        assert store.path.exists()


def test_missing_file(tmp_path):
    with pytest.raises(StoreError, match="not found.*nope.h5"):
        Store.open(tmp_path / "nope.h5")


def test_directory(tmp_path):
    with pytest.raises(StoreError, match="directory"):
        Store.open(tmp_path)


def test_not_hdf5(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(b"this is not an HDF5 file" * 100)
    with pytest.raises(StoreError, match="not an HDF5 file.*junk.h5"):
        Store.open(path)
    assert issubclass(StoreError, FastigError)


def test_truncated_store(tmp_path):
    with make(tmp_path) as store:
        store.write_rows(0, [f"{i}" for i in range(20)], np.arange(20), random_rows(20))
    data = (tmp_path / "run.h5").read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])  # the signature survives, the rest does not
    with pytest.raises(StoreError, match="cut.h5"):
        with Store.open(cut) as store:
            store.attributions()  # (in case the open itself succeeded)


def test_hdf5_file_that_is_not_a_store(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not a fastig store.*other.h5"):
        Store.open(path)


def test_newer_format_is_refused(tmp_path):
    make(tmp_path).close()
    with h5py.File(tmp_path / "run.h5", "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format version 99"):
        Store.open(tmp_path / "run.h5")


def test_bad_mode(tmp_path):
    make(tmp_path).close()
    with pytest.raises(ValueError, match="mode"):
        Store.open(tmp_path / "run.h5", mode="w")


def test_unknown_method(tmp_path):
    with make(tmp_path) as store:
        with pytest.raises(UnknownNameError, match="'saliency'.*available: ig"):
            store.attributions("saliency")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_rows_written_before_a_kill_survive(tmp_path):
    """The documented guarantee: a process killed between write_rows calls leaves every returned row readable."""
    path = tmp_path / "killed.h5"
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from fastig.io.store import Store
        store = Store.create({str(path)!r}, model="m", method="ig", options={{}}, shape=(4, 4))
        for i in (2, 0, 1):
            store.write_rows(i, [f"id{{i}}"], [i], np.full((1, 4, 4), i, np.float32))
        print("written", flush=True)
        time.sleep(60)  # killed here, without close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    with Store.open(path) as store:
        np.testing.assert_array_equal(store.done_indices(), [0, 1, 2])
        assert store.ids() == ["id0", "id1", "id2"]
        np.testing.assert_array_equal(store.attributions()[:, 0, 0], [0, 1, 2])


def test_damaged_chunk_is_a_store_error(tmp_path):
    with make(tmp_path, shape=(32, 32)) as store:
        store.write_rows(0, ["a"], [0], random_rows(1, shape=(32, 32)))
    with h5py.File(tmp_path / "run.h5", "r") as f:  # where the compressed row sits in the file
        chunk = f["attributions/ig"].id.get_chunk_info(0)
        offset, size = chunk.byte_offset, chunk.size
    data = bytearray((tmp_path / "run.h5").read_bytes())
    data[offset:offset + size] = b"\x00" * size
    (tmp_path / "run.h5").write_bytes(bytes(data))
    with Store.open(tmp_path / "run.h5") as store:
        assert store.ids() == ["a"]  # the rest of the file is fine
        with pytest.raises(StoreError, match="cannot read /attributions/ig from store.*run.h5"):
            store.attributions()


# ---- columns, skipped images ----------------------------------------------------------------------------------


def test_columns_and_skipped_records(tmp_path):
    with make(tmp_path) as store:
        store.write_rows(0, ["a", "b"], [1, 2], random_rows(2))
        store.write_column("index", np.array([10, 3]))
        store.write_column("notes", ["grey image", ""])
        store.write_column("confidences", np.array([0.5, 0.25], np.float32))
        store.write_skipped([4, 7], ["x", "y"], ["misclassified: predicted 1, label 2", "unreadable image: empty"],
                            labels=[2, -1], predictions=[1, -1], confidences=[0.9, np.nan])
    with Store.open(tmp_path / "run.h5") as store:
        assert store.column_names() == ["confidences", "index", "notes"]
        np.testing.assert_array_equal(store.column("index"), [10, 3])
        assert list(store.column("notes")) == ["grey image", ""]
        skipped = store.skipped()
        np.testing.assert_array_equal(skipped["index"], [4, 7])
        assert list(skipped["reasons"]) == ["misclassified: predicted 1, label 2", "unreadable image: empty"]
        np.testing.assert_array_equal(skipped["labels"], [2, -1])
        assert skipped["confidences"][0] == np.float32(0.9) and np.isnan(skipped["confidences"][1])
        with pytest.raises(UnknownNameError, match="no column 'labels'"):
            store.column("labels")
    with make(tmp_path, name="empty.h5") as store:
        assert store.skipped()["index"].shape == (0,) and store.column_names() == []
        for name in ("done", "a/b", ""):
            with pytest.raises(ValueError, match="column name"):
                store.write_column(name, [])
        with pytest.raises(ValueError, match="one value per row"):
            store.write_column("x", [1, 2])


# ---- journals: torn appends, damage, locking ------------------------------------------------------------------

RUN = {"model": "m", "method": "ig", "options": {"n_steps": 4}, "shape": [3, 2], "dtype": "float32"}


def row_record(index, value):
    meta = {"kind": "row", "index": index, "id": f"img{index}", "target": index % 3, "label": None,
            "prediction": index % 3, "confidence": 0.5, "note": None}
    return meta, np.full((3, 2), value, np.float32).tobytes()


def test_journal_round_trip_and_reopening_appends(tmp_path):
    path = tmp_path / "j" / "rank-0.journal"
    with Journal.open(path, RUN) as journal:
        journal.append([row_record(5, 1.0), row_record(2, 2.0)])
        journal.append([({"kind": "skip", "index": 9, "id": "img9", "reason": "empty"}, b"")])
    with Journal.open(path, RUN) as journal:
        assert len(journal.contents.records) == 3 and journal.rows == 2
        journal.append([row_record(1, 3.0)])
    contents = read_journal(path)
    assert contents.run == RUN and contents.damaged == []
    assert [r.meta["index"] for r in contents.records] == [5, 2, 9, 1]
    assert contents.valid_end == contents.file_size == path.stat().st_size
    with open(path, "rb") as f:
        data = read_record_data(f, contents.records[3])
    np.testing.assert_array_equal(np.frombuffer(data, np.float32), np.full(6, 3.0))


def test_a_journal_never_appended_to_leaves_nothing(tmp_path):
    path = tmp_path / "j" / "rank-0.journal"
    with Journal.open(path, RUN):
        assert path.exists() and path.stat().st_size == 0  # (created, so it can be locked)
    assert not path.exists()


def test_a_torn_append_at_any_byte_loses_only_the_record_in_flight(tmp_path):
    """A kill during an append leaves a prefix of the new bytes: every cut point is tried."""
    path = tmp_path / "full.journal"
    with Journal.open(path, RUN) as journal:
        journal.append([row_record(0, 1.0)])
        journal.append([row_record(1, 2.0), row_record(2, 3.0)])  # one write holding two records
    full = path.read_bytes()
    boundaries = [r.data_offset + r.data_length for r in read_journal(path).records]  # where each record ends
    assert boundaries[-1] == len(full)
    cut = tmp_path / "cut.journal"
    for length in range(len(full) + 1):
        cut.write_bytes(full[:length])
        contents = read_journal(cut)
        complete = [b for b in boundaries if b <= length]
        assert [r.meta["index"] for r in contents.records] == list(range(len(complete))), length
        assert contents.damaged == [], length  # a torn tail is not damage
        if complete:
            assert contents.valid_end >= complete[-1]
        assert contents.valid_end <= length
    for length in (len(full) - 1, boundaries[0] + 7, boundaries[1] - 3, 20):  # reopen a torn journal and go on
        cut.write_bytes(full[:length])
        with Journal.open(cut, RUN) as journal:
            journal.append([row_record(7, 7.0)])
        contents = read_journal(cut)
        indices = [r.meta["index"] for r in contents.records]
        assert indices == [i for i, b in enumerate(boundaries) if b <= length] + [7]
        assert contents.valid_end == contents.file_size and contents.damaged == []


def test_garbage_tails_are_dropped(tmp_path):
    path = tmp_path / "j.journal"
    with Journal.open(path, RUN) as journal:
        journal.append([row_record(0, 1.0), row_record(1, 2.0)])
    garbage = tmp_path / "garbage.journal"
    garbage.write_bytes(path.read_bytes() + b"\x00" * 100)  # a power loss can leave zeros past the last record
    contents = read_journal(garbage)
    assert [r.meta["index"] for r in contents.records] == [0, 1] and contents.damaged == []
    with Journal.open(garbage, RUN):  # the owner cuts the tail away
        pass
    assert garbage.read_bytes() == path.read_bytes()


def journal_of(path, n=8, per_append=2):
    with Journal.open(path, RUN) as journal:
        for start in range(0, n, per_append):
            journal.append([row_record(i, float(i)) for i in range(start, start + per_append)])
    return path.read_bytes()


def test_a_damaged_record_is_skipped_alone_and_the_rest_survive(tmp_path):
    """Issue 16.1: one flipped byte in a record's data lost that record and every later one."""
    full = journal_of(tmp_path / "j.journal")
    records = read_journal(tmp_path / "j.journal").records
    for k, where in ((5, "data"), (2, "metadata"), (6, "header"), (0, "data")):
        record = records[k]
        meta_start = record.data_offset - len(json.dumps(record.meta, sort_keys=True).encode())
        offset = {"data": record.data_offset + 3, "metadata": meta_start + 2, "header": meta_start - 10}[where]
        data = bytearray(full)
        data[offset] ^= 0x40
        damaged = tmp_path / f"damaged-{k}.journal"
        damaged.write_bytes(bytes(data))
        contents = read_journal(damaged)
        assert [r.meta["index"] for r in contents.records] == [i for i in range(8) if i != k], where
        assert [d.index for d in contents.damaged] == [k if where == "data" else None], where
        with Journal.open(damaged, RUN) as journal:  # the owner keeps the records after the damage
            journal.append([row_record(8, 8.0)])
        assert [r.meta["index"] for r in read_journal(damaged).records] == [i for i in range(9) if i != k], where


def test_a_damaged_run_header_is_replaced_by_its_copy_in_the_next_append(tmp_path):
    full = bytearray(journal_of(tmp_path / "j.journal"))
    full[30] ^= 0x01  # inside the first append's run header record
    (tmp_path / "j.journal").write_bytes(bytes(full))
    contents = read_journal(tmp_path / "j.journal")
    assert contents.run == RUN and [r.meta["index"] for r in contents.records] == list(range(8))
    single = bytearray(journal_of(tmp_path / "one.journal", n=2))
    single[30] ^= 0x01  # the only copy: its rows cannot be told apart from another run's
    (tmp_path / "one.journal").write_bytes(bytes(single))
    assert read_journal(tmp_path / "one.journal").run is None
    with pytest.raises(StoreError, match="no intact run header.*move it away"):
        Journal.open(tmp_path / "one.journal", RUN)


def test_journal_refuses_another_run_and_a_second_writer(tmp_path):
    path = tmp_path / "j.journal"
    with Journal.open(path, RUN) as journal:
        with pytest.raises(StoreError, match="another process"):
            Journal.open(path, RUN)
        journal.append([row_record(0, 1.0)])
    with pytest.raises(StoreError, match="other settings: options"):
        Journal.open(path, {**RUN, "options": {"n_steps": 8}})
    with Journal.open(path, RUN) as journal:  # the lock went with the first writer
        journal.append([row_record(1, 1.0)])
    header_only = tmp_path / "h.journal"
    header_only.write_bytes(encode_record({**RUN, "options": {"n_steps": 8}, "kind": "run"}))
    with Journal.open(header_only, RUN) as journal:  # a header without rows claims nothing: it is replaced
        journal.append([row_record(0, 1.0)])
    assert read_journal(header_only).run == RUN


def test_a_failed_append_keeps_every_earlier_record(tmp_path):
    """A write error (here the file-size limit, EFBIG) is one ResourceError; the earlier records stay intact."""
    path = tmp_path / "j.journal"
    script = textwrap.dedent(f"""
        import os, resource
        import numpy as np
        from fastig.errors import ResourceError
        from fastig.io.journal import Journal
        def row(i):
            return {{"kind": "row", "index": i, "id": str(i), "target": 0}}, np.zeros(2000, np.float32).tobytes()
        with Journal.open({str(path)!r}, {RUN!r}) as journal:
            journal.append([row(0), row(1)])
            limit = os.path.getsize({str(path)!r}) + 5000
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            try:
                journal.append([row(2), row(3)])  # more than the limit allows
            except ResourceError as e:
                print("ResourceError", e)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ResourceError cannot write the journal") and "File too large" in result.stdout
    assert "the 2 row(s) it recorded before are kept" in result.stdout
    contents = read_journal(path)
    assert [r.meta["index"] for r in contents.records] == [0, 1] and contents.valid_end == contents.file_size


# ---- merge ----------------------------------------------------------------------------------------------------


def test_merge_orders_rows_keeps_each_index_once_and_extends_an_existing_store(tmp_path):
    with Journal.open(tmp_path / "a.journal", RUN) as a, Journal.open(tmp_path / "b.journal", RUN) as b:
        a.append([row_record(4, 4.0), row_record(0, 0.0)])
        b.append([row_record(2, 2.0), row_record(4, 4.0),  # index 4 twice (a rank redone after a kill)
                  ({"kind": "skip", "index": 3, "id": "img3", "reason": "low confidence: 0.1 < 0.5",
                    "label": 1, "prediction": 0, "confidence": 0.1}, b"")])
    final = tmp_path / "final.h5"
    result = merge(final, [tmp_path / "a.journal", tmp_path / "b.journal"], RUN, compression="lzf")
    assert (result.rows, result.skipped, result.damaged) == (3, 1, 0)
    with Store.open(final) as store:
        np.testing.assert_array_equal(store.column("index"), [0, 2, 4])
        assert store.ids() == ["img0", "img2", "img4"]
        np.testing.assert_array_equal(store.attributions()[:, 0, 0], [0.0, 2.0, 4.0])
        np.testing.assert_array_equal(store.targets(), [0, 2, 1])
        np.testing.assert_array_equal(store.column("labels"), [-1, -1, -1])
        assert list(store.skipped()["reasons"]) == ["low confidence: 0.1 < 0.5"]
        assert store.attrs["options"] == RUN["options"]
    with Journal.open(tmp_path / "c.journal", RUN) as c:  # a later run adds rows to the final store
        c.append([row_record(1, 1.0), row_record(3, 3.0)])  # 3 was skipped before, attributed now
    merge(final, [tmp_path / "c.journal"], RUN)
    with Store.open(final) as store:
        np.testing.assert_array_equal(store.column("index"), [0, 1, 2, 3, 4])
        np.testing.assert_array_equal(store.attributions()[:, 2, 1], [0.0, 1.0, 2.0, 3.0, 4.0])
        assert store.skipped()["index"].shape == (0,)  # an attributed image is not also skipped


def test_merge_replaces_atomically_and_cleans_up_after_a_kill(tmp_path, monkeypatch):
    with Journal.open(tmp_path / "a.journal", RUN) as a:
        a.append([row_record(0, 1.0)])
    final = tmp_path / "final.h5"
    merge(final, [tmp_path / "a.journal"], RUN)
    before = final.read_bytes()
    with Journal.open(tmp_path / "b.journal", RUN) as b:
        b.append([row_record(1, 2.0)])

    def killed(*args):  # the process dies just before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr("fastig.io.journal.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        merge(final, [tmp_path / "a.journal", tmp_path / "b.journal"], RUN)
    assert final.read_bytes() == before and len(list(tmp_path.glob("final.h5.merging-*"))) == 1
    monkeypatch.undo()
    merge(final, [tmp_path / "a.journal", tmp_path / "b.journal"], RUN)
    assert not list(tmp_path.glob("final.h5.merging-*"))
    with Store.open(final) as store:
        np.testing.assert_array_equal(store.column("index"), [0, 1])


def test_merge_drops_damaged_rows_and_refuses_other_runs(tmp_path):
    path = tmp_path / "a.journal"
    with Journal.open(path, RUN) as a:
        a.append([row_record(0, 1.0), row_record(1, 2.0)])
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    result = merge(tmp_path / "f.h5", [path], RUN)
    assert (result.rows, result.damaged) == (1, 1)
    with pytest.raises(StoreError, match="other settings: method"):
        merge(tmp_path / "g.h5", [path], {**RUN, "method": "saliency"})
    with pytest.raises(StoreError, match="other settings: dtype"):
        merge(tmp_path / "f.h5", [], {**RUN, "dtype": "float16"})
