"""How much CPU other processes took while a benchmark ran (Linux): timings on a shared 2-core box are only
comparable when the machine was otherwise idle, so each benchmark prints this next to its table."""

from __future__ import annotations

import os
import resource
import time


def _busy_seconds() -> float | None:
    """Machine-wide busy CPU seconds so far (all cores), from /proc/stat; None where unavailable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, *rest = (int(v) for v in fields[1:])
    steal = rest[0] if rest else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds used by this process and its waited-for descendants."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


class CpuShare:
    """``with CpuShare() as c: ...`` then ``c.report()``: CPU taken by other processes during the block."""

    def start(self) -> "CpuShare":
        return self.__enter__()

    def stop(self) -> "CpuShare":
        self.__exit__(None, None, None)
        return self

    def __enter__(self) -> "CpuShare":
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        busy1 = _busy_seconds()
        self.own = _own_seconds() - self.own0
        self.busy = None if busy1 is None or self.busy0 is None else busy1 - self.busy0
        self.cores = os.cpu_count() or 1

    @property
    def others(self) -> float | None:
        """Average number of cores busy with other processes during the block."""
        if self.busy is None or self.wall <= 0:
            return None
        return max(0.0, self.busy - self.own) / self.wall

    def report(self) -> str:
        if self.others is None:
            return "other processes' CPU use during the run: unknown (no /proc/stat)"
        line = (f"other processes used {self.others:.2f} of {self.cores} cores on average during the timed part "
                f"({self.wall:.0f} s; this benchmark: {self.own / self.wall:.2f} cores)")
        if self.others > 0.1 * self.cores:
            line += ("\nWARNING: the machine was not idle; the figures above include that contention: rerun on a "
                     "quiet machine for clean numbers")
        return line
