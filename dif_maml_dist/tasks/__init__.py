"""Task families: each gives a model, a loss, per-agent seeded training samplers and a test set
(``tasks.protocol``: what a family provides, public, implemented by the built-ins and by a user's own).

``task_family(cfg)`` is the only place that maps the config to a family: the agent loop and the simulator see a
:class:`TaskFamily` and nothing task-specific.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

from dif_maml_dist.tasks.custom import AgentDataError, WithModel, agent_root, check_model, custom_family, custom_model
from dif_maml_dist.tasks.image_folder import ImageFolderFamily
from dif_maml_dist.tasks.miniimagenet import MiniImagenetFamily
from dif_maml_dist.tasks.omniglot import OmniglotFamily
from dif_maml_dist.tasks.protocol import TaskFamily, TaskSampler, TaskSet
from dif_maml_dist.tasks.sinusoid import SinusoidFamily, SinusoidTasks
from dif_maml_dist.tasks.table_tasks import TARGET_TYPES, TableFamily

if TYPE_CHECKING:
    from dif_maml_dist.config import Config

#: task.name -> the built-in family; ``custom`` is the user's own (``task._target_``)
FAMILIES = {"sinusoid": SinusoidFamily, "omniglot": OmniglotFamily, "miniimagenet": MiniImagenetFamily,
            "image_folder": ImageFolderFamily, "table_tasks": TableFamily}
CUSTOM = "custom"
TASKS = (*FAMILIES, CUSTOM)


def task_family(cfg: "Config") -> TaskFamily:
    """The family ``cfg.task`` names (with ``model._target_``, the user's model in place of its own)."""
    if cfg.task.name == CUSTOM:
        family = custom_family(cfg)
    elif cfg.task.name in FAMILIES:
        family = FAMILIES[cfg.task.name](cfg)
    else:
        raise ValueError(f"unknown task {cfg.task.name!r}; choose one of: {', '.join(TASKS)}")
    if cfg.model._target_ is not None:
        family = WithModel(family, custom_model(cfg))
    return family


def check_task_data(cfg: "Config", agents: Iterable[int], num_agents: int,
                    family: Optional[TaskFamily] = None) -> None:
    """Raise ``ValueError`` now if the data cannot serve the configured episodes to ``agents`` (this process's:
    one under torchrun, so that no agent opens another's data) and the test set (missing files, too few classes
    for N-way, too few images for K + Q): called before any process group or run directory exists. Decodes a
    dataset into its cache on first use (``family``: check this one, if built)."""
    from dif_maml_dist import seeding

    family = family or task_family(cfg)
    sampler = None
    for agent in agents:
        try:
            sampler = family.sampler(agent, num_agents)
        except AgentDataError:
            raise
        except ValueError as err:
            if cfg.data.agent_root is None:  # shared data: every process meets the same mistake
                raise
            said = str(err)
            raise AgentDataError(said if said.startswith(f"agent {agent}") else f"agent {agent}: {said}") from None
    family.eval_set(cfg.seed, 1)
    if sampler is not None:  # one task from a stream of its own (the agents' task streams are left untouched)
        check_model(cfg, family, sampler.sample(seeding.generator(cfg.seed, seeding.Stream.MODEL_CHECK), 1))


__all__ = ["FAMILIES", "TARGET_TYPES", "TASKS", "MiniImagenetFamily", "OmniglotFamily", "SinusoidFamily",
           "SinusoidTasks", "TableFamily",
           "AgentDataError", "TaskFamily", "TaskSampler", "TaskSet", "agent_root", "check_task_data", "task_family"]
