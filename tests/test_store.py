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
                     "method": "ig", "options": OPTIONS, "shape": (4, 3), "dtype": "float32"}
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


def test_matches(tmp_path):
    with make(tmp_path) as store:
        assert store.matches("resnet18", "ig", dict(OPTIONS))
        assert store.matches("resnet18", "ig", {"baselines": (0.0, 0.5), "method": "riemann_trapezoid",
                                                "n_steps": 32.0})  # key order, tuple vs list, 32 vs 32.0
        assert not store.matches("resnet50", "ig", OPTIONS)
        assert not store.matches("resnet18", "latent_ig", OPTIONS)
        assert not store.matches("resnet18", "ig", {**OPTIONS, "n_steps": 64})
        assert not store.matches("resnet18", "ig", {**OPTIONS, "idgi": True})
        assert not store.matches("resnet18", "ig", {})


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
