"""A user's own problem: their task family and model from the command line (``task._target_``,
``model._target_``), each agent's data in a folder of its own (``data.agent_root``), and the protocol's errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dif_maml_dist.learning.maml import TaskBatch, meta_gradient
from dif_maml_dist.learning.models import functional
from tests.helpers import REPO, free_port, wait_until

EXAMPLE = REPO / "examples" / "site_curves"
#: the example's family and model, as a user names them
CUSTOM = ["task=custom", "task._target_=site_curves.SiteCurves", "model._target_=site_curves.CurveNet"]


def make_sites(out: Path, sites: int) -> Path:
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), str(out), "--sites", str(sites), "--devices", "6",
                    "--rows", "30"], check=True)
    return out


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


def _reference_forward(p, x):
    """BatchNormNet written out: batch norm on the batch's own statistics (biased variance), as MAML does."""
    h = F.linear(x, p[0], p[1])
    mean, var = h.mean(0, keepdim=True), h.var(0, unbiased=False, keepdim=True)
    h = F.relu((h - mean) / torch.sqrt(var + 1e-5) * p[2] + p[3])
    return F.linear(h, p[4], p[5])


@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_any_modules_meta_gradient_equals_a_written_out_reference(path):
    """A user's nn.Module with BatchNorm1d through the general path (functional_call), float64, 2 inner steps,
    second order: equal to plain autograd, one task at a time, on the model written out by hand with per-task
    batch statistics.

    Catches running statistics leaking in (the module's buffers instead of the task's own statistics), PyTorch's
    batch-norm kernel under vmap (inexact: 1e-4 to 1e-2), and parameters matched to the wrong names."""
    torch.manual_seed(0)
    module = BatchNormNet().double()
    with torch.no_grad():  # not the identity transform, so a wrong normalisation shows
        module.net[1].weight.uniform_(0.5, 1.5)
        module.net[1].bias.uniform_(-0.5, 0.5)
    model = functional(module)
    params = tuple(p.detach().clone() for p in module.parameters())
    gen = torch.Generator().manual_seed(1)
    batch = TaskBatch(torch.randn(4, 6, 3, generator=gen, dtype=torch.float64),
                      torch.randn(4, 6, 2, generator=gen, dtype=torch.float64),
                      torch.randn(4, 7, 3, generator=gen, dtype=torch.float64),
                      torch.randn(4, 7, 2, generator=gen, dtype=torch.float64))

    def loss(forward):
        return lambda p, x, y: F.mse_loss(forward(p, x), y)

    grads, _ = meta_gradient(path, loss(model.forward), loss(model.batched_forward), params, batch, 0.1, 2)
    expected = [torch.zeros_like(p) for p in params]
    for t in range(len(batch)):
        theta = [p.clone().requires_grad_() for p in params]
        adapted = list(theta)
        for _ in range(2):
            g = torch.autograd.grad(loss(_reference_forward)(adapted, batch.support_x[t], batch.support_y[t]),
                                    adapted, create_graph=True)
            adapted = [a - 0.1 * gi for a, gi in zip(adapted, g)]
        for e, g in zip(expected, torch.autograd.grad(
                loss(_reference_forward)(adapted, batch.query_x[t], batch.query_y[t]), theta)):
            e += g / len(batch)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_user_family_under_torchrun_reads_each_agents_own_folder_only(tmp_path):
    """The example family and model (examples/site_curves) on 4 agents, one torchrun node each
    (launch/agent_node.sh), each node started in a folder of its own that holds only its own agent's data and the
    test devices (``data.agent_root=sites/site{agent}``, relative): had any agent opened another agent's folder, it
    would not have found it there. Every agent trains, writes its figures, and the network's figures exist.

    Catches a process that checks or samples every agent's data (the start-up checks did), a relative
    agent_root resolved against the wrong folder, and a user's family or model that does not reach the agents
    (their import path, their arguments)."""
    data = make_sites(tmp_path / "all", 4)
    run_dir, port = tmp_path / "run", free_port()
    nodes = []
    for k in range(4):
        node = tmp_path / f"node{k}"
        shutil.copytree(data / f"site{k}", node / "sites" / f"site{k}")
        shutil.copytree(data / "test", node / "sites" / "test")
        env = dict(os.environ, NUM_AGENTS="4", AGENT=str(k), MASTER=f"127.0.0.1:{port}", RUN_DIR=str(run_dir),
                   MAX_RESTARTS="0", PYTHONUNBUFFERED="1", TORCHRUN=f"{sys.executable} -m torch.distributed.run",
                   PYTHON=sys.executable,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(EXAMPLE), str(REPO), os.environ.get("PYTHONPATH")])))
        nodes.append(subprocess.Popen(
            ["bash", str(REPO / "launch" / "agent_node.sh"), *CUSTOM, "topology=ring", "topology.num_agents=4",
             "data.agent_root='sites/site{agent}'", "data.test_root=sites/test", "train.iterations=20",
             "train.eval_every=10", "task.eval_tasks=20", "+model.args.width=16"],
            cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        wait_until(lambda: all(n.poll() is not None for n in nodes), lambda: (run_dir / "metrics").exists()
                   and sum(p.stat().st_size for p in (run_dir / "metrics").glob("*.jsonl")),
                   "the four nodes did not finish")
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    outputs = [n.communicate()[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0] * 4, "\n".join(o[-1500:] for o in outputs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [a["agent"] for a in summary["agents"]] == [0, 1, 2, 3]
    saved = torch.load(run_dir / "models" / "agent0.pt", weights_only=True)
    assert saved["net.0.weight"].shape == (16, 1) and "net.1.running_mean" not in saved  # model.args reached it
    for agent in summary["agents"]:
        assert len(agent["adaptation_curve"]) > 1 and agent["bytes_sent"] > 0
    assert isinstance(summary["centroid_test_loss"], float)


@pytest.mark.parametrize("case", ["family_does_not_import", "family_lacks_a_member", "custom_without_target",
                                  "target_with_a_built_in_task", "model_output_does_not_fit",
                                  "classifier_of_the_wrong_width", "agent_folder_missing", "agent_folder_empty",
                                  "bad_csv_cell"])
def test_a_users_mistake_is_one_line_naming_it(tmp_path, monkeypatch, case):
    """Each mistake in a user's family, model or data is refused before anything is written, in one line that
    names it (the member missing, the agent and the folder, the file and line). The CLI's exit status and
    printing of such lines are checked through the real command for the missing folder.

    Catches tracebacks from the user's code reaching the user, a missing member found only mid-run, a model whose
    output size is wrong training anyway, and an agent's missing data reported without saying whose."""
    from dif_maml_dist.comm.process import ProcessEnv
    from dif_maml_dist.run.launch import prepare

    monkeypatch.syspath_prepend(str(EXAMPLE))
    sites = make_sites(tmp_path / "sites", 3)
    local = ["topology=ring", "topology.num_agents=3", f"data.agent_root='{sites}/site{{agent}}'",
             f"data.test_root={sites / 'test'}"]
    if case == "agent_folder_missing":
        shutil.rmtree(sites / "site2")
    if case == "agent_folder_empty":
        shutil.rmtree(sites / "site1")
        (sites / "site1").mkdir()
    if case == "classifier_of_the_wrong_width":
        from tests.test_omniglot import make_fixture

        make_fixture(tmp_path / "omniglot", {"images_background": {"A": 15, "B": 10}, "images_evaluation": {"C": 5}})
    if case == "bad_csv_cell":
        (sites / "site0" / "device003.csv").write_text("x,y\n0.5,1.0\n0.7,oops\n")
    args, expect = {
        "family_does_not_import": (["task=custom", "task._target_=no_such_pkg.Family"],
                                   "task._target_=no_such_pkg.Family does not import (No module named 'no_such_pkg')"),
        "family_lacks_a_member": (["task=custom", "task._target_=tests.user_code.NoSampler"],
                                  "NoSampler lacks sampler of the task-family protocol"),
        "custom_without_target": (["task=custom"], "task=custom needs your family's class: add task._target_="),
        "target_with_a_built_in_task": (["task._target_=site_curves.SiteCurves"],
                                        "use task=custom task._target_=site_curves.SiteCurves"),
        "model_output_does_not_fit": (["model._target_=tests.user_code.TwoOutputs"],
                                      "model._target_=tests.user_code.TwoOutputs does not fit the task"),
        "classifier_of_the_wrong_width": (["task=omniglot_5w1s", f"data.root={tmp_path / 'omniglot'}",
                                           "model._target_=tests.user_code.ThreeWay"],
                                          "gives 3 scores per example, but the tasks are 5-way (task.n_way)"),
        "agent_folder_missing": ([*CUSTOM, *local], f"agent 2: data folder {sites / 'site2'} does not exist"),
        "agent_folder_empty": ([*CUSTOM, *local], f"agent 1: data folder {sites / 'site1'} is empty"),
        "bad_csv_cell": ([*CUSTOM, *local], f"agent 0: {sites / 'site0' / 'device003.csv'}:3: expected numbers"),
    }[case]
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError) as refused:
        prepare(["runtime=simulate", *args, f"hydra.run.dir={run_dir}"], ProcessEnv())
    message = str(refused.value)
    assert expect in message and "\n" not in message, message
    assert not run_dir.exists()
    if case == "agent_folder_missing":  # the same through the command: exit status 2, that one line
        proc = subprocess.run([sys.executable, "-m", "dif_maml_dist.train", "runtime=simulate", *args,
                               f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(EXAMPLE), str(REPO)])))
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"dif_maml_dist: error: {message}"]
        assert not run_dir.exists()


def test_the_readmes_example_runs_as_it_stands(tmp_path):
    """The README's "Your own problem" example block, run verbatim by bash in a fresh folder beside a link to the
    repository's examples/ (the virtualenv first on PATH, as after the quick start): it makes the data and trains
    4 torchrun agents on it, and the run's summary exists.

    Catches the README's example drifting from the code: a renamed option, a moved file, a family that no longer
    runs."""
    import re

    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- example-check: [^>]*-->\s*\n```bash\n(.*?)\n```", readme, re.S)
    assert block, "the README lost its example-check block"
    (tmp_path / "examples").symlink_to(REPO / "examples")
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.group(1)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900,
                          env=dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((tmp_path / "runs" / "site_curves" / "summary.json").read_text())
    assert summary["num_agents"] == 4 and summary["iterations"] == 200
