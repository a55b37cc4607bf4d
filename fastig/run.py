"""The run driver behind ``fastig attribute``: images or a dataset -> batched filtering -> attribution -> store.

One run attributes a selection of images (``--image`` files, or ``--dataset ROOT`` with ``--start``,
``--stride`` and ``--end``) with one model and method:

1. the selected images are decoded and preprocessed in ``workers`` DataLoader processes, ``images_per_batch`` at a time;
   an image that cannot be used (unreadable, corrupt) is skipped and its reason recorded; grey, RGBA, 16-bit and
   small images are converted (the conversion is recorded as the row's note);
2. one batched forward pass gives each image's prediction and confidence (softmax probability of the top-1
   class); ``correct_only`` skips images whose prediction differs from their label (or that have no label),
   ``min_confidence`` those below the threshold; these decisions and numbers are recorded with the image;
3. the kept images of the batch are attributed together, for their predicted class (default), their label, or a
   fixed class; the attribution is summed over colour channels into one [H, W] map per image. A method that
   draws random numbers (SmoothGrad, gradient SHAP, LIME, kernel SHAP, Shapley sampling, PDA, ...: found out on
   the first batch, by whether the global generators moved) attributes each image alone, under its own seed
   :func:`image_seed` ``(seed, dataset index)``, so a resumed, re-batched or sharded run gives bitwise the same
   rows; ``weights="none"`` draws the model from ``seed`` too;
4. every result (row or skip) is appended to this process's journal as soon as its batch is done, and the final
   HDF5 store ``OUT/attributions.h5`` is built from the journals by an atomic merge at the end (see
   ``fastig.io.journal`` for why a SIGKILL at any moment loses at most the batch in flight).

Restarting the same command resumes: images recorded intact in the store or any journal are not redone (damaged
ones are, and the run says how many). A run whose header differs (model, weights' sha256 or seed, method and its
options with their defaults, target, images, filters, dtype, ``prepare``: ``fastig.io.journal.run_header``)
refuses to mix into the same ``OUT`` unless ``overwrite`` is set, which starts over. A run that records nothing
leaves ``OUT`` unclaimed. The summary names why images failed; ``RunSummary.exit_code`` is 1 when nothing could be attributed.

Many processes: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialized with gloo (CPU) or nccl
(CUDA, one device per local rank); rank r of W attributes the selected images at positions r, r + W, ...; all ranks
meet at a barrier and rank 0 merges, so ``OUT`` must be a folder every rank can reach (a shared file system when
the ranks run on several machines). A rank that died can be redone by rerunning the same command (with any number
of processes, or none: plain ``fastig attribute``), or alone with ``shard=(r, W)`` (``--shard r/W``): a shard run
merges when it finds every selected image recorded.
"""

from __future__ import annotations

import hashlib
import os
import random
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
from fastig.errors import FastigError, ResourceError, check_int
from fastig.io.journal import PARTS_NAME, STORE_NAME, RunFolder, run_header  # noqa: F401  (the folder's names)

TARGETS = ("predicted", "label")
# methods whose numbers depend on the model's layers, not only on the function it computes: not run prepared
UNPREPARED_METHODS = ("lrp",)
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
    target: int | str | None = None  # None or "predicted": top-1 class; "label"; or a class index >= 0
    correct_only: bool = False
    min_confidence: float | None = None
    images_per_batch: int = 8  # images filtered and attributed together (the method batches its model passes)
    workers: int | None = None  # decoding processes; None: 0 for image lists, min(4, CPUs) for datasets
    device: str = "cpu"
    dtype: str = "float32"  # of the stored attributions
    compression: str | None = "gzip"
    heatmaps: bool | None = None  # PNG per image; None: on for image lists, off for datasets
    sign: str = "absolute"
    overwrite: bool = False
    shard: tuple[int, int] | None = None  # (rank, world size) without torch.distributed
    fsync: bool = True  # fsync the journal after every batch (survives power loss, not only a kill)
    seed: int = 0  # seeds weights="none" and each image's random draws (recorded in the run header)
    prepare: bool = False  # fastig.prepare the model (BatchNorm folded, channels_last): cheaper passes, recorded
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
    damaged: int = 0  # rows found damaged in the store or the journals, redone by this run
    done: int = 0
    skipped: list = field(default_factory=list)  # (id, reason)
    failed: list = field(default_factory=list)  # (id, reason)
    setup_seconds: float = 0.0
    seconds: float = 0.0
    model_seconds: float = 0.0
    data_seconds: float = 0.0
    store_seconds: float = 0.0
    merge_seconds: float = 0.0
    merged: object = None  # fastig.io.journal.MergeResult when this process merged

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """1 when images failed and none could be attributed (the CLI's exit code), else 0."""
        return 1 if self.failed and not self.done else 0

    def lines(self) -> list[str]:
        """The human-readable summary."""
        who = f"[rank {self.rank}/{self.world_size}] " if self.world_size > 1 else ""
        why = ", ".join(f"{n} {what}" for what, n in Counter(_category(r) for _, r in self.failed).most_common())
        out = [f"{who}{self.done} attributed, {len(self.skipped)} skipped, {len(self.failed)} failed"
               + (f" ({why})" if why else "")
               + f" of {self.assigned} image(s) ({self.already_done} already done) in {self.seconds:.1f} s "
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
                       + (f", {m.damaged} damaged row(s) dropped (rerun to redo them)" if m.damaged else ""))
        elif self.failed and not self.done:
            out.append("  nothing was attributed, so no store was written")
        return out


def _category(reason: str) -> str:
    return reason.split(":", 1)[0]


def image_seed(seed: int, index: int) -> int:
    """The seed of dataset image ``index`` in a run seeded with ``seed`` (a 32-bit draw of numpy's SeedSequence),
    the same whichever process, batch or resumed run attributes the image."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


# ---- the run ----------------------------------------------------------------------------------------------------


def run(spec: RunSpec, echo: Callable[[str], None] | None = None) -> RunSummary:
    """Run ``spec`` (see the module docstring); ``echo`` prints messages (default: to stderr)."""
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    _check_spec(spec)
    folder = RunFolder(spec.out_dir)
    folder.check_writable()
    dist = _Distributed.start(spec)
    try:
        return _run(spec, folder, dist, echo)
    finally:
        dist.stop()


def _check_spec(spec: RunSpec) -> None:
    """Everything that can be checked before any work (nothing is read or created here)."""
    from fastig import models
    from fastig.io.store import COMPRESSIONS, DTYPES

    info = models.info(spec.model)  # an unknown model is named first
    if not str(spec.out_dir).strip():
        raise RunError("the output folder (--out) is an empty path: name a folder")
    if (spec.images is None) == (spec.dataset is None):
        raise RunError("give images or a dataset (--image or --dataset), not both" if spec.images is not None
                       else "give at least one --image, or --dataset ROOT")
    if spec.images is not None and not spec.images:
        raise RunError("give at least one --image")
    check_int("images_per_batch", spec.images_per_batch, error=RunError)
    if spec.prepare and spec.method in UNPREPARED_METHODS:
        raise RunError(f"--prepare folds BatchNorm into the convolutions, which changes {spec.method}'s layer rules: "
                       "run it without --prepare")
    check_int("workers", spec.workers, 0, none_ok=True, error=RunError)
    if spec.min_confidence is not None and not 0.0 <= spec.min_confidence <= 1.0:
        raise RunError(f"--min-confidence must be in [0, 1], got {spec.min_confidence}")
    target = spec.target
    if isinstance(target, str) and target not in TARGETS:
        raise RunError(f"target must be a class index or one of {TARGETS}, got {target!r}")
    if target is not None and not isinstance(target, str):
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
            raise RunError(f"target must be a class index, 'predicted' or 'label', got {target!r}")
        if not 0 <= target < info.num_classes:
            raise RunError(f"--target {target} is out of range: {spec.model} has classes 0..{info.num_classes - 1}")
    if target == "label" and spec.images is not None:
        raise RunError("--target label needs labelled images, and --image files have none: give --dataset with "
                       "labels, or a class index")
    check_int("seed", spec.seed, 0, error=RunError)
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


def _run_header(spec: RunSpec, dataset) -> dict:
    """This run's header (``fastig.io.journal.run_header``): a store or journal with another is not mixed into."""
    from fastig import methods, models

    info = models.info(spec.model)
    if spec.images is not None:  # (a digest keeps the header short; the store records every path)
        paths = [os.path.abspath(p) for p in spec.images]
        inputs = {"images": len(paths), "sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest()}
    else:
        inputs = {"dataset": os.path.abspath(spec.dataset), "layout": dataset.layout,
                  "labels": None if spec.labels is None else os.path.abspath(spec.labels),
                  "image_root": os.path.abspath(dataset.image_root), "classes": dataset.class_mapping,
                  "start": spec.start, "stride": spec.stride, "end": spec.end}
    filters = ({"correct_only": spec.correct_only, "min_confidence": spec.min_confidence}
               if spec.correct_only or spec.min_confidence is not None else None)
    return run_header(model=spec.model, weights=models.weights_identity(spec.model, spec.weights, spec.seed),
                      seed=spec.seed, method=spec.method, options={**methods.defaults(spec.method), **spec.options},
                      target=None if spec.target == "predicted" else spec.target, inputs=inputs, filters=filters,
                      shape=[info.input_size, info.input_size], dtype=spec.dtype, prepared=spec.prepare)


def _run(spec: RunSpec, folder: RunFolder, dist: "_Distributed", echo) -> RunSummary:
    from fastig import models
    from fastig.models.prepare import prepare
    from fastig.io import datasets
    from fastig.io.journal import Journal

    setup = time.perf_counter()
    preprocess = preprocess_for(spec.model)
    dataset = _open_dataset(spec, preprocess)
    for note in dataset.notes:
        dist.echo0(echo, f"note: {note}")
    selection = datasets.select(len(dataset), spec.start, spec.stride, spec.end)
    if not selection:
        raise RunError(f"the selection (start {spec.start}, stride {spec.stride}, end {spec.end}) holds no image "
                       f"of the {len(dataset)} in {dataset.root}")
    header = _run_header(spec, dataset)

    if spec.overwrite and dist.rank == 0:
        folder.reset()
    dist.barrier()
    recorded = folder.recorded(header)
    done = recorded.indices
    summary = RunSummary(folder.store, dist.rank, dist.world_size, selected=len(selection), damaged=recorded.damaged)
    mine = datasets.shard(selection, dist.rank, dist.world_size)
    todo = [i for i in mine if i not in done]
    summary.assigned, summary.already_done = len(mine), len(mine) - len(todo)
    already = sum(1 for i in selection if i in done)
    if already:
        dist.echo0(echo, f"resuming {folder.store}: {already} of {len(selection)} image(s) already done")
    if recorded.damaged:
        dist.echo0(echo, f"{recorded.damaged} damaged row(s) will be redone")

    started = time.perf_counter()
    if todo:
        device = dist.device(spec.device)
        model = models.get(spec.model, weights=spec.weights, device=device, seed=spec.seed, nonfinite="refuse")
        if spec.prepare:
            model = prepare(model, inplace=True)
        summary.setup_seconds = time.perf_counter() - setup
        started = time.perf_counter()
        heatmaps = spec.heatmaps if spec.heatmaps is not None else spec.images is not None
        workers = spec.workers if spec.workers is not None else (
            0 if spec.images is not None else min(4, os.cpu_count() or 1))
        journal = Journal.open(folder.journal_path(dist.rank), header, fsync=spec.fsync)
        try:
            with progress.task(f"{spec.method} on {spec.model}", len(todo), "images", show=True,
                               interval=spec.log_interval, bar=dist.rank == 0,
                               prefix=f"[rank {dist.rank}] " if dist.world_size > 1 else "") as images_done:
                loader = datasets.batches(dataset, todo, preprocess, spec.images_per_batch, workers,
                                          pin_memory=device.type == "cuda")
                worker = _BatchWorker(spec, model, device, journal, preprocess, folder.out_dir, heatmaps, summary,
                                      dataset)
                while True:
                    waited = time.perf_counter()
                    batch = next(loader, None)
                    summary.data_seconds += time.perf_counter() - waited
                    if batch is None:
                        break
                    images_done.underway(len(batch))
                    worker(batch)
                    images_done.advance(len(batch))
        finally:
            journal.close()
            folder.tidy()
    else:
        summary.setup_seconds = time.perf_counter() - setup
    summary.seconds = time.perf_counter() - started

    dist.barrier()
    if dist.group or dist.world_size == 1 or folder.complete(selection, header):
        if dist.rank == 0 or not dist.group:
            merging = time.perf_counter()
            summary.merged = folder.merge(header, spec.compression)
            summary.merge_seconds = time.perf_counter() - merging
    else:
        echo(f"shard {dist.rank}/{dist.world_size} finished; images of other shards remain, so the merge is left "
             "to the last shard to finish (or a plain rerun of the command)")
    return summary


# ---- one batch --------------------------------------------------------------------------------------------------


class _BatchWorker:
    """Filters and attributes one decoded batch and appends its records to the journal."""

    def __init__(self, spec: RunSpec, model, device, journal, preprocess, out_dir: Path, heatmaps: bool,
                 summary: RunSummary, dataset):
        self.spec, self.model, self.device, self.journal = spec, model, device, journal
        self.preprocess, self.out_dir, self.heatmaps, self.summary = preprocess, out_dir, heatmaps, summary
        self.dataset = dataset
        self.draws: bool | None = None  # whether the method draws random numbers (found out on the first batch)

    def __call__(self, batch) -> None:
        records = []
        good = []
        for item in batch:
            if item.input is None:
                records.append(self._skip(item, f"unreadable image: {item.reason}"))
            else:
                good.append(item)
        rows = self._attribute(good) if good else []
        records += [record for record, _, _ in rows]
        stored = time.perf_counter()
        self.journal.append(records)  # the rows are safe from here on; heatmaps come after
        if self.heatmaps:
            for _, item, heat in rows:
                if heat is not None:
                    self._heatmap(item, heat)
        self.summary.store_seconds += time.perf_counter() - stored

    def _skip(self, item, reason: str, prediction=None, confidence=None):
        self.summary.skipped.append((item.sample.id, reason))
        meta = {"kind": "skip", "index": item.index, "id": item.sample.id, "reason": reason,
                "label": item.sample.label, "prediction": prediction, "confidence": confidence}
        return meta, b""

    def _attribute(self, good) -> list:
        """(record, item, attribution map or None) for each image: skip records, then the attributed rows."""
        spec, summary = self.spec, self.summary
        timer = time.perf_counter()
        x = torch.stack([item.input for item in good]).to(self.device, non_blocking=True)
        from fastig.core.engine import Engine

        with torch.no_grad():  # the filter pass: through the engine, like every model pass
            probabilities = torch.softmax(Engine(self.model).call((x,)).float(), dim=1)
        confidence, prediction = (t.tolist() for t in probabilities.max(dim=1))
        summary.model_seconds += _elapsed(timer, self.device)
        out, kept = [], []
        for k, item in enumerate(good):
            reason = self._filter(item.sample.label, prediction[k], confidence[k])
            if reason:
                out.append((self._skip(item, reason, prediction[k], confidence[k]), item, None))
            else:
                kept.append(k)
        if not kept:
            return out
        targets = [self._target(good[k].sample.label, prediction[k]) for k in kept]
        heat = self._attributions(x[kept], targets, [good[k] for k in kept])
        from fastig.io.store import cast_attributions

        for row, k in enumerate(kept):
            item = good[k]
            if heat[row] is None:
                continue
            attribution, columns = heat[row]
            data = cast_attributions(attribution, spec.dtype)
            meta = {"kind": "row", "index": item.index, "id": item.sample.id, "target": targets[row],
                    "label": item.sample.label, "prediction": prediction[k], "confidence": confidence[k],
                    "note": item.note, "path": self.dataset.relative_path(item.sample),
                    **columns}  # extra per-row store columns (n_steps="auto": passes, cost, error)
            out.append(((meta, data.tobytes()), item, attribution))
            summary.done += 1
        return out

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
        """One ([H, W] float32 map (channels summed), extra columns) pair per image, None for an image whose
        attribution failed (the columns: a dict of per-row values for the store, e.g. the passes and error of
        ``--steps auto``, or empty).

        Errors of the arguments (FastigError, ValueError, TypeError) stop the run: they would fail every image.
        Anything else (out of memory, a numerical failure) fails the batch, which is then retried one image at a
        time so only the images that fail are recorded as failed.
        """
        indices = [item.index for item in items]
        try:
            return list(self._attribute_batch(x, targets, indices))
        except (FastigError, ValueError, TypeError):
            raise
        except Exception as e:  # noqa: BLE001
            if len(items) == 1:
                self.summary.failed.append((items[0].sample.id, _failure(e)))
                return [None]
        out = []
        for k, item in enumerate(items):
            try:
                out.append(self._attribute_batch(x[k:k + 1], targets[k:k + 1], indices[k:k + 1])[0])
            except (FastigError, ValueError, TypeError):
                raise
            except Exception as e:  # noqa: BLE001
                self.summary.failed.append((item.sample.id, _failure(e)))
                out.append(None)
        return out

    def _attribute_batch(self, x, targets, indices) -> list:
        """The batch's (map, columns) pairs. A method that draws random numbers attributes each image alone under its own seed:
        whether it does is seen on the first batch (the global generators moved), which is then redone."""
        if not self.draws:
            before = _RandomState(x.device)
            try:
                heat = self._call(x, targets)
            finally:
                moved = not before.same_as(_RandomState(x.device))
                before.restore()
            if not moved:
                self.draws = False
                return heat
            self.draws = True
        maps = []
        for k, index in enumerate(indices):
            before = _RandomState(x.device)
            _seed_everything(image_seed(self.spec.seed, index))
            try:
                maps += self._call(x[k:k + 1], targets[k:k + 1])
            finally:
                before.restore()
        return maps

    def _call(self, x, targets) -> list:
        import fastig

        timer = time.perf_counter()
        target = targets[0] if isinstance(self.spec.target, int) else torch.tensor(targets, device=x.device)
        adaptive = self.spec.options.get("n_steps") == "auto"  # its per-image passes and error go to the store
        result = fastig.attribute(self.model, x, target=target, method=self.spec.method, return_info=adaptive,
                                  **self.spec.options)
        result, info = result if adaptive else (result, None)
        result = result[0] if isinstance(result, tuple) else result
        heat = result.detach().float().sum(1).cpu().numpy()
        self.summary.model_seconds += _elapsed(timer, self.device)
        if not np.isfinite(heat).all():
            raise FloatingPointError("the attribution holds NaN or infinite values (are the weights finite?)")
        columns = [{} for _ in range(len(heat))]
        if info is not None and hasattr(info, "passes"):  # n_steps="auto": what each image cost and reached
            for row, (passes, cost, error) in enumerate(zip(info.passes.tolist(), info.cost.tolist(), info.error.tolist())):
                columns[row] = {"passes": passes, "cost": cost, "error": error}
        return list(zip(heat, columns))

    def _heatmap(self, item, heat: np.ndarray) -> None:
        import cv2

        from fastig.io.heatmap import render_heatmap, save_png

        path = self.out_dir / f"{item.index:04d}_{Path(item.sample.id).stem}_{self.spec.method}.png"
        picture = render_heatmap(torch.from_numpy(heat), self.preprocess.to_display(item.input), sign=self.spec.sign)
        try:
            save_png(path, picture)
        except (OSError, cv2.error) as e:
            raise ResourceError(f"cannot write the heatmap {path}: {getattr(e, 'strerror', None) or e}; the rows "
                                "are kept in the journal (rerun the same command to go on)") from None


def _failure(error: Exception) -> str:
    """Why an image failed, as the summary groups it ("<category>: <detail>")."""
    text = str(error).strip()
    if isinstance(error, MemoryError) or "out of memory" in text.lower():  # also torch's (CUDA) out of memory
        return f"out of memory: {type(error).__name__}: {text}"
    if isinstance(error, FloatingPointError):
        return f"non-finite attribution: {text}"
    return f"{type(error).__name__}: {text}"


class _RandomState:
    """The global generators a method may draw from: torch's (CPU, and the device's), numpy's and Python's."""

    def __init__(self, device: torch.device):
        self.device = device
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.numpy = np.random.get_state()
        self.python = random.getstate()

    def same_as(self, other: "_RandomState") -> bool:
        return (torch.equal(self.torch, other.torch) and (self.cuda is None or torch.equal(self.cuda, other.cuda))
                and self.python == other.python and self.numpy[0] == other.numpy[0]
                and np.array_equal(self.numpy[1], other.numpy[1]) and self.numpy[2:] == other.numpy[2:])

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # (also every CUDA device's generator)
    np.random.seed(seed)
    random.seed(seed)


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
