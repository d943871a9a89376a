"""Progress of long steps on stderr: engine builds (ninja's [n/N]), model downloads and assembly
(bytes), health waits (stage, elapsed of the timeout).

On a terminal one line per step is redrawn in place: a bar, the count, elapsed time and an estimate
of what is left. Elsewhere (a pipe, a CI log) a plain line is written when a step starts, every
`interval` seconds while it runs, and when it ends, so a log shows the build is alive without
holding a line per compiled file.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

BAR_WIDTH = 24
TTY_REDRAW_S = 0.1
WAIT_QUIET_TTY_S = 1.0     # a wait shorter than this draws nothing


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def amount(value: float, unit: str) -> str:
    if unit == "bytes":
        for size, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if value >= size:
                return f"{value / size:.1f} {name}"
        return f"{int(value)} B"
    if unit == "s":
        return duration(value)
    return f"{int(value)}"


def bar(done: float, total: float, width: int = BAR_WIDTH) -> str:
    filled = int(width * min(max(done / total, 0.0), 1.0)) if total else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


@dataclass
class Meter:
    """One step's progress: what is done of how much, since when."""

    who: str
    what: str
    unit: str                  # steps | bytes | s (a wait: done is the time waited)
    started: float
    done: float = 0.0
    total: float | None = None
    note: str = ""             # e.g. the health stage

    def figures(self, now: float) -> str:
        """The part after the label: count, share, elapsed, estimate."""
        elapsed = now - self.started
        if self.unit == "s":
            waited = f"{duration(self.done)} of {duration(self.total)}" if self.total else duration(self.done)
            return (f"{self.note}, " if self.note else "") + waited
        count = f"{amount(self.done, self.unit)}/{amount(self.total, self.unit)}" if self.total else \
            amount(self.done, self.unit)
        if self.unit == "steps":
            count += " steps"
        parts = [count + (f" ({100 * self.done / self.total:.0f}%)" if self.total else ""),
                 f"{duration(elapsed)} elapsed"]
        if self.total and 0 < self.done < self.total and elapsed >= 1:
            parts.append(f"~{duration(elapsed * (self.total - self.done) / self.done)} left")
        return ", ".join(parts)

    def plain(self, now: float) -> str:
        return f"  [{self.who}] {self.what}: {self.figures(now)}"

    def drawn(self, now: float) -> str:
        shown = bar(self.done, self.total) + " " if self.total else ""
        return f"  [{self.who}] {self.what} {shown}{self.figures(now)}"

    @property
    def finished(self) -> bool:
        return self.total is not None and self.unit != "s" and self.done >= self.total


class Display:
    """Writes progress to `stream`: redrawn in place on a terminal, a plain line every `interval`
    seconds elsewhere. Messages (line) are written whole, above any bar in progress."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() and os.environ.get("TERM") != "dumb" if tty is None else tty
        self.interval = interval
        self.clock = clock
        self.meters: dict[tuple[str, str], Meter] = {}
        self.shown: dict[tuple[str, str], float] = {}   # when each meter was last written
        self.ended: dict[tuple[str, str], tuple[float, float | None]] = {}   # what each finished meter showed
        self.drawn = False                              # a bar line is on screen without its newline

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.drawn = False

    def line(self, text: str) -> None:
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, who: str, what: str, done: float, total: float | None, unit: str, note: str = "") -> None:
        key = (who, what)
        if key not in self.meters and self.ended.get(key) == (done, total):
            return   # a finished step reported again (pip installing what it downloaded): said already
        now = self.clock()
        m = self.meters.get(key)
        if m is None or (m.unit != "s" and done < m.done):   # a new step (or the same label started over)
            m = self.meters[key] = Meter(who, what, unit, now)
            self.shown.pop(key, None)
        m.done, m.total, m.note = done, total, note
        if unit == "s" and done < (WAIT_QUIET_TTY_S if self.tty else self.interval):
            return   # a short wait is not worth a line: the stages it passes are reported anyway
        last = self.shown.get(key)
        if self.tty:
            if m.finished or last is None or now - last >= TTY_REDRAW_S:
                self.stream.write("\r" + m.drawn(now) + "\x1b[K")
                self.drawn = True
                if m.finished:
                    self.stream.write("\n")
                    self.drawn = False
                self.stream.flush()
                self.shown[key] = now
        elif m.finished or last is None or now - last >= self.interval:
            self.line(m.plain(now))
            self.shown[key] = now
        if m.finished:
            del self.meters[key]
            self.ended[key] = (done, total)

    def steps(self, who: str, what: str) -> Callable[[int, int], None]:
        """A (done, total) callback for an engine build."""
        return lambda done, total: self.update(who, what, done, total, "steps")

    def end(self) -> None:
        """Leave the terminal on a fresh line (a wait that ended without reaching its total)."""
        self._clear()
        self.stream.flush()


_DISPLAY: Display | None = None


def display() -> Display:
    """The one display on this process's stderr."""
    global _DISPLAY
    if _DISPLAY is None:
        _DISPLAY = Display()
    return _DISPLAY
