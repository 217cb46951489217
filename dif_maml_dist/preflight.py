"""A torchrun job's start-up checks, before and around torchrun.

``python -m dif_maml_dist.preflight --nproc N [--nproc-per-node P] [--max-restarts R] [--launch TEXT] OVERRIDES...``
makes, in this one plain process, every check a rank of a torchrun job of N processes (P per node) would make
before it starts (``train.check``), without locking or writing the run directory, and prints the topology's
number of agents. The launch scripts run it before torchrun: torchrun turns any failed worker into its own
exit status 1 and a ``ChildFailedError`` report, so a mistake found here is the only way to leave with the
project's one line and exit status 2.

``not_retried`` keeps torchrun's restarts (``--max-restarts``) from retrying a start that was refused: they
would repeat its message, and a restarted attempt counts as a resumption, which skips the check that the run
directory holds no other run.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

from .runtime import ProcessEnv


def _refusal_key() -> str:
    return f"dif_maml_dist/refused/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"


def _agent_store():
    """torchrun's store, which outlives its restarts of the job (``None`` without one: a lone process, or a
    launcher that serves no store to its workers)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    import torch.distributed as dist

    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=30), wait_for_workers=False)
    except (KeyError, ValueError, RuntimeError):
        return None  # then a restart is retried, as without this


@contextmanager
def not_retried(env: ProcessEnv) -> Iterator[None]:
    """Around a start's checks: a refusal (``ValueError``) is remembered in torchrun's store, and a restarted
    attempt of a refused job leaves at once with exit status 2, saying nothing more (the first attempt said
    it), before it has looked at, or written to, anything."""
    from .train import EXIT_USAGE

    if env.under_torchrun and env.restart_count > 0:
        store = _agent_store()
        if store is not None and store.check([_refusal_key()]):
            sys.exit(EXIT_USAGE)
    try:
        yield
    except ValueError:
        if env.under_torchrun and env.max_restarts > 0:
            store = _agent_store()
            if store is not None:
                store.set(_refusal_key(), "1")
        raise


def check_process_count(num_agents: int, topology: str, nproc: int, launch: str) -> None:
    """A torchrun job needs one process per agent; said in the launch's own terms (``launch``: what set
    ``nproc``), before the other checks."""
    from .train import UsageError

    if num_agents != nproc:
        raise UsageError(f"topology {topology!r} has {num_agents} agents but {launch} starts {nproc} process(es): "
                         f"start {num_agents} (or choose a topology with {nproc} agents, or runtime=simulate)")


def main(argv: list[str] | None = None) -> None:
    from . import train
    from .topology import num_agents_of

    ap = argparse.ArgumentParser(prog="python -m dif_maml_dist.preflight", description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, required=True, help="processes of the whole job (all nodes)")
    ap.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: --nproc)")
    ap.add_argument("--max-restarts", type=int, default=0, help="torchrun's --max-restarts")
    ap.add_argument("--launch", default=None, help="what sets the process count, for the message (e.g. "
                                                   "NPROC_PER_NODE=4)")
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
        cfg, _ = train.compose(args.overrides)
        if cfg.runtime.mode == "torchrun":
            check_process_count(num_agents_of(cfg.topology), cfg.topology.name, args.nproc,
                                args.launch or f"--nproc {args.nproc}")
        ctx = train.check(args.overrides, env)
    except ValueError as err:
        train._fail(err, rank=0)
    print(ctx.topology.num_agents)


if __name__ == "__main__":
    main()
