"""Progress lines for long loops (training epochs, evaluation), with rate and ETA."""

from __future__ import annotations

import sys
import time


class Progress:
    """A progress bar for long loops, as lines: `[train/A] epoch 2/10 [######----------]
    40% 80/200 steps 2.1/s 0:38 elapsed ETA 0:57 | loss 1.93`.

    One line at most every `every_s` seconds and one at the end, never carriage returns:
    the lines travel through Ray's log forwarding and `ray submit`'s non-TTY output, where
    a redrawn bar (tqdm's) would come out as a run-on line or as hundreds of lines.
    `active=False` (the other ranks) prints nothing.
    """

    WIDTH = 20

    def __init__(self, name: str, what: str, total: int | None, every_s: float = 10.0,
                 unit: str = "", active: bool = True):
        self.name = name
        self.what, self.total, self.every_s, self.unit, self.active = what, total, every_s, unit, active
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if self.active and (now - self.last >= self.every_s or finished):
            self.last = now
            # not print(): inside a Ray Train worker its print patch would echo the line twice
            sys.stderr.write(f"  [{self.name}] {self.line(now - self.t0, note)}\n")
            sys.stderr.flush()

    def line(self, elapsed: float, note: str = "") -> str:
        rate = self.done / max(elapsed, 1e-9)
        unit = f" {self.unit}" if self.unit else ""
        if not self.total:
            text = f"{self.what}: {self.done}{unit} {rate:.1f}/s {clock(elapsed)} elapsed"
        else:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * round(frac * self.WIDTH) + "-" * (self.WIDTH - round(frac * self.WIDTH))
            eta = clock((self.total - self.done) / rate) if rate > 0 else "?"
            text = (f"{self.what} [{bar}] {frac:4.0%} {self.done}/{self.total}{unit} {rate:.1f}/s "
                    f"{clock(elapsed)} elapsed ETA {eta}")
        return f"{text} | {note}" if note else text


def clock(seconds: float) -> str:
    """h:mm:ss or m:ss."""
    s = int(round(max(seconds, 0)))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def say(name: str, msg: str) -> None:
    """One `  [<name>] msg` line on stderr (the stages' line format), as Progress writes it."""
    sys.stderr.write(f"  [{name}] {msg}\n")
    sys.stderr.flush()
