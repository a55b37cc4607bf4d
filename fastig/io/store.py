"""The HDF5 store: one file per run holding attributions, inputs, metrics and what produced them.

Layout (N rows, attributions H x W)::

    /attributions/<method>     [N, H, W] float32 or float16, one chunk per row, compressed, with a Fletcher-32
                               checksum per chunk (so a damaged row is detected when read); unwritten rows are NaN
    /inputs/ids                [N] UTF-8 strings (image ids or paths); unwritten rows are ""
    /inputs/targets            [N] int64 target class; unwritten rows are -1
    /inputs/done               [N] uint8, 1 once the row's attribution has been written
    /inputs/<column>           [N] optional per-row columns written by a run (``write_column``): ``index`` (the
                               image's index in its dataset), ``paths`` (the image file, relative to the dataset's
                               image folder recorded in the run header, or absolute), ``labels`` (-1: unknown),
                               ``predictions``, ``confidences`` (softmax probability of the prediction), ``notes``
                               (conversions); with ``--steps auto`` also ``passes`` (gradients),
                               ``cost`` (in forward+backward passes) and ``error`` (the error estimate reached);
                               and any further per-row field a run records
    /skipped/<field>           [S] images a run left out and why (``write_skipped``): index, ids, reasons, labels,
                               predictions, confidences
    /metrics/<metric>          [N] float64
    /metrics/<metric>_curve    [N, K] float32, when the metric has curves
    file attributes: format_version, fastig_version, model, method, options (JSON), shape [H, W], dtype, and
                     ``run`` (JSON): the run header of a dataset run (see ``fastig.io.journal.run_header``)

Rows may be written in any order; the datasets grow to the highest row written.

Crash safety of a ``Store`` written in place:

- ``write_rows`` returns only after the rows' data, and then their done flags, have been flushed to the operating
  system (HDF5 ``H5Fflush``). A process killed between two calls leaves a readable file in which every row of
  every returned call is present and marked done.
- HDF5 keeps no journal: a process killed *during* a write or flush can leave the file's metadata inconsistent and
  the whole file unreadable; and HDF5 locks a file opened for writing, so two processes cannot share one store.
  Dataset runs therefore never write their store in place: see :mod:`fastig.io.journal`.
- A store created with ``abandon_on_error=True`` (what the merge writes) stops writing at the first write error
  (disk full, file-size limit): every later write of the HDF5 library is dropped, so the file can still be closed
  cleanly; ``write_rows`` then raises that OSError, and :attr:`Store.write_error` tells the caller to delete the
  file. (HDF5 left to retry writes on a full disk can crash the process when the file is closed.)
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from fastig.errors import FastigError, UnknownNameError

FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
COMPRESSIONS = ("gzip", "lzf", None)
_CURVE_SUFFIX = "_curve"
_REQUIRED_ATTRS = ("format_version", "fastig_version", "model", "method", "options", "shape", "dtype")
VERIFY_BLOCK = 64  # rows read at a time when checking a store's integrity


class StoreError(FastigError):
    """A store file that is missing, corrupt, not a fastig store, or used in a way its mode does not allow."""


class Store:
    """An open HDF5 store (see the module docstring for the layout). Use ``Store.create`` or ``Store.open``.

    Works as a context manager; ``close()`` is idempotent.
    """

    def __init__(self, file: h5py.File, path: Path, sink: "_StopAtFirstError | None" = None):
        self._file = file
        self.path = path
        self._sink = sink
        a = file.attrs  # written once by create(); read once here
        self._attrs = {
            "format_version": int(a["format_version"]), "fastig_version": str(a["fastig_version"]),
            "model": str(a["model"]), "method": str(a["method"]), "options_json": str(a["options"]),
            "shape": tuple(int(s) for s in a["shape"]), "dtype": str(a["dtype"]),
            "run_json": str(a["run"]) if "run" in a else None,
        }

    # ---- opening ----

    @classmethod
    def create(cls, path, *, model: str, method: str, options: dict, shape, dtype: str = "float32",
               compression: str | None = "gzip", overwrite: bool = False, run: dict | None = None,
               abandon_on_error: bool = False) -> "Store":
        """Create a new, empty store for ``model`` x ``method`` x ``options`` with attributions of ``shape`` (H, W).

        Parent directories are created. An existing file is an error unless ``overwrite`` is true. ``run``: the
        run header to record (JSON values). ``abandon_on_error``: stop writing at the first write error (see the
        module docstring and :attr:`write_error`).
        """
        path = Path(path)
        for name, value in (("model", model), ("method", method)):
            if not isinstance(value, str) or not value or "/" in value:
                raise ValueError(f"{name} must be a non-empty name without '/', got {value!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        shape = tuple(shape)
        if len(shape) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
            raise ValueError(f"shape must be (H, W) with positive integers, got {shape}")
        options_json = _options_json(options)
        run_json = None if run is None else _options_json(run)
        if path.exists() and not overwrite:
            raise StoreError(f"store file already exists: {path} (open it to resume, or pass overwrite=True)")

        import fastig  # here, not at module level: fastig/__init__ may import this module

        sink = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if abandon_on_error:
                sink = _StopAtFirstError(open(path, "w+b", buffering=0))  # errors show at once
                file = h5py.File(sink, "w")
            else:
                file = h5py.File(path, "w")
        except OSError as e:
            if sink is not None:
                sink.raw.close()
            raise StoreError(f"cannot create store {path}: {e}") from None
        try:
            file.attrs.update({
                "format_version": FORMAT_VERSION, "fastig_version": fastig.__version__, "model": model,
                "method": method, "options": options_json, "shape": np.array(shape, dtype=np.int64),
                "dtype": dtype, **({} if run_json is None else {"run": run_json}),
            })
            compress = {"compression": compression, "shuffle": compression is not None, "fletcher32": True}
            h, w = shape
            file.create_dataset(f"attributions/{method}", shape=(0, h, w), maxshape=(None, h, w),
                                chunks=(1, h, w), dtype=dtype, fillvalue=np.nan, **compress)
            inputs = file.create_group("inputs")
            row = {"shape": (0,), "maxshape": (None,), "chunks": (1024,)}
            inputs.create_dataset("ids", dtype=h5py.string_dtype(), **row)  # (HDF5 filters no variable-length data)
            inputs.create_dataset("targets", dtype=np.int64, fillvalue=-1, fletcher32=True, **row)
            inputs.create_dataset("done", dtype=np.uint8, fillvalue=0, fletcher32=True, **row)
            file.create_group("metrics")
            file.flush()
            if sink is not None and sink.error is not None:
                raise sink.error
        except BaseException:  # (a write error must still close the file)
            file.close()
            if sink is not None:
                sink.raw.close()
            raise
        return cls(file, path, sink)

    @classmethod
    def open(cls, path, mode: str = "r") -> "Store":
        """Open an existing store read-only (``"r"``) or to add rows and metrics (``"a"``)."""
        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if not path.exists():
            raise StoreError(f"store file not found: {path}")
        if path.is_dir():
            raise StoreError(f"expected a store file but got a directory: {path}")
        if not h5py.is_hdf5(path):
            raise StoreError(f"not an HDF5 file (corrupt, truncated or another format): {path}")
        try:
            file = h5py.File(path, mode)
        except OSError as e:
            raise StoreError(f"cannot open store {path} (corrupt, truncated, or open for writing elsewhere): "
                             f"{e}") from None
        missing = [a for a in _REQUIRED_ATTRS if a not in file.attrs]
        datasets = ["inputs/ids", "inputs/targets", "inputs/done"]
        if "method" in file.attrs:
            datasets.append(f"attributions/{file.attrs['method']}")
        missing += [d for d in datasets if d not in file]
        if missing:
            file.close()
            raise StoreError(f"not a fastig store (missing {', '.join(missing)}): {path}")
        if int(file.attrs["format_version"]) > FORMAT_VERSION:
            version = int(file.attrs["format_version"])
            file.close()
            raise StoreError(f"store {path} has format version {version}; this fastig reads up to "
                             f"{FORMAT_VERSION} (upgrade fastig)")
        return cls(file, path)

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()
        if self._sink is not None and not self._sink.raw.closed:
            self._sink.raw.close()

    @property
    def write_error(self) -> OSError | None:
        """The first write error of a store created with ``abandon_on_error=True`` (None: every write succeeded
        so far). After one, the file is incomplete: close and delete it."""
        return None if self._sink is None else self._sink.error

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"{len(self)} rows" if self._file.id.valid else "closed"
        return f"Store({str(self.path)!r}, {state})"

    # ---- what the run was ----

    @property
    def attrs(self) -> dict:
        """The file attributes, with ``options`` and ``run`` (None when not recorded) decoded from JSON and
        ``shape`` as a tuple."""
        attrs = {k: v for k, v in self._attrs.items() if k not in ("options_json", "run_json")}
        attrs["options"] = json.loads(self._attrs["options_json"])  # a fresh copy each time
        attrs["run"] = None if self._attrs["run_json"] is None else json.loads(self._attrs["run_json"])
        return attrs

    def __len__(self) -> int:
        """The number of rows (the highest row written + 1), done or not."""
        return self._file["inputs/done"].shape[0]

    # ---- rows ----

    def write_rows(self, start_index: int, ids, targets, attributions) -> None:
        """Write rows ``start_index .. start_index + n - 1`` and mark them done; flushed before returning.

        ``ids``: n strings (or paths); ``targets``: n integers; ``attributions``: [n, H, W] array or tensor.
        Rewriting a row replaces it.
        """
        self._require_writable()
        if isinstance(start_index, bool) or not isinstance(start_index, (int, np.integer)) or start_index < 0:
            raise ValueError(f"start_index must be a non-negative integer, got {start_index!r}")
        ids = [str(i) for i in ids]
        targets = _to_numpy(targets)
        if targets.size and targets.dtype.kind not in "iub":  # (an empty list comes out as float)
            raise TypeError(f"targets must be integers, got dtype {targets.dtype}")
        data = _to_numpy(attributions)
        n = len(ids)
        shape = self._attrs["shape"]
        if targets.shape != (n,):
            raise ValueError(f"{n} ids but targets of shape {targets.shape}")
        if data.shape != (n, *shape):
            raise ValueError(f"attributions must be [{n}, {shape[0]}, {shape[1]}] for {n} ids, got {data.shape}")
        if n == 0:
            return
        stored = cast_attributions(data, self._attrs["dtype"])

        end = int(start_index) + n
        if end > len(self):
            for dataset in self._row_datasets():
                dataset.resize(end, axis=0)
        rows = slice(int(start_index), end)
        self._file[f"attributions/{self._attrs['method']}"][rows] = stored
        self._file["inputs/ids"][rows] = ids
        self._file["inputs/targets"][rows] = targets.astype(np.int64)
        self._file.flush()  # the data first, so a row is never marked done before its data is out
        self._file["inputs/done"][rows] = 1
        self._file.flush()
        if self.write_error is not None:
            raise self.write_error

    def done_indices(self) -> np.ndarray:
        """The indices of the rows written so far (int64, ascending)."""
        return np.flatnonzero(self._read(self._file["inputs/done"])).astype(np.int64)

    def damaged_rows(self) -> np.ndarray:
        """The done rows whose attribution cannot be read back (checksum or decompression failure), ascending.

        Reads every row (blocks of :data:`VERIFY_BLOCK`, one row at a time where a block fails). Damage in the
        per-row datasets (ids, targets, done flags, columns) raises :class:`StoreError` when they are read.
        """
        dataset = self._file[f"attributions/{self._attrs['method']}"]
        done = self.done_indices()
        damaged = []
        for start in range(0, len(done), VERIFY_BLOCK):
            block = done[start:start + VERIFY_BLOCK]
            try:
                dataset[int(block[0]):int(block[-1]) + 1]
            except OSError:
                for row in block:
                    try:
                        dataset[int(row)]
                    except OSError:
                        damaged.append(int(row))
        return np.array(damaged, dtype=np.int64)

    def attribution_row(self, row: int) -> np.ndarray:
        """One row of ``/attributions/<method>``, [H, W]; StoreError when it cannot be read."""
        return self._read(self._file[f"attributions/{self._attrs['method']}"], int(row))

    def attributions(self, method: str | None = None) -> np.ndarray:
        """All rows of ``/attributions/<method>`` (default: the run's method), [N, H, W] in the stored dtype."""
        method = self._attrs["method"] if method is None else method
        group = self._file["attributions"]
        if method not in group:
            raise UnknownNameError(f"no attributions for method {method!r} in {self.path}; "
                                   f"available: {', '.join(sorted(group))}")
        return self._read(group[method])

    def ids(self) -> list[str]:
        return list(self._read(self._file["inputs/ids"].asstr()))

    def targets(self) -> np.ndarray:
        return self._read(self._file["inputs/targets"])

    # ---- per-row columns and skipped images ----

    def write_column(self, name: str, values) -> None:
        """Store one value per row as ``/inputs/<name>`` (numbers, or strings); replaces an earlier column."""
        self._require_writable()
        if not isinstance(name, str) or not name or "/" in name or name in _ROW_DATASETS:
            raise ValueError(f"column name must be non-empty, without '/', not one of {_ROW_DATASETS}; got {name!r}")
        values = _column_values(values)
        if values.shape != (len(self),):
            raise ValueError(f"column {name!r} needs one value per row ({len(self)}), got shape {values.shape}")
        inputs = self._file["inputs"]
        if name in inputs:
            del inputs[name]
        inputs.create_dataset(name, data=values, **_checksummed(values))
        self._file.flush()

    def column_names(self) -> list[str]:
        """The optional per-row columns present (see the module docstring)."""
        return sorted(k for k in self._file["inputs"] if k not in _ROW_DATASETS)

    def column(self, name: str) -> np.ndarray:
        """The values of ``/inputs/<name>``, [N] (strings as ``str`` objects)."""
        if name not in self.column_names():
            raise UnknownNameError(f"no column {name!r} in {self.path}; available: "
                                   f"{', '.join(self.column_names()) or 'none'}")
        dataset = self._file["inputs"][name]
        return self._read(dataset.asstr() if h5py.check_string_dtype(dataset.dtype) else dataset)

    def write_skipped(self, index, ids, reasons, labels=None, predictions=None, confidences=None) -> None:
        """Record the images a run left out, with the reason of each (replaces an earlier record).

        ``index``: their dataset indices; ``labels``/``predictions`` (-1: unknown) and ``confidences`` (NaN:
        unknown) are optional.
        """
        self._require_writable()
        index = np.asarray(index, dtype=np.int64)
        n = index.shape[0]
        fields = {"index": index, "ids": np.array([str(i) for i in ids], dtype=h5py.string_dtype()),
                  "reasons": np.array([str(r) for r in reasons], dtype=h5py.string_dtype()),
                  "labels": np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64),
                  "predictions": np.full(n, -1, np.int64) if predictions is None else np.asarray(predictions, np.int64),
                  "confidences": (np.full(n, np.nan, np.float32) if confidences is None
                                  else np.asarray(confidences, np.float32))}
        for key, values in fields.items():
            if values.shape != (n,):
                raise ValueError(f"skipped {key} must have one entry per skipped index ({n}), got {values.shape}")
        if "skipped" in self._file:
            del self._file["skipped"]
        group = self._file.create_group("skipped")
        for key, values in fields.items():
            group.create_dataset(key, data=values, **_checksummed(values))
        self._file.flush()

    def skipped(self) -> dict[str, np.ndarray]:
        """The images the run left out: arrays ``index``, ``ids``, ``reasons``, ``labels``, ``predictions``,
        ``confidences`` (all empty when none was)."""
        if "skipped" not in self._file:
            return {"index": np.zeros(0, np.int64), "ids": np.array([], object), "reasons": np.array([], object),
                    "labels": np.zeros(0, np.int64), "predictions": np.zeros(0, np.int64),
                    "confidences": np.zeros(0, np.float32)}
        group = self._file["skipped"]
        return {k: self._read(group[k].asstr() if k in ("ids", "reasons") else group[k])
                for k in ("index", "ids", "reasons", "labels", "predictions", "confidences")}

    # ---- metrics ----

    def write_metric(self, name: str, values, curves=None) -> None:
        """Store one value per row as ``/metrics/<name>`` (and ``[N, K]`` curves as ``/metrics/<name>_curve``).

        Replaces an earlier result of the same name, including its curves.
        """
        self._require_writable()
        if not isinstance(name, str) or not name or "/" in name or name.endswith(_CURVE_SUFFIX):
            raise ValueError(f"metric name must be non-empty, without '/', not ending in {_CURVE_SUFFIX!r}; "
                             f"got {name!r}")
        values = _to_numpy(values).astype(np.float64)
        n = len(self)
        if values.shape != (n,):
            raise ValueError(f"metric {name!r} needs one value per row ({n}), got shape {values.shape}")
        if curves is not None:
            curves = _to_numpy(curves).astype(np.float32)
            if curves.ndim != 2 or curves.shape[0] != n:
                raise ValueError(f"curves of metric {name!r} must be [{n}, K], got shape {curves.shape}")
        metrics = self._file["metrics"]
        for key in (name, name + _CURVE_SUFFIX):
            if key in metrics:
                del metrics[key]
        metrics.create_dataset(name, data=values)
        if curves is not None:
            metrics.create_dataset(name + _CURVE_SUFFIX, data=curves, chunks=(1, curves.shape[1]) if n else None)
        self._file.flush()

    def metric_names(self) -> list[str]:
        return sorted(k for k in self._file["metrics"] if not k.endswith(_CURVE_SUFFIX))

    def metric(self, name: str) -> np.ndarray:
        """The per-row values of a metric, [N] float64."""
        return self._read(self._metric_dataset(name))

    def curve(self, name: str) -> np.ndarray:
        """The curves of a metric, [N, K] float32."""
        if name in self._file["metrics"] and name + _CURVE_SUFFIX not in self._file["metrics"]:
            raise UnknownNameError(f"metric {name!r} in {self.path} was stored without curves")
        return self._read(self._metric_dataset(name, _CURVE_SUFFIX))

    # ---- helpers ----

    def _metric_dataset(self, name: str, suffix: str = "") -> h5py.Dataset:
        metrics = self._file["metrics"]
        if name + suffix not in metrics:
            raise UnknownNameError(f"no metric {name!r} in {self.path}; available: "
                                   f"{', '.join(self.metric_names()) or 'none'}")
        return metrics[name + suffix]

    def _read(self, dataset, selection=Ellipsis) -> np.ndarray:
        try:
            return dataset[selection]
        except OSError as e:  # e.g. a damaged compressed chunk, or one whose checksum fails
            raise StoreError(f"cannot read {dataset.name} from store {self.path} (corrupt file?): {e}") from None

    def _row_datasets(self) -> list[h5py.Dataset]:
        return [self._file[f"attributions/{self._attrs['method']}"], self._file["inputs/ids"],
                self._file["inputs/targets"], self._file["inputs/done"]]

    def _require_writable(self) -> None:
        if not self._file.id.valid:
            raise StoreError(f"store {self.path} is closed")
        if self._file.mode != "r+":
            raise StoreError(f"store {self.path} is open read-only; open it with mode='a' to write")


_ROW_DATASETS = ("ids", "targets", "done")


def _checksummed(values: np.ndarray) -> dict:
    """Dataset options that give a non-empty array of numbers a Fletcher-32 checksum (filters need a chunked
    dataset, and HDF5 filters no variable-length strings)."""
    return {"chunks": True, "fletcher32": True} if values.size and values.dtype.kind in "biuf" else {}


class _StopAtFirstError:
    """The file object under a store created with ``abandon_on_error``: passes every call to ``raw`` until the
    first write error, which it keeps in ``error``; from then on it touches ``raw`` no more and drops every write,
    so that the HDF5 library finishes and closes the file without an error (the file is to be deleted). It never
    raises: an exception raised inside h5py's file driver stays pending in the interpreter and breaks the next
    call, so the store checks ``error`` after each write instead."""

    def __init__(self, raw):
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):  # an unbuffered write may be partial
                    done += self.raw.write(view[done:])
            except OSError as e:
                self.error = e
        return len(view)

    def truncate(self, size=None):
        if self.error is None:
            try:
                return self.raw.truncate(size)
            except OSError as e:
                self.error = e
        return size

    def seek(self, offset, whence=0):
        return self.raw.seek(offset, whence) if self.error is None else offset

    def tell(self):
        return self.raw.tell() if self.error is None else 0

    def read(self, size=-1):
        return self.raw.read(size) if self.error is None else b""

    def flush(self):
        if self.error is None:
            self.raw.flush()


def cast_attributions(data: np.ndarray, dtype: str) -> np.ndarray:
    """``data`` in the store's ``dtype``; a ValueError when a finite value overflows it (float16)."""
    with np.errstate(over="ignore"):  # overflow is reported just below, as an error
        stored = np.asarray(data).astype(dtype)
    overflow = np.isinf(stored) & np.isfinite(data)
    if overflow.any():
        raise ValueError(f"{int(overflow.sum())} attribution values overflow {dtype} "
                         f"(|value| up to {np.abs(data[overflow]).max():.3g}); create the store with float32")
    return stored


def _column_values(values) -> np.ndarray:
    values = _to_numpy(values) if hasattr(values, "detach") else values
    if isinstance(values, (list, tuple)) and values and all(isinstance(v, str) for v in values):
        return np.array(values, dtype=h5py.string_dtype())
    array = np.asarray(values)
    if array.dtype.kind in "US":
        return array.astype(h5py.string_dtype())
    if array.size == 0 and isinstance(values, (list, tuple)):
        return np.zeros(0, np.int64)
    return array


def _options_json(options) -> str:
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    try:
        return json.dumps(options, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"options must be JSON-serializable (numbers, strings, lists, dicts): {e}") from None


def _to_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor; duck-typed so the store does not need torch
        values = values.detach().cpu()
        if str(values.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            values = values.float()
        values = values.numpy()
    return np.asarray(values)
