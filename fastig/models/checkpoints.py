"""Safe loading of weight files into zoo models.

Files are read with ``torch.load(path, map_location="cpu", weights_only=True)``: only tensors and plain containers
are unpickled, never arbitrary objects or code, so a file that tries to run code is refused. A state_dict may be
wrapped in a dict under ``"state_dict"`` or ``"model"`` (training checkpoints) and its keys may carry the
``"module."`` prefix of ``nn.DataParallel``. Every key and shape is checked against the model before anything is
copied, and each problem is reported by name (integer tensors for float parameters included); NaN or infinite values
are warned about, or refused on request (the CLI does). When the file name carries torchvision's hash prefix
(``resnet18-f37072fd.pth``: the text between the last-but-one ``-`` and the next ``.`` as matched by torch.hub's
``-([a-f0-9]*)\\.`` rule), the file's sha256 must start with it, as ``torch.hub``'s ``check_hash`` requires.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from fastig.errors import CheckpointError

# torch.hub's rule: the hash prefix is the first "-<hex digits>." in the file name.
HASH_PREFIX_RE = re.compile(r"-([a-f0-9]*)\.")

# Names listed per problem in an error message (the count of the rest follows).
_MAX_LISTED = 10
# What to do with a file whose float tensors hold NaN or infinity (a model with them attributes NaN)
NONFINITE = ("warn", "refuse")


class NonFiniteWeightsWarning(UserWarning):
    """A weight file holds NaN or infinite values (loaded anyway; pass ``nonfinite="refuse"`` to refuse it)."""


def checkpoint_dir() -> Path:
    """The folder weight files are looked up in: ``$FASTIG_CHECKPOINTS`` if set, else ``checkpoints/`` at the
    repository root (next to the ``fastig`` package)."""
    env = os.environ.get("FASTIG_CHECKPOINTS")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "checkpoints"


def hash_prefix_from_name(path: str | os.PathLike) -> str | None:
    """The sha256 prefix a file name carries by torchvision's convention (``None`` when it carries none)."""
    match = HASH_PREFIX_RE.search(Path(path).name)
    return match.group(1) if match and match.group(1) else None


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_hash(path: str | os.PathLike, expected: str | None = None) -> None:
    """Check the file's sha256 against ``expected`` (a full digest or a prefix) and against the prefix in its
    name, if any. Raises :class:`CheckpointError` naming the file and both digests on a mismatch."""
    wanted = [h.lower() for h in (expected, hash_prefix_from_name(path)) if h]
    if not wanted:
        return
    actual = file_sha256(path)
    for prefix in wanted:
        if not actual.startswith(prefix):
            raise CheckpointError(
                f"checkpoint '{path}': sha256 is {actual}, which does not start with the expected {prefix!r} "
                "(the file is corrupt, incomplete or a different file; download it again; a file that is not "
                "torchvision's must not carry a '-<hex>.' hash prefix in its name)"
            )


def _unwrap(obj, path) -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded object: plain, or under "state_dict"/"model", "module." prefix removed."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}': holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not obj or not_tensors:
        what = "is empty" if not obj else f"has non-tensor entries {_listed(not_tensors)}"
        raise CheckpointError(f"checkpoint '{path}': not a state_dict: the dict {what}")
    keys = list(obj)
    if all(isinstance(k, str) and k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}': no such file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}': not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}': the file is empty")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weight file safely (``weights_only=True``, on the CPU) and return its state_dict.

    Raises :class:`CheckpointError` naming the file when it is missing, not a regular file, truncated or
    corrupt, not a PyTorch file, refused by the safe unpickler, or not a (wrapped) state_dict.
    """
    path = _existing_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            # torch's message names the offending global ("... unsupported GLOBAL posix.system ...").
            culprit = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
            raise CheckpointError(
                f"checkpoint '{path}': refused: it holds pickled objects other than tensors and plain containers, "
                "which could run code when loaded; only state_dicts are accepted"
                + (f" ({culprit[0]})" if culprit else "")
            ) from None
        raise CheckpointError(f"checkpoint '{path}': not a PyTorch weight file or corrupt ({e})") from None
    except Exception as e:  # truncated zip, garbage bytes, EOF...: all mean "not a readable checkpoint"
        raise CheckpointError(
            f"checkpoint '{path}': cannot be read as a PyTorch weight file, it is truncated, corrupt or of "
            f"another format ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
        ) from None
    return _unwrap(obj, path)


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], path="<state_dict>",
                     nonfinite: str = "warn") -> dict:
    """Compare a state_dict with the model's: return it completed, or raise :class:`CheckpointError` listing
    missing keys, unexpected keys, shape mismatches and integer tensors for float parameters by name.

    BatchNorm's ``num_batches_tracked`` counters may be absent (old torchvision files lack them; PyTorch itself
    fills them in), they are then taken from the model. Float tensors holding NaN or infinity are named in a
    :class:`NonFiniteWeightsWarning` (``nonfinite="warn"``) or refused (``"refuse"``, what the CLI asks for).
    """
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {', '.join(map(repr, NONFINITE))}, got {nonfinite!r}")
    expected = model.state_dict()
    completed = dict(state_dict)
    for key, value in expected.items():
        if key not in completed and key.endswith("num_batches_tracked"):
            completed[key] = value.clone()
    missing = [k for k in expected if k not in completed]
    unexpected = [k for k in completed if k not in expected]
    mismatched = [
        f"{k}: file {tuple(completed[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in completed and completed[k].shape != expected[k].shape
    ]
    # load_state_dict would copy 3 into 3.0 silently: a float parameter stored as integers is not a weight file
    integers = [f"{k}: {completed[k].dtype}" for k in expected if k in completed and expected[k].is_floating_point()
                and not (completed[k].is_floating_point() or completed[k].is_complex())]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {_listed(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) {_listed(mismatched)}")
    if integers:
        problems.append(f"{len(integers)} integer tensor(s) for float parameters {_listed(integers)}")
    if problems:
        raise CheckpointError(
            f"checkpoint '{path}' does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    not_finite = [k for k in expected if completed[k].is_floating_point() and not torch.isfinite(completed[k]).all()]
    if not_finite:
        what = f"{len(not_finite)} tensor(s) hold non-finite values (NaN or infinity) {_listed(not_finite)}"
        if nonfinite == "refuse":
            raise CheckpointError(f"checkpoint '{path}' refused: {what}; such weights make every attribution NaN")
        warnings.warn(f"checkpoint '{path}': {what}; attributions of this model will not be finite",
                      NonFiniteWeightsWarning, stacklevel=3)
    return completed


def apply_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], path="<state_dict>",
                     nonfinite: str = "warn") -> nn.Module:
    """Check ``state_dict`` against ``model`` (:func:`check_state_dict`) and load it strictly; returns ``model``."""
    model.load_state_dict(check_state_dict(model, state_dict, path, nonfinite), strict=True)
    return model


def read_verified(path: str | os.PathLike, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """:func:`verify_hash`, then :func:`read_state_dict`: a file with a wrong hash is refused before unpickling."""
    verify_hash(_existing_file(path), sha256)
    return read_state_dict(path)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, sha256: str | None = None,
                    nonfinite: str = "warn") -> nn.Module:
    """Load the weight file at ``path`` into ``model`` (strictly, after checking hash, keys, shapes and dtypes).

    ``sha256`` is an optional expected digest or digest prefix; the prefix in a torchvision-style file name is
    always checked. ``nonfinite``: ``"warn"`` (default) or ``"refuse"`` a file with NaN or infinite values.
    Returns ``model``.
    """
    return apply_state_dict(model, read_verified(path, sha256), path, nonfinite)
