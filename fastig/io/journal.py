"""Dataset runs on disk: the run folder, its journals, what is already recorded, and the merge into the store.

A run folder (``--out``) holds::

    attributions.h5             the final HDF5 store (fastig.io.store), only ever replaced whole, by a merge
    attributions.parts/         while a run is under way: one journal per process (rank-00000.journal, ...)

Everything about that folder lives here: its names (:class:`RunFolder`), the **run header** that says what a run
is (:func:`run_header` builds it; :func:`require_same_run` is the one place two headers are compared), which
images are already recorded (:meth:`RunFolder.recorded`), the lock that serializes merges, and the merge.

Why a SIGKILL at any moment loses at most the batch in flight:

1. Each process appends its results to its own **journal** (:class:`Journal`), a plain file of records. A record
   is a fixed header (magic, lengths, CRC-32 of the metadata and of the data, and a CRC-32 of the header itself),
   then JSON metadata, then the raw attribution. Records are only ever appended, one ``write`` per batch (the run
   header first, then the batch's rows), then ``flush`` and, by default, ``fsync``; bytes already in the file are
   never modified. The file is created by the first append, so a run that records nothing claims nothing.
2. Reading a journal (:func:`read_journal`) keeps every record whose three checksums hold. A SIGKILL can
   interrupt only the append in progress: the kernel keeps what ``write`` copied, so the file is the old records
   followed by a prefix of the new bytes, which is shorter than its header announces (or fails a CRC): that torn
   tail is dropped, and the owner truncates it away when it reopens the journal. A record damaged later (a
   flipped bit on disk) is skipped alone: when its header CRC holds, its framing is intact and reading goes on
   after it; when the header itself is damaged, reading resumes at the next intact header. Every append repeats
   the run header, so a damaged copy loses nothing. Damaged rows are not counted as done: the next run redoes
   them. An advisory lock (``flock``) keeps a second process from appending to the same journal.
3. The final store is only ever produced by :func:`merge`: it reads the current final store (if any; rows whose
   checksum fails are dropped, to be redone) and every journal, writes a complete new store into a fresh
   temporary file beside it, fsyncs it, and renames it over the final path with ``os.replace`` (atomic on POSIX
   and Windows), then fsyncs the folder. A kill before the rename leaves the old final store (or none) and a stray
   temporary file that the next merge removes; a kill after it leaves the new one. Readers never see a partial
   store. A write error (full disk, file-size limit) abandons the temporary file at once and leaves the journals
   as they were. Journals are deleted only after the rename; if a kill comes first, the next merge reads their
   rows again and keeps each index once.
4. A restarted run counts as done every index found intact in the final store (every row is read back and its
   checksum checked) or in any journal (its own or another process's), so it redoes only the images whose
   records were lost or damaged, and never duplicates one.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from fastig.errors import ResourceError
from fastig.io.store import Store, StoreError

STORE_NAME = "attributions.h5"
PARTS_NAME = "attributions.parts"


# ---- the run header ---------------------------------------------------------------------------------------------


def run_header(*, model: str, weights: str, seed: int, method: str, options: dict, target, inputs: dict,
               filters: dict | None, shape, dtype: str, prepared: bool = False) -> dict:
    """What a run is: everything that decides its rows. Two runs share a folder only when their headers are equal.

    ``weights``: the weights' identity (``sha256:<hex>`` of the file, ``random:<seed>``, ``closed-form``);
    ``seed``: seeds random initialization and every per-image random draw; ``options``: the method's options with
    its defaults filled in; ``target``: None (each image's top-1 class), ``"label"`` or a class index;
    ``inputs``: which images (files, or a dataset's root, layout, class mapping and selection); ``filters``: the
    prediction filters, or None; ``shape``/``dtype``: of the stored attributions; ``prepared``: the model was
    ``fastig.prepare``d (its float32 rounding differs), recorded only when true, so that the headers of runs made
    before the option existed still match. Returned as JSON values.
    """
    header = {"model": model, "weights": weights, "seed": seed, "method": method, "options": options,
              "target": target, "inputs": inputs, "filters": filters, "shape": list(shape), "dtype": dtype}
    if prepared:
        header["prepared"] = True
    try:
        return json.loads(json.dumps(header, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"a run header holds JSON values only: {e}") from None


def require_same_run(recorded: dict | None, header: dict, where) -> None:
    """Raise StoreError, naming what differs, unless ``recorded`` (a header found at ``where``) is ``header``."""
    recorded = {k: v for k, v in (recorded or {}).items() if k != "kind"}
    if recorded == header:
        return
    there, now = _flat(recorded), _flat(header)
    differences = [f"{key}: {_short(there.get(key))} there, {_short(now.get(key))} now"
                   for key in sorted(set(there) | set(now)) if there.get(key) != now.get(key)]
    older = (" (written by an older fastig, which did not record the weights and seed)"
             if "weights" in header and "weights" not in recorded else "")
    raise StoreError(f"{where} holds a run with other settings{older}: {'; '.join(differences)}. Pass --overwrite "
                     "to start over there, or choose another --out")


def _flat(header: dict, prefix: str = "") -> dict:
    """``{"inputs": {"end": 6}}`` -> ``{"inputs.end": 6}``, so a difference is named down to the setting."""
    flat = {}
    for key, value in header.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def stored_header(store: Store) -> dict:
    """The run header recorded in a store (for a store of an older fastig: the part of it that it recorded)."""
    attrs = store.attrs
    if attrs["run"] is not None:
        return attrs["run"]
    return {"model": attrs["model"], "method": attrs["method"], "options": attrs["options"],
            "shape": list(attrs["shape"]), "dtype": attrs["dtype"]}


# ---- journal records ------------------------------------------------------------------------------------------

_MAGIC = b"FGJ1"
_HEAD = struct.Struct("<4sIQII")  # magic, metadata length, data length, metadata CRC-32, data CRC-32
_HEAD_CRC = struct.Struct("<I")  # CRC-32 of the header above
_HEADER_BYTES = _HEAD.size + _HEAD_CRC.size
_SCAN_CHUNK = 1 << 20  # bytes read at a time when looking for the next intact header past a damaged one


@dataclass(frozen=True)
class JournalRecord:
    """One intact record of a journal: its metadata and where its data lies in the file."""

    meta: dict
    data_offset: int
    data_length: int
    data_crc: int


@dataclass(frozen=True)
class DamagedRecord:
    """A stretch of a journal that failed a checksum: where it starts, and the dataset index of its row when its
    metadata is intact (None when unknown)."""

    offset: int
    index: int | None


@dataclass(frozen=True)
class JournalContents:
    """What :func:`read_journal` found: the run header, the intact records after it, the damaged ones, and the
    end of the last intact record (``valid_end`` < ``file_size``: a torn or damaged tail follows)."""

    run: dict | None
    records: list[JournalRecord]
    damaged: list[DamagedRecord]
    valid_end: int
    file_size: int


def encode_record(meta: dict, data: bytes = b"") -> bytes:
    """One journal record: header, JSON metadata, data."""
    meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
    head = _HEAD.pack(_MAGIC, len(meta_bytes), len(data), zlib.crc32(meta_bytes), zlib.crc32(data))
    return head + _HEAD_CRC.pack(zlib.crc32(head)) + meta_bytes + data


def _parse_head(head: bytes):
    """(metadata length, data length, metadata CRC, data CRC) of an intact record header, else None."""
    if len(head) < _HEADER_BYTES:
        return None
    magic, meta_length, data_length, meta_crc, data_crc = _HEAD.unpack_from(head)
    if magic != _MAGIC or _HEAD_CRC.unpack_from(head, _HEAD.size)[0] != zlib.crc32(head[:_HEAD.size]):
        return None
    return meta_length, data_length, meta_crc, data_crc


def _next_head(f, start: int, size: int) -> int | None:
    """The offset of the next intact record header at or after ``start`` whose record fits in the file."""
    position = start
    while position + _HEADER_BYTES <= size:
        f.seek(position)
        window = f.read(_SCAN_CHUNK + _HEADER_BYTES)
        found = window.find(_MAGIC)
        while found != -1:
            fields = _parse_head(window[found:found + _HEADER_BYTES])
            if fields is None and found + _HEADER_BYTES > len(window):  # the header straddles the window
                f.seek(position + found)
                fields = _parse_head(f.read(_HEADER_BYTES))
            if fields is not None and position + found + _HEADER_BYTES + fields[0] + fields[1] <= size:
                return position + found
            found = window.find(_MAGIC, found + 1)
        position += _SCAN_CHUNK
    return None


def read_journal(path) -> JournalContents:
    """Every intact record of the journal at ``path`` (all three checksums checked), and the damaged ones.

    See the module docstring: a damaged record is skipped alone; a torn tail ends the journal. The run header is
    the first intact ``kind: "run"`` record; its repetitions (one per append) must agree with it.
    """
    path = Path(path)
    records, damaged, run, valid_end = [], [], None, 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        while offset + _HEADER_BYTES <= size:
            f.seek(offset)
            fields = _parse_head(f.read(_HEADER_BYTES))
            if fields is None or offset + _HEADER_BYTES + fields[0] + fields[1] > size:
                following = _next_head(f, offset + 1, size)
                if following is None:
                    break  # a torn (or damaged) tail
                damaged.append(DamagedRecord(offset, None))
                offset = following
                continue
            meta_length, data_length, meta_crc, data_crc = fields
            meta_bytes = f.read(meta_length)
            data = f.read(data_length)
            data_offset = offset + _HEADER_BYTES + meta_length
            offset = valid_end = data_offset + data_length
            meta = _meta(meta_bytes, meta_crc)
            if meta is None or zlib.crc32(data) != data_crc:
                index = meta.get("index") if isinstance(meta, dict) else None
                damaged.append(DamagedRecord(data_offset - meta_length - _HEADER_BYTES,
                                             index if isinstance(index, int) else None))
            elif meta.get("kind") == "run":
                header = {k: v for k, v in meta.items() if k != "kind"}
                if run is None:
                    run = header
                elif header != run:
                    raise StoreError(f"journal {path} holds records of two runs; it was written by something "
                                     "other than fastig: move it away")
            else:
                records.append(JournalRecord(meta, data_offset, data_length, data_crc))
    return JournalContents(run, records, damaged, valid_end, size)


def _meta(meta_bytes: bytes, crc: int) -> dict | None:
    if zlib.crc32(meta_bytes) != crc:
        return None
    try:
        meta = json.loads(meta_bytes)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def read_record_data(file, record: JournalRecord) -> bytes:
    """The data of ``record`` from the open journal ``file``; StoreError when its CRC does not hold."""
    file.seek(record.data_offset)
    data = file.read(record.data_length)
    if len(data) != record.data_length or zlib.crc32(data) != record.data_crc:
        raise StoreError(f"damaged record data at byte {record.data_offset} of {file.name}")
    return data


class Journal:
    """The append-only journal of one process (see the module docstring). Use :meth:`open`.

    Every :meth:`append` writes the run header ``run`` and then the records; reopening a journal that holds rows
    of another run is an error. A journal never appended to is removed by :meth:`close`.
    """

    def __init__(self, path: Path, file, run: dict, contents: JournalContents, fsync: bool):
        self.path, self._file, self.run, self.contents, self.fsync = path, file, run, contents, fsync
        self.rows = sum(1 for r in contents.records if r.meta.get("kind") == "row")

    @classmethod
    def open(cls, path, run: dict, fsync: bool = True) -> "Journal":
        """Open (or create) the journal at ``path`` for appending: lock it, drop a torn tail, check its run."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            file = open(path, "a+b", buffering=0)  # unbuffered: a write error shows in the append that caused it
        except OSError as e:
            raise _resource_error(f"cannot open the journal {path}", e, "") from None
        try:
            _lock(file, path)
            contents = read_journal(path)
            if contents.records and contents.run is None:
                raise StoreError(f"journal {path} holds rows but no intact run header, so they cannot be told apart "
                                 "from another run's: move it away (its rows are redone)")
            if contents.records:
                require_same_run(contents.run, run, f"journal {path}")
            if contents.valid_end < contents.file_size or (contents.run is not None and not contents.records
                                                            and contents.run != run):
                # a torn tail, or only the header of a run that recorded nothing: cut it so appends follow records
                file.truncate(contents.valid_end if contents.records else 0)
                _fsync_file(file)
                contents = read_journal(path)
            return cls(path, file, run, contents, fsync)
        except BaseException:
            file.close()
            raise

    def append(self, records) -> None:
        """Append the run header and ``records`` (pairs of metadata dict and data bytes) with one write, then
        flush (and fsync). A write error (disk full, file-size limit) cuts the partial append away again and
        raises ResourceError: every record appended before is kept."""
        if self._file.closed:
            raise StoreError(f"journal {self.path} is closed")
        if not records:
            return  # (a header alone would claim the folder for a run that recorded nothing)
        payload = memoryview(encode_record(dict(self.run, kind="run"))
                             + b"".join(encode_record(meta, data) for meta, data in records))
        end = os.fstat(self._file.fileno()).st_size
        try:
            written = 0
            while written < len(payload):  # an unbuffered write may be partial
                written += self._file.write(payload[written:])
            if self.fsync:
                os.fsync(self._file.fileno())
        except OSError as e:
            try:
                self._file.truncate(end)
            except OSError:
                pass  # the torn append is dropped when the journal is read
            raise _resource_error(f"cannot write the journal {self.path}", e,
                                  f"; the {self.rows} row(s) it recorded before are kept") from None
        self.rows += sum(1 for meta, _ in records if meta.get("kind") == "row")

    def close(self) -> None:
        if not self._file.closed:
            if os.fstat(self._file.fileno()).st_size == 0:
                self.path.unlink(missing_ok=True)  # never appended to: leave nothing behind
            self._file.close()  # also releases the lock

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _resource_error(what: str, error: OSError, kept: str) -> ResourceError:
    return ResourceError(f"{what}: {error.strerror or error}{kept}; make room (or raise the file-size limit) and "
                         "rerun the same command to go on")


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


# ---- the merge --------------------------------------------------------------------------------------------------

# Row metadata: these keys are the store's row datasets; every other key of a row record becomes a column
# /inputs/<name>, so a run can record further per-row fields without a change here.
_ROW_KEYS = ("kind", "index", "id", "target")
_COLUMN_NAMES = {"label": "labels", "prediction": "predictions", "confidence": "confidences", "note": "notes",
                 "path": "paths"}
_FIELD_NAMES = {column: key for key, column in _COLUMN_NAMES.items()}
_EMPTY = {"label": -1, "prediction": -1, "confidence": float("nan"), "note": "", "path": ""}  # type when all None


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge` wrote: ``rows`` attributions and ``skipped`` records; ``damaged``: rows left out because
    their data failed a checksum, in the old store or a journal, and no intact copy was found (their images are
    redone by the next run; a record whose header was damaged counts, as its image is unknown)."""

    path: Path
    rows: int
    skipped: int
    damaged: int


def merge(final_path, journal_paths, run: dict, compression: str | None = "gzip", block: int = 64) -> MergeResult:
    """Build the final store at ``final_path`` from the store already there (if any) and ``journal_paths``, then
    replace it atomically (see the module docstring). Rows are ordered by dataset index, each index once.

    ``run``: the run header (:func:`run_header`); the existing store and every journal must belong to it. The
    journals are not deleted here. A write error raises ResourceError and leaves everything as it was.
    """
    final_path = Path(final_path)
    shape, dtype = tuple(run["shape"]), run["dtype"]
    rows: dict[int, tuple] = {}  # dataset index -> (source, reference, metadata); the first source seen wins
    skips: dict[int, dict] = {}
    damaged, unknown = set(), 0  # indices of damaged rows; damaged records of unknown index
    old = None
    files = {}
    try:
        if final_path.exists():
            old = Store.open(final_path)
            require_same_run(stored_header(old), run, final_path)
            bad = set(old.damaged_rows().tolist())
            damaged |= _collect_store(old, rows, skips, bad)
        for path in journal_paths:
            contents = read_journal(path)
            damaged |= {d.index for d in contents.damaged if d.index is not None}
            unknown += sum(1 for d in contents.damaged if d.index is None)
            if contents.run is None:
                unknown += len(contents.records)  # (no intact header: rows of an unknown run)
                continue
            require_same_run(contents.run, run, f"journal {path}")
            for record in contents.records:
                index = int(record.meta["index"])
                if record.meta["kind"] == "row":
                    rows.setdefault(index, ("journal", (Path(path), record), record.meta))
                elif record.meta["kind"] == "skip":
                    skips.setdefault(index, record.meta)
        temporary = final_path.with_name(f"{final_path.name}.merging-{os.getpid()}")
        for stale in final_path.parent.glob(f"{final_path.name}.merging-*"):
            stale.unlink()  # left by a merge that was killed
        order, kept, skipped = sorted(rows), [], sorted(i for i in skips if i not in rows)
        kept_all = (f"; nothing was lost: {final_path.name} (if any) is unchanged and the journals still hold every "
                    "new row")
        try:
            new = Store.create(temporary, model=run["model"], method=run["method"], options=run["options"],
                               shape=shape, dtype=dtype, compression=compression, run=run, abandon_on_error=True)
        except OSError as e:
            temporary.unlink(missing_ok=True)
            raise _resource_error(f"cannot write the merged store {temporary}", e, kept_all) from None
        try:
            for start in range(0, len(order), block):
                chunk, data = [], []
                for index in order[start:start + block]:
                    source, reference, meta = rows[index]
                    try:
                        if source == "store":
                            array = old.attribution_row(reference)
                        else:
                            path, record = reference
                            if path not in files:
                                files[path] = open(path, "rb")
                            array = np.frombuffer(read_record_data(files[path], record), dtype=dtype).reshape(shape)
                    except StoreError:  # damaged since it was read above
                        damaged.add(index)
                        continue
                    chunk.append(index)
                    data.append(array)
                if chunk:
                    new.write_rows(len(kept), [rows[i][2]["id"] for i in chunk],
                                   np.array([int(rows[i][2]["target"]) for i in chunk], np.int64), np.stack(data))
                    kept += chunk
            metas = [rows[i][2] for i in kept]
            new.write_column("index", np.array(kept, np.int64))
            for key in sorted({k for m in metas for k in m} - set(_ROW_KEYS) | set(_COLUMN_NAMES)):
                new.write_column(_COLUMN_NAMES.get(key, key), _column([m.get(key) for m in metas], key))
            s = [skips[i] for i in skipped]
            new.write_skipped(skipped, [m["id"] for m in s], [m["reason"] for m in s],
                              [_int(m.get("label")) for m in s], [_int(m.get("prediction")) for m in s],
                              [_float(m.get("confidence")) for m in s])
        except Exception:
            new.close()
            if new.write_error is None:  # (a write error is reported below)
                temporary.unlink(missing_ok=True)
                raise
        new.close()
        if new.write_error is not None:
            temporary.unlink(missing_ok=True)
            raise _resource_error(f"cannot write the merged store {temporary}", new.write_error, kept_all)
        try:
            with open(temporary, "rb+") as f:
                _fsync_file(f)
            os.replace(temporary, final_path)
            _fsync_dir(final_path.parent)
        except OSError as e:
            temporary.unlink(missing_ok=True)
            raise _resource_error(f"cannot put the merged store in place at {final_path}", e,
                                  "; the journals still hold every new row") from None
        return MergeResult(final_path, len(kept), len(skipped), len(damaged - set(kept) - set(skipped)) + unknown)
    finally:
        if old is not None:
            old.close()
        for f in files.values():
            f.close()


def _collect_store(store: Store, rows: dict, skips: dict, damaged: set) -> set:
    """The intact done rows and the skipped images of an existing store, keyed by dataset index; returns the
    dataset indices of its ``damaged`` rows."""
    columns = [c for c in store.column_names() if c != "index"]
    index = store.column("index") if "index" in store.column_names() else np.arange(len(store))
    ids, targets = store.ids(), store.targets()
    extra = {_FIELD_NAMES.get(column, column): store.column(column) for column in columns}
    for row in store.done_indices():
        if int(row) in damaged:
            continue
        meta = {"id": ids[row], "target": int(targets[row])}
        for key, values in extra.items():
            meta[key] = values[row].item() if hasattr(values[row], "item") else values[row]
        rows.setdefault(int(index[row]), ("store", int(row), meta))
    s = store.skipped()
    for k, i in enumerate(s["index"]):
        skips.setdefault(int(i), {"id": s["ids"][k], "reason": s["reasons"][k], "label": int(s["labels"][k]),
                                  "prediction": int(s["predictions"][k]),
                                  "confidence": float(s["confidences"][k])})
    return {int(index[row]) for row in damaged}


def _column(values: list, key: str) -> np.ndarray:
    """One store column from the values of a row field (None: missing): strings ("" for None), integers (-1) or
    floats (NaN); the type comes from the values, or for a known field whose values are all None, from its kind."""
    present = [v for v in values if v is not None]
    sample = present or [_EMPTY.get(key, float("nan"))]
    if any(isinstance(v, str) for v in sample):
        return np.array(["" if v is None else str(v) for v in values], dtype=h5py.string_dtype())
    if all(isinstance(v, (int, np.integer)) for v in sample):
        return np.array([-1 if v is None else int(v) for v in values], dtype=np.int64)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _int(value) -> int:
    return -1 if value is None else int(value)


def _float(value) -> float:
    return float("nan") if value is None else float(value)


# ---- the run folder ---------------------------------------------------------------------------------------------


@dataclass
class Recorded:
    """What a run folder already holds for a run: the dataset ``indices`` recorded intact (attributed or skipped),
    the journaled rows among them, and ``damaged``: rows found damaged (not in ``indices``: they are redone)."""

    indices: set = field(default_factory=set)
    journaled: int = 0
    damaged: int = 0


class RunFolder:
    """The ``--out`` folder of a dataset run (see the module docstring)."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.store = self.out_dir / STORE_NAME
        self.parts = self.out_dir / PARTS_NAME

    def journal_path(self, rank: int) -> Path:
        return self.parts / f"rank-{rank:05d}.journal"

    def journals(self) -> list[Path]:
        return sorted(self.parts.glob("*.journal")) if self.parts.is_dir() else []

    def check_writable(self) -> None:
        """Refuse, before any work, a folder the run could not write into (StoreError naming it and why); creates
        nothing that stays."""
        for path, kind in ((self.out_dir, "folder"), (self.parts, "journal folder")):
            if path.exists() and not path.is_dir():
                raise StoreError(f"{path} is a file, where the run keeps its {kind}: move it away or choose another "
                                 "--out")
        if self.store.is_dir():
            raise StoreError(f"{self.store} is a folder, where the run keeps its store: move it away")
        existing = self.out_dir
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise StoreError(f"cannot create --out {self.out_dir}: {existing} is a file")
        try:
            with tempfile.TemporaryFile(dir=existing):  # (unnamed where the OS allows: a kill leaves nothing)
                pass
        except OSError as e:
            raise StoreError(f"cannot write to --out {self.out_dir} ({existing}: {e.strerror or e}); choose a "
                             "folder you can write to") from None

    def tidy(self) -> None:
        """Remove the journal folder if it is empty (a run that recorded nothing leaves nothing behind)."""
        try:
            self.parts.rmdir()
        except OSError:
            pass  # not empty, or not there

    def reset(self) -> None:
        """Delete the store and the journals (``--overwrite``)."""
        self.store.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)

    def recorded(self, header: dict, verify: bool = True) -> Recorded:
        """The images already recorded for the run ``header`` in the store and the journals. Refuses (StoreError)
        a folder holding another run, and a store that cannot be read, saying which rows are safe and how to keep
        them. ``verify``: read every row of the store back (checksums); without it, trust its done flags."""
        found = Recorded()
        contents = []
        for path in self.journals():
            journal = read_journal(path)
            if journal.records and journal.run is not None:
                require_same_run(journal.run, header, f"journal {path}")
            contents.append(journal)
        unknown = 0
        for journal in contents:
            if journal.run is None:  # (no intact header: rows of an unknown run, redone)
                unknown += len(journal.records)
                continue
            found.indices.update(int(r.meta["index"]) for r in journal.records if r.meta.get("kind") in ("row", "skip"))
            found.journaled += sum(1 for r in journal.records if r.meta.get("kind") == "row")
        if self.store.exists():
            try:
                store = Store.open(self.store)
            except StoreError as e:
                raise StoreError(self._unreadable(e, found.journaled)) from None
            with store:
                require_same_run(stored_header(store), header, self.store)
                try:
                    bad = set(store.damaged_rows().tolist()) if verify else set()
                    index = store.column("index") if "index" in store.column_names() else np.arange(len(store))
                    rows = [r for r in store.done_indices().tolist() if r not in bad]
                    found.indices.update(int(index[r]) for r in rows)
                    found.indices.update(int(i) for i in store.skipped()["index"])
                except StoreError as e:
                    raise StoreError(self._unreadable(e, found.journaled)) from None
                unknown += len({int(index[r]) for r in bad} - found.indices)
        damaged_indices = {d.index for journal in contents for d in journal.damaged if d.index is not None}
        found.damaged = unknown + len(damaged_indices - found.indices) + sum(
            1 for journal in contents for d in journal.damaged if d.index is None)
        return found

    def _unreadable(self, error: StoreError, journaled: int) -> str:
        keep = (f"the {journaled} row(s) journaled in {self.parts} are intact and will be kept: " if journaled else "")
        return (f"{self.store} is damaged and cannot be read ({error}); {keep}move the damaged store aside (mv "
                f"'{self.store}' '{self.store}.damaged') and rerun the same command to redo only what is missing"
                + ("; --overwrite would delete the journals too" if journaled else " (--overwrite starts over)"))

    def complete(self, selection, header: dict) -> bool:
        """Whether every index of ``selection`` is recorded (done flags trusted: the merge checks the rows)."""
        done = self.recorded(header, verify=False).indices
        return all(i in done for i in selection)

    def merge(self, header: dict, compression) -> MergeResult | None:
        """Merge the journals into the store (atomically), then delete them; None when there was nothing to merge.
        Serialized by a lock on the journal folder."""
        if not self.parts.is_dir():
            return None
        with self._lock() as locked:
            if not locked:
                return None  # another process merged and removed the folder meanwhile
            journals = self.journals()
            anything = any(p.stat().st_size for p in journals)
            result = merge(self.store, journals, header, compression) if anything else None
            for path in journals:
                path.unlink()
        self.tidy()  # (a newer journal may have appeared meanwhile: then the folder stays)
        return result

    @contextmanager
    def _lock(self):
        """An exclusive advisory lock on the journal folder (flock on its descriptor; none where flock is missing);
        yields whether the folder is still there."""
        try:
            import fcntl
        except ImportError:
            yield self.parts.is_dir()
            return
        try:
            fd = os.open(self.parts, os.O_RDONLY)
        except FileNotFoundError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self.parts.is_dir()
        finally:
            os.close(fd)  # releases the lock
