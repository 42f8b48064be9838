"""Progress of long work: a live bar on a terminal, a plain line now and then in a log file.

tqdm redraws its bar with carriage returns; written to a file (nohup, a cluster job's log, a redirected
demo) those accumulate into one enormous line. ``progress_bar`` therefore returns tqdm only when stderr
is a terminal, and otherwise an object with the same ``update`` / ``set_postfix`` / ``close`` methods that
prints one ordinary line at most every ``LOG_INTERVAL`` seconds and one when it closes.
"""
from __future__ import annotations

import sys
import time

#: seconds between two progress lines in a log file
LOG_INTERVAL = 60.0


def progress_bar(total: int | None, desc: str, unit: str, *, enabled: bool = True, leave: bool = True):
    """A progress object for ``total`` items (None if unknown): tqdm on a terminal, log lines otherwise."""
    if not enabled:
        return _Quiet()
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave, mininterval=0.2)
    return _LogLines(total, desc, unit)


class _Quiet:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class _LogLines(_Quiet):
    def __init__(self, total: int | None, desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= LOG_INTERVAL:
            self.last = now
            self._line(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.n:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        rate = self.n / max(now - self.t0, 1e-9)
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit} ({rate:.1f} {self.unit}/s{extra})", file=sys.stderr, flush=True)
