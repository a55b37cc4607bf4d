"""The HDF5 store: one file per run holding attributions, inputs, metrics and what produced them.

Layout (N rows, attributions H x W)::

    /attributions/<method>     [N, H, W] float32 or float16, one chunk per row, compressed; unwritten rows are NaN
    /inputs/ids                [N] UTF-8 strings (image ids or paths); unwritten rows are ""
    /inputs/targets            [N] int64 target class; unwritten rows are -1
    /inputs/done               [N] uint8, 1 once the row's attribution has been written
    /metrics/<metric>          [N] float64
    /metrics/<metric>_curve    [N, K] float32, when the metric has curves
    file attributes: format_version, fastig_version, model, method, options (JSON), shape [H, W], dtype

Rows may be written in any order; the datasets grow to the highest row written.

Crash safety, as it stands:

- Safe: ``write_rows`` returns only after the rows' data, and then their done flags, have been flushed to the
  operating system (HDF5 ``H5Fflush``). A process killed between two calls leaves a readable file in which every
  row of every returned call is present and marked done, so a resumed run (same model, method and options, see
  ``matches``) can skip ``done_indices()`` and redo the rest without duplicating or losing a row.
- Not safe: HDF5 keeps no journal. A process killed *during* a write or flush, or a machine that loses power
  before the OS has written its buffers (there is no fsync), can leave the file's metadata inconsistent and the
  whole file unreadable. HDF5 locks a file opened for writing, so two processes cannot share one store: parallel
  shards (torchrun) need one file each. Making dataset-scale and sharded runs crash-safe is a later step.
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
        with np.errstate(over="ignore"):  # overflow is reported just below, as an error
            stored = data.astype(self._attrs["dtype"])
        overflow = np.isinf(stored) & np.isfinite(data)
        if overflow.any():
            raise ValueError(f"{int(overflow.sum())} attribution values overflow {self._attrs['dtype']} "
                             f"(|value| up to {np.abs(data[overflow]).max():.3g}); create the store with float32")

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
