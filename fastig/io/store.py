"""The HDF5 store: one file per run holding attributions, inputs, metrics and what produced them; and the journals
and merge that make dataset-scale runs survive a kill at any moment.

Layout (N rows, attributions H x W)::

    /attributions/<method>     [N, H, W] float32 or float16, one chunk per row, compressed; unwritten rows are NaN
    /inputs/ids                [N] UTF-8 strings (image ids or paths); unwritten rows are ""
    /inputs/targets            [N] int64 target class; unwritten rows are -1
    /inputs/done               [N] uint8, 1 once the row's attribution has been written
    /inputs/<column>           [N] optional per-row columns written by a run (``write_column``): ``index`` (the
                               image's index in its dataset), ``labels`` (-1: unknown), ``predictions``,
                               ``confidences`` (softmax probability of the prediction), ``notes`` (conversions);
                               with ``--steps auto`` also ``passes`` (gradients), ``cost`` (in forward+backward
                               passes) and ``error`` (the error estimate reached), from the journal rows' "columns"
    /skipped/<field>           [S] images a run left out and why (``write_skipped``): index, ids, reasons, labels,
                               predictions, confidences
    /metrics/<metric>          [N] float64
    /metrics/<metric>_curve    [N, K] float32, when the metric has curves
    file attributes: format_version, fastig_version, model, method, options (JSON), shape [H, W], dtype

Rows may be written in any order; the datasets grow to the highest row written.

Crash safety of a ``Store`` written in place:

- ``write_rows`` returns only after the rows' data, and then their done flags, have been flushed to the operating
  system (HDF5 ``H5Fflush``). A process killed between two calls leaves a readable file in which every row of
  every returned call is present and marked done.
- HDF5 keeps no journal: a process killed *during* a write or flush can leave the file's metadata inconsistent and
  the whole file unreadable; and HDF5 locks a file opened for writing, so two processes cannot share one store.

Crash safety of a run (``fastig.run``, ``fastig attribute``), which therefore never writes its store in place:

1. Each process appends its results to its own **journal** (:class:`Journal`), a plain file of records. A record
   is a fixed header (magic, lengths, CRC-32 of the metadata and of the data, and a CRC-32 of the header itself),
   then JSON metadata, then the raw attribution. Records are only ever appended (one ``write`` per batch, then
   ``flush`` and, by default, ``fsync``); bytes already in the file are never modified.
2. Reading a journal keeps its longest prefix of complete records whose checksums hold. A SIGKILL can interrupt
   only the append in progress: the kernel keeps what ``write`` copied, so the file is the old records followed
   by a prefix of the new bytes; that prefix is shorter than its header announces (or fails a CRC), so it is
   dropped, and the owner truncates it away when it reopens the journal. Earlier records are untouched, so at
   most the batch in flight is lost. (``fsync`` extends this to a power loss, where the tail may hold garbage:
   the CRCs reject it.) An advisory lock (``flock``) keeps a second process from appending to the same journal.
3. The final store is only ever produced by :func:`merge`: it reads the current final store (if any) and every
   journal, writes a complete new store into a fresh temporary file beside it, fsyncs it, and renames it
   over the final path with ``os.replace`` (atomic on POSIX and Windows), then fsyncs the folder. A kill
   before the rename leaves the old final store (or none) and a stray temporary file that the next merge
   removes; a kill after it leaves the new one. Readers never see a partial store. Journals are deleted only
   after the rename; if a kill comes first, the next merge reads their rows again and keeps each index once.
4. A restarted run counts as done every index found in the final store or in any journal (its own or another
   process's), so it redoes only the images whose records were lost, and never duplicates one.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fastig.errors import FastigError, UnknownNameError

FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
COMPRESSIONS = ("gzip", "lzf", None)
_CURVE_SUFFIX = "_curve"
_REQUIRED_ATTRS = ("format_version", "fastig_version", "model", "method", "options", "shape", "dtype")


class StoreError(FastigError):
    """A store file that is missing, corrupt, not a fastig store, or used in a way its mode does not allow."""


class Store:
    """An open HDF5 store (see the module docstring for the layout). Use ``Store.create`` or ``Store.open``.

    Works as a context manager; ``close()`` is idempotent.
    """

    def __init__(self, file: h5py.File, path: Path):
        self._file = file
        self.path = path
        a = file.attrs  # written once by create(); read once here
        self._attrs = {
            "format_version": int(a["format_version"]), "fastig_version": str(a["fastig_version"]),
            "model": str(a["model"]), "method": str(a["method"]), "options_json": str(a["options"]),
            "shape": tuple(int(s) for s in a["shape"]), "dtype": str(a["dtype"]),
        }

    # ---- opening ----

    @classmethod
    def create(cls, path, *, model: str, method: str, options: dict, shape, dtype: str = "float32",
               compression: str | None = "gzip", overwrite: bool = False) -> "Store":
        """Create a new, empty store for ``model`` x ``method`` x ``options`` with attributions of ``shape`` (H, W).

        Parent directories are created. An existing file is an error unless ``overwrite`` is true.
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
        if path.exists() and not overwrite:
            raise StoreError(f"store file already exists: {path} (open it to resume, or pass overwrite=True)")

        import fastig  # here, not at module level: fastig/__init__ may import this module

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            file = h5py.File(path, "w")
        except OSError as e:
            raise StoreError(f"cannot create store {path}: {e}") from None
        file.attrs.update({
            "format_version": FORMAT_VERSION, "fastig_version": fastig.__version__, "model": model,
            "method": method, "options": options_json, "shape": np.array(shape, dtype=np.int64), "dtype": dtype,
        })
        compress = {"compression": compression, "shuffle": compression is not None}
        h, w = shape
        file.create_dataset(f"attributions/{method}", shape=(0, h, w), maxshape=(None, h, w), chunks=(1, h, w),
                            dtype=dtype, fillvalue=np.nan, **compress)
        inputs = file.create_group("inputs")
        inputs.create_dataset("ids", shape=(0,), maxshape=(None,), chunks=(1024,), dtype=h5py.string_dtype())
        inputs.create_dataset("targets", shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.int64, fillvalue=-1)
        inputs.create_dataset("done", shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.uint8, fillvalue=0)
        file.create_group("metrics")
        file.flush()
        return cls(file, path)

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
        """The file attributes, with ``options`` decoded from JSON and ``shape`` as a tuple."""
        attrs = {k: v for k, v in self._attrs.items() if k != "options_json"}
        attrs["options"] = json.loads(self._attrs["options_json"])  # a fresh copy each time
        return attrs

    def matches(self, model: str, method: str, options: dict) -> bool:
        """True when this store was created for the same model, method and options (compared as JSON values)."""
        recorded = self.attrs
        return (model == recorded["model"] and method == recorded["method"]
                and json.loads(_options_json(options)) == recorded["options"])

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

    def done_indices(self) -> np.ndarray:
        """The indices of the rows written so far (int64, ascending)."""
        return np.flatnonzero(self._read(self._file["inputs/done"])).astype(np.int64)

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
        inputs.create_dataset(name, data=values)
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
            group.create_dataset(key, data=values)
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

    def _read(self, dataset) -> np.ndarray:
        try:
            return dataset[...]
        except OSError as e:  # e.g. a damaged compressed chunk
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


# ---- journals and the atomic merge (see "Crash safety of a run" in the module docstring) ----------------------

_MAGIC = b"FGJ1"
_HEAD = struct.Struct("<4sIQII")  # magic, metadata length, data length, metadata CRC-32, data CRC-32
_HEAD_CRC = struct.Struct("<I")  # CRC-32 of the header above
_HEADER_BYTES = _HEAD.size + _HEAD_CRC.size


@dataclass(frozen=True)
class JournalRecord:
    """One record of a journal: its metadata and where its data lies in the file."""

    meta: dict
    data_offset: int
    data_length: int
    data_crc: int


@dataclass(frozen=True)
class JournalContents:
    """What :func:`read_journal` found: the run header (first record), the records after it, and the length of the
    valid prefix of the file (anything beyond is a torn or damaged tail)."""

    run: dict | None
    records: list[JournalRecord]
    valid_end: int
    file_size: int


def encode_record(meta: dict, data: bytes = b"") -> bytes:
    """One journal record: header, JSON metadata, data."""
    meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
    head = _HEAD.pack(_MAGIC, len(meta_bytes), len(data), zlib.crc32(meta_bytes), zlib.crc32(data))
    return head + _HEAD_CRC.pack(zlib.crc32(head)) + meta_bytes + data


def read_journal(path, verify_data: bool = False) -> JournalContents:
    """The longest prefix of complete records of the journal at ``path`` whose checksums hold.

    ``verify_data`` also checks each record's data CRC (reads the whole file); without it only headers and metadata
    are read, and :func:`read_record_data` checks the data when it is used.
    """
    path = Path(path)
    records, run, valid_end = [], None, 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while True:
            head = f.read(_HEADER_BYTES)
            if len(head) < _HEADER_BYTES:
                break
            magic, meta_length, data_length, meta_crc, data_crc = _HEAD.unpack_from(head)
            if magic != _MAGIC or _HEAD_CRC.unpack_from(head, _HEAD.size)[0] != zlib.crc32(head[:_HEAD.size]):
                break
            data_offset = valid_end + _HEADER_BYTES + meta_length
            if data_offset + data_length > size:
                break  # torn: the append was cut short
            meta_bytes = f.read(meta_length)
            if zlib.crc32(meta_bytes) != meta_crc:
                break
            try:
                meta = json.loads(meta_bytes)
            except ValueError:
                break
            if verify_data:
                if zlib.crc32(f.read(data_length)) != data_crc:
                    break
            else:
                f.seek(data_length, os.SEEK_CUR)
            if run is None and not records and meta.get("kind") == "run":
                run = meta
            else:
                records.append(JournalRecord(meta, data_offset, data_length, data_crc))
            valid_end = data_offset + data_length
    return JournalContents(run, records, valid_end, size)


def read_record_data(file, record: JournalRecord) -> bytes:
    """The data of ``record`` from the open journal ``file``; StoreError when its CRC does not hold."""
    file.seek(record.data_offset)
    data = file.read(record.data_length)
    if len(data) != record.data_length or zlib.crc32(data) != record.data_crc:
        raise StoreError(f"damaged record data at byte {record.data_offset} of {file.name}")
    return data


class Journal:
    """The append-only journal of one process (see the module docstring). Use :meth:`open`.

    The first record holds ``run`` (what the run is: model, method, options, shape, dtype); reopening a journal
    of another run is an error. Records are appended with :meth:`append`.
    """

    def __init__(self, path: Path, file, run: dict, contents: JournalContents, fsync: bool):
        self.path, self._file, self.run, self.contents, self.fsync = path, file, run, contents, fsync

    @classmethod
    def open(cls, path, run: dict, fsync: bool = True) -> "Journal":
        """Open (or create) the journal at ``path`` for appending: lock it, drop a torn tail, check its run."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        file = open(path, "a+b")
        try:
            _lock(file, path)
            contents = read_journal(path, verify_data=True)
            if contents.run is not None and not same_run(contents.run, run):
                raise StoreError(f"journal {path} belongs to another run ({contents.run}); remove it or pass "
                                 "overwrite")
            if contents.valid_end < contents.file_size:  # a torn or damaged tail: cut it so appends follow records
                file.truncate(contents.valid_end)
                _fsync_file(file)
            journal = cls(path, file, run, contents, fsync)
            if contents.run is None:
                if contents.records:
                    raise StoreError(f"journal {path} has no run header")
                journal.append([(dict(run, kind="run"), b"")])
            return journal
        except BaseException:
            file.close()
            raise

    def append(self, records) -> None:
        """Append ``records`` (pairs of metadata dict and data bytes) with one write, then flush (and fsync)."""
        if self._file.closed:
            raise StoreError(f"journal {self.path} is closed")
        payload = b"".join(encode_record(meta, data) for meta, data in records)
        self._file.write(payload)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()  # also releases the lock

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def same_run(a: dict, b: dict) -> bool:
    """True when two run headers describe the same run (compared as JSON values; the record kind is ignored)."""
    def normal(run):
        return json.loads(json.dumps({k: v for k, v in run.items() if k != "kind"}, sort_keys=True))
    return normal(a) == normal(b)


def _lock(file, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; one process per journal is then the user's job
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise StoreError(f"journal {path} is being written by another process (same rank running twice?)") from None


def _fsync_file(file) -> None:
    file.flush()
    os.fsync(file.fileno())


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge` wrote: ``rows`` attributions and ``skipped`` records; ``damaged``: journal rows dropped
    because their data failed its CRC (their images are redone by the next run)."""

    path: Path
    rows: int
    skipped: int
    damaged: int


_ROW_FIELDS = ("id", "target", "label", "prediction", "confidence", "note")


def merge(final_path, journal_paths, run: dict, compression: str | None = "gzip", block: int = 64) -> MergeResult:
    """Build the final store at ``final_path`` from the store already there (if any) and ``journal_paths``, then
    replace it atomically (see the module docstring). Rows are ordered by dataset index, each index once.

    ``run``: the journals' run header (``model``, ``method``, ``options``, ``shape``, ``dtype``); the existing
    store and every journal must belong to it. The journals are not deleted here.
    """
    final_path = Path(final_path)
    shape, dtype = tuple(run["shape"]), run["dtype"]
    rows: dict[int, tuple] = {}  # dataset index -> (source, reference, metadata); the first source seen wins
    skips: dict[int, dict] = {}
    old = None
    files = {}
    try:
        if final_path.exists():
            old = Store.open(final_path)
            if not (old.matches(run["model"], run["method"], run["options"]) and old.attrs["dtype"] == dtype
                    and old.attrs["shape"] == shape):
                raise StoreError(f"{final_path} holds another run; cannot merge into it")
            _collect_store(old, rows, skips)
        for path in journal_paths:
            contents = read_journal(path)
            if contents.run is None:
                continue  # created, then killed before its header was out: nothing in it
            if not same_run(contents.run, run):
                raise StoreError(f"journal {path} belongs to another run; cannot merge it")
            for record in contents.records:
                index = int(record.meta["index"])
                if record.meta["kind"] == "row":
                    rows.setdefault(index, ("journal", (Path(path), record), record.meta))
                elif record.meta["kind"] == "skip":
                    skips.setdefault(index, record.meta)
        temporary = final_path.with_name(f"{final_path.name}.merging-{os.getpid()}")
        for stale in final_path.parent.glob(f"{final_path.name}.merging-*"):
            stale.unlink()  # left by a merge that was killed
        order = sorted(rows)
        damaged = []
        with Store.create(temporary, model=run["model"], method=run["method"], options=run["options"],
                          shape=shape, dtype=dtype, compression=compression) as new:
            position = 0
            kept = []
            for start in range(0, len(order), block):
                chunk, ids, targets, data = [], [], [], []
                for index in order[start:start + block]:
                    source, reference, meta = rows[index]
                    try:
                        if source == "store":
                            array = old._file[f"attributions/{old.attrs['method']}"][reference]
                        else:
                            path, record = reference
                            if path not in files:
                                files[path] = open(path, "rb")
                            array = np.frombuffer(read_record_data(files[path], record), dtype=dtype).reshape(shape)
                    except StoreError:
                        damaged.append(index)
                        continue
                    chunk.append(index)
                    ids.append(meta["id"])
                    targets.append(int(meta["target"]))
                    data.append(array)
                if chunk:
                    new.write_rows(position, ids, np.array(targets, np.int64), np.stack(data))
                    position += len(chunk)
                    kept += chunk
            metas = [rows[i][2] for i in kept]
            new.write_column("index", np.array(kept, np.int64))
            new.write_column("labels", np.array([_int(m.get("label")) for m in metas], np.int64))
            new.write_column("predictions", np.array([_int(m.get("prediction")) for m in metas], np.int64))
            new.write_column("confidences", np.array([_float(m.get("confidence")) for m in metas], np.float32))
            new.write_column("notes", [m.get("note") or "" for m in metas] or np.array([], h5py.string_dtype()))
            for name in sorted({c for m in metas for c in m.get("columns", {})}):  # extra per-row columns
                new.write_column(name, np.array([m.get("columns", {}).get(name, np.nan) for m in metas]))
            skipped = sorted(i for i in skips if i not in rows)
            s = [skips[i] for i in skipped]
            new.write_skipped(skipped, [m["id"] for m in s], [m["reason"] for m in s],
                              [_int(m.get("label")) for m in s], [_int(m.get("prediction")) for m in s],
                              [_float(m.get("confidence")) for m in s])
        with open(temporary, "rb+") as f:
            _fsync_file(f)
        os.replace(temporary, final_path)
        _fsync_dir(final_path.parent)
        return MergeResult(final_path, len(kept), len(skipped), len(damaged))
    finally:
        if old is not None:
            old.close()
        for f in files.values():
            f.close()


def _collect_store(store: Store, rows: dict, skips: dict) -> None:
    """The done rows and skipped images of an existing store, keyed by dataset index."""
    done = store.done_indices()
    columns = store.column_names()
    index = store.column("index") if "index" in columns else np.arange(len(store))
    ids, targets = store.ids(), store.targets()
    extra = {name: store.column(col) if col in columns else None
             for name, col in (("label", "labels"), ("prediction", "predictions"), ("confidence", "confidences"),
                               ("note", "notes"))}
    known = {"index", "labels", "predictions", "confidences", "notes"}
    columns = {name: store.column(name) for name in store.column_names() if name not in known}
    for row in done:
        meta = {"id": ids[row], "target": int(targets[row])}
        for name, values in extra.items():
            if values is not None:
                meta[name] = values[row].item() if hasattr(values[row], "item") else values[row]
        if columns:  # extra per-row columns (see merge), kept through a resume
            meta["columns"] = {name: values[row].item() for name, values in columns.items()}
        rows.setdefault(int(index[row]), ("store", int(row), meta))
    s = store.skipped()
    for k, i in enumerate(s["index"]):
        skips.setdefault(int(i), {"id": s["ids"][k], "reason": s["reasons"][k], "label": int(s["labels"][k]),
                                  "prediction": int(s["predictions"][k]),
                                  "confidence": float(s["confidences"][k])})


def _int(value) -> int:
    return -1 if value is None else int(value)


def _float(value) -> float:
    return float("nan") if value is None else float(value)
