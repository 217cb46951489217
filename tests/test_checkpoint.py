"""Checkpoint files: atomic, pruned, matched to their run, never executing code on load; metric streams resumed."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from dif_maml_dist import checkpoint
from dif_maml_dist.metrics import JsonlSink

from .helpers import small_config

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
    with pytest.raises(ValueError, match=r"^cannot load checkpoint .*iter00000007\.pt: UnpicklingError"):
        checkpoint.load(tmp_path, 0, 7, {})
    assert not marker.exists()


def test_resumed_metric_stream_drops_records_from_the_checkpoint_on(tmp_path):
    """Resuming at iteration 20 keeps the records before 20 (and a line cut short by the crash is dropped), then
    appends; a new stream refuses an existing file. Catches duplicated or lost records after a restart."""
    path = tmp_path / "agent0.jsonl"
    path.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in (0, 10, 20, 30)) + '{"iterati')
    with pytest.raises(FileExistsError):
        JsonlSink(path)
    sink = JsonlSink(path, resume_at=20)
    sink.write({"iteration": 20, "resumed": True})
    sink.close()
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 10, 20]
