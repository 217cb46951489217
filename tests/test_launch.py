"""The launch scripts in launch/: multi-node through torchrun's c10d rendezvous (two "nodes" on this machine)
against one node, and their one-line usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, free_port

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


#: The float64 six-agent job whose figures the implementation before the rewrite recorded (commit c675836).
REFERENCE_RUN = ["seed=3", "train.dtype=float64", "train.iterations=40", "train.eval_every=20", "train.log_every=10",
                 "task.eval_tasks=100"]


@pytest.fixture(scope="module")
def one_node_of_six(tmp_path_factory):
    """The reference run through launch/single_node.sh (6 processes on one node), shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("one_node") / "run"
    finish(script("single_node.sh", REFERENCE_RUN, NPROC_PER_NODE="6", RUN_DIR=str(run_dir)))
    return run_dir


def test_float64_job_reproduces_the_implementation_before_the_rewrite(one_node_of_six):
    """A float64 6-agent torchrun job gives the figures the pre-rewrite implementation gave (commit c675836: flat
    parameters through functional_call, one backward over all tasks, rank 0 evaluating the centroid alone) to
    1e-10: the meta-gradient paths, the written-out forwards, the evaluation shared among ranks and the last
    record read off the final evaluation must not change what a run computes. The expected figures were recorded
    by running that commit (tests/data/sinusoid_float64_before_issue10.json says how)."""
    expected = json.loads((REPO / "tests" / "data" / "sinusoid_float64_before_issue10.json").read_text())
    got = json.loads((one_node_of_six / "summary.json").read_text())
    close = dict(rel=1e-10, abs=1e-13)
    assert got["centroid_test_loss"] == pytest.approx(expected["centroid_test_loss"], **close)
    assert got["centroid_adaptation_curve"] == pytest.approx(expected["centroid_adaptation_curve"], **close)
    assert got["disagreement"] == pytest.approx(expected["disagreement"], **close)
    for a, b in zip(got["agents"], expected["agents"], strict=True):
        assert a["final_test_loss"] == pytest.approx(b["final_test_loss"], **close)
        assert a["adaptation_curve"] == pytest.approx(b["adaptation_curve"], **close)
    network = [json.loads(line) for line in (one_node_of_six / "metrics" / "network.jsonl").read_text().splitlines()]
    assert len(network) == len(expected["network"])
    for a, b in zip(network, expected["network"]):
        assert a["iteration"] == b["iteration"]
        for key in ("centroid_test_loss_pre", "centroid_test_loss_post", "disagreement"):
            assert a[key] == pytest.approx(b[key], **close)


def test_two_nodes_of_three_agents_equal_one_node_of_six(one_node_of_six, tmp_path):
    """Two torchrun invocations (--nnodes=2, 3 processes each, c10d rendezvous on 127.0.0.1) through
    launch/multi_node.sh train the same six agents as launch/single_node.sh with 6 processes: every agent's final
    parameters are bit-identical, and all of them write into the one run directory.

    Catches agent ids taken from the local rank instead of the global one, a topology or seed stream that depends
    on how agents are spread over nodes, and ranks of the second node writing elsewhere."""
    port = free_port()
    nodes = [script("multi_node.sh", REFERENCE_RUN, NNODES="2", NPROC_PER_NODE="3",
                    RDZV_ENDPOINT=f"127.0.0.1:{port}", RUN_ID=f"two-nodes-{port}", RUN_DIR=str(tmp_path / "two"))
             for _ in range(2)]
    for node in nodes:
        finish(node)

    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    one = json.loads((one_node_of_six / "summary.json").read_text())
    assert [a["agent"] for a in two["agents"]] == list(range(6))
    for a, b in zip(two["agents"], one["agents"]):
        assert a["adaptation_curve"] == b["adaptation_curve"] and a["bytes_sent"] == b["bytes_sent"]
    for k in range(6):
        mine = torch.load(tmp_path / "two" / "models" / f"agent{k}.pt", weights_only=True)
        ref = torch.load(one_node_of_six / "models" / f"agent{k}.pt", weights_only=True)
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


# ------------------------------------------------------------------------------- refusals before and under torchrun
RING2 = ["topology=ring", "topology.num_agents=2"]
LR_ERROR = "dif_maml_dist: error: optim.lr must be a positive number, got 0.0 (the meta step size mu)"


def refused(name: str, args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """A launch script that should stop at once; one that hangs (waiting in a rendezvous) is killed, with its
    torchrun and workers, and fails the test."""
    import signal

    base = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RUN_ID")}
    proc = subprocess.Popen(["bash", str(REPO / "launch" / name), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env=dict(base, TORCHRUN=TORCHRUN, PYTHONUNBUFFERED="1", **env))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{name} was still running after {timeout} s instead of refusing the launch:\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def launch_env(name: str, nproc: int, run_dir) -> dict:
    """Settings of a launch of ``nproc`` agent processes, all on this machine, through launch script ``name``."""
    if name == "single_node.sh":
        return {"NPROC_PER_NODE": str(nproc), "RUN_DIR": str(run_dir)}
    if name == "multi_node.sh":
        return {"NNODES": "1", "NPROC_PER_NODE": str(nproc), "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
                "RUN_ID": "preflight", "RUN_DIR": str(run_dir)}
    return {"NUM_AGENTS": str(nproc), "AGENT": "0", "MASTER": f"127.0.0.1:{free_port()}", "RUN_DIR": str(run_dir)}


@pytest.mark.parametrize("name", ["single_node.sh", "multi_node.sh", "agent_node.sh"])
def test_launch_scripts_report_a_config_mistake_in_one_line_with_exit_2(tmp_path, name):
    """A config mistake given to a launch script: the project's one line, exit status 2, no run directory.

    Catches the mistake reaching torchrun, which then adds its ~40-line ChildFailedError report and exits 1
    whatever the worker's status (README promised 2)."""
    proc = refused(name, [*RING2, "optim.lr=0"], **launch_env(name, 2, tmp_path / "run"))
    assert (proc.returncode, proc.stderr.strip(), proc.stdout) == (2, LR_ERROR, "")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, env, expect", [
    ("single_node.sh", {"NPROC_PER_NODE": "4"}, "NPROC_PER_NODE=4 starts 4 process(es)"),
    ("multi_node.sh", {"NNODES": "2", "NPROC_PER_NODE": "2"}, "NNODES=2 x NPROC_PER_NODE=2 starts 4 process(es)"),
    ("agent_node.sh", {"NUM_AGENTS": "4"}, "NUM_AGENTS=4 starts 4 process(es)"),
])
def test_launch_scripts_refuse_a_process_count_other_than_the_topologys(tmp_path, name, env, expect):
    """The paper's 6-agent graph launched with 4 processes: one line naming the script's own setting, exit 2,
    before torchrun starts.

    Catches the count reaching torchrun: there every worker refuses it under torchrun's report (exit 1), and a
    multi-node launch waits in a rendezvous for nodes that will never come."""
    proc = refused(name, [], timeout=90, **{**launch_env(name, 4, tmp_path / "run"), **env})
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"dif_maml_dist: error: topology 'paper6' has 6 agents but {expect}: start 6 "
                                   f"(or choose a topology with 4 agents, or runtime=simulate)")
    assert not (tmp_path / "run").exists()


def test_preflight_prints_the_agent_count_and_writes_nothing(tmp_path):
    """``python -m dif_maml_dist.preflight`` on a good config: the topology's agent count on stdout, nothing on
    stderr, and no run directory (no lock, no hydra record).

    Catches a pre-flight that takes the run directory (the job it precedes would then find it in use) or that
    cannot be run on its own."""
    proc = subprocess.run([sys.executable, "-m", "dif_maml_dist.preflight", "--nproc", "2", *RING2,
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "2\n", "")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("finished_run", [False, True], ids=["config-mistake", "dir-holds-a-run"])
def test_torchrun_restarts_neither_repeat_nor_retry_a_refused_start(tmp_path, finished_run):
    """torchrun --max-restarts=1 and a start refused for a user mistake: the message once, not once per attempt,
    and the refusal stands in the restarted attempt.

    Catches the restart printing the error again (config mistake) and, worse, the restart taking the run
    directory of another, finished run for its own to resume, overwriting that run's summary (a restart skips
    the check that the directory holds no run)."""
    run = tmp_path / "run"
    if finished_run:
        run.mkdir()
        (run / "summary.json").write_text('{"theirs": true}')
    args = SHORT_RUN if finished_run else ["optim.lr=0"]
    proc = subprocess.run([*TORCHRUN.split(), "--standalone", "--nproc-per-node=2", "--max-restarts=1", "-m",
                           "dif_maml_dist.train", *RING2, *args, f"hydra.run.dir={run}"], cwd=REPO, text=True,
                          capture_output=True, timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("dif_maml_dist:")]
    assert proc.returncode != 0 and len(ours) == 1, proc.stderr[-3000:]
    if finished_run:
        assert "already holds a run" in ours[0]
        assert [p.name for p in run.iterdir()] == ["summary.json"]
        assert (run / "summary.json").read_text() == '{"theirs": true}'
    else:
        assert ours == [LR_ERROR] and not run.exists()


# ------------------------------------------------------------------------------- experiment scripts' run folders
def experiment(script_name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / script_name), *args], cwd=REPO, text=True,
                          capture_output=True, timeout=300)


def summaries(runs) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runs.rglob("summary.json"))]


def compression(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return experiment("reproduce_compression.py", "--agents", "2", "--seeds", "0", "--only", "none", "--jobs", "1",
                      "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *args)


@pytest.fixture(scope="module")
def compression_two_iterations(tmp_path_factory):
    """``reproduce_compression.py --iterations 2`` run once into a folder of its own (its runs/ and out/); the
    tests below work on copies of it."""
    base = tmp_path_factory.mktemp("compression")
    first = compression(base, "--iterations", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    return base


def _copy_of(base, tmp_path):
    import shutil

    for name in ("runs", "out"):
        if (base / name).exists():
            shutil.copytree(base / name, tmp_path / name)


def test_reproduce_compression_runs_again_when_a_setting_changes(compression_two_iterations, tmp_path):
    """--iterations 3 after --iterations 2 (a copy of the module's 2-iteration call): a new run, and its figures
    in the table.

    Catches run folders named by graph, setting and seed only, which made the second call report the first
    call's 2-iteration figures as the 3-iteration ones, silently."""
    _copy_of(compression_two_iterations, tmp_path)
    second = compression(tmp_path, "--iterations", "3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(s["iterations"] for s in summaries(tmp_path / "runs")) == [2, 3]
    again = compression(tmp_path, "--iterations", "3")  # unchanged settings: the finished run is reused
    assert again.returncode == 0 and len(summaries(tmp_path / "runs")) == 2, again.stderr[-3000:]


def test_reproduce_compression_retries_a_crashed_run_and_keeps_its_files(compression_two_iterations, tmp_path):
    """A run folder left without summary.json (a crashed or killed run; here a copy of the module's 2-iteration
    call with its summary removed): the next call runs it afresh, and the crashed run's files are moved aside,
    not deleted.

    Catches a crashed run's folder refusing every retry (the run directory already holds metrics), so that its
    setting stayed without results for good."""
    _copy_of(compression_two_iterations, tmp_path)
    (done,) = (tmp_path / "runs").rglob("summary.json")
    done.unlink()  # as if the run had died before writing it
    retry = compression(tmp_path, "--iterations", "2")
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert (done.parent / "summary.json").is_file()
    (aside,) = [p for p in done.parent.parent.iterdir() if p.is_dir() and p != done.parent]
    assert (aside / "metrics" / "network.jsonl").is_file() and not (aside / "summary.json").exists()


def test_reproduce_compression_exits_non_zero_when_a_run_fails(tmp_path):
    """A run that fails (here: a ring of 0 agents, refused): the script's exit status is not 0.

    Catches a failure reported only as a line among the runs' progress, with exit status 0, so that a
    script or CI calling it took the missing results for a success."""
    proc = experiment("reproduce_compression.py", "--agents", "0", "--seeds", "0", "--only", "none", "--jobs", "1",
                      "--iterations", "2", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "1 run(s) failed" in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]


def test_churn_study_runs_again_when_a_setting_changes(tmp_path):
    """churn_study.py with --iterations 3 after --iterations 2: a new run, not the 2-iteration one.

    Catches run folders named by agents, topology, fraction and seed only (the same bug as the compression
    script's)."""
    for iterations in ("2", "3"):
        proc = experiment("churn_study.py", "--agents", "4", "--topology", "ring", "--iterations", iterations,
                          "--fractions", "0", "--seeds", "0", "--threads", "1", "--runs", str(tmp_path / "runs"))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(s["iterations"] for s in summaries(tmp_path / "runs")) == [2, 3]
