"""End to end through the hydra CLI: real torchrun jobs on a short schedule, and the one-line usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PARAMS = 1761  # 1-40-40-1 MLP: 40 + 40 + 1600 + 40 + 40 + 1
PAPER6_DEGREES = [1, 1, 4, 2, 3, 1]


def train(args: list[str], nproc: int | None = None, timeout: float = 900, cwd: Path = REPO,
          **env_vars: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    if nproc is not None:  # torchrun, from this interpreter's environment
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "dif_maml_dist.train", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_vars)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("strategy, extra, degrees", [
    ("dif_maml", ["seed=3", "compression=topk", "strategy.combine_every=2"], PAPER6_DEGREES),
    ("centralized", ["optim=sgd"], None),
    ("noncooperative", ["topology=ring"], None),
])
def test_torchrun_six_agents_short_run(tmp_path, strategy, extra, degrees):
    """A 6-process torchrun job per strategy writes every output, with exactly the traffic the strategy implies.
    The dif_maml job sends top-10% messages every second iteration: ceil(0.1 x 1761) = 177 float32 values and
    int32 indices = 1416 bytes per neighbour and combination round.

    Catches: hydra overrides (and the compression group) not reaching the agents, ranks writing to different run
    directories, missing per-agent metrics, and bytes that do not match degree x message x rounds (or 0 without
    exchange).
    """
    iters, run_dir = 40, tmp_path / "run"
    proc = train([f"strategy={strategy}", *extra, f"train.iterations={iters}", "train.eval_every=20",
                  "train.log_every=10", "task.eval_tasks=100", f"hydra.run.dir={run_dir}"], nproc=6)
    assert proc.returncode == 0, proc.stderr[:4000] + " ... " + proc.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategy"] == strategy and summary["num_agents"] == 6 and summary["iterations"] == iters
    assert summary["parameters"] == PARAMS
    if "optim=sgd" in extra:
        assert summary["optim"] == "sgd" and summary["lr"] == 0.005
    if "seed=3" in extra:
        assert summary["seed"] == 3
        assert summary["compression"] == {"name": "topk", "ratio": 0.1, "gamma": 0.25, "zeta": 1.0}
        assert summary["combine_every"] == 2 and summary["schedule"] == "static"
        assert summary["mixing_rate_per_round"] == pytest.approx(0.864, abs=5e-4)
    expected_lambda2 = {"dif_maml": 0.864, "centralized": 0.0, "noncooperative": 1.0}[strategy]
    assert summary["lambda2"] == pytest.approx(expected_lambda2, abs=5e-4)
    for key in ("centroid_test_loss", "disagreement", "wall_seconds"):
        assert isinstance(summary[key], float)
    assert len(summary["centroid_adaptation_curve"]) == 11
    for k, agent in enumerate(summary["agents"]):
        assert agent["agent"] == k and len(agent["adaptation_curve"]) == 11
        if strategy == "dif_maml":  # top-10% messages (values + indices), every second iteration
            expected = degrees[k] * 177 * 8 * (iters // 2)
        else:
            expected = {"centralized": 2 * 5 * PARAMS * 4 // 6, "noncooperative": 0}[strategy] * iters
        assert agent["bytes_sent"] == expected
        records = [json.loads(line) for line in (run_dir / "metrics" / f"agent{k}.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in records] == [0, 10, 20, 30, 40]
        assert all("test_loss_post" in r for r in records if r["iteration"] in (0, 20, 40))
        assert records[-1]["bytes_sent"] == agent["bytes_sent"]
        assert (run_dir / "models" / f"agent{k}.pt").is_file()
    network = (run_dir / "metrics" / "network.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in network] == [0, 20, 40]
    assert (run_dir / "models" / "centroid.pt").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    # From a shared start: centralized agents stay identical (up to rounding), Dif-MAML agents close, and
    # non-cooperative ones drift apart.
    low, high = {"centralized": (0, 1e-10), "dif_maml": (1e-8, 1e-1), "noncooperative": (1e-4, 1e3)}[strategy]
    assert low <= summary["disagreement"] <= high
    # rank 0 alone prints progress
    assert proc.stderr.count("[agent 0] INFO iter 40/40") == 1 and "[agent 3] INFO" not in proc.stderr
    if strategy == "dif_maml":
        # The same command with runtime=simulate (per-agent engine) runs all six agents in this one process
        # and must reproduce the torchrun job exactly: same float32 arithmetic in the same order.
        sim_dir = tmp_path / "sim"
        sim = train([f"strategy={strategy}", *extra, f"train.iterations={iters}", "train.eval_every=20",
                     "train.log_every=10", "task.eval_tasks=100", "runtime=simulate", "runtime.vectorize=false",
                     f"hydra.run.dir={sim_dir}"])
        assert sim.returncode == 0, sim.stderr[-3000:]
        simulated = json.loads((sim_dir / "summary.json").read_text())
        assert simulated["runtime"] == "simulate"
        for a, b in zip(summary["agents"], simulated["agents"]):
            assert a["adaptation_curve"] == b["adaptation_curve"] and a["bytes_sent"] == b["bytes_sent"]
        assert simulated["centroid_test_loss"] == summary["centroid_test_loss"]
        assert sorted(p.name for p in (sim_dir / "metrics").iterdir()) == sorted(
            p.name for p in (run_dir / "metrics").iterdir())


def _edge_file(tmp_path: Path, text: str) -> str:
    tmp_path.mkdir(exist_ok=True)
    f = tmp_path / "edges.txt"
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize("case", ["disconnected", "unknown_topology", "nproc_mismatch", "existing_run_dir",
                                  "nccl_without_gpu", "resume_without_checkpoints"])
def test_bad_input_is_one_line_error(tmp_path, case):
    """Each user mistake ends with exit status 2 and exactly one line on stderr naming the problem; a few of
    each kind (graph, config group, launch, run directory, device, resume) through the real command.

    Catches tracebacks leaking to the user, errors that do not say what to fix, and runs that start anyway.
    """
    run_dir = tmp_path / "run"
    two_components = _edge_file(tmp_path, "0 1\n2 3\n")
    args, expect = {
        "disconnected": (["runtime=simulate", "topology=edge_list", f"topology.edge_list={two_components}"],
                         "disconnected"),
        "unknown_topology": (["topology=hexagon"], "unknown topology 'hexagon'; choose one of: complete"),
        "nproc_mismatch": ([], "has 6 agents but 1 process(es) were started; launch with torchrun --nproc-per-node=6"),
        "existing_run_dir": ([], "already holds a run"),
        # This machine (and CI) has no GPU: asking for nccl must fail before any process group is formed.
        "nccl_without_gpu": (["topology=ring", "topology.num_agents=1", "runtime.backend=nccl"],
                             "runtime.backend=nccl needs GPUs"),
        "resume_without_checkpoints": (["topology=ring", "topology.num_agents=1", "train.resume=yes"],
                                       "holds no checkpoints to resume from"),
    }[case]
    if case in ("existing_run_dir", "resume_without_checkpoints"):
        run_dir.mkdir()
        (run_dir / "summary.json").write_text("earlier results\n")
    proc = train([*args, f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dif_maml_dist: error: ") and expect in lines[0], proc.stderr
    if case in ("existing_run_dir", "resume_without_checkpoints"):
        assert (run_dir / "summary.json").read_text() == "earlier results\n"
        assert sorted(p.name for p in run_dir.iterdir()) == ["summary.json"]
    else:
        assert not run_dir.exists()  # a run that never started leaves no directory behind


@pytest.mark.parametrize("case", ["run_dir_empty", "run_dir_is_file", "run_dir_below_file", "timeout_tiny",
                                  "unknown_key", "bad_value", "edge_list_directory", "edge_list_not_utf8",
                                  "weights_ragged", "huge_node_id", "too_many_agents_for_memory",
                                  "processes_checked_first", "unknown_task", "zero_lr", "negative_alpha",
                                  "missing_node", "weights_not_doubly_stochastic", "schedule_with_centralized",
                                  "negative_seed", "continue_with_centralized", "departure_without_continue",
                                  "departure_of_unknown_agent", "every_agent_departs", "departure_after_the_end",
                                  "departure_twice", "topk_keeping_every_entry", "ratio_below_one_entry",
                                  "resample_without_edges", "combine_every_beyond_iterations",
                                  "overlap_with_continue", "slowdown_of_unknown_agent", "staleness_with_overlap",
                                  "staleness_with_compression", "staleness_negative", "stale_step_alone"])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, case):
    """The entry point's checks (``train.prepare``: hydra's compose API on the command line's overrides, then
    the run's context), case by case: each refusal is one line naming what to change, and nothing is created.

    Catches: ``hydra.run.dir=`` writing a whole run into the current folder; a run directory at or below a file
    (a traceback); a timeout too short for process-group start-up (a traceback inside it); hydra's multi-line
    errors for unknown keys and bad values; a directory, non-UTF-8 bytes or ragged rows in the user's files; a
    mistyped huge node id listing a million components; 50,000 agents ending in a MemoryError; and 8000 agents
    in one process computing dense spectra for minutes before the process count was checked; and the config's
    own validation (values out of range, options that do not combine). Also settings that would run uselessly:
    departures of every agent (a ZeroDivisionError in the summary after training, or under torchrun exit 0 with
    nothing written), a top-k "compression" sending more bytes than the full state, a ratio keeping less than
    one entry (consensus step ~0: no averaging), resample rounds with no edge on average, and combine_every
    beyond the last iteration (never combines). (The exit status and the printing of these lines are the CLI's,
    checked by the subprocess test above.)"""
    from dif_maml_dist.comm.process import ProcessEnv
    from dif_maml_dist.run.launch import prepare

    cwd_before = sorted(os.listdir(REPO))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("0 1\n1 2 # caf\xe9\n".encode("latin-1"))
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("0.5 0.5 0\n0.5 0.5\n0 0 1\n")
    huge = _edge_file(tmp_path, "0 1\n1 2\n2 999999\n")
    names_node_5 = _edge_file(tmp_path / "m", "0 1\n1 5\n")
    # columns sum to 1, rows to 1.2 / 1.05 / 0.75 (the worst, reported): left- but not doubly stochastic
    matrix = tmp_path / "weights.txt"
    matrix.write_text("0.5 0.5 0.2\n0.25 0.5 0.3\n0.25 0.0 0.5\n")
    run_dir = tmp_path / "run"
    args, expect = {
        "unknown_task": (["task=imagenet"], "unknown task 'imagenet'; choose one of: custom, image_folder, "
                                            "miniimagenet_5w1s, miniimagenet_5w5s, omniglot_20w1s, omniglot_20w5s, "
                                            "omniglot_5w1s, omniglot_5w5s, sinusoid, table_tasks"),
        "zero_lr": (["optim.lr=0"], "optim.lr must be a positive number"),
        "negative_alpha": (["maml.inner_lr=-0.01"], "maml.inner_lr must be a positive number"),
        "missing_node": (["runtime=simulate", "topology=edge_list", f"topology.edge_list={names_node_5}",
                          "topology.num_agents=3"], "edges.txt:2: node 5 does not exist"),
        "weights_not_doubly_stochastic": (["runtime=simulate", "topology=ring", "topology.num_agents=3",
                                           "topology.weights=file", f"topology.weight_matrix={matrix}"],
                                          "weights.txt: combination matrix row 2 sums to 0.75, not 1 (not doubly "
                                          "stochastic)"),
        "schedule_with_centralized": (["strategy=centralized", "topology.schedule=one_peer_exponential"],
                                      "strategy=centralized uses no graph"),
        "negative_seed": (["seed=-1"], "seed must be a non-negative integer, got -1"),
        "continue_with_centralized": (["runtime.on_peer_failure=continue", "strategy=centralized"],
                                      "runtime.on_peer_failure=continue: strategy=centralized averages over every "
                                      "agent"),
        "departure_without_continue": (["runtime=simulate", "runtime.departures=[[1,5]]"],
                                       "add runtime.on_peer_failure=continue"),
        "departure_of_unknown_agent": (["runtime=simulate", "runtime.on_peer_failure=continue",
                                        "runtime.departures=[[6,5]]"], "names agent 6, but the topology has 6"),
        "every_agent_departs": (["runtime=simulate", "runtime.on_peer_failure=continue", "topology=ring",
                                 "topology.num_agents=3", "runtime.departures=[[0,5],[1,6],[2,7]]"],
                                "runtime.departures lists every one of the 3 agents; at least one agent must stay"),
        "departure_after_the_end": (["runtime=simulate", "runtime.on_peer_failure=continue", "train.iterations=10",
                                     "runtime.departures=[[1,11]]"], "1 <= iteration <= train.iterations (10)"),
        "departure_twice": (["runtime=simulate", "runtime.on_peer_failure=continue",
                             "runtime.departures=[[1,3],[1,5]]"], "names an agent twice"),
        "topk_keeping_every_entry": (["runtime=simulate", "compression=topk", "compression.ratio=1"],
                                     "at least the 7044 bytes of the full state: use compression=none"),
        "ratio_below_one_entry": (["runtime=simulate", "compression=randk", "compression.ratio=1e-9"],
                                  "compression.ratio=1e-09 keeps less than one of the model's 1761 entries"),
        "resample_without_edges": (["runtime=simulate", "topology.schedule=resample", "topology.active_prob=1e-9"],
                                   "topology.active_prob=1e-09 keeps less than one of the graph's 6 edges"),
        "combine_every_beyond_iterations": (["runtime=simulate", "train.iterations=10", "strategy.combine_every=11"],
                                            "strategy.combine_every=11 is above train.iterations=10"),
        "overlap_with_continue": (["runtime.on_peer_failure=continue", "strategy.overlap=true"],
                                  "runtime.on_peer_failure=continue: a departed neighbour is noticed inside the "
                                  "exchange"),
        "slowdown_of_unknown_agent": (["runtime=simulate", "runtime.slowdown=[[6,2]]"],
                                      "runtime.slowdown names agent 6, but the topology has 6 agents"),
        "staleness_with_overlap": (["strategy.staleness=2", "strategy.overlap=true"],
                                   "strategy.staleness=2: a stale round already computes while its messages "
                                   "travel: drop strategy.overlap"),
        "staleness_with_compression": (["strategy.staleness=1", "compression=topk"],
                                       "strategy.staleness=1: compressed gossip updates each edge's reference "
                                       "copies at both ends in the same round: use compression=none"),
        "staleness_negative": (["runtime=simulate", "strategy.staleness=-1"],
                               "strategy.staleness must be 0 (synchronous) or a number of rounds, got -1"),
        "stale_step_alone": (["runtime=simulate", "strategy.stale_step=0.5"],
                             "strategy.stale_step is the step of strategy.staleness's combine: set "
                             "strategy.staleness too, or drop it"),
        "run_dir_empty": (["hydra.run.dir="], "hydra.run.dir is empty"),
        "run_dir_is_file": ([f"hydra.run.dir={a_file}"], "is a file: choose a directory path"),
        "run_dir_below_file": ([f"hydra.run.dir={a_file / 'run'}"], f"is below {a_file}, which is a file"),
        "timeout_tiny": (["runtime.timeout_s=0.001"], "runtime.timeout_s=0.001 is too short"),
        "unknown_key": (["train.iterationz=5"], "Could not override 'train.iterationz': Key 'iterationz' not in"),
        "bad_value": (["train.iterations=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
        "edge_list_directory": (["topology=edge_list", f"topology.edge_list={tmp_path}"], "is a directory"),
        "edge_list_not_utf8": (["runtime=simulate", "topology=edge_list", f"topology.edge_list={latin}"],
                               "latin.txt:2: edge list file is not UTF-8 text"),
        "weights_ragged": (["runtime=simulate", "topology=ring", "topology.num_agents=3", "topology.weights=file",
                            f"topology.weight_matrix={ragged}"], "ragged.txt:2: row has 2 values, expected 3"),
        "huge_node_id": (["runtime=simulate", "topology=edge_list", f"topology.edge_list={huge}"],
                         "node id 999999 makes K = 1000000 agents"),
        "too_many_agents_for_memory": (["runtime=simulate", "topology=ring", "topology.num_agents=200000"],
                                       "200000 agents need about"),
        "processes_checked_first": (["topology=ring", "topology.num_agents=8000"],
                                    "has 8000 agents but 1 process(es) were started"),
    }[case]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args = [*args, f"hydra.run.dir={run_dir}"]
    with pytest.raises(ValueError) as refused:
        prepare(args, ProcessEnv())
    message = str(refused.value)
    assert expect in message and "\n" not in message and len(message) < 400, message
    assert not run_dir.exists() and sorted(os.listdir(REPO)) == cwd_before


def test_compression_with_a_non_symmetric_weight_file_is_refused_before_anything_is_written(tmp_path):
    """Catches compressed gossip run on a weight file that is doubly stochastic with a symmetric support but not
    symmetric (A[0, 1] = 0.3, A[1, 0] = 0.2): CHOCO's per-edge terms no longer cancel, so the network average
    drifted silently. Refused in one line saying how to fix it, before the run directory exists; the same file
    without compression is a valid matrix."""
    from dif_maml_dist.comm.process import ProcessEnv
    from dif_maml_dist.config import TopologyConfig
    from dif_maml_dist.graphs.topology import build_topology
    from dif_maml_dist.run.launch import prepare

    cwd_before = sorted(os.listdir(REPO))
    matrix = tmp_path / "weights.txt"
    matrix.write_text("0.5 0.3 0.2\n0.2 0.5 0.3\n0.3 0.2 0.5\n")  # circulant: rows and columns sum to 1
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError) as refused:
        prepare(["runtime=simulate", "topology=ring", "topology.num_agents=3", "topology.weights=file",
                 f"topology.weight_matrix={matrix}", "compression=topk", f"hydra.run.dir={run_dir}"], ProcessEnv())
    message = str(refused.value)
    assert message == (f"compression=topk keeps the network average only with symmetric weights, but {matrix} has "
                       f"A[0, 1] = 0.3 != A[1, 0] = 0.2: use topology.weights=metropolis, make the file symmetric, "
                       f"or use compression=none"), message
    assert not run_dir.exists() and sorted(os.listdir(REPO)) == cwd_before
    topo = build_topology(TopologyConfig(name="ring", num_agents=3, weights="file", weight_matrix=str(matrix)))
    assert topo.weights[0, 1] == 0.3


def test_run_dir_whose_parent_is_not_writable_is_refused_before_anything_is_written(tmp_path):
    """hydra.run.dir below a folder this user cannot write into: one line naming the folder, before any check
    that builds the graph or the data and before anything is written. Catches a refusal that came only as a
    PermissionError traceback from hydra or the lock, after the checks had passed.

    Permission bits do not stop root (the tests may run as root): there the folder is /proc, which nobody can
    write into, and which a check of the permission bits (``os.access``) would have let through."""
    from dif_maml_dist.comm.process import ProcessEnv
    from dif_maml_dist.run.launch import prepare

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:
        locked = Path("/proc")
    run_dir = locked / "runs" / "a"
    try:
        with pytest.raises(ValueError) as refused:
            prepare(["runtime=simulate", f"hydra.run.dir={run_dir}"], ProcessEnv())
    finally:
        (tmp_path / "locked").chmod(0o755)
    message = str(refused.value)
    assert message == (f"hydra.run.dir={run_dir} cannot be created: {locked} is not writable by this user; choose "
                       f"a directory you can write to"), message
    assert not (locked / "runs").exists() and list((tmp_path / "locked").iterdir()) == []


def test_default_run_dir_holding_a_run_is_left_intact(tmp_path):
    """Without hydra.run.dir the run directory comes from the run id (here a repeated one): an earlier run
    there must survive the refusal untouched (catches the clean-up of a failed start deleting it)."""
    old = tmp_path / "outputs" / "same-id"
    (old / "metrics").mkdir(parents=True)
    (old / "metrics" / "agent0.jsonl").write_text("{}\n")
    (old / "summary.json").write_text("earlier results\n")
    proc = train(["runtime=simulate", "train.iterations=2"], cwd=tmp_path, TORCHELASTIC_RUN_ID="same-id")
    assert proc.returncode == 2 and "already holds a run" in proc.stderr, proc.stderr
    assert (old / "summary.json").read_text() == "earlier results\n"
    assert (old / "metrics" / "agent0.jsonl").read_text() == "{}\n"


def test_launch_mismatches_under_torchrun_report_once(tmp_path):
    """Under torchrun every rank detects a bad launch, but the user sees the message once (from rank 0):
    a process count that is not the topology's, and the single-process simulator started under torchrun."""
    proc = train([f"hydra.run.dir={tmp_path / 'run'}"], nproc=2)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("dif_maml_dist: error: topology 'paper6' has 6 agents but 2 process(es) were started") == 1
    proc = train(["runtime=simulate", f"hydra.run.dir={tmp_path / 'run2'}"], nproc=2)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("dif_maml_dist: error: runtime=simulate runs all 6 agents in one process, but 2 were") == 1


def test_omniglot_task_runs_through_the_cli(tmp_path):
    """task=omniglot_5w1s with data.root on a small fixture in the real layout (30 characters): the simulator
    trains a (narrow) Conv4 and reports accuracy with a 95% confidence interval, per agent and for the centroid.

    Catches: labels cast to float on their way to the device, a family not wired into the runtime, and missing
    accuracy figures."""
    from tests.test_omniglot import make_fixture

    make_fixture(tmp_path / "data", {"images_background": {"A": 15, "B": 10}, "images_evaluation": {"C": 5}})
    run_dir = tmp_path / "run"
    proc = train(["task=omniglot_5w1s", f"data.root={tmp_path / 'data'}", "runtime=simulate", "runtime.vectorize=false",
                  "topology=ring", "topology.num_agents=2", "model.filters=4", "task.meta_batch=2", "task.q_query=2",
                  "task.eval_tasks=4", "task.final_eval_tasks=6", "train.iterations=4", "train.eval_every=2",
                  "maml.final_adapt_steps=2", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    for agent in summary["agents"]:
        assert 0.0 <= agent["final_test_accuracy"] <= 1.0 and agent["final_test_accuracy_ci95"] >= 0
        assert len(agent["accuracy_curve"]) == 3
    assert 0.0 <= summary["centroid_test_accuracy"] <= 1.0
    record = json.loads((run_dir / "metrics" / "agent1.jsonl").read_text().splitlines()[-1])
    assert "test_acc_post" in record
    proc = train(["task=omniglot_5w1s", "runtime=simulate", f"hydra.run.dir={tmp_path / 'r2'}"])
    assert proc.returncode == 2 and "needs the dataset: add data.root=DIR" in proc.stderr


TINY_CONV4 = ["model.filters=4", "task.q_query=2", "task.eval_tasks=2", "task.final_eval_tasks=3",
              "train.iterations=2", "train.eval_every=1", "maml.eval_inner_steps=2", "maml.final_adapt_steps=2"]


def test_miniimagenet_fixture_under_torchrun_three_agents(tmp_path):
    """task=miniimagenet_5w1s under torchrun, 3 agent processes on a ring, on a pickle fixture: every agent trains
    (5 inner steps), writes its metrics, and the summary holds accuracy curves for all three and the centroid.

    Catches the RGB family not wired into the per-process runtime (model input channels, 84x84 feature size, the
    mmap-loaded cache shared by the ranks) and missing per-agent figures."""
    from tests.test_miniimagenet import pickle_fixture

    pickle_fixture(tmp_path / "data", "train", classes=6, per_class=4)
    pickle_fixture(tmp_path / "data", "test", classes=5, per_class=4, first=6)
    run_dir = tmp_path / "run"
    proc = train(["task=miniimagenet_5w1s", f"data.root={tmp_path / 'data'}", *TINY_CONV4, "topology=ring",
                  "topology.num_agents=3", f"hydra.run.dir={run_dir}"], nproc=3)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [a["agent"] for a in summary["agents"]] == list(range(3))
    for agent in summary["agents"]:
        assert len(agent["accuracy_curve"]) == 3 and 0.0 <= agent["final_test_accuracy"] <= 1.0
    assert 0.0 <= summary["centroid_test_accuracy"] <= 1.0
    for k in range(3):
        last = json.loads((run_dir / "metrics" / f"agent{k}.jsonl").read_text().splitlines()[-1])
        assert last["iteration"] == 2 and "test_acc_post" in last


@pytest.mark.parametrize("case", ["n_way_above_classes", "missing_split", "missing_root", "cache_dir_unwritable"])
def test_bad_dataset_is_one_line_error(tmp_path, case):
    """A dataset that cannot serve the configured episodes, or a data.cache_dir that cannot take its cache, stops
    the run before it starts: exit 2, one line naming the file, the folder or the class count and what to change,
    no run directory left behind.

    Catches tracebacks from deep inside the data pipeline and half-created run directories."""
    from tests.test_miniimagenet import pickle_fixture

    data = tmp_path / "data"
    pickle_fixture(data, "train", classes=6, per_class=4)
    if case != "missing_split":
        pickle_fixture(data, "test", classes=5, per_class=4, first=6)
    args, expect = {
        "n_way_above_classes": (["task.n_way=7"], "7-way episodes need 7 classes, but only 6 are available; "
                                                  "lower task.n_way"),
        "missing_split": ([], f"MiniImagenet test split not found in {data}: expected mini-imagenet-cache-test.pkl"),
        "missing_root": ([f"data.root={tmp_path / 'nowhere'}"], f"MiniImagenet root {tmp_path / 'nowhere'} is "
                                                                f"not a folder; set data.root=DIR"),
        "cache_dir_unwritable": ([f"data.cache_dir={tmp_path / 'notes.txt' / 'cache'}"],  # below a file: even root
                                 f"cannot write the dataset cache into {tmp_path / 'notes.txt' / 'cache'} (Not a "
                                 f"directory): set data.cache_dir=DIR to a folder you can write to"),
    }[case]
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    run_dir = tmp_path / "run"
    proc = train(["task=miniimagenet_5w1s", f"data.root={data}", "runtime=simulate", *TINY_CONV4, *args,
                  f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert not run_dir.exists()


SWEEP = ["topology=ring", "topology.num_agents=3", "train.iterations=10", "train.eval_every=10", "task.eval_tasks=20",
         "maml.final_adapt_steps=2"]


@pytest.fixture(scope="module")
def torchrun_sweep(tmp_path_factory):
    """A finished two-job sweep (``-m``) under torchrun, three processes: read by the sweep tests below."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "sweep"
    proc = train(["-m", *SWEEP, "compression=topk,qsgd", f"hydra.sweep.dir={sweep_dir}"], nproc=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_sweep_under_torchrun_runs_every_job(torchrun_sweep):
    """``-m`` under torchrun: two jobs, one after the other in the same three processes, each with its own
    process group, run directory and summary. Catches every job forming its group under the same keys of
    torchrun's store (the second job waited on the first one's peers and hung) and ranks of one job writing to
    different folders (hydra's default sweep folder is named by the clock)."""
    sweep_dir = torchrun_sweep
    for job, name in enumerate(["topk", "qsgd"]):
        summary = json.loads((sweep_dir / str(job) / "summary.json").read_text())
        assert summary["compression"]["name"] == name and summary["iterations"] == 10
        assert (sweep_dir / str(job) / ".hydra" / "overrides.yaml").is_file()
        assert not (sweep_dir / str(job) / ".lock").exists()


def test_sweep_is_checked_like_a_single_run_before_anything_is_written(torchrun_sweep, tmp_path):
    """A sweep into a folder whose job 0 holds a finished run (the torchrun sweep's) is refused in one line, exit
    2, and neither that run's hydra record nor the sweep's ``multirun.yaml`` is rewritten (both said the new
    settings beside the old models); an unknown group option among a sweep's values and ``hydra.run.dir`` with
    ``-m`` (ignored by hydra, which wrote to ./multirun) are one line (hydra's multi-line error, exit 1).

    The first case goes through the real command: it shows that the entry point routes a sweep's refusals
    (``prepare_sweep``'s ValueError, whichever check raised it) to the one line and exit status 2 before hydra
    runs. The other two are ``prepare_sweep``'s own checks, called in this process as the command calls it."""
    from dif_maml_dist.comm.process import ProcessEnv
    from dif_maml_dist.run.launch import prepare_sweep

    sweep_dir = torchrun_sweep
    records = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file() and "logs" not in p.parts}
    proc = train(["-m", *SWEEP, "runtime=simulate", "compression=sign,randk", f"hydra.sweep.dir={sweep_dir}"],
                 cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("dif_maml_dist: error: ") \
        and f"{sweep_dir / '0'} already holds" in lines[0], proc.stderr
    assert {p: p.read_bytes() for p in records} == records
    assert not (tmp_path / "multirun").exists()
    cases = {
        "bogus": (["compression=topk,bogus", f"hydra.sweep.dir={tmp_path / 'new'}"], "unknown compression 'bogus'"),
        "run_dir": (["compression=topk,sign", f"hydra.run.dir={tmp_path / 'new'}"], "give hydra.sweep.dir=DIR"),
    }
    cwd_before = sorted(os.listdir(REPO))
    for name, (args, expect) in cases.items():
        with pytest.raises(ValueError) as refused:
            prepare_sweep([*SWEEP, "runtime=simulate", *args], ProcessEnv())
        message = str(refused.value)
        assert expect in message and "\n" not in message, (name, message)
    assert {p: p.read_bytes() for p in records} == records
    assert not (tmp_path / "new").exists() and sorted(os.listdir(REPO)) == cwd_before
