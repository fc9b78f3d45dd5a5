"""Progress of long commands, on stderr: a tqdm bar when stderr is a terminal; plain lines, without carriage
returns, when it is a log file or a pipe (a SLURM log, CI, ``2>&1 | tee``)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

PLAIN_INTERVAL_S = 30.0
"""Seconds between two plain progress lines (stderr not a terminal)."""


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """``4.2s``, ``3m05s``, ``2h07m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _amount(n: float, unit: str, scale: bool) -> str:
    if not scale:
        return f"{int(n):,} {unit}"
    from tqdm import tqdm

    return tqdm.format_sizeof(n, unit, divisor=1024 if unit == "B" else 1000)


class Progress:
    """Progress over ``total`` units (None: unknown, then no percentage or ETA). On a terminal, a tqdm bar that
    appears after ``delay_s``; elsewhere, with ``lines``, a plain line every PLAIN_INTERVAL_S seconds, and with a
    ``summary`` given to ``close``, that line at the end. ``enabled=False`` shows nothing."""

    def __init__(self, desc: str, total: float | None = None, unit: str = "it", *, unit_scale: bool = False,
                 enabled: bool = True, delay_s: float = 2.0, lines: bool = True, stream: TextIO | None = None):
        self.desc, self.total, self.unit, self.unit_scale = desc, total, unit, unit_scale
        self.enabled, self.lines = enabled, lines
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0.0
        self.postfix: dict[str, Any] = {}
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if enabled and is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                            unit_divisor=1024 if unit == "B" else 1000, file=self.stream, mininterval=1.0,
                            delay=delay_s, dynamic_ncols=True)

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.lines and time.monotonic() - self.last_line >= PLAIN_INTERVAL_S:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        """Extra fields shown after the count (``tokens=1,234``)."""
        self.postfix.update(values)
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def elapsed(self) -> float:
        """Seconds since the progress began."""
        return time.monotonic() - self.started

    def line(self) -> str:
        """The plain progress line: count (and share of the total), elapsed time, ETA, extra fields."""
        elapsed = self.elapsed()
        done = _amount(self.n, self.unit, self.unit_scale)
        parts = [done]
        if self.total:
            fraction = min(self.n / self.total, 1.0)
            parts = [f"{done} of {_amount(self.total, self.unit, self.unit_scale)} ({100 * fraction:.0f}%)"]
        parts.append(f"elapsed {format_duration(elapsed)}")
        if self.total and 0 < self.n < self.total:
            parts.append(f"ETA {format_duration(elapsed * (self.total - self.n) / self.n)}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return f"{self.desc}: " + ", ".join(parts)

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_line = time.monotonic()

    def close(self, summary: str | None = None) -> None:
        """End the bar; without a terminal, write ``summary`` (when given) as the last line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and summary is not None:
            print(f"{self.desc}: {summary}", file=self.stream, flush=True)
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Phases:
    """One stderr line as each phase of a long step ends, with its duration: ``export: consolidated the deepspeed
    checkpoint of 2 rank(s) (3.2s)``. A phase that fails writes no line, so that its error stays the only one."""

    def __init__(self, desc: str, stream: TextIO | None = None):
        self.desc, self.stream = desc, stream
        self.started = self.last = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the first phase began."""
        return time.monotonic() - self.started

    def done(self, what: str) -> None:
        """The phase since the previous one ended (or since the first began) is ``what``, and ended now."""
        now = time.monotonic()
        stream = self.stream if self.stream is not None else sys.stderr
        print(f"{self.desc}: {what} ({format_duration(now - self.last)})", file=stream, flush=True)
        self.last = now
