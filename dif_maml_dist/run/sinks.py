"""Where a run's metric records go: JSONL files (the run's own record) and TensorBoard; each implements
``engine.loop.MetricsSink``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


class TensorBoardSink:
    """Each record's numbers as TensorBoard scalars at step ``iteration``, in ``log_dir`` (one folder per agent, so
    that TensorBoard overlays the agents as runs with the same tags)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["iteration"])
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def abandon(self) -> None:
        self.writer.close()  # what was written stays, as for a crash


def tensorboard_import_error() -> Optional[str]:
    """Why :class:`TensorBoardSink`'s writer cannot be imported (``"TypeError: ..."``), or None when it can."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception as err:  # a broken install raises anything: ImportError, protobuf's TypeError, ...
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else 'no message'}"
    return None


class TeeSink:
    """One stream written to several sinks (e.g. JSONL and TensorBoard)."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def abandon(self) -> None:
        for sink in self.sinks:
            sink.abandon()


class JsonlSink:
    """One JSON object per line, flushed per record so a crashed run keeps everything logged so far.

    A new stream (``resume_at=None``) opens its file with ``"x"``: it is never appended to another run's stream
    (two jobs sharing a run directory fail instead).

    A resumed stream (``resume_at=N``, the iteration of the checkpoint the run continues from) leaves the existing
    file untouched until the resumed run has passed it: it writes the continued stream to a shadow file beside it
    (``<name>.resuming``): the old records of iterations before N, the resumed run's first record (of iteration
    N) merged over the old record of N (the old fields kept, e.g. the training loss and timings up to N; the new
    ones win, including its ``"resumed": true``), then the new records. As soon as a new record's iteration passes
    the last iteration of the old stream, the shadow replaces the file (``os.replace``, atomic) and writing
    continues by appending to it. Until then:

    - ``abandon()`` (the resumed run failed: diverged, a peer died) removes the shadow and leaves the old file
      exactly as it was; so does a process killed outright (the stale shadow is overwritten by the next resume).
    - ``close()`` (the resumed run finished) commits the shadow anyway: a run that finished is the truth, so old
      records beyond what it wrote are dropped.

    A line of the old file cut short by a crash is skipped. Once committed (or for a new stream), ``abandon`` only
    closes the file: what was written stays, as a crash would leave it.
    """

    def __init__(self, path: Path, resume_at: int | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.shadow: Path | None = None  #: the shadow file while a resumed stream is not yet committed
        self._merge: dict[str, Any] | None = None  # the old record of iteration resume_at, until merged
        self._old_last: int | None = None  # the old stream's last iteration: passing it commits the shadow
        self._resume_at = resume_at
        if resume_at is None:
            self._fh = path.open("x", encoding="utf-8")
            return
        kept = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    it = int(record["iteration"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by the crash
                self._old_last = it if self._old_last is None else max(self._old_last, it)
                if it < resume_at:
                    kept.append(line + "\n")
                elif it == resume_at:
                    self._merge = record
        self.shadow = path.with_name(path.name + ".resuming")
        self._fh = self.shadow.open("w", encoding="utf-8")  # a stale shadow (a killed resume) is overwritten
        self._fh.write("".join(kept))
        self._fh.flush()

    def write(self, record: dict[str, Any]) -> None:
        if self.shadow is not None and self._merge is not None and record.get("iteration") == self._resume_at:
            record, self._merge = {**self._merge, **record}, None
        self._fh.write(json.dumps(record, allow_nan=True) + "\n")
        self._fh.flush()
        if self.shadow is not None and (self._old_last is None or _after(record.get("iteration"), self._old_last)):
            self._commit()

    def _commit(self) -> None:
        """Make the shadow the stream: on disk, then renamed over the old file; keep appending to it."""
        assert self.shadow is not None
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.shadow, self.path)
        self.shadow = None
        self._fh = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        """The run finished: commit a shadow not yet committed; close the file."""
        if self._fh.closed:
            return
        if self.shadow is not None:
            self._commit()
        self._fh.close()

    def abandon(self) -> None:
        """The run failed: drop a shadow not yet committed (the old file stays as it was); close the file."""
        if self._fh.closed:
            return
        self._fh.close()
        if self.shadow is not None:
            self.shadow.unlink(missing_ok=True)
            self.shadow = None


def _after(iteration: Any, last: int) -> bool:
    try:
        return int(iteration) > last
    except (TypeError, ValueError):
        return False


