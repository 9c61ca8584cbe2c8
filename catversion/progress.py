"""Progress bars and log lines that share the terminal (stderr) without garbling each other.

Every command's progress goes through `bar` (tqdm on stderr; off with --quiet), and every log line
printed while a bar may be showing goes through `write`, which clears the bar, prints the line and
redraws the bar. When stderr is not a terminal (a Ray Job's log, CI, a pipe), a bar redraws at most
every `PLAIN_INTERVAL_S` seconds as a plain line, so logs get a progress line now and then rather
than a stream of carriage returns.
"""

from __future__ import annotations

import sys
import time

PLAIN_INTERVAL_S = 30.0
TTY_INTERVAL_S = 0.5


def interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class PlainBar:
    """A progress bar for a log that is not a terminal: the bar's text as a line of its own, at most
    every PLAIN_INTERVAL_S seconds and once at the end (the subset of tqdm's API the commands use)."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float = PLAIN_INTERVAL_S):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n, self.postfix, self.shown_n = 0, "", None
        self.started = self.shown = time.monotonic()
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def update(self, n: float = 1) -> None:
        self.n += n
        if time.monotonic() - self.shown >= self.interval:
            self._show()

    def _show(self) -> None:
        from tqdm import tqdm

        self.shown, self.shown_n = time.monotonic(), self.n
        line = tqdm.format_meter(self.n, self.total, self.shown - self.started, prefix=self.desc, unit=self.unit,
                                 postfix=self.postfix or None, ncols=0)
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.closed and self.n and self.n != self.shown_n:
            self._show()
        self.closed = True


class _Off(PlainBar):
    def update(self, n: float = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


def bar(total: int | None, desc: str, unit: str, quiet: bool = False):
    """A progress bar on stderr: tqdm's on a terminal, a line every PLAIN_INTERVAL_S otherwise, none
    when `quiet`."""
    if quiet:
        return _Off(total, desc, unit)
    if not interactive():
        return PlainBar(total, desc, unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=TTY_INTERVAL_S, dynamic_ncols=True)


def write(line: str) -> None:
    """Print a log line to stderr above any progress bar."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()
