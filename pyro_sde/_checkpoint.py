"""Safe, atomic and checked checkpoint files: the one way the package writes and reads its state.

A checkpoint is a ``torch.save`` file of an envelope::

    {"format": "pyro_sde", "kind": "DiffusionSampler", "version": 1,
     "fingerprint": {"dim": 2, ...}, "checksum": "<sha256 hex>", "payload": {...}}

* Writes are atomic (:func:`atomic_save`): a temporary file in the target's folder, flushed and
  ``fsync``-ed, then renamed over the target, so a crash leaves the old file or the new one.
* Only tensors and plain values (dict, list, tuple, str, int, float, bool, None, dtype, device) are
  written, and files are read with ``torch.load(weights_only=True)``: loading never runs pickled code.
* The checksum (SHA-256 over kind, version, fingerprint and payload, in a fixed order) refuses damaged
  files; the fingerprint (what the state belongs to) refuses files from another model, naming the
  fields that differ.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import uuid
import warnings
from collections import OrderedDict
from typing import NamedTuple

import torch

from ._distributed import is_main_process

FORMAT = "pyro_sde"
FORMAT_VERSION = 1
#: fingerprint fields that only warn when they differ (a checkpoint of another release may still fit)
ADVISORY_FIELDS = ("package version",)


class Checkpoint(NamedTuple):
    """A loaded checkpoint: its ``kind``, ``fingerprint`` (dict) and ``payload`` (dict)."""

    kind: str
    fingerprint: dict
    payload: dict


def package_version() -> str:
    """``pyro_sde.__version__`` (recorded in fingerprints)."""
    from . import __version__

    return __version__


def atomic_save(obj, path) -> None:
    """``torch.save(obj, path)`` atomically: write a temporary file next to ``path``, flush and
    ``fsync`` it, ``os.replace`` it onto ``path`` and ``fsync`` the folder (where the OS allows)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, payload: dict, *, kind: str, fingerprint: dict) -> None:
    """Write ``payload`` (tensors and plain values only) in a checked envelope to ``path`` (atomically).

    Raises ``TypeError`` naming the entry when the payload holds another Python object (it could only
    be pickled, and pickles are not loaded back). Under ``torch.distributed`` only rank 0 writes."""
    if not is_main_process():
        return
    payload = plain(payload, "payload")
    fingerprint = plain(fingerprint, "fingerprint")
    envelope = {"format": FORMAT, "kind": kind, "version": FORMAT_VERSION, "fingerprint": fingerprint,
                "checksum": checksum(kind, FORMAT_VERSION, fingerprint, payload), "payload": payload}
    atomic_save(envelope, path)


def load_checkpoint(path, *, kind, expected_fingerprint: dict | None = None, map_location=None) -> Checkpoint:
    """Read a file written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    :param kind: the accepted kind (a str) or kinds (a tuple of str).
    :param dict expected_fingerprint: checked with :func:`check_fingerprint` when given.
    :raises ValueError: the file is not a pyro_sde checkpoint (or holds Python objects, not loaded for
        safety), is damaged (checksum mismatch), is of another kind or belongs to another model.
    """
    name = os.fspath(path)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    what = " or ".join(kinds)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"no checkpoint file {name!r}")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol is no news: it is refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            blob = torch.load(name, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            raise ValueError(
                f"{name!r} is not a {what} checkpoint: it contains Python objects, which are not loaded "
                "for safety (unpickling can run arbitrary code). pyro_sde's savers write only tensors and "
                "plain values, so this file was not written by them."
            ) from e
        raise ValueError(f"{name!r} is not a {what} checkpoint (unreadable: damaged, truncated): {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{name!r} is not a {what} checkpoint (no pyro_sde checkpoint header)")
    version = blob.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{name!r} has checkpoint format version {version!r}; this pyro_sde reads up to "
                         f"{FORMAT_VERSION} (upgrade pyro_sde)")
    fields = ("kind", "fingerprint", "checksum", "payload")
    if any(k not in blob for k in fields) or not isinstance(blob["payload"], dict):
        missing = [k for k in fields if k not in blob]
        raise ValueError(f"{name!r} is damaged: its checkpoint header lacks {missing or 'a payload dict'}")
    try:
        actual = checksum(blob["kind"], version, blob["fingerprint"], blob["payload"])
    except TypeError as e:
        raise ValueError(f"{name!r} is damaged (unexpected content: {e})") from e
    if actual != blob["checksum"]:
        raise ValueError(f"{name!r} is damaged (checksum mismatch): its tensors or values are not those "
                         "that were saved; use another copy or an earlier checkpoint")
    if blob["kind"] not in kinds:
        raise ValueError(f"{name!r} holds a {blob['kind']} checkpoint, not a {what} checkpoint")
    if expected_fingerprint is not None:
        check_fingerprint(blob["fingerprint"], expected_fingerprint, source=name)
    return Checkpoint(blob["kind"], blob["fingerprint"], blob["payload"])


def check_fingerprint(saved: dict, expected: dict, *, source, this: str = "this model") -> None:
    """Raise ``ValueError`` naming every field where ``saved`` and ``expected`` differ (fields in
    :data:`ADVISORY_FIELDS` only warn)."""
    differ, advisory = [], []
    for field in list(expected) + [k for k in saved if k not in expected]:
        a, b = (_comparable(fp[field]) if field in fp else "(none)" for fp in (saved, expected))
        if a != b:
            line = f"{field} differ{'s' if not field.endswith('s') else ''}: saved {a!r}, {this} {b!r}"
            (advisory if field in ADVISORY_FIELDS else differ).append(line)
    if differ:
        raise ValueError(f"{os.fspath(source)!r} belongs to another model: " + "; ".join(differ))
    if advisory:
        warnings.warn(f"{os.fspath(source)!r}: " + "; ".join(advisory), UserWarning, stacklevel=3)


def _comparable(value):
    """Lists as tuples (recursively), so that ``(2,)`` and ``[2]`` compare equal."""
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(v) for v in value)
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    return value


def plain(obj, where: str = "value"):
    """``obj`` with only weights_only-loadable types: NamedTuples become tuples, dict subclasses dicts
    (``OrderedDict`` kept), tensors detached; anything else raises ``TypeError`` naming ``where``."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.layout != torch.strided:
            raise TypeError(f"{where} is a {type(obj).__name__} with layout {obj.layout}: only dense "
                            "tensors are saved")
        return obj.detach()
    if isinstance(obj, torch.Size):
        return tuple(obj)
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"{where} has a key of type {type(k).__name__}: only plain keys are saved")
            out[k] = plain(v, f"{where}[{k!r}]")
        return out
    raise TypeError(f"{where} is a {type(obj).__name__}, a Python object that cannot be saved safely "
                    "(checkpoints hold only tensors and plain values, and pickles are never loaded)")


def checksum(kind, version, fingerprint, payload) -> str:
    """SHA-256 hex digest of the envelope's content, independent of dict order and tensor device."""
    h = hashlib.sha256()
    _feed(h, (kind, version, fingerprint, payload))
    return h.hexdigest()


def _feed(h, obj) -> None:
    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"B1" if obj else b"B0")
    elif isinstance(obj, int):
        h.update(b"I%d;" % obj)
    elif isinstance(obj, float):
        h.update(b"F" + float.hex(obj).encode() + b";")
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"S%d;" % len(data) + data)
    elif isinstance(obj, (torch.dtype, torch.device)):
        h.update(b"D" + str(obj).encode() + b";")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype};{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + b"%d;" % len(obj))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, dict):
        h.update(b"M%d;" % len(obj))
        for k in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, k)
            _feed(h, obj[k])
    else:
        raise TypeError(f"a {type(obj).__name__} in the checkpoint")
