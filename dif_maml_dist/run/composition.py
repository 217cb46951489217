"""The config from a command line, as hydra composes it, composed once: hydra's compose API on the command line's
overrides (``compose``: a mistake is one line, before anything is written), and hydra's job runner on that same
composition (``run_as_hydra_job``: hydra's logging, record and callbacks, as ``@hydra.main`` would set them up).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from dif_maml_dist.config import Config, from_omegaconf
from dif_maml_dist.run import rundir
from dif_maml_dist.run.context import RunContext
from dif_maml_dist.run.validate import validate

#: The hydra config groups: conf/ beside the package in a checkout (or editable install); a wheel carries them
#: as dif_maml_dist/conf (pyproject.toml maps the top-level conf/ there).
CONF_DIR = next(d for d in (Path(__file__).resolve().parents[1] / "conf", Path(__file__).resolve().parents[2] / "conf")
                if (d / "config.yaml").is_file())


class UsageError(ValueError):
    """A mistake in the user's command or config: reported as one line, exit status 2."""


ConfigStore.instance().store(name="schema", node=Config)

#: torchrun's run id when it was given none (multi-node without --rdzv-id, or --master-port): not unique.
NO_RUN_ID = ("", "none")


@lru_cache(maxsize=None)
def run_id() -> str:
    # Same value on every rank of a torchrun job (its rendezvous id: a fresh uuid under --standalone); a
    # timestamp and pid for a lone process. Cached: a sweep's jobs are composed by the checks, then by hydra's
    # sweeper, and both must name the same directories; the run directory's lock records it.
    given = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if given not in NO_RUN_ID:
        return given
    return time.strftime("%Y-%m-%d_%H-%M-%S") + f"-{os.getpid()}"


OmegaConf.register_new_resolver("dmd_run_id", run_id, replace=True)


def parse_overrides(overrides: list[str]) -> list:
    """Hydra's own reading of the command line's overrides (quotes, ``+``/``~`` and all)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise UsageError(one_line(err)) from None


def check_group_choices(parsed: list, conf_dir: Path = CONF_DIR) -> None:
    """``group=option`` overrides must name an existing ``conf/group/option.yaml`` (one-line error otherwise)."""
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for o in parsed:
        key, value = o.key_or_group, o.value()
        if key in groups and isinstance(value, str) and not (conf_dir / key / f"{value}.yaml").is_file():
            options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
            raise UsageError(f"unknown {key} {value!r}; choose one of: {', '.join(options)}")


@dataclass(frozen=True)
class Composition:
    """The config as hydra composes it from one command line, composed once: the checks read it and hydra runs
    the job with it (``run_as_hydra_job``)."""

    node: DictConfig  #: hydra's whole composition, its own settings (``hydra.*``) included
    cfg: Config  #: the run's part, validated
    run_dir: str  #: the directory it names (``hydra.run.dir``; a sweep job's ``hydra.sweep.dir/subdir``)
    loader: Any  #: hydra's config loader that composed it (part of the context hydra runs a job in)


def compose(overrides: list[str], sweep_job: Optional[int] = None) -> Composition:
    """The validated composition that hydra makes of ``overrides`` (``ValueError``); for job ``sweep_job`` of a
    sweep (``-m``), that job's."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_group_choices(parse_overrides(overrides))
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
            job = [] if sweep_job is None else [f"hydra.job.num={sweep_job}"]
            node = hydra_compose("config", overrides=[*overrides, *job], return_hydra_config=True)
            loader = GlobalHydra.instance().hydra.config_loader
        run_dir = str(node.hydra.run.dir if sweep_job is None else
                      Path(node.hydra.sweep.dir) / str(node.hydra.sweep.subdir))
        run_part = copy.deepcopy(node)
        with open_dict(run_part):
            del run_part["hydra"]
        return Composition(node, validate(from_omegaconf(run_part)), run_dir, loader)
    except (HydraException, OmegaConfBaseException) as err:
        raise UsageError(one_line(err)) from None


def one_line(err: BaseException) -> str:
    """Hydra's message and its cause's, first lines only (the rest is hydra's advice and omegaconf's key path)."""
    first = str(err).strip().splitlines()[0].rstrip(".")
    cause = err.__cause__
    return f"{first}: {str(cause).strip().splitlines()[0]}" if cause is not None and str(cause).strip() else first


def run_as_hydra_job(composition: Composition, ctx: RunContext, task: Callable[[RunContext], None]) -> None:
    """``task`` on ``ctx``, inside the steps ``@hydra.main`` takes for a single run, applied to the
    composition the checks read (no second composition that could differ from it): hydra's logging set up, its
    record written (``.hydra/``: rank 0 only; a resumed start's beside the first start's), its callbacks called
    and its ``HydraConfig`` set while ``task`` runs. An exception from ``task`` is raised again after hydra's
    end-of-run steps."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import configure_log, run_job
    from hydra.types import HydraContext, RunMode

    node = composition.node
    with read_write(node), open_dict(node):
        node.hydra.mode = RunMode.RUN
        if ctx.env.rank != 0:
            node.hydra.output_subdir = None
        elif ctx.resuming:
            node.hydra.output_subdir = rundir.resume_record_dir(ctx.run_dir)
    configure_log(node.hydra.hydra_logging, node.hydra.verbose)
    callbacks = Callbacks(node)
    callbacks.on_run_start(config=node, config_name="config")
    done = run_job(task_function=lambda _: task(ctx), config=node, job_dir_key="hydra.run.dir", job_subdir_key=None,
                   hydra_context=HydraContext(config_loader=composition.loader, callbacks=callbacks))
    callbacks.on_run_end(config=node, config_name="config", job_return=done)
    done.return_value  # raises the task's exception, if it raised one
