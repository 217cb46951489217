"""A user's own problem: their task family and model from the command line (``task._target_``,
``model._target_``), each agent's data in a folder of its own (``data.agent_root``), and the protocol's errors."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dif_maml_dist.learning import functional as functional_module
from dif_maml_dist.learning.batch import Losses, TaskBatch, make_loss
from dif_maml_dist.learning.functional import functional
from tests import user_code
from tests.helpers import REPO, free_port, maml, reference_meta_gradient, wait_until

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
    """A user's nn.Module with BatchNorm1d through the general path (traced), float64, 2 inner steps, second
    order: equal to plain autograd, one task at a time, on the model written out by hand with per-task batch
    statistics.

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

    losses = Losses(loss(model.forward), loss(model.first_order_forward), loss(model.batched_forward))
    grads, _ = maml(model.layout, 0.1, 2).meta_gradient(path, losses, params, batch, 1)
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


#: user modules, the shape of one example, and whether torch.fx traces them (else: functional_call)
GENERAL = [(user_code.Regressor, (1,), True), (BatchNormNet, (3,), True), (user_code.ConvBatchNorm, (1, 8, 8), True),
           (user_code.Standardised, (3,), True), (user_code.Tied, (3,), True), (user_code.ShapeBranch, (3,), False)]


def _user_model(cls):
    """The module as its author left it (float64, train mode: PyTorch's batch norm on each batch's statistics;
    batch norm not the identity transform, so a wrong normalisation shows), and the general path's model of a
    copy."""
    torch.manual_seed(0)
    pristine = cls().double().train()
    with torch.no_grad():
        for m in pristine.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return pristine, functional(copy.deepcopy(pristine))


@pytest.mark.parametrize("cls, shape, traced", GENERAL, ids=[c.__name__ for c, *_ in GENERAL])
def test_general_path_runs_a_module_as_the_module_itself(cls, shape, traced):
    """Each forward of the general path, on parameters other than the module's own, equals PyTorch running the
    module as written (functional_call; batch norm in training mode), on one batch and under vmap over tasks;
    torch.fx traces the module unless it cannot. Catches a parameter read from the module instead of the tuple,
    tied weights or a layer used twice mapped to the wrong entries, a buffer lost, batch norm on the wrong
    statistics or without its affine transform, and a module silently left on (or wrongly taken off) the trace."""
    pristine, model = _user_model(cls)
    assert model.kind == "module"
    assert isinstance(getattr(model.forward, "__self__", None), torch.fx.GraphModule) is traced
    g = torch.Generator().manual_seed(1)
    params = tuple(torch.randn(s, generator=g, dtype=torch.float64) for s in model.layout.shapes)
    xs = torch.randn(3, 5, *shape, generator=g, dtype=torch.float64)
    want = torch.stack([functional_call(pristine, dict(zip(model.layout.names, params)), (x,)) for x in xs])
    for forward in (model.forward, model.batched_forward, model.first_order_forward):
        torch.testing.assert_close(forward(params, xs[0]), want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.vmap(model.batched_forward, in_dims=(None, 0))(params, xs), want, rtol=1e-12,
                               atol=1e-12)
    own = tuple(p.detach() for p in model.module.parameters())
    torch.testing.assert_close(model.forward(own, xs[0]), pristine(xs[0]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls, shape, traced", GENERAL, ids=[c.__name__ for c, *_ in GENERAL])
def test_general_paths_meta_gradient_equals_plain_autograd_on_the_module(cls, shape, traced):
    """Second order, 2 inner steps, float64: the loop (its query loss through the first-order forward, as agents
    run it) and vmap over tasks through the general path equal plain autograd on the module as written
    (functional_call, PyTorch's batch norm), task by task, to 1e-10 relative. Catches a trace that is right in
    value but wrong in gradient (a parameter baked in as a constant, a tied weight's two uses not summed)."""
    pristine, model = _user_model(cls)
    flat = model.layout.flatten(dict(pristine.named_parameters())).detach()
    g = torch.Generator().manual_seed(2)
    batch = TaskBatch(*(torch.randn(4, n, *s, generator=g, dtype=torch.float64)
                        for n, s in ((6, shape), (6, (2,)), (7, shape), (7, (2,)))))
    want = reference_meta_gradient(pristine, flat, batch, 0.1, 2, False, F.mse_loss)
    losses = Losses(*(make_loss(f, F.mse_loss) for f in (model.forward, model.first_order_forward,
                                                         model.batched_forward)))
    for path in ("loop", "vmap"):
        grads, _ = maml(model.layout, 0.1, 2).meta_gradient(path, losses, model.layout.split(flat), batch, 1)
        rel = float((model.layout.join(grads) - want).norm() / want.norm())
        assert rel < 1e-10, (path, rel)


def test_an_untraceable_module_falls_back_and_says_so_once(monkeypatch, caplog):
    """A module torch.fx cannot trace runs through functional_call (slower), and the log says so once per module
    class, naming it and the reason; a traceable module says nothing. Catches a silent fallback and a note
    repeated per agent."""
    monkeypatch.setattr(functional_module, "_UNTRACEABLE_NOTED", set())
    with caplog.at_level(logging.WARNING, logger=functional_module.log.name):
        for cls in (user_code.ShapeBranch, user_code.ShapeBranch, user_code.Regressor):
            functional(cls())
    notes = [r.getMessage() for r in caplog.records if r.name == functional_module.log.name]
    assert len(notes) == 1, notes
    assert "tests.user_code.ShapeBranch cannot be traced" in notes[0] and "TraceError" in notes[0], notes[0]



@pytest.mark.parametrize("launch", ["agent_node", "torchrun_static"])
def test_each_agent_under_torchrun_reads_and_is_tested_on_its_own_folder_only(tmp_path, launch):
    """4 agents, one torchrun node each, each node started in a folder of its own that holds nothing but its own
    agent's data (``data.agent_root=sites/site{agent}``, relative): had any agent opened another agent's folder,
    it would not have found it there. ``agent_node``: the example's own family and model (examples/site_curves)
    under launch/agent_node.sh (agents that go on without a departed one), tested on a shared test folder each
    node holds. ``torchrun_static``: task=image_folder on each site's own class folders
    (examples/image_sites) under plain torchrun with a static rendezvous and no shared test folder, so each agent
    is tested on classes held out of its own and the centroid on the union of the agents' shares, each process
    adapting the centroid on its own agent's. Every figure equals the per-agent simulator's
    (runtime.vectorize=false: the same code in one process, reading every folder).

    Catches a process that checks, samples or tests on another agent's data (the start-up checks did), a relative
    agent_root resolved against the wrong folder, a user's family or model that does not reach the agents (their
    import path, their arguments), and a centroid tested on other tasks than the simulator's."""
    run_dir, port = tmp_path / "run", free_port()
    common = ["topology=ring", "topology.num_agents=4", "data.agent_root='sites/site{agent}'", "train.iterations=12",
              "train.eval_every=6", "task.eval_tasks=7", "task.final_eval_tasks=10"]
    if launch == "agent_node":
        data = make_sites(tmp_path / "all", 4)
        settings = [*CUSTOM, *common, "+model.args.width=16", "data.test_root=sites/test"]
    else:
        data = tmp_path / "all"
        subprocess.run([sys.executable, str(REPO / "examples" / "image_sites" / "make_images.py"), str(data),
                        "--sites", "4", "--classes", "4", "--test-classes", "3", "--images", "4", "--size", "16"],
                       check=True)
        settings = ["task=image_folder", *common, "task.n_way=3", "task.q_query=2", "task.image_size=16",
                    "model.filters=8", "task.meta_batch=2"]
    pythonpath = os.pathsep.join(filter(None, [str(EXAMPLE), str(REPO), os.environ.get("PYTHONPATH")]))
    nodes = []
    for k in range(4):
        node = tmp_path / f"node{k}"
        shutil.copytree(data / f"site{k}", node / "sites" / f"site{k}")
        if launch == "agent_node":
            shutil.copytree(data / "test", node / "sites" / "test")
            env = dict(os.environ, NUM_AGENTS="4", AGENT=str(k), MASTER=f"127.0.0.1:{port}", RUN_DIR=str(run_dir),
                       MAX_RESTARTS="0", PYTHONUNBUFFERED="1", TORCHRUN=f"{sys.executable} -m torch.distributed.run",
                       PYTHON=sys.executable, PYTHONPATH=pythonpath)
            command = ["bash", str(REPO / "launch" / "agent_node.sh"), *settings]
        else:
            env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath, XDG_CACHE_HOME=str(node / "cache"))
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=4", "--nproc-per-node=1",
                       "--rdzv-backend=static", f"--node-rank={k}", "--master-addr=127.0.0.1",
                       f"--master-port={port}", "-m", "dif_maml_dist.train", *settings, f"hydra.run.dir={run_dir}"]
        nodes.append(subprocess.Popen(command, cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
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
    assert all(agent["bytes_sent"] > 0 for agent in summary["agents"])
    if launch == "agent_node":
        saved = torch.load(run_dir / "models" / "agent0.pt", weights_only=True)
        assert saved["net.0.weight"].shape == (16, 1) and "net.1.running_mean" not in saved  # model.args reached it
        assert summary["parameters"] == sum(t.numel() for t in saved.values())  # continue mode's summary too
    sim_dir, home = tmp_path / "simulated", tmp_path / "everyone"
    home.mkdir()
    (home / "sites").symlink_to(data)
    proc = subprocess.run([sys.executable, "-m", "dif_maml_dist.train", "runtime=simulate", "runtime.vectorize=false",
                           *settings, f"hydra.run.dir={sim_dir}"], cwd=home, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=pythonpath, XDG_CACHE_HOME=str(home / "c")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    simulated = json.loads((sim_dir / "summary.json").read_text())
    for key in ("centroid_test_loss", "centroid_test_loss_pre", "centroid_adaptation_curve"):
        assert summary[key] == simulated[key], key
    assert ([a["adaptation_curve"] for a in summary["agents"]]
            == [a["adaptation_curve"] for a in simulated["agents"]])


@pytest.mark.parametrize("case", ["family_does_not_import", "family_lacks_a_member", "custom_without_target",
                                  "target_with_a_built_in_task", "model_output_does_not_fit",
                                  "classifier_of_the_wrong_width", "agent_folder_missing", "agent_folder_empty",
                                  "bad_csv_cell", "agent_data_for_a_shared_dataset", "no_held_out_tasks",
                                  "held_out_tasks_in_continue_mode", "sharing_with_agent_data"])
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
        "agent_data_for_a_shared_dataset": (["task=sinusoid", local[2]], "task=sinusoid reads one shared dataset "
                                            "(data.root); each agent's own data (data.agent_root) is read by task="),
        "no_held_out_tasks": (["task=custom", "task._target_=tests.user_code.SharedTestsOnly", *local[:3]],
                              "which tests.user_code.SharedTestsOnly does not provide (held_out_set"),
        "held_out_tasks_in_continue_mode": ([*CUSTOM, *local[:3], "runtime.on_peer_failure=continue"],
                                            "would read every agent's held-out data: set data.test_root=DIR"),
        "sharing_with_agent_data": (["task=image_folder", *local, "task.sharing=disjoint_classes"],
                                    "with data.agent_root each agent has data of its own: drop task.sharing"),
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


@pytest.mark.parametrize("run", ["site_curves", "image_sites"])
def test_the_readmes_examples_run_as_they_stand(tmp_path, run):
    """Each of the README's "Your own problem" example blocks (your own family and model; each site's own image
    folders), run verbatim by bash in a fresh folder beside a link to the repository's examples/ (the virtualenv
    first on PATH, as after the quick start): it makes the data and trains torchrun agents on it, and the run's
    summary exists with the figures of every agent.

    Catches the README's examples drifting from the code: a renamed option, a moved file, a family that no
    longer runs."""
    import re

    readme = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- example-check: [^>]*\(run: runs/{run}\) -->\s*\n\s*```bash\n(.*?)\n\s*```", readme,
                      re.S)
    assert block, f"the README lost its example-check block of runs/{run}"
    (tmp_path / "examples").symlink_to(REPO / "examples")
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.group(1)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900,
                          env=dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                                   XDG_CACHE_HOME=str(tmp_path / "cache")))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((tmp_path / "runs" / run / "summary.json").read_text())
    assert len(summary["agents"]) == summary["num_agents"] == {"site_curves": 4, "image_sites": 6}[run]
    assert summary["iterations"] == {"site_curves": 200, "image_sites": 50}[run]


def test_the_centroids_held_out_tasks_of_a_shorter_evaluation_are_a_prefix_of_a_longer_ones():
    """Each agent contributes held_out_share(n, agent, K) of its own held-out tasks to the centroid's n test
    tasks, interleaved (task j from agent j % K). For every n <= N and K the shares sum to n, never shrink as n
    grows, and the interleaved union of n is the first n of the union of N, as a shared test set's prefix is
    (the periodic figures are read off the final evaluation's head).

    Catches shares that do not add up (tasks dropped or doubled), and a union whose head is not the shorter
    evaluation's tasks (the last periodic record would then differ from an evaluation of its own)."""
    from dif_maml_dist.engine.learner import held_out_share, interleave_by_agent

    for k in range(1, 7):
        for big in range(1, 20):
            # agent a's held-out task i stands for itself: (a, i), as the curves of its loss and metric
            tags = [(torch.tensor([[a, i] for i in range(held_out_share(big, a, k))], dtype=torch.float),) * 2
                    for a in range(k)]
            union = interleave_by_agent([(t[0].view(-1, 2), t[1].view(-1, 2)) for t in tags], True)[0]
            assert union.shape[0] == big and [int(a) for a, _ in union] == [j % k for j in range(big)]
            for small in range(1, big + 1):
                shares = [held_out_share(small, a, k) for a in range(k)]
                assert sum(shares) == small and all(s <= held_out_share(big, a, k) for a, s in enumerate(shares))
                head = interleave_by_agent([(t[0][:s].view(-1, 2), t[1][:s].view(-1, 2))
                                            for t, s in zip(tags, shares)], False)[0]
                assert torch.equal(head, union[:small])


def test_a_users_family_and_model_resume_evaluate_and_adapt_like_the_built_ins(tmp_path, monkeypatch):
    """The whole user path with the example's family and BatchNorm model: 2 torchrun agents train 6 iterations,
    a second start extends the same run to 12 from its checkpoint (train.resume=true), and its figures equal an
    uninterrupted 12-iteration run's (the per-agent simulator: the same code in one process); ``evaluate`` on the
    finished run gives the summary's final centroid figures; ``load_run(...).model("centroid").adapt(...)`` on a
    user's own points equals one SGD step written out with plain autograd on the module itself.

    Catches a user's model or family that a resumed start rebuilds differently (other initialisation, other
    task streams), ``evaluate`` or ``load_run`` that cannot rebuild a user's family from the run's config, and
    an adaptation that treats batch norm differently from training (running statistics, a frozen module)."""
    from dif_maml_dist import load_run

    monkeypatch.syspath_prepend(str(EXAMPLE))
    import site_curves

    sites = make_sites(tmp_path / "sites", 2)
    pythonpath = os.pathsep.join(filter(None, [str(EXAMPLE), str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath)
    common = [*CUSTOM, "topology=ring", "topology.num_agents=2", f"data.agent_root='{sites}/site{{agent}}'",
              f"data.test_root={sites / 'test'}", "train.eval_every=3", "train.checkpoint_every=3",
              "task.eval_tasks=6", "+model.args.width=8"]
    run_dir, reference = tmp_path / "run", tmp_path / "uninterrupted"

    def train(*args: str) -> None:
        proc = subprocess.run([*args, *common], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                "dif_maml_dist.train", f"hydra.run.dir={run_dir}"]
    train(*torchrun, "train.iterations=6")
    train(*torchrun, "train.iterations=12", "train.resume=true")
    train(sys.executable, "-m", "dif_maml_dist.train", "runtime=simulate", "runtime.vectorize=false",
          f"hydra.run.dir={reference}", "train.iterations=12")
    summary, want = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert summary["centroid_adaptation_curve"] == want["centroid_adaptation_curve"]
    assert [a["adaptation_curve"] for a in summary["agents"]] == [a["adaptation_curve"] for a in want["agents"]]

    proc = subprocess.run([sys.executable, "-m", "dif_maml_dist.evaluate", str(run_dir), "--json",
                           str(tmp_path / "evaluation.json")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    evaluated = json.loads((tmp_path / "evaluation.json").read_text())["models"]["centroid"]
    assert evaluated["loss"] == pytest.approx(summary["centroid_adaptation_curve"], rel=1e-5)

    run = load_run(run_dir)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(10, 1, generator=gen) * 10 - 5
    y = 2.0 * torch.sin(x - 0.5)
    adapted = run.model("centroid").adapt(x[:5], y[:5], steps=1)
    net = site_curves.CurveNet(8)
    named = torch.load(run_dir / "models" / "centroid.pt", weights_only=True)
    net.load_state_dict(named, strict=False)  # the saved model holds parameters only, no running statistics
    net.train()  # batch norm on the batch's own statistics, as the runtime adapts
    loss = F.mse_loss(net(x[:5]), y[:5])
    grads = torch.autograd.grad(loss, list(net.parameters()))
    stepped = {n: p - run.cfg.maml.inner_lr * g for (n, p), g in zip(net.named_parameters(), grads)}
    want = torch.func.functional_call(net, stepped, (x[5:],))
    torch.testing.assert_close(adapted(x[5:]), want, rtol=1e-5, atol=1e-6)
