"""Faults under real gloo processes and torchrun: a hung peer, a killed agent under elastic restarts, divergence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dif_maml_dist.comm.process import ProcessEnv, distributed
from dif_maml_dist.comm.transport import PeerError
from dif_maml_dist.config import TopologyConfig
from dif_maml_dist.engine.agent import networked_agent
from dif_maml_dist.graphs.topology import build_topology
from tests.helpers import REPO, free_port, run_agent, schedule_for, small_config, spawn_within

TIMEOUT_S = 6.0
#: Start-up's own timeout, far longer than TIMEOUT_S: a wait that ends near TIMEOUT_S used the right timeout, one
#: near this used the wrong one. The bounds below sit halfway between, so that a loaded machine, which can delay
#: a process that has given up by tens of seconds before it records the moment, cannot fail them.
INIT_TIMEOUT_S = 600.0
SLACK_S = (INIT_TIMEOUT_S - TIMEOUT_S) / 2
HUNG_AGENT, HUNG_AT = 2, 6  # agent 2 stops answering in its 6th exchange


def _hung_peer_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="4",
                      LOCAL_RANK=str(rank))
    cfg = small_config(iterations=20)
    cfg.runtime.timeout_s = TIMEOUT_S
    cfg.runtime.init_timeout_s = INIT_TIMEOUT_S  # start-up's own timeout, far longer: exchanges must not use it
    ring = build_topology(TopologyConfig(name="ring", num_agents=4))
    result: dict = {}
    try:
        with distributed(cfg.runtime, ProcessEnv.from_environ(), torch.device("cpu")) as transport:
            if rank == HUNG_AGENT:
                calls = [0]
                real_post = transport.post_exchange

                def post_exchange(messages, round):
                    calls[0] += 1
                    if calls[0] == HUNG_AT:
                        result["silent_at"] = time.time()
                        # Alive but silent, as a hung process, until every other agent has given up on the run
                        # (its result written): leaving earlier would close its sockets, a different failure.
                        others = [Path(out_dir) / f"rank{r}.pt" for r in range(4) if r != rank]
                        give_up = result["silent_at"] + INIT_TIMEOUT_S
                        while not all(p.exists() for p in others) and time.time() < give_up:
                            time.sleep(0.2)
                        raise SystemExit(0)
                    return real_post(messages, round)

                transport.post_exchange = post_exchange
            agent = networked_agent(cfg, rank, 4, schedule_for(cfg, ring), transport)
            try:
                run_agent(agent, transport)
            except PeerError as err:
                result = {"error": str(err), "peer": err.peer, "at": time.time()}
                raise
    except PeerError:
        pass  # torn down by distributed(); the error is the result
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_hung_peer_is_named_within_the_timeout(tmp_path):
    """Four gloo processes on a ring; agent 2 stops answering in iteration 6 without dying. Its neighbours 1 and 3
    stop with a PeerError naming agent 2 and iteration 6 within runtime.timeout_s (plus start-up slack) — never an
    endless hang — and say, from the progress channel in the rendezvous store, that agent 2 stopped at round 5.
    Agent 0, whose neighbours wait themselves, names agent 2 as the one behind them. Catches an exchange that
    waits forever or for the start-up timeout (runtime.init_timeout_s, set far longer here), and errors that do
    not say which peer or iteration."""
    # The guard is a hang guard only: spawning four torch processes on a loaded 2-core machine is slow.
    spawn_within(_hung_peer_worker, (free_port(), str(tmp_path)), 4, 2 * INIT_TIMEOUT_S,
                 "the agents did not stop: a hung peer made the run hang")
    results = {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)}
    for neighbour in (1, 3):
        res = results[neighbour]
        assert res.get("peer") == HUNG_AGENT, res
        assert f"agent {neighbour}, iteration {HUNG_AT}: no message from agent {HUNG_AGENT}" in res["error"]
        assert f"runtime.timeout_s={TIMEOUT_S:g}" in res["error"]
        assert f"stopped advancing: agent {HUNG_AGENT} at round {HUNG_AT - 1}; this agent is at round {HUNG_AT}" \
            in res["error"], res["error"]
    # Agent 0 waits for 1 and 3 (which stop after the timeout) and fails in the same iteration or the next.
    assert "error" in results[0] and results[0]["peer"] in (1, 3)
    # The neighbours gave up after the timeout, counted from the moment agent 2 went silent (not before: it is
    # the timeout that ended the wait); agent 0, one hop further, at most one timeout later.
    silent = results[HUNG_AGENT]["silent_at"]
    for neighbour in (1, 3):
        waited = results[neighbour]["at"] - silent
        assert TIMEOUT_S - 1 <= waited <= TIMEOUT_S + SLACK_S, waited
    assert results[0]["at"] - silent <= 2 * TIMEOUT_S + SLACK_S


EVAL_TIMEOUT_S = 5.0
#: How long the hanging agent of the evaluation test stays silent at most (it leaves as soon as the other agent
#: has given up). A wait bounded by EVAL_TIMEOUT_S ends far below half of it even on a saturated machine; an
#: unbounded one ends only when the hanging agent leaves.
EVAL_HANG_S = 300.0


def _slow_evaluation_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    cfg = small_config()
    cfg.runtime.timeout_s = EVAL_TIMEOUT_S
    result: dict = {}
    try:
        with distributed(cfg.runtime, ProcessEnv.from_environ(), torch.device("cpu")) as transport:
            transport.exchange({1 - rank: torch.zeros(3)}, 0)  # a training round, as before an evaluation
            # An evaluation whose shares take 6 s and 12 s: the fast agent waits 6 s > timeout_s in the gather, well
            # within timeout_s + 4 x its own 6 s of work (23 s to spare for the two processes' skew under load).
            time.sleep(6 if rank == 0 else 12)
            t0 = time.time()
            result["gathered"] = transport.all_gather_object(rank)
            result["waited"] = time.time() - t0
            # Then agent 1 hangs before the next gather, while agent 0 has done no work since the last one: agent 0
            # gives up after about timeout_s.
            if rank == 1:
                gave_up, hung_at = Path(out_dir) / "rank0.pt", time.time()
                while not gave_up.exists() and time.time() < hung_at + EVAL_HANG_S:
                    time.sleep(0.2)
                raise SystemExit(0)
            t0 = time.time()
            try:
                transport.all_gather_object(rank)
            except PeerError as err:
                result.update(error=str(err), gave_up_after=time.time() - t0)
                raise
    except PeerError:
        pass
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_evaluation_waits_are_sized_to_the_evaluation_not_to_the_exchange_timeout(tmp_path):
    """Two gloo processes with runtime.timeout_s = 5. An evaluation gather that waits 6 s for a slower agent's
    share succeeds (its allowance is timeout_s plus 4 x the waiting agent's own 6 s share of the work), while a gather
    for an agent that hangs, with no work of one's own before it, fails with a PeerError after about timeout_s.
    Catches evaluation collectives bounded by the exchange timeout (a long final evaluation killing the run)
    and ones that are not bounded at all."""
    spawn_within(_slow_evaluation_worker, (free_port(), str(tmp_path)), 2, 2 * EVAL_HANG_S, "an evaluation gather hung")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert results[0]["gathered"] == results[1]["gathered"] == [0, 1]
    assert results[0]["waited"] > EVAL_TIMEOUT_S  # it did wait longer than the exchange timeout
    assert "gathering every agent's results did not complete within 5 s" in results[0]["error"], results[0]
    assert EVAL_TIMEOUT_S - 1 <= results[0]["gave_up_after"] <= EVAL_TIMEOUT_S + EVAL_HANG_S / 2, results[0]


def test_killed_agent_is_restarted_and_finishes_bit_identical(tmp_path):
    """launch/fault_injection.py, one trial on 4 agents (ring): an agent process is SIGKILLed mid-run under
    torchrun --max-restarts=1; the job restarts, every agent resumes from the newest common checkpoint, and the
    final parameters of all agents equal those of an uninterrupted run bit for bit (float64, CPU).

    Catches checkpoints that miss part of the loop state (optimizer moments, the task-stream RNG, the iteration),
    a resume point that is not common to all agents, a restarted job refused by the "run directory holds a run"
    check, and torchrun restarts that cannot form a new process group."""
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "fault_injection.py"), "--trials", "1",
                           "--iterations", "40", "--checkpoint-every", "10", "--nproc", "4", "--seed", "3",
                           "--out", str(tmp_path), "topology=ring", "topology.num_agents=4"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "survived 1/1, matched the uninterrupted run 1/1" in proc.stdout


def test_resume_continues_a_run_bit_identically_and_refuses_another_runs_checkpoints(tmp_path):
    """train.resume=true on a finished 10-iteration run (checkpoints every 5) with train.iterations=20 ends with
    exactly the models of a straight 20-iteration run; resuming it under another optimizer is refused in one
    line naming the difference, with the run directory left as it was. The agents exchange qsgd-compressed
    messages over random matchings, so the per-edge reference copies must be in the checkpoints too.

    Catches a resume that restarts from scratch or from the wrong iteration, state missing from checkpoints
    (optimizer moments, RNG, the compressed combine's copies), and a resume that clobbers the run it could not
    continue."""
    from tests.test_cli import train

    common = ["topology=ring", "topology.num_agents=3", "train.dtype=float64", "train.checkpoint_every=5",
              "train.eval_every=5", "task.eval_tasks=20", "maml.final_adapt_steps=1", "compression=qsgd",
              "compression.bits=3", "topology.schedule=random_matching"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train([*common, "train.iterations=20", f"hydra.run.dir={straight}"], nproc=3).returncode == 0
    assert train([*common, "train.iterations=10", f"hydra.run.dir={resumed}"], nproc=3).returncode == 0

    before = {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file()}
    refused = train([*common, "train.iterations=20", "optim=sgd", "train.resume=true", f"hydra.run.dir={resumed}"],
                    nproc=3)
    assert refused.returncode != 0
    out = refused.stdout + refused.stderr
    assert out.count("dif_maml_dist: error: checkpoint ") == 1 and "written by a run with a different optim;" in out
    for path, content in before.items():  # results and checkpoints as they were; logs only appended to
        if ".hydra" not in path.parts:
            now = path.read_bytes()
            assert now.startswith(content) if "logs" in path.parts else now == content, path

    proc = train([*common, "train.iterations=20", "train.resume=true", f"hydra.run.dir={resumed}"], nproc=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from_iteration"] == 10 and summary["iterations"] == 20
    for k in range(3):
        a = torch.load(resumed / "models" / f"agent{k}.pt", weights_only=True)
        b = torch.load(straight / "models" / f"agent{k}.pt", weights_only=True)
        assert all(torch.equal(a[n], b[n]) for n in b), f"agent {k}"
    lines = (resumed / "metrics" / "agent0.jsonl").read_text().splitlines()
    iterations = [json.loads(line)["iteration"] for line in lines]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 20  # no record twice
