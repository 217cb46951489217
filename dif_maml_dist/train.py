"""Hydra entry point, one agent per process: ``torchrun --standalone --nproc-per-node=6 -m dif_maml_dist.train``
(or all agents in this process with ``runtime=simulate``).

Its steps: compose the config from the command line (``run/composition.py``), check it into a run context and
own the run directory (``run/launch.py``: every refusal before anything is written) -> let hydra write its
record, from that same composition -> carry out the run (``run/recipes.py``) -> leave with the run's exit
status.

Why not ``@hydra.main`` alone: it composes the config before any of this code runs and then creates the run
directory and writes its record, and a composition error there is hydra's own multi-line report with exit status
1. A single run is therefore composed with hydra's compose API, checked, and handed to hydra's job runner
(``composition.run_as_hydra_job``). ``@hydra.main`` is kept for what belongs to hydra: its flags (``--cfg``,
``--help``, ...) and sweeps (``-m``), whose jobs hydra's sweeper composes and its launcher runs (a launcher
plugin may run them elsewhere); each sweep job is checked first by composing it the same way.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dif_maml_dist.comm.process import ProcessEnv
from dif_maml_dist.config import from_omegaconf
from dif_maml_dist.run.composition import CONF_DIR, run_as_hydra_job
from dif_maml_dist.run.context import RunContext
from dif_maml_dist.run.launch import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    MULTIRUN_FLAGS,
    Launch,
    Terminated,
    fail,
    let_go,
    own,
    prepare,
    prepare_sweep,
    stop_cleanly_on_sigterm,
)
from dif_maml_dist.run.recipes import run
from dif_maml_dist.run.validate import validate

_SWEEP: dict[int, RunContext] = {}  #: with -m: every job's context, by job number, checked by ``main``


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(node: DictConfig) -> None:
    if _SWEEP:
        ctx = _SWEEP[HydraConfig.get().job.num]
    else:  # hydra's own flags (e.g. --cfg), or a sweep job a launcher plugin runs in a process of its own (submitit
        # on Slurm: ``main`` did not run there): checked here, after hydra has written its record
        env = ProcessEnv.from_environ()
        try:
            ctx = RunContext.build(validate(from_omegaconf(node)), env, Path(HydraConfig.get().runtime.output_dir))
        except ValueError as err:
            fail(err, env)
    assert Path(HydraConfig.get().runtime.output_dir).resolve() == ctx.run_dir.resolve(), (
        HydraConfig.get().runtime.output_dir, ctx.run_dir)
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        run(ctx)
        return
    # A sweep's job owns its directory as a single run does, from here (hydra has written the job's record).
    try:
        lock = own(ctx)
    except ValueError as err:
        fail(err, ctx.env)
    code = 0
    try:
        run(ctx)
    except SystemExit as leaving:
        code = leaving.code
        raise
    finally:
        let_go(lock, code)


def main() -> None:
    stop_cleanly_on_sigterm()
    env = ProcessEnv.from_environ()
    overrides = sys.argv[1:]
    flags = [arg for arg in overrides if arg.startswith("-")]
    launch: Optional[Launch] = None
    code = 0
    try:
        if not flags:
            try:
                launch = prepare(overrides, env)
            except ValueError as err:
                fail(err, env)
            run_as_hydra_job(launch.composition, launch.ctx, run)
        else:
            if all(flag in MULTIRUN_FLAGS for flag in flags):
                try:
                    _SWEEP.update(prepare_sweep([arg for arg in overrides if arg not in MULTIRUN_FLAGS], env))
                except ValueError as err:
                    fail(err, env)
            # Hydra's other flags (--help, --cfg, ...) are left to hydra. Only rank 0 writes hydra's records.
            if env.rank != 0:
                sys.argv.append("hydra.output_subdir=null")
            _hydra_main()
    except SystemExit as leaving:
        code = leaving.code if isinstance(leaving.code, int) else (0 if leaving.code is None else 1)
    except Terminated:  # before the run started, or after it ended
        code = EXIT_TERMINATED
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    finally:
        if launch is not None:
            let_go(launch.lock, code)
    if not env.under_torchrun:
        sys.exit(code)
    # A torchrun worker leaves without the interpreter's own teardown: every output is closed and written by
    # now, but gloo's C++ threads can still hold objects whose destruction during interpreter finalization
    # aborts the process ("terminate called without an active exception", exit -6; docs/notes.md), which
    # torchrun reports as a failed job.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
