"""Checkpoint files: atomic, checksummed, pruned, matched to their run, never executing code on load; metric streams
resumed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch

from dif_maml_dist.run import checkpoint
from dif_maml_dist.run.sinks import JsonlSink
from tests.helpers import small_config

WEIGHTS = np.full((3, 3), 1 / 3)


def _state(iteration: int) -> dict:
    return {"iteration": iteration, "params": torch.arange(4.0) + iteration, "rng": torch.Generator().get_state(),
            "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99),
                                                                                        "params": [0]}]}}


def test_newest_common_iteration_and_pruning(tmp_path):
    """Each agent keeps its `keep` newest files; a leftover temporary file (a write cut short) never counts;
    resume takes the newest iteration that every agent has. Catches resuming from an iteration one agent never
    finished writing, and pruning that deletes the only common checkpoint."""
    prints = checkpoint.fingerprint(small_config(), WEIGHTS, 4)
    for it in (10, 20, 30):
        checkpoint.save(tmp_path, 0, _state(it), prints, keep=2)
    for it in (10, 20):
        checkpoint.save(tmp_path, 1, _state(it), prints, keep=2)
    (checkpoint.agent_dir(tmp_path, 1) / "iter00000030.pt.tmp123").write_bytes(b"half a file")
    assert checkpoint.available(tmp_path, 0) == [20, 30] and checkpoint.available(tmp_path, 1) == [10, 20]
    assert checkpoint.newest_common([checkpoint.available(tmp_path, k) for k in (0, 1)]) == 20
    assert checkpoint.newest_common([[20, 30], []]) is None
    state = checkpoint.load(tmp_path, 1, 20, prints)
    assert torch.equal(state["params"], torch.arange(4.0) + 20) and state["optimizer"]["param_groups"][0]["betas"] == (
        0.9, 0.99)


def test_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path):
    """A checkpoint written under another optimizer, topology (weights) or model is refused with the sections
    that differ; the length of the schedule and where data lives may change. Catches silently continuing
    another run's state, and refusing a legitimate extension of a run."""
    cfg = small_config()
    prints = checkpoint.fingerprint(cfg, WEIGHTS, 4)
    checkpoint.save(tmp_path, 0, _state(5), prints)
    longer = small_config(iterations=500)
    longer.data.root = "/elsewhere"
    longer.runtime.timeout_s = 9.0
    checkpoint.load(tmp_path, 0, 5, checkpoint.fingerprint(longer, WEIGHTS, 4))
    other = small_config(optim="sgd")
    other.model = replace(other.model, hidden=[20, 20])
    ring = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
    with pytest.raises(ValueError, match=r"iter00000005\.pt was written by a run with a different model, optim, "
                                         r"topology; resume with the configuration that wrote it"):
        checkpoint.load(tmp_path, 0, 5, checkpoint.fingerprint(other, ring, 4))


def _vouch_for(path):
    """What ``sha256sum iterN.pt > iterN.pt.sha256`` writes."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    checkpoint.checksum_path(path).write_text(f"{digest}  {path.name}\n")


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_flipped_byte_is_a_one_line_error_naming_the_file(tmp_path):
    """One byte flipped inside the parameters (a file torch.load still reads, giving other numbers) is refused
    with a one-line error naming the file and what to do. Catches a corrupt checkpoint loading silently and the
    resumed run diverging later, with the blame on the step sizes."""
    prints = checkpoint.fingerprint(small_config(), WEIGHTS, 4)
    path = checkpoint.save(tmp_path, 0, _state(20), prints)
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<4f", 20, 21, 22, 23))
    assert at > 0
    data[at + 2] ^= 0x01
    path.write_bytes(bytes(data))
    silently = torch.load(io.BytesIO(bytes(data)), weights_only=True)  # the bug: it loads, with a wrong number
    assert not torch.equal(silently["params"], torch.arange(4.0) + 20)
    with pytest.raises(ValueError) as excinfo:
        checkpoint.load(tmp_path, 0, 20, prints)
    assert _one_line_error(excinfo) == (
        f"checkpoint {path} is corrupt (its SHA-256 differs from the one recorded in iter00000020.pt.sha256 when "
        f"it was written); delete it to resume from the one before")


def test_truncated_checkpoint_is_a_one_line_error_naming_the_file(tmp_path):
    """A checkpoint cut short after it was written (a disk filling, a copy interrupted) is refused as corrupt,
    in one line naming the file, before unpickling is tried. Catches a truncated file reported as a multi-line
    zip error or, worse, read in part."""
    prints = checkpoint.fingerprint(small_config(), WEIGHTS, 4)
    path = checkpoint.save(tmp_path, 0, _state(20), prints)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"^checkpoint .*iter00000020\.pt is corrupt .*delete it to resume from "
                                         r"the one before$") as excinfo:
        checkpoint.load(tmp_path, 0, 20, prints)
    _one_line_error(excinfo)


def test_checksums_are_written_and_pruned_with_their_checkpoints(tmp_path):
    """Every checkpoint has its ``.sha256`` (in ``sha256sum`` format); pruning removes a checkpoint's checksum
    with it, a checksum left without its checkpoint (a save killed between the two renames) is not a checkpoint
    and is removed by the next save, and an iteration saved again (a resumed run) pairs the new file with the new
    checksum. Catches checksum files piling up, a lone checksum counted as a checkpoint, and a re-saved iteration
    that no longer verifies."""
    prints = checkpoint.fingerprint(small_config(), WEIGHTS, 4)
    folder = checkpoint.agent_dir(tmp_path, 0)
    for it in (10, 20):
        checkpoint.save(tmp_path, 0, _state(it), prints, keep=2)
    (folder / "iter00000030.pt.sha256").write_text("0" * 64 + "  iter00000030.pt\n")  # killed mid-save of 30
    assert checkpoint.available(tmp_path, 0) == [10, 20]
    checkpoint.save(tmp_path, 0, _state(40), prints, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == [
        "iter00000020.pt", "iter00000020.pt.sha256", "iter00000040.pt", "iter00000040.pt.sha256"]
    line = (folder / "iter00000040.pt.sha256").read_text()
    assert line == f"{hashlib.sha256((folder / 'iter00000040.pt').read_bytes()).hexdigest()}  iter00000040.pt\n"
    again = {**_state(40), "params": torch.full((4,), 7.0)}
    checkpoint.save(tmp_path, 0, again, prints, keep=2)
    assert torch.equal(checkpoint.load(tmp_path, 0, 40, prints)["params"], torch.full((4,), 7.0))
    assert checkpoint.available(tmp_path, 0) == [20, 40]


def test_checkpoint_without_checksum_is_refused_until_vouched_for(tmp_path):
    """A checkpoint without its ``.sha256`` (written before checksums were kept, or the file lost) is refused in
    one line that names the file and the ``sha256sum`` command that vouches for it; once written, it loads.
    Catches an unverifiable file loading silently, and a refusal that leaves no way to resume an old run."""
    prints = checkpoint.fingerprint(small_config(), WEIGHTS, 4)
    path = checkpoint.save(tmp_path, 0, _state(20), prints)
    checkpoint.checksum_path(path).unlink()
    assert checkpoint.available(tmp_path, 0) == [20]  # listed, so resuming says what is wrong instead of "none"
    with pytest.raises(ValueError, match=r"^checkpoint .*iter00000020\.pt has no checksum file "
                                         r"iter00000020\.pt\.sha256 .*'sha256sum iter00000020\.pt > "
                                         r"iter00000020\.pt\.sha256' in .*delete it to resume from the one "
                                         r"before$") as excinfo:
        checkpoint.load(tmp_path, 0, 20, prints)
    _one_line_error(excinfo)
    _vouch_for(path)
    assert torch.equal(checkpoint.load(tmp_path, 0, 20, prints)["params"], torch.arange(4.0) + 20)
    checkpoint.checksum_path(path).write_text("not a digest\n")
    with pytest.raises(ValueError, match=r"^checksum file .*iter00000020\.pt\.sha256 does not hold a SHA-256; "):
        checkpoint.load(tmp_path, 0, 20, prints)


def test_loading_never_runs_code_from_the_file(tmp_path):
    """A checkpoint file carrying a pickled callable (what a malicious file would hold) is refused with a
    one-line error and the callable is not run. Catches torch.load without weights_only."""
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = checkpoint.checkpoint_path(tmp_path, 0, 7)
    path.parent.mkdir(parents=True)
    torch.save({"iteration": 7, "payload": Exploit()}, path)
    # A checksum proves integrity, not origin: whoever plants the file can plant its checksum too.
    _vouch_for(path)
    with pytest.raises(ValueError, match=r"^cannot load checkpoint .*iter00000007\.pt: UnpicklingError"):
        checkpoint.load(tmp_path, 0, 7, {})
    assert not marker.exists()


def test_resumed_metric_stream_drops_records_from_the_checkpoint_on(tmp_path):
    """Resuming at iteration 20 keeps the records before 20 (and a line cut short by the crash is dropped), then
    appends; once the resumed run finishes (close), its records are the stream, even where it stopped before the
    old one; a new stream refuses an existing file. Catches duplicated or lost records after a restart (more in
    test_metrics.py)."""
    path = tmp_path / "agent0.jsonl"
    path.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in (0, 10, 20, 30)) + '{"iterati')
    with pytest.raises(FileExistsError):
        JsonlSink(path)
    sink = JsonlSink(path, resume_at=20)
    sink.write({"iteration": 20, "resumed": True})
    sink.close()
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 10, 20]
