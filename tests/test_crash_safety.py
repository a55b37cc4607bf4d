"""Crash safety of dataset runs, end to end through the CLI: SIGKILL at random moments (the merge included), a
flipped byte in a journal, a full disk or file-size limit while journaling and while merging, an unwritable --out.

The runs are forked from the test process (no new interpreter: a run of the 8x8 test CNN takes milliseconds, so
dozens of kills fit in seconds); each child runs `fastig attribute` exactly as the command line does, with one
thread (OpenMP's thread pool does not survive a fork), like the uninterrupted reference run it is compared with.
"""

import contextlib
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from fastig.cli import cli
from fastig.io.journal import read_journal
from fastig.run import PARTS_NAME, STORE_NAME

from test_run import TINY, interrupted_before_the_merge, tiny_model, tiny_spec, write_list_dataset  # noqa: F401

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"), reason="needs fork, SIGKILL")


@pytest.fixture(autouse=True, scope="module")
def _imports_done_once():
    """A first attribution imports sympy (through autograd; seconds): done here once, not in every forked child."""
    import fastig

    fastig.attribute(torch.nn.Linear(3, 2), torch.ones(1, 3), target=0, method="ig", n_steps=2)


def fork_cli(args, output=None, file_limit=None):
    """Start ``fastig ARGS`` in a forked child; its stdout and stderr go to ``output`` (default: nowhere);
    ``file_limit``: RLIMIT_FSIZE in bytes for the child. Returns the pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:  # (an exception other than SystemExit, a bug, is code 3 with its traceback in ``output``)
        torch.set_num_threads(1)
        sink = os.open(output or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(sink, 1)
        os.dup2(sink, 2)
        sys.stdout = sys.stderr = open(sink, "w", buffering=1)  # (pytest replaced the streams)
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.RLIM_INFINITY))
        cli.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def wait(pid) -> int:
    """The child's exit code (negative: killed by that signal)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def cli_run(args, output=None, file_limit=None) -> int:
    return wait(fork_cli(args, output, file_limit))


def contents(path) -> dict:
    """Every dataset and attribute of an HDF5 file, for a bitwise comparison."""
    found = {}
    with h5py.File(path, "r") as f:
        found["attrs"] = {k: str(v) for k, v in f.attrs.items()}

        def visit(name, item):
            if isinstance(item, h5py.Dataset):
                found[name] = item[...].tobytes() if item.dtype.kind != "O" else list(item.asstr()[...])
        f.visititems(visit)
    return found


def attribute_args(listing, out, method, *extra):
    return ["attribute", "--model", TINY, "--weights", "none", "--method", method, "--dataset", listing,
            "--images-per-batch", "2", "--workers", "0", "--no-fsync", "--out", out, *extra]


def merging(out) -> bool:
    return bool(list(out.glob(f"{STORE_NAME}.merging-*")))


def poll(pid):
    """The child's exit code if it has ended (it is then reaped), else None."""
    done, status = os.waitpid(pid, os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def kill_until_done(args, out, reference, rng, kills, span) -> list:
    """Run ``args`` again and again, SIGKILLing each run after a random delay of up to ``span`` seconds (every
    third one once its merge has begun), until ``kills`` runs were killed; then let one run to the end. When a run
    finishes before its kill, its store must be the ``reference`` store, and the folder starts over. Returns what
    each kill hit: the journal records written, or "merge"."""
    hits = []
    while len(hits) < kills:
        pid = fork_cli(args)
        code = None
        if len(hits) % 3 == 2:
            deadline = time.monotonic() + 30
            while not merging(out) and time.monotonic() < deadline and code is None:
                time.sleep(0.0005)
                code = poll(pid)
            time.sleep(rng.uniform(0.0, 0.01))
        else:
            time.sleep(rng.uniform(0.0, span))
        code = poll(pid) if code is None else code
        if code is None:
            in_merge = merging(out)
            os.kill(pid, signal.SIGKILL)
            code = wait(pid)  # (0 when it ended just before the signal)
        if code == -signal.SIGKILL:
            journal = out / PARTS_NAME / "rank-00000.journal"
            hits.append("merge" if in_merge else len(read_journal(journal).records) if journal.exists() else 0)
        else:  # the run ended before its kill
            assert code == 0, (code, hits)
            assert contents(out / STORE_NAME) == contents(reference / STORE_NAME), hits
            shutil.rmtree(out)
    assert cli_run(args) == 0
    return hits


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_store(tmp_path, tiny_model):  # noqa: F811
    """>= 20 kills at random (seeded) moments, the merge included, with --weights none and with a seeded
    SmoothGrad: after resuming to the end, the store is bitwise the uninterrupted run's."""
    listing = write_list_dataset(tmp_path / "data", 14, seed=3)
    (tmp_path / "data" / "img005.png").write_text("not an image")  # skip records are journaled too
    rng = random.Random(16)
    report = {}
    for method, extra, kills in (("ig", ["--steps", "4"], 12), ("smoothgrad", ["--nt-samples", "3", "--stdevs",
                                                                               "0.3"], 10)):
        reference = tmp_path / f"ref-{method}"
        started = time.monotonic()
        assert cli_run(attribute_args(listing, reference, method, *extra)) == 0
        span = time.monotonic() - started
        out = tmp_path / f"out-{method}"
        hits = kill_until_done(attribute_args(listing, out, method, *extra), out, reference, rng, kills, span)
        report[method] = hits
        assert contents(out / STORE_NAME) == contents(reference / STORE_NAME), report
        assert not merging(out) and not (out / PARTS_NAME).exists(), report
    every = report["ig"] + report["smoothgrad"]
    assert len(every) >= 20 and "merge" in every, report


def test_a_flipped_byte_anywhere_in_a_journal_loses_only_its_own_record(tmp_path, tiny_model, monkeypatch):  # noqa: F811
    listing = write_list_dataset(tmp_path / "data", 12, seed=4)
    options = {"nt_samples": 2, "stdevs": 0.3}  # seeded per image: a redone row is bitwise the lost one
    from fastig.run import run

    run(tiny_spec(tmp_path / "ref", listing, method="smoothgrad", options=options), echo=lambda _: None)
    reference = contents(tmp_path / "ref" / STORE_NAME)
    rng = random.Random(6)
    for trial in range(4):
        out = tmp_path / f"out{trial}"
        interrupted_before_the_merge(monkeypatch, tiny_spec(out, listing, method="smoothgrad", options=options))
        journal = out / PARTS_NAME / "rank-00000.journal"
        data = bytearray(journal.read_bytes())
        where = rng.randrange(len(data))
        data[where] ^= 1 << rng.randrange(8)
        journal.write_bytes(bytes(data))
        lost = 12 - sum(1 for r in read_journal(journal).records if r.meta["kind"] == "row")
        assert lost <= 1, where  # at most the record holding the byte (none if it hit a run-header copy)
        summary = run(tiny_spec(out, listing, method="smoothgrad", options=options), echo=lambda _: None)
        assert summary.done == lost and summary.already_done == 12 - lost, where
        assert contents(out / STORE_NAME) == reference, where


@contextlib.contextmanager
def small_disk(path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True) if shutil.which("mount") else None
    if mounted is None or mounted.returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN): "
                    + (mounted.stderr.strip() if mounted else "no mount command"))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def one_line_error(path) -> str:
    lines = path.read_text().strip().splitlines()
    assert not any("Traceback" in line for line in lines), lines
    return lines[-1]


def test_a_full_disk_while_journaling_is_one_line_and_every_finished_row_is_kept(tmp_path, tiny_model):  # noqa: F811
    """Issue 16.9: ENOSPC and EFBIG escaped with a traceback."""
    listing = write_list_dataset(tmp_path / "data", 10, seed=5)
    reference = tmp_path / "ref"
    assert cli_run(attribute_args(listing, reference, "saliency", "--images-per-batch", "1")) == 0
    log = tmp_path / "log.txt"
    # the file-size limit (EFBIG): unprivileged, always tried
    out = tmp_path / "efbig"
    assert cli_run(attribute_args(listing, out, "saliency", "--images-per-batch", "1"), log, file_limit=6000) == 1
    error = one_line_error(log)
    assert error.startswith(f"fastig: error: cannot write the journal {out / PARTS_NAME}/rank-00000.journal: File "
                            "too large; the ") and "row(s) it recorded before are kept" in error, error
    kept = len(read_journal(out / PARTS_NAME / "rank-00000.journal").records)
    assert kept >= 1
    assert cli_run(attribute_args(listing, out, "saliency", "--images-per-batch", "1")) == 0  # the limit lifted
    assert contents(out / STORE_NAME) == contents(reference / STORE_NAME)
    # a full disk (ENOSPC) where a small tmpfs can be mounted
    with small_disk(tmp_path / "disk", "8k") as disk:
        out = disk / "out"
        assert cli_run(attribute_args(listing, out, "saliency", "--images-per-batch", "1"), log) == 1
        error = one_line_error(log)
        assert "cannot write the journal" in error and "No space left on device" in error, error
        subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)  # make room
        assert cli_run(attribute_args(listing, out, "saliency", "--images-per-batch", "1")) == 0
        assert contents(out / STORE_NAME) == contents(reference / STORE_NAME)


def test_a_full_disk_during_the_merge_abandons_the_temporary_store_and_keeps_the_journals(tmp_path, tiny_model,  # noqa: F811
                                                                                          monkeypatch):
    """Issue 16.10: a full disk during the final merge ended in a segmentation fault."""
    from fastig.run import run

    listing = write_list_dataset(tmp_path / "data", 8, seed=6)
    reference = tmp_path / "ref"
    assert cli_run(attribute_args(listing, reference, "saliency")) == 0
    out = tmp_path / "out"
    interrupted_before_the_merge(monkeypatch, tiny_spec(out, listing, method="saliency", options={},
                                                        images_per_batch=2))
    journals = (out / PARTS_NAME / "rank-00000.journal").read_bytes()
    log = tmp_path / "log.txt"
    code = cli_run(attribute_args(listing, out, "saliency"), log, file_limit=len(journals) + 4096)
    assert code == 1, (code, log.read_text())  # not -11 (SIGSEGV)
    error = one_line_error(log)
    assert error.startswith(f"fastig: error: cannot write the merged store {out / STORE_NAME}.merging-"), error
    assert "File too large; nothing was lost" in error and "the journals still hold every new row" in error
    assert not (out / STORE_NAME).exists() and not merging(out)
    assert (out / PARTS_NAME / "rank-00000.journal").read_bytes() == journals
    with small_disk(tmp_path / "disk", "48k") as disk:  # the same on a full disk, where one can be mounted
        shutil.copytree(out, disk / "out")
        (disk / "filler").write_bytes(b"\0" * (48 * 1024 - 2 * len(journals) - 8192))
        assert cli_run(attribute_args(listing, disk / "out", "saliency"), log) == 1
        assert "No space left on device; nothing was lost" in one_line_error(log)
        assert (disk / "out" / PARTS_NAME / "rank-00000.journal").read_bytes() == journals
        assert not merging(disk / "out")
    assert cli_run(attribute_args(listing, out, "saliency")) == 0  # room again: the merge completes
    assert contents(out / STORE_NAME) == contents(reference / STORE_NAME)
    assert run(tiny_spec(out, listing, method="saliency", options={}), echo=lambda _: None).already_done == 8


def test_an_unwritable_out_is_refused_before_the_model_loads(tmp_path, tiny_model):  # noqa: F811
    """Issue 16.9: a read-only --out failed with OSError only after the model was loaded and the images decoded."""
    listing = write_list_dataset(tmp_path / "data", 2)
    log = tmp_path / "log.txt"
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "out"
    else:  # root writes through permission bits: a read-only file system then
        with small_disk(tmp_path / "ro", "64k") as disk:
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            target = disk / "out"
            assert cli_run(attribute_args(listing, target, "saliency"), log) == 2
    if os.geteuid() != 0:
        assert cli_run(attribute_args(listing, target, "saliency"), log) == 2
    error = one_line_error(log)
    assert error.startswith(f"fastig: error: cannot write to --out {target}") and "choose a folder" in error, error
