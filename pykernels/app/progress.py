"""Plain-text progress bars and section headings for the demo (no tqdm dependency).

On a terminal the bar redraws in place on stderr; in a log (not a terminal) only the
finished line is written, so logs hold one line per bar instead of hundreds of redraws.
"""

import sys
import time


def heading(title, out=print):
    out(f"\n== {title}")


class Progress:
    """``with Progress(total, label) as bar: bar.update(metrics="loss 0.31")``."""

    WIDTH = 30

    def __init__(self, total, label, stream=None):
        self.total, self.label, self.done = max(1, total), label, 0
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.metrics = ""
        self.start = time.perf_counter()

    def _line(self):
        filled = self.WIDTH * min(self.done, self.total) // self.total
        return (f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                f"{self.done}/{self.total} {time.perf_counter() - self.start:5.1f}s "
                f"{self.metrics}")

    def update(self, n=1, metrics=None):
        self.done += n
        if metrics is not None:
            self.metrics = metrics
        if self.live:
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.write(("\r" if self.live else "") + self._line() + "\n")
        self.stream.flush()
