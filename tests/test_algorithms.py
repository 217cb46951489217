"""The meta-learning algorithms (maml.algorithm, MAML++'s options) against references written out from their papers'
equations: plain autograd on the module itself (functional_call), one task at a time, named parameters, nothing
from learning.adaptation or learning.algorithms. Their runs under gloo are checked against the simulator in
tests/test_distributed.py (VARIANTS)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dif_maml_dist import load_run, seeding
from dif_maml_dist.config import Config, TaskConfig, TopologyConfig
from dif_maml_dist.evaluate import main as evaluate_main
from dif_maml_dist.graphs.topology import build_topology, strategy_weights
from dif_maml_dist.learning.adaptation import RATE_PREFIX, adaptation_curves, adaptation_curves_loop
from dif_maml_dist.learning.algorithms import step_loss_weights
from dif_maml_dist.learning.batch import Losses, make_loss
from dif_maml_dist.learning.flat import FlatLayout
from dif_maml_dist.learning.functional import functional
from dif_maml_dist.learning.models import MLP
from dif_maml_dist.run.validate import validate
from dif_maml_dist.tasks import SinusoidTasks
from tests.helpers import REPO, maml, reference_sgd_run, simulated_states, small_config
from tests.test_conv4 import _conv4_problem

#: name -> (MamlConfig fields, what the reference does); inner steps 2 wherever the algorithm has a per-step part
CASES = {
    "maml": ({}, {}),
    "fomaml": ({"first_order": True}, {"first_order": True}),
    "anil": ({"algorithm": "anil"}, {"head_only": True}),
    "anil-first-order": ({"algorithm": "anil", "first_order": True}, {"head_only": True, "first_order": True}),
    "metasgd": ({"algorithm": "metasgd"}, {"rates": "per_parameter"}),
    "lslr": ({"learned_inner_lr": "per_layer_per_step"}, {"rates": "per_layer_per_step"}),
    # at iteration 5 of 10: the multi-step weights half-way annealed (checked by hand in test_step_loss_weights)
    "msl": ({"multi_step_loss": True, "multi_step_loss_until": 10}, {"weights": (0.2575, 0.7425)}),
    "mamlpp": ({"learned_inner_lr": "per_layer_per_step", "multi_step_loss": True, "multi_step_loss_until": 10},
               {"rates": "per_layer_per_step", "weights": (0.2575, 0.7425)}),
    "reptile": ({"algorithm": "reptile"}, {"reptile": True}),
}
ITERATION = 5
PAPER6 = build_topology(TopologyConfig(name="paper6"))


def reference(module, flat: torch.Tensor, rates: dict, batch, alpha: float, steps: int, criterion, head_only=False,
              first_order=False, rates_kind=None, weights=None, reptile=False):
    """The algorithm's update direction, written out: per task, ``steps`` inner steps
    ``theta_n <- theta_n - rate_n(k) * dL_support/dtheta_n`` on the adapted names (all, or the last layer's), the
    rate alpha, a learned rate per weight (Meta-SGD) or per name and step (MAML++'s LSLR); MAML: the gradient of
    sum_k weight_k * L_query(theta_k) with respect to the weights and the rates; Reptile: w - theta_K. Task mean.
    Returns (gradient of the weights, gradient of each rate by name)."""
    layout = FlatLayout.of(module)
    w = {n: t.detach().clone().requires_grad_(True) for n, t in layout.unflatten(flat).items()}
    r = {n: t.detach().clone().requires_grad_(True) for n, t in rates.items()}
    names = list(w)
    adapted = [n for n in names if n.rsplit(".", 1)[0] == names[-1].rsplit(".", 1)[0]] if head_only else names
    weights = weights or (0.0,) * (steps - 1) + (1.0,)
    total, deltas = 0, {n: torch.zeros_like(t) for n, t in w.items()}
    for t in range(len(batch)):
        xs, ys, xq, yq = (a[t] for a in batch.tensors())
        theta = dict(w)
        for k in range(steps):
            support = criterion(torch.func.functional_call(module, theta, (xs,)), ys)
            grads = torch.autograd.grad(support, [theta[n] for n in adapted],
                                        create_graph=not (first_order or reptile))
            for n, g in zip(adapted, grads):
                rate = alpha if rates_kind is None else r[n] if rates_kind == "per_parameter" else r[n][k]
                theta[n] = theta[n] - rate * g
            if not reptile:
                total = total + weights[k] * criterion(torch.func.functional_call(module, theta, (xq,)), yq)
        if reptile:
            for n in names:
                deltas[n] += (w[n] - theta[n]).detach()
    if reptile:
        return torch.cat([deltas[n].reshape(-1) for n in names]) / len(batch), {}
    grads = torch.autograd.grad(total / len(batch), [w[n] for n in names] + list(r.values()))
    return (torch.cat([g.reshape(-1) for g in grads[:len(names)]]),
            {n: g for n, g in zip(r, grads[len(names):])})


def _learned_rates(algorithm, alpha: float, seed: int = 4) -> dict:
    """Learned rates spread around alpha (so that a rate applied to the wrong weight or step shows), by model
    name."""
    layout, inner = algorithm.inner.layout, algorithm.inner
    g = torch.Generator().manual_seed(seed)
    n = len(inner.model.names)
    return {name[len(RATE_PREFIX):]: alpha * (0.5 + torch.rand(shape, generator=g, dtype=torch.float64))
            for name, shape in zip(layout.names[n:], layout.shapes[n:])}


def _check(module, flat, batch, alpha, steps, criterion, case, path, chunk=None):
    fields, ref_options = CASES[case][0], dict(CASES[case][1])
    fm = functional(module)
    algorithm = maml(fm.layout, alpha, steps, **fields)
    rates = _learned_rates(algorithm, alpha)
    state = torch.cat([flat, *(t.reshape(-1) for t in rates.values())])
    losses = Losses(make_loss(fm.forward, criterion), make_loss(fm.first_order_forward, criterion),
                    make_loss(fm.batched_forward, criterion))
    grads, _ = algorithm.meta_gradient(path, losses, algorithm.inner.layout.split(state), batch, ITERATION, chunk)
    got = algorithm.inner.layout.join(grads)
    kind = ref_options.pop("rates", None)
    want_w, want_r = reference(module, flat, rates, batch, alpha, steps, criterion, rates_kind=kind, **ref_options)
    want = torch.cat([want_w, *(g.reshape(-1) for g in want_r.values())])
    assert got.shape == want.shape == state.shape
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-10, (case, path, rel)
    return got


def _mlp_problem(tasks=4):
    model = MLP(1, [40, 40], 1).double()
    flat = FlatLayout.of(model).flatten(dict(model.named_parameters())).detach()
    batch = SinusoidTasks(TaskConfig(num_support=7, num_query=9)).sample(seeding.generator(0, 5), tasks)
    return model, flat, batch


@pytest.mark.parametrize("path, chunk", [("loop", None), ("vmap", None), ("vmap", 3)])
@pytest.mark.parametrize("case", list(CASES))
def test_every_algorithm_equals_its_written_out_reference_on_the_mlp(case, path, chunk):
    """Each algorithm's update direction on the sinusoid MLP (2 inner steps, 4 tasks, float64), by both paths and
    in chunks, equals its reference to 1e-10, learned rates' gradients included. Catches ANIL adapting the body
    (or its body getting no gradient through the features), a learned rate applied to the wrong weight or step,
    rates without a meta-gradient, multi-step weights not applied, Reptile's direction of the wrong sign or
    scale, and a path or chunk that drops a task."""
    model, flat, batch = _mlp_problem()
    _check(model, flat, batch, 0.05, 2, F.mse_loss, case, path, chunk)


@pytest.mark.parametrize("case", ["anil", "metasgd", "mamlpp", "reptile"])
def test_every_algorithm_equals_its_written_out_reference_on_conv4(case):
    """The same on Conv4 (Omniglot-shaped, 8 filters, 3 tasks, float64, alpha 0.4; MAML++: 2 inner steps): the
    per-task loop (native batch norm, channels-last query loss, as agents run it) and vmap in chunks of 2
    (written-out batch norm). MAML itself: tests/test_conv4.py."""
    model, flat, batch = _conv4_problem()
    steps = 2 if case == "mamlpp" else 1
    loop = _check(model, flat, batch, 0.4, steps, F.cross_entropy, case, "loop")
    vmap = _check(model, flat, batch, 0.4, steps, F.cross_entropy, case, "vmap", chunk=2)
    assert loop.abs().sum() > 0 and not torch.equal(loop, torch.zeros_like(vmap))


def test_step_loss_weights():
    """MAML++'s multi-step loss weights, by hand: equal at the start, non-final ones down to 0.03/K at the end of
    the annealing and after it, half-way between at its middle, always summing to 1; without the option, the last
    step's loss only. Catches an annealing that runs backwards, never ends, or does not sum to one."""
    assert step_loss_weights(3, 1, False, 10) == (0.0, 0.0, 1.0)
    assert step_loss_weights(1, 1, True, 10) == (1.0,)
    start, mid, end, after = (step_loss_weights(2, i, True, 10) for i in (0, 5, 10, 50))
    assert start == pytest.approx((0.5, 0.5))
    assert mid == pytest.approx((0.2575, 0.7425))  # (0.5 + 0.015) / 2 and the rest
    assert end == after == pytest.approx((0.015, 0.985))
    assert sum(step_loss_weights(4, 3, True, 7)) == pytest.approx(1.0)


def test_order_annealing_is_first_order_up_to_its_iteration_and_second_order_after():
    """maml.order_annealing_until=N: iterations 1..N give first-order MAML's meta-gradient, N+1 on the exact
    second-order one (the two differ). Catches an off-by-one at the switch or a switch that never happens."""
    model, flat, batch = _mlp_problem(3)
    fm = functional(model)
    loss = make_loss(fm.forward)
    losses, views = Losses(loss, loss, make_loss(fm.batched_forward)), fm.layout.split(flat)
    annealed = maml(fm.layout, 0.3, 1, order_annealing_until=4)
    first, second = maml(fm.layout, 0.3, 1, first_order=True), maml(fm.layout, 0.3, 1)
    for path in ("loop", "vmap"):
        at = {i: fm.layout.join(annealed.meta_gradient(path, losses, views, batch, i)[0]) for i in (1, 4, 5, 9)}
        fo = fm.layout.join(first.meta_gradient(path, losses, views, batch, 1)[0])
        so = fm.layout.join(second.meta_gradient(path, losses, views, batch, 1)[0])
        assert (fo - so).norm() > 0.05 * so.norm()
        assert torch.equal(at[1], fo) and torch.equal(at[4], fo)
        assert torch.equal(at[5], so) and torch.equal(at[9], so)


@pytest.mark.parametrize("kind", ["metasgd", "anil", "lslr"])
def test_evaluation_adapts_with_the_algorithms_own_inner_rule(kind):
    """Test-time adaptation curves (one task at a time, and vmap over tasks) follow the algorithm's inner rule:
    Meta-SGD's learned per-weight rates, ANIL's head-only steps, LSLR's per-step rates (the last one reused past
    the trained steps), checked against the written-out inner loop's query losses. Catches evaluation that
    adapts with alpha where the run learned its rates, or adapts the body under ANIL."""
    model, flat, batch = _mlp_problem(3)
    fields, options = CASES[kind]
    fm = functional(model)
    algorithm = maml(fm.layout, 0.05, 2, **fields)
    rates = _learned_rates(algorithm, 0.05)
    state = torch.cat([flat, *(t.reshape(-1) for t in rates.values())])
    views = algorithm.inner.layout.split(state)
    looped, _ = adaptation_curves_loop(fm.forward, F.mse_loss, algorithm.inner, views, batch, 3)
    vmapped, _ = adaptation_curves(fm.batched_forward, F.mse_loss, algorithm.inner, views, batch, 3, chunk=2)
    layout, names = FlatLayout.of(model), [n for n, _ in model.named_parameters()]
    adapted = names[-2:] if options.get("head_only") else names
    for t in range(len(batch)):
        xs, ys, xq, yq = (a[t] for a in batch.tensors())
        theta = {n: v.clone().requires_grad_(True) for n, v in layout.unflatten(flat).items()}
        for k in range(4):
            query = F.mse_loss(torch.func.functional_call(model, theta, (xq,)), yq)
            torch.testing.assert_close(looped[t, k], query.detach(), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(vmapped[t, k], query.detach(), rtol=1e-12, atol=1e-14)
            grads = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, theta, (xs,)), ys),
                                        [theta[n] for n in adapted])
            for n, g in zip(adapted, grads):
                rate = (0.05 if "rates" not in options else rates[n] if options["rates"] == "per_parameter"
                        else rates[n][min(k, 1)])
                theta[n] = (theta[n] - rate * g).detach().requires_grad_(True)


def test_learned_rates_are_state_initialised_at_alpha():
    """Meta-SGD's state is the model's parameters then one rate per weight, named inner_lr:<parameter>, all alpha
    at the start; LSLR adds one rate per parameter tensor and step; ANIL and Reptile add nothing."""
    fm = functional(MLP(1, [40, 40], 1).double())
    p = fm.layout.numel
    metasgd = maml(fm.layout, 0.05, 2, algorithm="metasgd").inner
    assert metasgd.layout.numel == 2 * p and metasgd.layout.names[6] == RATE_PREFIX + "0.weight"
    assert torch.equal(metasgd.initial_rates(torch.float64, torch.device("cpu")),
                       torch.full((p,), 0.05, dtype=torch.float64))
    assert maml(fm.layout, 0.05, 3, learned_inner_lr="per_layer_per_step").inner.layout.numel == p + 6 * 3
    assert maml(fm.layout, 0.05, 2, algorithm="anil").inner.layout.numel == p
    assert maml(fm.layout, 0.05, 2, algorithm="reptile").inner.layout.numel == p


@pytest.mark.parametrize("fields, message", [
    ({"algorithm": "protonet"}, "unknown maml.algorithm 'protonet'; choose one of: maml, anil, metasgd, reptile"),
    ({"learned_inner_lr": "per_layer"}, "unknown maml.learned_inner_lr 'per_layer'"),
    ({"algorithm": "metasgd", "learned_inner_lr": "per_layer_per_step"}, "learns a rate per parameter already"),
    ({"algorithm": "reptile", "multi_step_loss": True}, "maml.multi_step_loss has no meaning there"),
    ({"order_annealing_until": -1}, "maml.order_annealing_until must be an iteration"),
])
def test_impossible_algorithm_settings_are_refused(fields, message):
    """A setting no algorithm defines is refused by the config check with one line naming it. Catches a typo run
    silently as MAML, or MAML++ options silently ignored by Reptile."""
    cfg = Config()
    for key, value in fields.items():
        setattr(cfg.maml, key, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg)


@pytest.fixture(scope="module")
def metasgd_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("metasgd") / "run"
    proc = subprocess.run([sys.executable, "-m", "dif_maml_dist.train", "runtime=simulate", "runtime.threads=1",
                           "maml.algorithm=metasgd", "train.iterations=30", "train.eval_every=15",
                           "task.eval_tasks=40", "maml.final_adapt_steps=3", "optim.lr=0.003",
                           f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_a_saved_metasgd_model_adapts_with_its_own_learned_rates(metasgd_run, capsys):
    """A Meta-SGD run saves each model with its learned rates (moved away from alpha by training, and equal
    across the centroid's computation); load_run(...).adapt steps each weight by its own rate (checked against
    the step written out), ``evaluate`` reproduces the run's own final figures and says it adapted with the
    learned rates, and asking to adapt with another alpha is refused. Catches rates dropped from the saved model,
    adaptation at alpha, or an inner_lr override that silently replaces learned rates."""
    saved = torch.load(metasgd_run / "models" / "centroid.pt", weights_only=True)
    rate_names = [n for n in saved if n.startswith(RATE_PREFIX)]
    assert len(rate_names) == 6
    learned = torch.cat([saved[n].reshape(-1) for n in rate_names])
    assert not torch.allclose(learned, torch.full_like(learned, 0.01))  # trained: no longer alpha
    run = load_run(metasgd_run)
    model = run.model("centroid")
    batch = model.learner.tests.slice(0, 1)
    xs, ys, xq, yq = (t[0] for t in batch.tensors())
    adapted = model.adapt(xs, ys, steps=1)
    module = model.learner.family.build_model().to(model.learner.dtype)
    theta = {n: saved[n].to(model.learner.dtype).requires_grad_(True) for n in model.named_parameters()}
    grads = torch.autograd.grad(F.mse_loss(torch.func.functional_call(module, theta, (xs,)), ys), list(theta.values()))
    for (n, w), g in zip(theta.items(), grads):
        expected = w.detach() - saved[RATE_PREFIX + n].to(w.dtype) * g
        torch.testing.assert_close(adapted.named_parameters()[n], expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="learned its inner rates"):
        model.adapt(xs, ys, inner_lr=0.01)
    assert evaluate_main([str(metasgd_run), "--model", "centroid"]) == 0
    assert "of metasgd, the run's learned inner rates (per_parameter)" in capsys.readouterr().out
    result = json.loads((metasgd_run / "evaluation.json").read_text())
    summary = json.loads((metasgd_run / "summary.json").read_text())
    assert result["models"]["centroid"]["loss"] == pytest.approx(summary["centroid_adaptation_curve"], rel=1e-6)


def test_a_metasgd_run_reports_how_much_its_agents_rates_disagree(metasgd_run):
    """summary.json and every network record report the learned rates' disagreement apart from the weights':
    ``(1/K) sum_k ||r_k - r_c||^2`` over the agents' saved rates, and the weights' figure over their weights only.
    Catches the rates folded into the weights' disagreement, or a figure computed over the wrong entries."""
    summary = json.loads((metasgd_run / "summary.json").read_text())
    agents = [torch.load(metasgd_run / "models" / f"agent{k}.pt", weights_only=True) for k in range(6)]
    rates = torch.stack([torch.cat([a[n].reshape(-1) for n in a if n.startswith(RATE_PREFIX)]) for a in agents])
    weights = torch.stack([torch.cat([a[n].reshape(-1) for n in a if not n.startswith(RATE_PREFIX)]) for a in agents])
    for states, key in ((rates, "rate_disagreement"), (weights, "disagreement")):
        expected = float(((states - states.mean(0)) ** 2).sum(1).mean())
        assert summary[key] == pytest.approx(expected, rel=1e-4), key
    assert 0 < summary["rate_disagreement"]
    records = [json.loads(line) for line in (metasgd_run / "metrics" / "network.jsonl").read_text().splitlines()]
    assert all("rate_disagreement" in r for r in records)


@pytest.mark.parametrize("vectorize", [True, False])
def test_cosine_outer_schedule_follows_the_written_out_recursion(vectorize):
    """optim.schedule=cosine with SGD: ``w_i = A^T (w_{i-1} - mu_i g(w_{i-1}))`` with mu_i going from optim.lr at
    the first iteration to optim.min_lr at the last along half a cosine (values by hand), in both simulator engines
    (and so under torchrun, which runs the per-agent engine's code). Catches a schedule shifted by one iteration,
    one that never reaches its floor, or one applied in one engine only."""
    cfg = small_config(iterations=5, optim="sgd")
    cfg.optim.lr, cfg.optim.schedule, cfg.optim.min_lr = 0.05, "cosine", 0.01
    mus = {1: 0.05, 2: 0.01 + 0.04 * (1 + math.cos(math.pi / 4)) / 2, 3: 0.03,
           4: 0.01 + 0.04 * (1 + math.cos(3 * math.pi / 4)) / 2, 5: 0.01}
    weights = strategy_weights("dif_maml", PAPER6)
    a = torch.as_tensor(weights, dtype=torch.float64)
    want = reference_sgd_run(cfg, weights, 5, lambda w, g, i: a.T @ (w - mus[i] * g))
    torch.testing.assert_close(simulated_states(cfg, weights, 5, vectorize=vectorize), want, rtol=1e-10, atol=1e-12)
    cfg.optim.schedule = "constant"
    assert (simulated_states(cfg, weights, 5, vectorize=vectorize) - want).abs().max() > 1e-6


def _preset(name: str, *overrides: str) -> Config:
    from dif_maml_dist.run.composition import compose

    return compose([f"algorithm={name}", "task=omniglot_5w1s", "data.root=/data", *overrides]).cfg


def test_every_algorithm_preset_composes_to_its_papers_settings():
    """Each conf/algorithm preset composes, passes the config check and selects what its paper uses; MAML++'s
    multi-step annealing is its released configs' 20 of 250 epochs, scaled to the run's iterations. Catches a
    preset naming an option the schema or the registry lacks, a preset losing to the task's settings (defaults
    order), and the fraction resolved against the wrong length."""
    from dif_maml_dist.run.composition import CONF_DIR

    presets = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))
    assert presets == ["anil", "fomaml", "maml", "mamlpp", "metasgd", "reptile"]
    chosen = {name: _preset(name, "train.iterations=250") for name in presets}
    assert {name: c.maml.algorithm for name, c in chosen.items()} == {
        "anil": "anil", "fomaml": "maml", "maml": "maml", "mamlpp": "maml", "metasgd": "metasgd",
        "reptile": "reptile"}
    assert chosen["fomaml"].maml.first_order and not chosen["maml"].maml.first_order
    assert chosen["maml"].maml.inner_lr == 0.4 and chosen["maml"].maml.inner_steps == 1  # the task's alpha, steps
    assert chosen["reptile"].maml.inner_steps == 5
    pp = chosen["mamlpp"]
    assert (pp.maml.inner_steps, pp.maml.eval_inner_steps, pp.maml.inner_lr) == (5, 5, 0.1)
    assert (pp.maml.learned_inner_lr, pp.maml.multi_step_loss, pp.maml.multi_step_loss_until) == (
        "per_layer_per_step", True, 20)
    assert (pp.optim.schedule, pp.optim.min_lr) == ("cosine", 1e-5)
    assert _preset("mamlpp", "train.iterations=3000").maml.multi_step_loss_until == 240
    assert _preset("mamlpp", "maml.inner_steps=3").maml.inner_steps == 3  # the command line still wins


def test_a_fraction_outside_the_run_is_refused_in_one_line():
    """``${iterations_fraction:F}`` with F outside [0, 1] is a one-line usage error naming it. Catches a schedule
    that silently points past the run's end (never annealed) or before its start."""
    from dif_maml_dist.run.composition import UsageError

    with pytest.raises(UsageError, match=r"iterations_fraction:1.5 must be a fraction of train.iterations"):
        _preset("mamlpp", "maml.multi_step_loss_until=${iterations_fraction:1.5}")


def test_a_recorded_config_resolves_its_fractions_where_evaluation_reads_it(tmp_path):
    """A run directory holding only hydra's record of its config (.hydra/config.yaml keeps the interpolation, e.g.
    a run stopped before its summary) resolves it to the iteration training used. Catches the resolver registered
    only on the training command's path, which would make evaluate fail on such a run."""
    from omegaconf import OmegaConf

    from dif_maml_dist.run.composition import compose
    from dif_maml_dist.run.saved import run_config

    node = compose(["algorithm=mamlpp", "train.iterations=500"]).node
    run_part = OmegaConf.masked_copy(node, [k for k in node if k != "hydra"])
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(run_part, tmp_path / ".hydra" / "config.yaml")
    assert "${iterations_fraction:0.08}" in (tmp_path / ".hydra" / "config.yaml").read_text()
    assert run_config(tmp_path).maml.multi_step_loss_until == 40
