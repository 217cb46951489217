"""The simulator checkpoints and resumes: a run stopped (Ctrl-C, or finished short) and continued with
train.resume=true equals the uninterrupted run bit for bit, in both engines, with the torchrun path's refusals.

Runs go through ``run.recipes.simulated`` in this process (the run directory, metric streams, checkpoints and summary of a
real run, without a subprocess per run): sinusoid, 4 agents, float64, one intra-op thread.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from dif_maml_dist.comm.process import ProcessEnv
from dif_maml_dist.engine.loop import BestCentroid
from dif_maml_dist.engine.simulator import Simulation
from dif_maml_dist.graphs.topology import build_topology
from dif_maml_dist.run import checkpoint, recipes, rundir
from dif_maml_dist.run.context import RunContext
from dif_maml_dist.run.validate import validate
from tests.helpers import schedule_for, small_config
from tests.test_run_dir import snapshot

ENGINES = pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "per_agent"])
#: what differs between two runs of the same arithmetic: time, and the config's train.iterations/resume
TIMES = {"wall_s", "compute_s", "exchange_s"}
SUMMARY_TIMES = {"wall_seconds", "final_eval_seconds", "resumed_from_iteration", "config"}
AGENT_TIMES = {"compute_seconds", "exchange_seconds"}


@pytest.fixture(autouse=True)
def _restore_logging():
    """``execute`` sets up the run's logging (root handlers, a log file in the run directory): undone after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def config(vectorize: bool, iterations: int, resume: bool = False, departures: bool = False, **train_):
    """4 agents on a ring, records every 2 iterations, evaluations and checkpoints every 4. Without departures:
    qsgd (random draws, reference copies) over a random matching per round (a changing graph); with: agent 1
    leaves at iteration 5 (continue mode, which takes neither)."""
    cfg = small_config(iterations=12, checkpoint_every=4)
    cfg.train.save_models, cfg.train.eval_every, cfg.train.log_every = True, 4, 2
    cfg.task.eval_tasks, cfg.maml.final_adapt_steps = 10, 2
    cfg.topology.name, cfg.topology.num_agents = "ring", 4
    if departures:
        cfg.runtime.on_peer_failure, cfg.runtime.departures = "continue", [[1, 5]]
    else:
        cfg.topology.schedule, cfg.compression.name = "random_matching", "qsgd"
    cfg.runtime.mode, cfg.runtime.vectorize, cfg.runtime.threads = "simulate", vectorize, 1
    for key, value in train_.items():
        setattr(cfg.train, key, value)
    cfg = validate(cfg)
    # Set after validation: train.resume for the simulator, and a shorter run than the departure's iteration.
    cfg.train.iterations, cfg.train.resume = iterations, resume
    return cfg


def run(cfg, run_dir: Path) -> dict:
    return recipes.simulated(RunContext.build(cfg, ProcessEnv(), run_dir))


def records(run_dir: Path, name: str, after: int) -> list[dict]:
    lines = (run_dir / "metrics" / f"{name}.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k not in TIMES} for r in map(json.loads, lines) if r["iteration"] > after]


def assert_same_run(straight: Path, resumed: Path, after: int) -> None:
    """Models, every record after ``after`` and the summary's figures equal, bit for bit (times aside)."""
    for name in ["network"] + [f"agent{k}" for k in range(4)]:
        assert records(resumed, name, after) == records(straight, name, after), name
        assert records(resumed, name, after)  # there was something to compare
    for name in ["centroid"] + [f"agent{k}" for k in range(4)]:
        a, b = (torch.load(d / "models" / f"{name}.pt", weights_only=True) for d in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), name
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, resumed))
    for s in (a, b):
        s["agents"] = [{k: v for k, v in agent.items() if k not in AGENT_TIMES} for agent in s["agents"]]
    assert {k: v for k, v in b.items() if k not in SUMMARY_TIMES} == {k: v for k, v in a.items()
                                                                        if k not in SUMMARY_TIMES}
    assert b["resumed_from_iteration"] == after


@ENGINES
def test_interrupted_or_extended_simulation_equals_an_uninterrupted_one(vectorize, tmp_path, monkeypatch, capsys):
    """Ctrl-C during iteration 10 of 12 (checkpoints at 4 and 8): the message names iteration 8 and how to
    continue, and the resumed run equals the uninterrupted one bit for bit. A run of 6 iterations (its checkpoint
    of the last iteration, 6, off the every-4 grid) extended to 12 equals it too. With qsgd over a random matching:
    catches a simulator that cannot resume, a random stream (task sampling, compressor draws, a round's graph) or
    a reference copy restored wrong or not at all, optimizer moments lost, bytes_sent restarting at 0, a finished
    run without a checkpoint of its last iteration, and pruning that forgets the last one."""
    straight = tmp_path / "straight"
    run(config(vectorize, 12), straight)

    stopped = tmp_path / "stopped"
    step = Simulation.step

    def interrupted(self):
        if self.iteration == 9:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Simulation, "step", interrupted)
    ctx = RunContext.build(config(vectorize, 12), ProcessEnv(), stopped)
    with pytest.raises(KeyboardInterrupt):
        recipes.simulated(ctx)
    monkeypatch.undo()
    capsys.readouterr()
    recipes._interrupted(ctx)
    assert capsys.readouterr().err == (
        f"dif_maml_dist: interrupted; the newest checkpoint of the simulator is iteration 8 in "
        f"{stopped / 'checkpoints'}: continue with train.resume=true hydra.run.dir={stopped}\n")
    assert checkpoint.available(stopped, checkpoint.SIMULATOR) == [4, 8]
    run(config(vectorize, 12, resume=True), stopped)
    assert_same_run(straight, stopped, 8)

    short = tmp_path / "short"
    run(config(vectorize, 6), short)
    assert checkpoint.available(short, checkpoint.SIMULATOR) == [4, 6]
    run(config(vectorize, 12, resume=True), short)
    assert_same_run(straight, short, 6)
    assert checkpoint.available(short, checkpoint.SIMULATOR) == [8, 12]  # keep_checkpoints=2, the last included


@ENGINES
def test_resume_after_a_departure_equals_an_uninterrupted_run(vectorize, tmp_path):
    """Agent 1 leaves at iteration 5; the run stops at 8 and is resumed to 12: equal to the uninterrupted run.
    Catches the departed agent's frozen model or its neighbours' knowledge of the departure (the round weights)
    not carried by the checkpoint."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(config(vectorize, 12, departures=True), straight)
    run(config(vectorize, 8, departures=True), resumed)
    run(config(vectorize, 12, resume=True, departures=True), resumed)
    assert_same_run(straight, resumed, 8)


def test_either_engine_continues_the_others_checkpoint():
    """A vectorized simulation's state (qsgd, random matching, a best centroid) loaded into a per-agent one and
    back: the per-agent engine's optimizer moments are the stack's rows, and both continue alike (to rounding, as
    the engines agree). Catches agents' optimizer states or task streams swapped when the stack is split or
    rebuilt, and a best centroid not carried."""
    cfg = config(True, 12)
    sched = schedule_for(cfg, build_topology(cfg.topology))
    vec, per = Simulation(cfg, sched, vectorize=True), Simulation(cfg, sched, vectorize=False)
    for _ in range(3):
        vec.step()
    vec.best = BestCentroid(2, 0.5, torch.arange(3.0))
    per.load_state_dict(vec.state_dict())
    again = per.state_dict()
    moments = vec.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(per.agents[2].state.optimizer.state_dict()["state"][0]["exp_avg"], moments[2])
    assert torch.equal(again["optimizer"]["state"][0]["exp_avg"], moments)
    assert again["rngs"][3].equal(vec.rngs[3].get_state()) and per.best.iteration == 2
    assert torch.equal(per.best.centroid, torch.arange(3.0)) and per.iteration == 3
    for _ in range(3):
        vec.step(), per.step()
    torch.testing.assert_close(per.states(), vec.states(), rtol=1e-10, atol=1e-13)
    assert per.bytes_sent == vec.bytes_sent


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 8-iteration simulator run, checkpoints at 4 and 8 (each test works on a copy)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(config(True, 8), run_dir)
    return run_dir


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_refused_simulator_resumes_change_nothing(finished, tmp_path, capsys):
    """The torchrun path's refusals, for the simulator's checkpoints, before anything is written: another run's
    checkpoints (a different seed), a target behind the checkpoint, a corrupt newest checkpoint (named), no
    checkpoint at all (train.checkpoint_every=0 writes none, not even the last), and a torchrun job's checkpoints
    (and the other way round). Each one line, the run directory unchanged. Catches the simulator resuming
    anything it finds, and refusals that come only after hydra has written its record."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    prints = RunContext.build(config(True, 12), ProcessEnv(), run_dir).fingerprint()
    other = config(True, 12)
    other.seed = 1
    theirs = RunContext.build(other, ProcessEnv(), run_dir).fingerprint()
    before = snapshot(run_dir)
    cases = [((12, theirs), r"iter00000008\.pt was written by a run with a different seed; resume with"),
             ((4, prints), r"^train\.iterations=4, but the run in .* is checkpointed at iteration 8")]
    for (iterations, fp), expect in cases:
        with pytest.raises(ValueError, match=expect) as excinfo:
            rundir.check_resumable(run_dir, 4, iterations, fp, simulated=True)
        one_line(excinfo)
    assert snapshot(run_dir) == before
    newest = checkpoint.checkpoint_path(run_dir, checkpoint.SIMULATOR, 8)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match=f"^checkpoint {newest} is corrupt") as excinfo:
        rundir.check_resumable(run_dir, 4, 12, prints, simulated=True)
    one_line(excinfo)
    # The same refusal when the run itself resumes (the check it shares with torchrun's resume).
    ctx = RunContext.build(config(True, 12), ProcessEnv(), run_dir)
    with pytest.raises(checkpoint.ResumeError, match=f"^checkpoint {newest} is corrupt"):
        checkpoint.resume(Simulation(ctx.cfg, ctx.schedule), None, run_dir, checkpoint.SIMULATOR, prints, 12)
    assert snapshot(run_dir) == before

    never = tmp_path / "never"
    ctx = RunContext.build(config(True, 8, checkpoint_every=0), ProcessEnv(), never)
    recipes.simulated(ctx)
    capsys.readouterr()
    recipes._interrupted(ctx)
    assert capsys.readouterr().err == (f"dif_maml_dist: interrupted; no checkpoint of the simulator was written, so "
                                       f"the run in {never} cannot be continued (train.checkpoint_every sets how "
                                       f"often they are)\n")
    assert not (never / "checkpoints").exists()
    with pytest.raises(rundir.RunDirError, match="holds no checkpoints to resume from"):
        rundir.check_resumable(never, 4, 12, prints, simulated=True)
    (never / "checkpoints").mkdir()
    with pytest.raises(rundir.RunDirError, match=r"holds no checkpoint of the simulator to resume from") as excinfo:
        rundir.check_resumable(never, 4, 12, prints, simulated=True)
    one_line(excinfo)
    torchrun_job = tmp_path / "torchrun_job"
    for k in range(4):
        checkpoint.save(torchrun_job, k, {"iteration": 8}, prints)
    with pytest.raises(rundir.RunDirError, match=r"were written by a torchrun job: resume it with runtime=torchrun"):
        rundir.check_resumable(torchrun_job, 4, 12, prints, simulated=True)
    with pytest.raises(rundir.RunDirError, match=r"were written by the simulator: resume it with runtime=simulate"):
        rundir.check_resumable(finished, 4, 12, prints, simulated=False)
