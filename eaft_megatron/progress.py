"""Progress of long work: a tqdm bar on a terminal, a plain line every few seconds in logs.

    from eaft_megatron.progress import Progress
    with Progress(total=n_lines, desc="preprocess", unit="lines") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk), docs=documents)     # keyword arguments: shown after the counts

On a terminal (the stream's ``isatty()``) this is a tqdm bar. Otherwise -- Slurm, ``nohup``,
``> log`` -- it writes one flushed line at most every ``interval`` seconds (default 10, or the
environment variable ``EAFT_PROGRESS_INTERVAL``) and one when it closes::

    preprocess: 120000/500000 lines (24.0%) | 3987 lines/s | elapsed 0:00:30 | ETA 0:01:35 | docs=119874
    preprocess: done 500000 lines in 0:02:05 (4000 lines/s) | docs=499411

Lines are written from ``update`` (no thread: safe around ``fork``), so a line can come later
than ``interval`` when a single step takes longer. ``unit="B"`` prints sizes in KiB/MiB/GiB.
``total=None`` (unknown, e.g. a pipe) leaves out the percentage and the ETA. The stream is
stderr unless given; ``enabled=False`` prints nothing.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

DEFAULT_INTERVAL_S = 10.0


def _interval_from_env() -> float:
    value = os.environ.get("EAFT_PROGRESS_INTERVAL", "")
    try:
        return float(value) if value else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _amount(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:.0f} {unit}" if float(n).is_integer() or abs(n) >= 100 else f"{n:.3g} {unit}"
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or prefix == "Ti":
            return f"{n:.0f} B" if not prefix else f"{n:.1f} {prefix}B"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    def __init__(self, total: float | None = None, *, desc: str = "", unit: str = "it",
                 interval: float | None = None, enabled: bool = True,
                 stream: IO[str] | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.interval = _interval_from_env() if interval is None else float(interval)
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.done = 0.0
        self.postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._bar = None
        self._closed = False
        isatty = getattr(self.stream, "isatty", None)
        if enabled and isatty is not None and isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc or None, file=self.stream,
                             unit=unit if unit == "B" else f" {unit}", unit_scale=unit == "B",
                             unit_divisor=1024, mininterval=0.5, smoothing=0.1,
                             dynamic_ncols=True)

    def update(self, n: float = 1, **postfix: Any) -> None:
        """Count ``n`` more units done; ``postfix`` replaces the key=value fields shown."""
        self.done += n
        if postfix:
            self.postfix = postfix
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._write(self._line(now))

    def _fields(self) -> str:
        return "".join(f" | {k}={v}" for k, v in self.postfix.items())

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            count = (f"{_amount(self.done, self.unit)}/{_amount(self.total, self.unit)} "
                     f"({100 * self.done / self.total:.1f}%)")
        else:
            count = _amount(self.done, self.unit)
        eta = ""
        if self.total and rate > 0:
            eta = f" | ETA {_clock(max(self.total - self.done, 0) / rate)}"
        return (f"{head}{count} | {_amount(rate, self.unit)}/s | elapsed {_clock(elapsed)}"
                f"{eta}{self._fields()}")

    def _write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken log must not kill the work
            pass

    def close(self, *, ok: bool = True) -> None:
        """End the bar; in logs, write the final line (``ok=False``: no "done" line)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and ok:
            elapsed = time.monotonic() - self._start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            head = f"{self.desc}: " if self.desc else ""
            self._write(f"{head}done {_amount(self.done, self.unit)} in {_clock(elapsed)} "
                        f"({_amount(rate, self.unit)}/s){self._fields()}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)
