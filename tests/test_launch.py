"""The launch scripts in launch/: multi-node through torchrun's c10d rendezvous (two "nodes" on this machine)
against one node, and their one-line usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from .helpers import REPO, free_port

TORCHRUN = f"{sys.executable} -m torch.distributed.run"
SHORT_RUN = ["train.iterations=20", "train.eval_every=10", "train.log_every=5", "task.eval_tasks=50",
             "maml.final_adapt_steps=2", "train.dtype=float64", "seed=4"]


def script(name: str, args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(REPO / "launch" / name), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, TORCHRUN=TORCHRUN, PYTHONUNBUFFERED="1", **env))


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"launch did not finish in {timeout} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def test_two_nodes_of_three_agents_equal_one_node_of_six(tmp_path):
    """Two torchrun invocations (--nnodes=2, 3 processes each, c10d rendezvous on 127.0.0.1) through
    launch/multi_node.sh train the same six agents as launch/single_node.sh with 6 processes: every agent's final
    parameters are bit-identical, and all of them write into the one run directory.

    Catches agent ids taken from the local rank instead of the global one, a topology or seed stream that depends
    on how agents are spread over nodes, and ranks of the second node writing elsewhere."""
    port = free_port()
    nodes = [script("multi_node.sh", SHORT_RUN, NNODES="2", NPROC_PER_NODE="3", RDZV_ENDPOINT=f"127.0.0.1:{port}",
                    RUN_ID=f"two-nodes-{port}", RUN_DIR=str(tmp_path / "two")) for _ in range(2)]
    for node in nodes:
        finish(node)
    finish(script("single_node.sh", SHORT_RUN, NPROC_PER_NODE="6", RUN_DIR=str(tmp_path / "one")))

    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert [a["agent"] for a in two["agents"]] == list(range(6))
    for a, b in zip(two["agents"], one["agents"]):
        assert a["adaptation_curve"] == b["adaptation_curve"] and a["bytes_sent"] == b["bytes_sent"]
    for k in range(6):
        mine = torch.load(tmp_path / "two" / "models" / f"agent{k}.pt", weights_only=True)
        ref = torch.load(tmp_path / "one" / "models" / f"agent{k}.pt", weights_only=True)
        assert mine.keys() == ref.keys() and all(torch.equal(mine[n], ref[n]) for n in ref), f"agent {k}"
        assert (tmp_path / "two" / "metrics" / f"agent{k}.jsonl").is_file()
        assert (tmp_path / "two" / "logs" / f"agent{k}.log").is_file()


@pytest.mark.parametrize("env, expect", [
    ({"NPROC_PER_NODE": "3", "RDZV_ENDPOINT": "127.0.0.1:29400", "RUN_ID": "x"}, "set NNODES: the number of nodes"),
    ({"NNODES": "2", "NPROC_PER_NODE": "3", "RDZV_ENDPOINT": "127.0.0.1:29400"}, "set RUN_ID: one name for the job"),
    ({"NNODES": "2", "NPROC_PER_NODE": "3", "RDZV_ENDPOINT": "node0", "RUN_ID": "x"},
     "RDZV_ENDPOINT must be host:port, got 'node0'"),
    ({"NNODES": "two", "NPROC_PER_NODE": "3", "RDZV_ENDPOINT": "127.0.0.1:29400", "RUN_ID": "x"},
     "NNODES must be a positive integer, got 'two'"),
])
def test_multi_node_script_reports_missing_settings_in_one_line(env, expect):
    """A node started without one of the settings every node must share stops at once (exit 2, one line) instead
    of waiting in a rendezvous the other nodes can never complete."""
    base = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RUN_ID")}
    proc = subprocess.run(["bash", str(REPO / "launch" / "multi_node.sh")], cwd=REPO, capture_output=True, text=True,
                          env=dict(base, TORCHRUN=TORCHRUN, **env), timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch: error: ") and expect in lines[0], proc.stderr


def test_single_node_script_refuses_a_taken_port(tmp_path):
    """MASTER_PORT already in use on this machine: one line saying so, exit 2, no run directory — instead of
    torchrun's traceback (or a job that joins a stranger's store)."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(["bash", str(REPO / "launch" / "single_node.sh")], cwd=REPO, capture_output=True,
                              text=True, timeout=30, env=dict(os.environ, TORCHRUN=TORCHRUN, MASTER_PORT=str(port),
                                                              RUN_DIR=str(tmp_path / "run")))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"launch: error: port {port} (MASTER_PORT) is already in use on this machine; "
                                   f"choose another MASTER_PORT")
    assert not (tmp_path / "run").exists()
