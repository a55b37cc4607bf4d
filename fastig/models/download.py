"""Downloading the official weight files listed in ``checkpoints/README.md``.

``fastig fetch-weights NAME... | all`` and ``fastig.models.get(name, weights="auto")`` (when the file is missing)
fetch a model's file into :func:`~fastig.models.checkpoints.checkpoint_dir`; ``FASTIG_OFFLINE=1`` forbids every
download (``get`` then fails as it always did, naming the file to place there). Names: the zoo models that have a
file (``fastig models``), and ``dvae``: OpenAI's ``encoder.pkl`` / ``decoder.pkl``, converted at once into
``dvae_encoder.pt`` / ``dvae_decoder.pt`` by the safe reader (``fastig convert-dvae``; the pickles are never
unpickled as such and are deleted after a successful conversion).

A download streams into ``<file>.part-<pid>`` in the destination folder, hashing as it goes, with a progress bar
(:mod:`fastig.core.progress`); it is checked (the byte count against ``Content-Length``: a connection closed early
is a truncated file; the sha256 against what is known of it) and only then renamed onto the final name with
``os.replace``, after an fsync, so a torn or wrong download never becomes a checkpoint and a failed one leaves
nothing behind. What is checked per file: torchvision's files carry the first 8 hex digits of their sha256 in
their names (``resnet50-0676ba61.pth``), which is checked, as ``torch.hub`` does; the SASceneNet checkpoint and
OpenAI's dVAE pickles have no published hash: their size is checked against the server's ``Content-Length``,
their structure by the safe loaders (``weights_only`` unpickling; the dVAE's known classes only), and the sha256
of what was received is printed so it can be recorded.

``torch.hub.download_url_to_file`` is not used: it has no timeout (a stalled server blocks forever) and does not
compare the byte count with ``Content-Length`` (a connection closed early leaves a truncated file that passes when
no hash is known). The request itself is plain ``urllib``, with ``timeout`` seconds allowed per network operation.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastig.errors import CheckpointError, UnknownNameError

OFFLINE_ENV = "FASTIG_OFFLINE"
DVAE = "dvae"
CHUNK = 1 << 20
TIMEOUT = 60.0  # seconds per network operation (connect, each read)


def downloads_allowed() -> bool:
    """False when ``FASTIG_OFFLINE`` is set to anything but ``""``/``0``."""
    return os.environ.get(OFFLINE_ENV, "").strip() in ("", "0")


@dataclass(frozen=True)
class Remote:
    """One file to fetch: its URL, its name under the checkpoints folder, and the sha256 (or prefix) known."""

    url: str
    filename: str
    sha256: str | None = None

    def checked(self) -> str:
        """What is verified of this file, in words."""
        if self.sha256:
            what = "full sha256" if len(self.sha256) == 64 else f"sha256 prefix {self.sha256} (from the file name)"
            return f"{what} and size"
        return "size against the server's Content-Length (no published hash); the sha256 received is printed"


def remotes(name: str) -> list[Remote]:
    """The files ``fetch-weights NAME`` downloads."""
    from fastig import models
    from fastig.attr.latent_ig import OPENAI_FILES, OPENAI_URL

    if name == DVAE:
        return [Remote(OPENAI_URL + f, f) for f in OPENAI_FILES]
    info = models.info(name)
    if info.filename is None:
        raise UnknownNameError(f"model {name!r} needs no weight file (its weights are computed)")
    return [Remote(info.url, info.filename, info.sha256)]


def names() -> list[str]:
    """Every name ``fetch-weights`` accepts (besides ``all``)."""
    from fastig import models

    return [n for n in models.names() if models.info(n).filename is not None] + [DVAE]


def download(remote: Remote, folder: Path, *, timeout: float = TIMEOUT, show: bool = True) -> tuple[Path, str]:
    """Fetch ``remote`` into ``folder`` (see the module docstring); returns (path, sha256 of the file).

    Raises :class:`CheckpointError` naming the URL and the problem (HTTP error, network failure, timeout,
    truncation, hash mismatch); a partial file is always removed.
    """
    from fastig.core import progress

    if not downloads_allowed():
        raise CheckpointError(f"downloads are off ({OFFLINE_ENV}=1): place {remote.filename} in {folder} "
                              f"yourself (from {remote.url})")
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / remote.filename
    partial = folder / f"{remote.filename}.part-{os.getpid()}"
    digest = hashlib.sha256()
    try:
        request = urllib.request.Request(remote.url, headers={"User-Agent": "fastig"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, "wb") as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None and length.isdigit() else None
            received = 0
            total_kib = None if expected is None else -(-expected // 1024)
            with progress.task(f"downloading {remote.filename}", total_kib, "KiB", show=show) as task:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    task.advance(-(-(received + len(chunk)) // 1024) - -(-received // 1024))
                    received += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and received != expected:
            raise CheckpointError(f"download of {remote.url} is truncated: got {received} of {expected} bytes "
                                  "(the connection closed early); run it again")
        actual = digest.hexdigest()
        if remote.sha256 and not actual.startswith(remote.sha256.lower()):
            raise CheckpointError(f"download of {remote.url}: sha256 is {actual}, which does not start with the "
                                  f"expected {remote.sha256!r}; the file was not kept")
        os.replace(partial, final)
        return final, actual
    except urllib.error.HTTPError as e:
        raise CheckpointError(f"cannot download {remote.url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise CheckpointError(f"cannot download {remote.url}: {e.reason} (no network? place {remote.filename} in "
                              f"{folder} yourself)") from None
    except OSError as e:  # a timeout, a reset connection, a full disk
        raise CheckpointError(f"cannot download {remote.url}: {type(e).__name__}: {e}") from None
    finally:
        partial.unlink(missing_ok=True)


def fetch(name: str, folder: Path | None = None, *, timeout: float = TIMEOUT, show: bool = True,
          echo: Callable[[str], None] = lambda line: None) -> list[Path]:
    """Download the files of ``name`` (a model or ``dvae``) into ``folder`` (default: the checkpoints folder)
    unless they are there; the dVAE's pickles are converted and deleted. Returns the usable files."""
    from fastig.models.checkpoints import checkpoint_dir

    folder = checkpoint_dir() if folder is None else Path(folder)
    if name == DVAE:
        return _fetch_dvae(folder, timeout, show, echo)
    if name not in names():
        raise UnknownNameError(f"unknown weights {name!r}; fetch-weights knows: {', '.join(names())}, all")
    (remote,) = remotes(name)
    path = folder / remote.filename
    if path.is_file():
        echo(f"{name}: {path} is already there")
        return [path]
    path, sha256 = download(remote, folder, timeout=timeout, show=show)
    echo(f"{name}: wrote {path} (checked: {remote.checked()}; sha256 {sha256})")
    return [path]


def _fetch_dvae(folder: Path, timeout: float, show: bool, echo) -> list[Path]:
    from fastig.models.dvae import DECODER_FILE, ENCODER_FILE, convert

    converted = [folder / ENCODER_FILE, folder / DECODER_FILE]
    if all(p.is_file() for p in converted):
        echo(f"{DVAE}: {converted[0]} and {converted[1]} are already there")
        return converted
    pickles = []
    for remote in remotes(DVAE):
        path = folder / remote.filename
        if not path.is_file():
            path, sha256 = download(remote, folder, timeout=timeout, show=show)
            echo(f"{DVAE}: wrote {path} (checked: {remote.checked()}; sha256 {sha256})")
        pickles.append(path)
    written = list(convert(pickles[0], pickles[1], folder))  # refuses anything but the dVAE's own classes
    for path in pickles:
        path.unlink()
    echo(f"{DVAE}: converted into {written[0]} and {written[1]} (the pickles were deleted)")
    return written


def ensure(name: str, path: Path, url: str | None, sha256: str | None) -> Path:
    """The weight file of model ``name`` at ``path``, downloaded first when it is missing and downloads are
    allowed (``weights="auto"``); otherwise the error that names the file to place there."""
    if path.exists():
        return path
    where = f"model {name!r} needs its weight file {path.name!r} in {path.parent} (set FASTIG_CHECKPOINTS to use " \
            f"another folder)"
    if url is None or not downloads_allowed():
        why = f"; downloads are off ({OFFLINE_ENV}=1)" if url is not None else ""
        raise CheckpointError(f"{where}; download it from {url}{why}" if url else where)
    try:
        download(Remote(url, path.name, sha256), path.parent)
    except CheckpointError as e:
        raise CheckpointError(f"{where}; fetching it failed: {e}") from None
    return path
