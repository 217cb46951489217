"""A torchrun job's start-up checks, before and around torchrun.

``python -m dif_maml_dist.preflight --nproc N [--nproc-per-node P] [--max-restarts R] [--launch TEXT] OVERRIDES...``
makes, in this one plain process, every check a rank of a torchrun job of N processes (P per node) would make
before it starts (``run.launch.check``), without locking or writing the run directory, and prints the topology's
number of agents. The launch scripts run it before torchrun: torchrun turns any failed worker into its own
exit status 1 and a ``ChildFailedError`` report, so a mistake found here is the only way to leave with the
project's one line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import uuid

from dif_maml_dist.comm.process import ProcessEnv
from dif_maml_dist.graphs.topology import num_agents_of
from dif_maml_dist.run import launch
from dif_maml_dist.run.composition import UsageError


def check_process_count(num_agents: int, topology: str, nproc: int, launch: str) -> None:
    """A torchrun job needs one process per agent; said in the launch's own terms (``launch``: what set
    ``nproc``), before the other checks."""
    if num_agents != nproc:
        raise UsageError(f"topology {topology!r} has {num_agents} agents but {launch} starts {nproc} process(es): "
                         f"start {num_agents} (or choose a topology with {nproc} agents, or runtime=simulate)")


def hosted_agents(given: str | None, nproc: int, per_node: int) -> list[int]:
    """The agents of ``--agents``: ``all``, ``none`` or ``0,3``; by default every agent of a one-node job, and none
    of a multi-node job (c10d deals agents out to nodes in arrival order: no node knows its own in advance)."""
    if given is None:
        given = "all" if per_node == nproc else "none"
    if given in ("all", "none"):
        return list(range(nproc)) if given == "all" else []
    try:
        agents = [int(a) for a in given.split(",")]
    except ValueError:
        raise UsageError(f"--agents must be all, none or a comma-separated list of agents, got {given!r}") from None
    if any(not 0 <= a < nproc for a in agents):
        raise UsageError(f"--agents {given}: agents are 0..{nproc - 1}")
    return agents


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dif_maml_dist.preflight", description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, required=True, help="processes of the whole job (all nodes)")
    ap.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: --nproc)")
    ap.add_argument("--max-restarts", type=int, default=0, help="torchrun's --max-restarts")
    ap.add_argument("--launch", default=None, help="what sets the process count, for the message (e.g. "
                                                   "NPROC_PER_NODE=4)")
    ap.add_argument("--agents", default=None,
                    help="the agents this node hosts, whose own data (data.agent_root) is checked: all, none, or a "
                         "comma-separated list (default: all on one node, none when nodes take agents in "
                         "rendezvous order)")
    ap.add_argument("overrides", nargs="*", help="hydra overrides, as given to dif_maml_dist.train")
    args = ap.parse_args(argv)
    if any(arg.startswith("-") for arg in args.overrides):
        return  # hydra's own flags (--cfg, --help, --multirun): left to hydra, as train.main leaves them
    per_node = args.nproc_per_node or args.nproc
    # The highest local rank: if it has a GPU of its own (nccl), every rank of the node has.
    env = ProcessEnv(rank=0, world_size=args.nproc, local_rank=per_node - 1, under_torchrun=True,
                     local_world_size=per_node, max_restarts=args.max_restarts)
    # As under torchrun --standalone: a fresh run id names the default run directory.
    os.environ.setdefault("TORCHELASTIC_RUN_ID", uuid.uuid4().hex)
    try:
        cfg = launch.compose(args.overrides).cfg
        if cfg.runtime.mode == "torchrun":
            check_process_count(num_agents_of(cfg.topology), cfg.topology.name, args.nproc,
                                args.launch or f"--nproc {args.nproc}")
        ctx = launch.check(args.overrides, env, hosted_agents(args.agents, args.nproc, per_node))
    except ValueError as err:
        launch.fail(err, env)
    print(ctx.topology.num_agents)


if __name__ == "__main__":
    main()
