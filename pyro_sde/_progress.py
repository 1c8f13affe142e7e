"""Progress of long loops: a tqdm bar on a terminal, a few plain lines in a log, or nothing."""

from __future__ import annotations

import sys
import time
from typing import Literal, TextIO

from tqdm.auto import tqdm

from ._distributed import is_main_process

__all__ = ["progress_bar"]


def progress_bar(total: float, *, initial: float = 0, enabled: bool | Literal["bar", "lines"] | None = None,
                 desc: str = "", file: TextIO | None = None, unit: str = "it") -> _Bar | _Lines | _Silent:
    """A progress reporter with ``update(done, postfix=None)`` and ``close(reason=None)``.

    :param enabled: ``None`` (default): a tqdm bar when ``file`` (stderr) is a terminal or in a Jupyter
        notebook, otherwise plain lines at 25 %, 50 %, 75 % and at the end (no carriage returns in a log);
        ``True``: always a bar; ``False``: nothing; ``"bar"`` / ``"lines"``: that kind. Under
        ``torch.distributed`` only rank 0 reports.
    """
    if not is_main_process():
        return _Silent()
    file = sys.stderr if file is None else file
    if enabled is None:
        enabled = "bar" if _isatty(file) or _in_notebook() else "lines"
    if enabled is True or enabled == "bar":
        return _Bar(total, initial, desc, file, unit)
    if enabled == "lines":
        return _Lines(total, initial, desc, file, unit)
    return _Silent()


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (whose stderr is no terminal but shows tqdm's widget)."""
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"
    except Exception:  # noqa: BLE001 - any IPython oddity: not a notebook
        return False


def _isatty(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):
        return False


class _Silent:
    def update(self, done: float, postfix: dict[str, object] | None = None) -> None:
        pass

    def close(self, reason: str | None = None) -> None:
        pass


class _Bar:
    def __init__(self, total, initial, desc, file, unit):
        self._bar = tqdm(total=total, initial=initial, desc=desc, file=file, unit=unit)
        self._done = initial

    def update(self, done: float, postfix: dict[str, object] | None = None) -> None:
        self._bar.update(done - self._done)
        self._done = done
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)

    def close(self, reason: str | None = None) -> None:
        if reason:
            self._bar.set_postfix_str(f"stopped: {reason}", refresh=True)
        self._bar.close()


class _Lines:
    """One line at each quarter of ``total`` and one at the end."""

    def __init__(self, total, initial, desc, file, unit):
        self.total, self.desc, self.file, self.unit = total, desc, file, unit
        self._start, self._done, self._postfix = time.perf_counter(), initial, None
        self._next_quarter = int(4 * initial / total) + 1 if total else 5

    def _write(self, text):
        print(f"{self.desc}: {text}", file=self.file, flush=True)

    def _status(self):
        extra = "" if not self._postfix else " " + " ".join(f"{k}={v}" for k, v in self._postfix.items())
        elapsed = time.perf_counter() - self._start
        return f"{_fmt(self._done)}/{_fmt(self.total)} {self.unit} [{elapsed:.1f} s]{extra}"

    def update(self, done: float, postfix: dict[str, object] | None = None) -> None:
        self._done = done
        if postfix:
            self._postfix = postfix
        if self.total and self._next_quarter < 4 and done >= self._next_quarter * self.total / 4:
            self._next_quarter = int(4 * done / self.total) + 1
            self._write(self._status())

    def close(self, reason: str | None = None) -> None:
        self._write(self._status() + ("" if not reason else f", stopped: {reason}"))


def _fmt(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) and not float(x).is_integer() else str(int(x))
