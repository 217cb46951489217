"""Agents that leave (runtime.on_peer_failure=continue): the weights the survivors compute without a coordinator,
how departures spread, the simulator's departure schedule, and torchrun jobs that lose agents and finish."""

from __future__ import annotations

import json
import random

import networkx as nx
import numpy as np
import pytest
import torch

from dif_maml_dist.graphs.membership import Membership, churn_plan, components, round_weights
from dif_maml_dist.graphs.weights import combine_plan, metropolis_weights
from tests.helpers import small_config, wait_until
from tests.test_cli import train

PAPER6 = [(0, 2), (1, 2), (2, 3), (2, 4), (3, 4), (4, 5)]  # the paper's graph (DESIGN.md), not read from the code


def _random_graphs(n: int):
    for seed in range(n):
        rng = random.Random(seed)
        yield rng, nx.gnp_random_graph(rng.randrange(2, 30), rng.uniform(0.1, 0.6), seed=seed)


def test_declared_degrees_give_exactly_the_metropolis_weights_while_everyone_is_there():
    """Each agent's column from its neighbours' declared degrees equals the Metropolis matrix's, bit for bit.

    Catches a different formula (max vs sum of degrees, a degree without the agent itself) and a self weight summed
    in another order: either would make a continue-mode run without departures differ from a stop-mode run."""
    for _, g in _random_graphs(60):
        a = metropolis_weights(g)
        declared = {v: g.degree(v) + 1 for v in g}
        for v in g:
            mine, ref = churn_plan(v, declared[v], {u: declared[u] for u in g.neighbors(v)}), combine_plan(a, v)
            assert (mine.self_weight, mine.neighbors, mine.neighbor_weights) == \
                   (ref.self_weight, ref.neighbors, ref.neighbor_weights)


def test_weights_stay_doubly_stochastic_on_the_surviving_graph():
    """Whoever leaves, and whether the neighbours already knew (departed before the round) or notice during it
    (they still declared the agent): the survivors' matrix is symmetric, non-negative, with rows and columns
    summing to one, a departed agent keeps its state, and every survivor's local column (from the declarations it
    received) is that matrix's column.

    Catches weights that stop summing to one when a neighbour disappears mid-round (the network average drifts),
    asymmetric weights when two ends count degrees differently, and a departed agent still mixed in."""
    for rng, g in _random_graphs(80):
        nodes = list(g)
        known = set(rng.sample(nodes, rng.randrange(0, len(nodes) // 2 + 1)))
        leaving = set(rng.sample([v for v in nodes if v not in known], rng.randrange(0, 3) if len(nodes) > 3 else 0))
        a = round_weights(g, known, leaving)
        live = [v for v in nodes if v not in known | leaving]
        sub = a[np.ix_(live, live)]
        assert (a >= 0).all() and np.allclose(sub, sub.T, atol=0, rtol=0)
        assert np.allclose(sub.sum(axis=0), 1) and np.allclose(sub.sum(axis=1), 1)
        for v in known | leaving:
            assert a[v, v] == 1 and a[:, v].sum() == 1 and a[v].sum() == 1
        for v in live:  # what agent v computes from the messages that arrive
            declared = {u: 1 + sum(1 for w in g.neighbors(u) if w not in known) for u in g}
            answered = {u: declared[u] for u in g.neighbors(v) if u in live}
            mine, ref = churn_plan(v, declared[v], answered), combine_plan(a, v)
            assert (mine.self_weight, mine.neighbors, mine.neighbor_weights) == \
                   (ref.self_weight, ref.neighbors, ref.neighbor_weights)


def test_departures_reach_every_survivor_one_hop_per_round_and_a_dropped_agent_learns_it():
    """On a path 0-1-2-3-4 agent 0 dies in round 5: its neighbour notices then ("no message"), agent d hops away
    d - 1 rounds later ("told by" the previous one); an agent whose neighbours report it departed is told so.

    Catches a merge that loses information (a departure that never reaches the far end), one that resurrects a
    departed agent, and a dropped agent that keeps training as if nothing happened."""
    k = 5
    members = [Membership(v, k) for v in range(k)]
    alive = set(range(1, k))
    for r in range(5, 10):
        vectors = {v: members[v].vector() for v in alive}
        for v in alive:
            failed = {0: "closed"} if v == 1 and members[1].is_live(0) else {}
            heard = {u: vectors[u] for u in (v - 1, v + 1) if u in alive}
            assert members[v].absorb(r, r + 1, failed, heard) is None
    learned = {v: (members[v].departures[0].round, members[v].departures[0].how) for v in alive}
    assert learned == {1: (5, "no message"), 2: (6, "told by agent 1"), 3: (7, "told by agent 2"),
                       4: (8, "told by agent 3")}
    assert all(members[v].departed == [0] for v in alive)
    stale = Membership(0, k)  # agent 0 was only hung: its neighbour's next message says it was dropped
    assert stale.absorb(10, 11, {}, {1: members[1].vector()}) == 1


def test_components_of_the_surviving_graph():
    """The paper's graph loses its hub (agent 2): three components, largest first; losing a leaf splits nothing.

    Catches a component computation that keeps the departed agent's edges (one component reported)."""
    g = nx.Graph(PAPER6)
    assert components(g, [2]) == [[3, 4, 5], [0], [1]]
    assert components(g, [5]) == [[0, 1, 2, 3, 4]]


def test_simulator_departures_freeze_the_departed_and_both_engines_agree():
    """runtime=simulate with runtime.departures: a departed agent's model is the one it had before its departure
    iteration (the undisturbed run's state there), both engines agree, and the centroid is the survivors'.

    Catches a departed agent that keeps adapting or mixing, a departure applied one iteration off, and an
    engine that ignores the schedule."""
    from dif_maml_dist.engine.simulator import Simulation
    from dif_maml_dist.graphs.topology import build_topology

    cfg = small_config(iterations=12)
    cfg.runtime.on_peer_failure = "continue"
    cfg.runtime.departures = [[2, 5], [5, 9]]
    topo = build_topology(cfg.topology)
    undisturbed = Simulation(small_config(iterations=12), topo.weights, vectorize=False)
    for _ in range(4):
        undisturbed.step()
    runs, after8 = [], None
    for vectorize in (False, True):
        sim = Simulation(cfg, topo.weights, vectorize=vectorize)
        for done in range(1, 13):
            sim.step()
            if done == 8 and not vectorize:
                after8 = sim.states().detach().clone()
        runs.append(sim)
    per_agent, vectorized = (s.states().detach() for s in runs)
    torch.testing.assert_close(vectorized, per_agent, rtol=1e-12, atol=1e-12)
    # agent 2 leaves at iteration 5 with the state of iteration 4, which nothing had disturbed yet
    assert torch.equal(per_agent[2], undisturbed.states()[2])
    assert torch.equal(per_agent[5], after8[5]) and not torch.equal(per_agent[4], after8[4])
    assert sorted(runs[0].departed()) == [2, 5]
    assert torch.equal(runs[0].all_states(), per_agent[[0, 1, 3, 4]])


def test_torchrun_job_loses_agents_and_the_survivors_finish_as_the_simulator_says(tmp_path):
    """Six torchrun agents in continue mode; agent 0 (rank 0) leaves at iteration 9, then the hub (agent 2) at 17,
    splitting the paper's graph. The survivors finish; their final models equal the per-agent simulator's with the
    same departures bit for bit (float64), so the weights they computed locally from the declared degrees are
    the reference's doubly-stochastic surviving-graph weights; the summary, written by a survivor, records both
    departures with who noticed, the split and its components; the network's records come from the snapshots.

    Catches: survivors that stop or hang when a neighbour's process ends; weights that differ from the surviving
    graph's (a survivor would drift from the simulator); a summary that needs rank 0; departures or the split
    missing from the summary."""
    overrides = ["train.iterations=24", "train.eval_every=8", "train.log_every=4", "train.dtype=float64",
                 "task.eval_tasks=50", "maml.final_adapt_steps=3", "runtime.on_peer_failure=continue",
                 "runtime.departures=[[0,9],[2,17]]"]
    run_dir, sim_dir = tmp_path / "run", tmp_path / "sim"
    proc = train([*overrides, f"hydra.run.dir={run_dir}"], nproc=6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sim = train([*overrides, "runtime=simulate", "runtime.vectorize=false", "runtime.threads=1",
                 f"hydra.run.dir={sim_dir}"])
    assert sim.returncode == 0, sim.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    simulated = json.loads((sim_dir / "summary.json").read_text())
    assert summary["survivors"] == simulated["survivors"] == [1, 3, 4, 5]
    for k in (1, 3, 4, 5):
        mine = torch.load(run_dir / "models" / f"agent{k}.pt", weights_only=True)
        ref = torch.load(sim_dir / "models" / f"agent{k}.pt", weights_only=True)
        assert all(torch.equal(mine[n], ref[n]) for n in ref), k
    assert not (run_dir / "models" / "agent0.pt").exists() and not (run_dir / "agents" / "agent2.json").exists()
    departed = {d["agent"]: d for d in summary["departed"]}
    assert sorted(departed) == [0, 2]
    # agent 0's only neighbour (2) noticed in iteration 9 but left itself; the survivors heard of it from 2 a round
    # later
    assert (departed[0]["iteration"], departed[0]["how"], departed[0]["noticed_by"]) == (10, "told by agent 2", 1)
    assert departed[2]["iteration"] == 17 and departed[2]["how"] == "no message"
    assert summary["split"] is True and summary["components"] == simulated["components"] == [[3, 4, 5], [1]]
    assert summary["summarized_by"].startswith("agent ") and summary["summarized_by"] != "agent 0"
    assert summary["centroid_test_loss"] == pytest.approx(simulated["centroid_test_loss"], rel=1e-12)
    assert [a["bytes_sent"] for a in summary["agents"]] == [a["bytes_sent"] for a in simulated["agents"]]
    network = [json.loads(line) for line in (run_dir / "metrics" / "network.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["agents_present"]) for r in network] == [(0, 6), (8, 6), (16, 5), (24, 4)]
    component_agents = [c["agents"] for c in summary["component_figures"]]
    assert component_agents == [[3, 4, 5], [1]]
    # The summarize command rebuilds the same summary from the run directory alone.
    from dif_maml_dist.summarize import main as summarize

    (run_dir / "summary.json").rename(tmp_path / "by_agent.json")
    assert summarize([str(run_dir)]) == 0
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["summarized_by"] == "dif_maml_dist.summarize"
    for key in ("survivors", "departed", "components", "centroid_test_loss", "disagreement", "agents"):
        assert again[key] == summary[key], key
    assert summarize([str(tmp_path)]) == 2  # not a continue-mode run: one line, exit status 2


def test_simulator_summary_has_the_component_figures_summarize_computes(tmp_path):
    """runtime=simulate with a departure that splits the graph (the paper's hub, agent 2): the summary lists, per
    component of the surviving graph, its agents, their disagreement and their centroid's test figures, as a
    torchrun run's summary does (run/summary.py), and the figures are what summarize's computation gives for the
    survivors' final models. Catches a simulator summary that reports the split but not how each part did."""
    from dif_maml_dist.engine.learner import Learner
    from dif_maml_dist.run.summary import component_figures, context_of

    run_dir = tmp_path / "sim"
    proc = train(["runtime=simulate", "runtime.vectorize=false", "runtime.threads=1", "train.iterations=8",
                  "train.eval_every=4", "train.log_every=4", "train.dtype=float64", "task.eval_tasks=20",
                  "maml.final_adapt_steps=2", "runtime.on_peer_failure=continue", "runtime.departures=[[2,5]]",
                  f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["split"] is True and summary["components"] == [[3, 4, 5], [0], [1]]
    got = summary["component_figures"]
    assert [c["agents"] for c in got] == summary["components"]
    ctx = context_of(run_dir)
    learner = Learner.build(ctx.cfg, torch.device("cpu"), torch.float64, ctx.family)
    finals = {k: learner.layout.flatten(torch.load(run_dir / "models" / f"agent{k}.pt", weights_only=True))
              for k in summary["survivors"]}
    assert got == component_figures(ctx.cfg, learner, finals, summary["components"])
    assert {"agents", "disagreement", "test_loss", "test_loss_pre", "adaptation_curve"} <= set(got[0])
    assert got[2]["disagreement"] == 0.0  # a component of one agent


def test_run_directory_lock_is_gone_when_rank_0_left_and_the_others_finished(tmp_path):
    """Three torchrun agents on a ring in continue mode; agent 0 (rank 0, which took the run directory's lock)
    leaves at iteration 3. The others finish and write the summary; the lock must not outlive the run. Catches
    the stale RUN/.lock a departed rank 0 left behind (it ends as if killed, without releasing it), which made
    the next job into that directory refuse or take over a lock whose run was long over."""
    run_dir = tmp_path / "run"
    proc = train(["topology=ring", "topology.num_agents=3", "train.iterations=6", "train.eval_every=3",
                  "train.log_every=3", "task.eval_tasks=20", "maml.final_adapt_steps=1",
                  "runtime.on_peer_failure=continue", "runtime.departures=[[0,3]]", f"hydra.run.dir={run_dir}"],
                 nproc=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["survivors"] == [1, 2] and [d["agent"] for d in summary["departed"]] == [0]
    assert not (run_dir / ".lock").exists()


def _fault_injection():
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("fault_injection", REPO / "launch" / "fault_injection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stopped_agent_is_dropped_then_restarted_by_its_node_and_taken_back(tmp_path):
    """One torchrun node per agent (launch/agent_node.sh, static rendezvous, 4 agents on a ring). Agent 2's process
    is stopped (SIGSTOP) mid-run: its neighbours give up on it once its heartbeat has been silent for timeout_s,
    and the others go on; resumed (SIGCONT), it learns that it was dropped and exits; its node restarts it, it
    restores its own checkpoint and a neighbour takes it back; every node exits 0, nobody else rolled back.

    Catches: survivors that hang on a stopped neighbour, or give up on neighbours that only wait for it (the
    network would fall apart); a resumed agent that trains on alone; a restart that rolls the others back (their
    iterations would go back) or that never gets back in."""
    import os
    import signal
    import time

    fi = _fault_injection()
    run_dir = tmp_path / "run"
    nodes = fi.start_nodes(run_dir, 4, ["topology=ring", "topology.num_agents=4", "train.iterations=3000",
                                        "train.checkpoint_every=250", "train.log_every=10", "train.eval_every=3000",
                                        "task.eval_tasks=50", "maml.final_adapt_steps=2", "runtime.timeout_s=5"], 1)
    everyone = lambda: tuple(fi.iteration_of(run_dir, k) for k in range(4))  # noqa: E731
    try:
        wait_until(lambda: fi.iteration_of(run_dir, 2) >= 500, everyone, "agent 2 never reached iteration 500",
                   alive=lambda: all(n.poll() is None for n in nodes))
        pid = fi.agent_pid(run_dir, 2)
        assert pid is not None, "agent 2's process not found"
        stopped_at = fi.iteration_of(run_dir, 2)
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: fi.iteration_of(run_dir, 1) >= stopped_at + 50, everyone,
                   "the others did not go on without agent 2")
        time.sleep(1.0)
        os.kill(pid, signal.SIGCONT)
        wait_until(lambda: all(n.poll() is not None for n in nodes), everyone, "the nodes did not finish")
        codes = [n.returncode for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert codes == [0, 0, 0, 0], (run_dir.parent / "run.log").read_text()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["survivors"] == [0, 1, 2, 3] and summary["departed"] == []
    back = summary["returned"]
    assert [r["agent"] for r in back] == [2] and back[0]["incarnation"] == 1
    assert stopped_at - 250 <= back[0]["restored_checkpoint"] <= stopped_at
    # Back within a bound far below the start-up timeout (900 s) that a wrong wait would run into; a loaded
    # machine stretches the ~5 s it takes when idle.
    assert back[0]["iteration"] > stopped_at + 50 and back[0]["back_at"] - back[0]["asked_at"] <= 120
    for k in (1, 3):  # its neighbours: it left without a heartbeat, after about timeout_s, and came back
        view = json.loads((run_dir / "agents" / f"agent{k}.json").read_text())
        gone = [d for d in view["departures"] if d["agent"] == 2]
        assert gone and gone[0]["how"] == "no message" and "no heartbeat" in gone[0]["reason"]
        # timeout_s, plus the watch's first look and its polling: about 7 s when idle; the bound leaves room for a
        # loaded machine while staying far below the start-up timeout (900 s) a wrong wait would use
        assert 5 <= gone[0]["waited_s"] <= 5 + 60
        assert any(r["agent"] == 2 for r in view["returns"])
    for k in (0, 1, 3):
        assert fi.monotonic_iterations(run_dir, k)
    log2 = (run_dir / "logs" / "agent2.log").read_text()
    assert "back in the network" in log2
    assert "was dropped by the network" in (run_dir.parent / "run.log").read_text()


def test_continue_mode_refuses_a_torchrun_node_that_restarts_all_its_agents_together():
    """Several agents on one torchrun node with --max-restarts: the node restarts all of them at once, each would
    wait for a live neighbour to take it back and none would find one. Refused in one line naming the launch that
    works; one agent per node with restarts, or several without, are accepted.

    Catches a launch that would deadlock after its first failure (every agent waiting 2 x timeout_s, then failing
    again, restart after restart)."""
    from dif_maml_dist.comm.process import ProcessEnv
    from dif_maml_dist.run.context import LaunchError, check_launch

    cfg = small_config()
    cfg.runtime.on_peer_failure = "continue"
    together = ProcessEnv(rank=0, world_size=6, under_torchrun=True, local_world_size=6, max_restarts=1)
    with pytest.raises(LaunchError, match="launch/agent_node.sh") as refused:
        check_launch(cfg, together, 6)
    assert "\n" not in str(refused.value)
    check_launch(cfg, ProcessEnv(rank=0, world_size=6, under_torchrun=True, local_world_size=1, max_restarts=3), 6)
    check_launch(cfg, ProcessEnv(rank=0, world_size=6, under_torchrun=True, local_world_size=6, max_restarts=0), 6)


def test_accounting_merges_the_views_and_knows_the_planned_departures(tmp_path):
    """The summary's bookkeeping from agents' final files (written here by hand): an agent one survivor saw leave
    and another saw come back (its vector's incarnation is newer) is not departed but missing until it finishes;
    a planned departure nobody saw (its only neighbour left too) is departed, not missing.

    Catches a summary written before an agent that came back has finished (it would be left out), and one that
    never gets written when a departed agent's neighbours all left as well."""
    from dif_maml_dist.run.summary import accounting

    (tmp_path / "agents").mkdir()
    seen_leaving = {"agent": 3, "round": 4, "iteration": 5, "how": "no message"}
    (tmp_path / "agents" / "agent2.json").write_text(json.dumps(
        {"departures": [seen_leaving], "states": [1, 1, 0, 1]}))
    (tmp_path / "agents" / "agent1.json").write_text(json.dumps({"departures": [], "states": [1, 0, 0, 2]}))
    books = accounting(tmp_path, 4, planned=[[0, 3]])
    assert sorted(books["finals"]) == [1, 2]
    assert books["departed"] == {0: {"agent": 0, "iteration": 3, "how": "planned (runtime.departures)"}}
    assert books["missing"] == [3]  # came back (incarnation 1 in agent 1's view): still running
    (tmp_path / "agents" / "agent1.json").write_text(json.dumps({"departures": [], "states": [1, 0, 0, 1]}))
    assert accounting(tmp_path, 4, planned=[[0, 3]])["departed"][3] == {**seen_leaving, "noticed_by": 2}
