"""The run driver behind ``fastig attribute``: images or a dataset -> batched filtering -> attribution -> store.

One run attributes a selection of images (``--image`` files, or ``--dataset ROOT`` with ``--start``,
``--stride`` and ``--end``) with one model and method:

1. the selected images are decoded and preprocessed in ``workers`` DataLoader processes, ``batch_size`` at a time;
   an image that cannot be used (unreadable, corrupt) is skipped and its reason recorded; grey, RGBA, 16-bit and
   small images are converted (the conversion is recorded as the row's note);
2. one batched forward pass gives each image's prediction and confidence (softmax probability of the top-1
   class); ``correct_only`` skips images whose prediction differs from their label (or that have no label),
   ``min_confidence`` those below the threshold; these decisions and numbers are recorded with the image;
3. the kept images of the batch are attributed together, for their predicted class (default), their label, or a
   fixed class; the attribution is summed over colour channels into one [H, W] map per image;
4. every result (row or skip) is appended to this process's journal as soon as its batch is done, and the final
   HDF5 store ``OUT/attributions.h5`` is built from the journals by an atomic merge at the end (see
   ``fastig.io.store`` for why a SIGKILL at any moment loses at most the batch in flight).

Restarting the same command resumes: images recorded in the store or any journal are not redone. A run with other
settings (model, method, options, target, selection, filters, dtype) refuses to mix into the same ``OUT`` unless
``overwrite`` is set, which starts over.

Many processes: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialized with gloo (CPU) or nccl
(CUDA, one device per local rank); rank r of W attributes the selected images at positions r, r + W, ...; all ranks
meet at a barrier and rank 0 merges, so ``OUT`` must be a folder every rank can reach (a shared file system when
the ranks run on several machines). A rank that died can be redone by rerunning the same command (with any number
of processes, or none: plain ``fastig attribute``), or alone with ``shard=(r, W)`` (``--shard r/W``): a shard run
merges when it finds every selected image recorded.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fastig.core import progress
from fastig.errors import FastigError

STORE_NAME = "attributions.h5"
PARTS_NAME = "attributions.parts"
TARGETS = ("predicted", "label")
# A barrier waits for the slowest rank; ranks get equal shares, but a long run must not time out at the end.
BARRIER_TIMEOUT = timedelta(hours=48)


class RunError(FastigError):
    """A run that cannot start as asked: a store of other settings, an empty selection, conflicting options."""


@dataclass
class RunSpec:
    """Everything a run needs; ``fastig attribute``'s options map one to one onto these fields."""

    model: str
    method: str
    out_dir: Path
    weights: str = "auto"
    options: dict = field(default_factory=dict)  # the method's keyword arguments (fastig.methods)
    images: Sequence | None = None  # explicit image files (then not dataset)
    dataset: Path | None = None
    layout: str = "auto"
    labels: Path | None = None  # label file overriding the layout's own
    start: int = 0
    stride: int = 1
    end: int | None = None
    target: int | str | None = None  # None or "predicted": top-1 class; "label"; or a class index
    correct_only: bool = False
    min_confidence: float | None = None
    batch_size: int = 8  # images per batch (the method batches its own path points inside)
    workers: int | None = None  # decoding processes; None: 0 for image lists, min(4, CPUs) for datasets
    device: str = "cpu"
    dtype: str = "float32"  # of the stored attributions
    compression: str | None = "gzip"
    heatmaps: bool | None = None  # PNG per image; None: on for image lists, off for datasets
    sign: str = "absolute"
    overwrite: bool = False
    shard: tuple[int, int] | None = None  # (rank, world size) without torch.distributed
    fsync: bool = True  # fsync the journal after every batch (survives power loss, not only a kill)
    log_interval: float = progress.LOG_INTERVAL  # seconds between log lines when stderr is not a terminal


@dataclass
class RunSummary:
    """What a run did. Times are seconds of this process: ``setup_seconds`` to open the dataset, load the model
    and find what is already done; ``seconds`` the processing of the images, of which ``model_seconds`` the
    filter and attribution passes, ``data_seconds`` the waits for decoded batches, ``store_seconds`` journal
    writes and heatmaps; ``merge_seconds`` the merge."""

    store: Path
    rank: int = 0
    world_size: int = 1
    selected: int = 0
    assigned: int = 0
    already_done: int = 0
    done: int = 0
    skipped: list = field(default_factory=list)  # (id, reason)
    failed: list = field(default_factory=list)  # (id, reason)
    setup_seconds: float = 0.0
    seconds: float = 0.0
    model_seconds: float = 0.0
    data_seconds: float = 0.0
    store_seconds: float = 0.0
    merge_seconds: float = 0.0
    merged: object = None  # fastig.io.store.MergeResult when this process merged

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        """The human-readable summary."""
        who = f"[rank {self.rank}/{self.world_size}] " if self.world_size > 1 else ""
        out = [f"{who}{self.done} attributed, {len(self.skipped)} skipped, {len(self.failed)} failed "
               f"of {self.assigned} image(s) ({self.already_done} already done) in {self.seconds:.1f} s "
               f"({self.images_per_second:.2f} images/s)"]
        for title, entries in (("skipped", self.skipped), ("failed", self.failed)):
            if entries:
                counts = Counter(_category(reason) for _, reason in entries)
                out.append(f"  {title}: " + ", ".join(f"{n} {what}" for what, n in counts.most_common()))
                out += [f"    {name}: {reason}" for name, reason in entries[:5]]
                if len(entries) > 5:
                    out.append(f"    ... and {len(entries) - 5} more (all recorded in the store)"
                               if title == "skipped" else f"    ... and {len(entries) - 5} more")
        if self.seconds > 0 and self.done + len(self.skipped):
            out.append(f"  time: model passes {100 * self.model_seconds / self.seconds:.0f}%, waiting for data "
                       f"{100 * self.data_seconds / self.seconds:.0f}%, storage {100 * self.store_seconds / self.seconds:.0f}%")
        if self.merged is not None:
            m = self.merged
            out.append(f"  -> {m.path}: {m.rows} row(s), {m.skipped} skipped image(s) recorded"
                       + (f", {m.damaged} damaged journal row(s) dropped (rerun to redo them)" if m.damaged else ""))
        return out


def _category(reason: str) -> str:
    return reason.split(":", 1)[0]


# ---- the run ----------------------------------------------------------------------------------------------------


def run(spec: RunSpec, echo: Callable[[str], None] | None = None) -> RunSummary:
    """Run ``spec`` (see the module docstring); ``echo`` prints messages (default: to stderr)."""
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    _check_spec(spec)
    dist = _Distributed.start(spec)
    try:
        return _run(spec, dist, echo)
    finally:
        dist.stop()


def _check_spec(spec: RunSpec) -> None:
    from fastig.io.store import COMPRESSIONS, DTYPES

    if (spec.images is None) == (spec.dataset is None):
        raise RunError("give images or a dataset (--image or --dataset), not both" if spec.images is not None
                       else "give at least one --image, or --dataset ROOT")
    if spec.images is not None and not spec.images:
        raise RunError("give at least one --image")
    if spec.batch_size < 1:
        raise RunError(f"images per batch must be >= 1, got {spec.batch_size}")
    if spec.workers is not None and spec.workers < 0:
        raise RunError(f"--workers must be >= 0, got {spec.workers}")
    if spec.min_confidence is not None and not 0.0 <= spec.min_confidence <= 1.0:
        raise RunError(f"--min-confidence must be in [0, 1], got {spec.min_confidence}")
    if isinstance(spec.target, str) and spec.target not in TARGETS:
        raise RunError(f"target must be a class index or one of {TARGETS}, got {spec.target!r}")
    if spec.dtype not in DTYPES:
        raise RunError(f"dtype must be one of {DTYPES}, got {spec.dtype!r}")
    if spec.compression not in COMPRESSIONS:
        raise RunError(f"compression must be one of {COMPRESSIONS}, got {spec.compression!r}")
    if spec.shard is not None and not (spec.shard[1] >= 1 and 0 <= spec.shard[0] < spec.shard[1]):
        raise RunError(f"shard must be RANK/WORLD with 0 <= RANK < WORLD, got {spec.shard[0]}/{spec.shard[1]}")


def preprocess_for(model_name: str):
    """The zoo model's input transform (resize, crop, normalize, grey)."""
    from fastig import models
    from fastig.io.images import Preprocess

    info = models.info(model_name)
    return Preprocess(resize=info.resize_size, crop=info.input_size, mean=info.mean, std=info.std,
                      grayscale=info.channels == 1)


def _open_dataset(spec: RunSpec, preprocess):
    from fastig.io import datasets

    if spec.images is not None:
        dataset = datasets.image_list(spec.images)
        for sample in dataset.samples:  # files named one by one are the user's input: a bad one is an error
            datasets.decode(sample, preprocess)
        return dataset
    return datasets.open_dataset(spec.dataset, spec.layout, spec.labels)


def _recorded_options(spec: RunSpec, dataset) -> dict:
    """The settings that define the run: a store or journal with other ones is not mixed into."""
    target = None if spec.target == "predicted" else spec.target
    recorded = {**spec.options, "target": target}
    if spec.images is not None:
        recorded["images"] = [str(p) for p in spec.images]
    else:
        recorded["dataset"] = {"root": str(Path(spec.dataset).resolve()), "layout": dataset.layout,
                               "labels": None if spec.labels is None else str(Path(spec.labels).resolve()),
                               "start": spec.start, "stride": spec.stride, "end": spec.end}
    if spec.correct_only or spec.min_confidence is not None:
        recorded["filters"] = {"correct_only": spec.correct_only, "min_confidence": spec.min_confidence}
    return recorded


def _run(spec: RunSpec, dist: "_Distributed", echo) -> RunSummary:
    from fastig import models
    from fastig.io import datasets
    from fastig.io.store import Journal

    setup = time.perf_counter()
    preprocess = preprocess_for(spec.model)
    dataset = _open_dataset(spec, preprocess)
    for note in dataset.notes:
        dist.echo0(echo, f"note: {note}")
    selection = datasets.select(len(dataset), spec.start, spec.stride, spec.end)
    if not selection:
        raise RunError(f"the selection (start {spec.start}, stride {spec.stride}, end {spec.end}) holds no image "
                       f"of the {len(dataset)} in {dataset.root}")
    device = dist.device(spec.device)
    model = models.get(spec.model, weights=spec.weights, device=device, nonfinite="refuse")
    info = models.info(spec.model)
    run_header = {"model": spec.model, "method": spec.method, "options": _recorded_options(spec, dataset),
                  "shape": [info.input_size, info.input_size], "dtype": spec.dtype}
    out_dir = Path(spec.out_dir)
    final, parts = out_dir / STORE_NAME, out_dir / PARTS_NAME

    if spec.overwrite and dist.rank == 0:
        final.unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
    dist.barrier()
    done = _recorded_indices(final, parts, run_header)
    summary = RunSummary(final, dist.rank, dist.world_size, selected=len(selection))
    mine = datasets.shard(selection, dist.rank, dist.world_size)
    todo = [i for i in mine if i not in done]
    summary.assigned, summary.already_done = len(mine), len(mine) - len(todo)
    already = sum(1 for i in selection if i in done)
    if already:
        dist.echo0(echo, f"resuming {final}: {already} of {len(selection)} image(s) already done")

    summary.setup_seconds = time.perf_counter() - setup
    started = time.perf_counter()
    if todo:
        heatmaps = spec.heatmaps if spec.heatmaps is not None else spec.images is not None
        workers = spec.workers if spec.workers is not None else (
            0 if spec.images is not None else min(4, os.cpu_count() or 1))
        journal = Journal.open(parts / f"rank-{dist.rank:05d}.journal", run_header, fsync=spec.fsync)
        try:
            with progress.task(f"{spec.method} on {spec.model}", len(todo), "images", show=True,
                               interval=spec.log_interval, bar=dist.rank == 0,
                               prefix=f"[rank {dist.rank}] " if dist.world_size > 1 else "") as images_done:
                loader = datasets.batches(dataset, todo, preprocess, spec.batch_size, workers,
                                          pin_memory=device.type == "cuda")
                worker = _BatchWorker(spec, model, device, journal, preprocess, out_dir, heatmaps, summary)
                while True:
                    waited = time.perf_counter()
                    batch = next(loader, None)
                    summary.data_seconds += time.perf_counter() - waited
                    if batch is None:
                        break
                    worker(batch)
                    images_done.advance(len(batch))
        finally:
            journal.close()
    summary.seconds = time.perf_counter() - started

    dist.barrier()
    if dist.group or dist.world_size == 1 or _complete(selection, final, parts, run_header):
        if dist.rank == 0 or not dist.group:
            merging = time.perf_counter()
            summary.merged = _merge(final, parts, run_header, spec.compression)
            summary.merge_seconds = time.perf_counter() - merging
    else:
        echo(f"shard {dist.rank}/{dist.world_size} finished; images of other shards remain, so the merge is left "
             "to the last shard to finish (or a plain rerun of the command)")
    return summary


def _recorded_indices(final: Path, parts: Path, run_header: dict) -> set:
    """Dataset indices already recorded (attributed or skipped) in the final store or in any journal."""
    from fastig.io.store import Store, read_journal, same_run

    done = set()
    if final.exists():
        with Store.open(final) as store:
            recorded = {"model": store.attrs["model"], "method": store.attrs["method"],
                        "options": store.attrs["options"], "shape": list(store.attrs["shape"]),
                        "dtype": store.attrs["dtype"]}
            if not same_run(recorded, run_header):
                raise RunError(_other_settings(final, recorded))
            index = store.column("index") if "index" in store.column_names() else np.arange(len(store))
            done.update(int(index[row]) for row in store.done_indices())
            done.update(int(i) for i in store.skipped()["index"])
    for path in sorted(parts.glob("*.journal")) if parts.is_dir() else []:
        contents = read_journal(path)
        if contents.run is None:
            continue
        if not same_run(contents.run, run_header):
            raise RunError(_other_settings(path, contents.run))
        done.update(int(r.meta["index"]) for r in contents.records if r.meta.get("kind") in ("row", "skip"))
    return done


def _other_settings(path: Path, recorded: dict) -> str:
    return (f"{path} holds a run with other settings ({recorded.get('model')}, {recorded.get('method')}, "
            f"{recorded.get('options')}, {recorded.get('dtype')}); pass --overwrite or choose another --out")


def _complete(selection, final: Path, parts: Path, run_header: dict) -> bool:
    done = _recorded_indices(final, parts, run_header)
    return all(i in done for i in selection)


def _merge(final: Path, parts: Path, run_header: dict, compression):
    """Merge the journals into the final store (atomically), then delete them. Serialized by a lock on ``parts``."""
    from fastig.io.store import merge

    if not parts.is_dir():
        return None if final.exists() else merge(final, [], run_header, compression)
    with _DirectoryLock(parts):
        journals = sorted(parts.glob("*.journal")) if parts.is_dir() else []
        if not journals and final.exists():
            return None  # another process merged them while this one waited for the lock
        result = merge(final, journals, run_header, compression)
        for path in journals:
            path.unlink()
    try:
        parts.rmdir()
    except OSError:
        pass  # not empty (a newer journal) or already gone
    return result


class _DirectoryLock:
    """An exclusive advisory lock on a folder (flock on its descriptor); a no-op where flock does not exist."""

    def __init__(self, folder: Path):
        self.folder, self.fd = folder, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.folder, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock


# ---- one batch --------------------------------------------------------------------------------------------------


class _BatchWorker:
    """Filters and attributes one decoded batch and appends its records to the journal."""

    def __init__(self, spec: RunSpec, model, device, journal, preprocess, out_dir: Path, heatmaps: bool,
                 summary: RunSummary):
        self.spec, self.model, self.device, self.journal = spec, model, device, journal
        self.preprocess, self.out_dir, self.heatmaps, self.summary = preprocess, out_dir, heatmaps, summary

    def __call__(self, batch) -> None:
        records = []
        good = []
        for item in batch:
            if item.input is None:
                records.append(self._skip(item, f"unreadable image: {item.reason}"))
            else:
                good.append(item)
        if good:
            records += self._attribute(good)
        stored = time.perf_counter()
        self.journal.append(records)
        self.summary.store_seconds += time.perf_counter() - stored

    def _skip(self, item, reason: str, prediction=None, confidence=None):
        self.summary.skipped.append((item.sample.id, reason))
        meta = {"kind": "skip", "index": item.index, "id": item.sample.id, "reason": reason,
                "label": item.sample.label, "prediction": prediction, "confidence": confidence}
        return meta, b""

    def _attribute(self, good) -> list:
        spec, summary = self.spec, self.summary
        timer = time.perf_counter()
        x = torch.stack([item.input for item in good]).to(self.device, non_blocking=True)
        from fastig.core.engine import Engine

        with torch.no_grad():  # the filter pass: through the engine, like every model pass
            probabilities = torch.softmax(Engine(self.model).call((x,)).float(), dim=1)
        confidence, prediction = (t.tolist() for t in probabilities.max(dim=1))
        summary.model_seconds += _elapsed(timer, self.device)
        records, kept = [], []
        for k, item in enumerate(good):
            reason = self._filter(item.sample.label, prediction[k], confidence[k])
            if reason:
                records.append(self._skip(item, reason, prediction[k], confidence[k]))
            else:
                kept.append(k)
        if not kept:
            return records
        targets = [self._target(good[k].sample.label, prediction[k]) for k in kept]
        heat = self._attributions(x[kept], targets, [good[k] for k in kept])
        from fastig.io.store import cast_attributions

        stored = time.perf_counter()
        for row, k in enumerate(kept):
            item = good[k]
            if heat[row] is None:
                continue
            data = cast_attributions(heat[row], spec.dtype)
            records.append(({"kind": "row", "index": item.index, "id": item.sample.id, "target": targets[row],
                             "label": item.sample.label, "prediction": prediction[k],
                             "confidence": confidence[k], "note": item.note}, data.tobytes()))
            summary.done += 1
            if self.heatmaps:
                self._heatmap(item, heat[row])
        summary.store_seconds += time.perf_counter() - stored
        return records

    def _filter(self, label, prediction: int, confidence: float) -> str | None:
        spec = self.spec
        if (spec.correct_only or spec.target == "label") and label is None:
            return "missing label: the dataset gives no label for this image"
        if spec.correct_only and prediction != label:
            return f"misclassified: predicted {prediction}, label {label}"
        if spec.min_confidence is not None and confidence < spec.min_confidence:
            return f"low confidence: {confidence:.4f} < {spec.min_confidence}"
        return None

    def _target(self, label, prediction: int) -> int:
        if isinstance(self.spec.target, int) and not isinstance(self.spec.target, bool):
            return self.spec.target
        return label if self.spec.target == "label" else prediction

    def _attributions(self, x, targets, items) -> list:
        """One [H, W] float32 map per image (channels summed), None for an image whose attribution failed.

        Errors of the arguments (FastigError, ValueError, TypeError) stop the run: they would fail every image.
        Anything else (out of memory, a numerical failure) fails the batch, which is then retried one image at a
        time so only the images that fail are recorded as failed.
        """
        try:
            return list(self._attribute_batch(x, targets))
        except (FastigError, ValueError, TypeError):
            raise
        except Exception as e:  # noqa: BLE001
            if len(items) == 1:
                self.summary.failed.append((items[0].sample.id, f"{type(e).__name__}: {e}"))
                return [None]
        out = []
        for k, item in enumerate(items):
            try:
                out.append(self._attribute_batch(x[k:k + 1], targets[k:k + 1])[0])
            except (FastigError, ValueError, TypeError):
                raise
            except Exception as e:  # noqa: BLE001
                self.summary.failed.append((item.sample.id, f"{type(e).__name__}: {e}"))
                out.append(None)
        return out

    def _attribute_batch(self, x, targets) -> np.ndarray:
        import fastig

        timer = time.perf_counter()
        target = targets[0] if isinstance(self.spec.target, int) else torch.tensor(targets, device=x.device)
        result = fastig.attribute(self.model, x, target=target, method=self.spec.method, **self.spec.options)
        result = result[0] if isinstance(result, tuple) else result
        heat = result.detach().float().sum(1).cpu().numpy()
        self.summary.model_seconds += _elapsed(timer, self.device)
        if not np.isfinite(heat).all():
            raise FloatingPointError("the attribution holds NaN or infinite values")
        return heat

    def _heatmap(self, item, heat: np.ndarray) -> None:
        from fastig.io.heatmap import render_heatmap, save_png

        picture = render_heatmap(torch.from_numpy(heat), self.preprocess.to_display(item.input), sign=self.spec.sign)
        save_png(self.out_dir / f"{item.index:04d}_{Path(item.sample.id).stem}_{self.spec.method}.png", picture)


def _elapsed(since: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # count the kernels, not only their launches
    return time.perf_counter() - since


# ---- many processes ---------------------------------------------------------------------------------------------


class _Distributed:
    """This process's place among the run's processes: torch.distributed under torchrun, a manual shard, or alone."""

    def __init__(self, rank: int = 0, world_size: int = 1, group: bool = False, owns_group: bool = False,
                 local_rank: int = 0, backend: str | None = None):
        self.rank, self.world_size, self.group = rank, world_size, group
        self.owns_group, self.local_rank, self.backend = owns_group, local_rank, backend

    @classmethod
    def start(cls, spec: RunSpec) -> "_Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if spec.shard is not None:
            if world > 1:
                raise RunError("--shard is for runs without torchrun; under torchrun the ranks shard themselves")
            return cls(spec.shard[0], spec.shard[1])
        if world <= 1:
            return cls()
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if spec.device == "cuda" else "gloo"
        owns = False
        if not dist.is_initialized():
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), True, owns, local_rank, dist.get_backend())

    def device(self, name: str) -> torch.device:
        if name == "cuda" and self.group:
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def barrier(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.local_rank] if self.backend == "nccl" else None)

    def echo0(self, echo, line: str) -> None:
        """Print on rank 0 only (every rank would print the same)."""
        if self.rank == 0:
            echo(line)

    def stop(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
