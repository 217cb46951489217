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
from dif_maml_dist.tasks.protocol import HeldOutTasks, TaskFamily, TaskSampler, TaskSet
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


def tests_held_out_per_agent(cfg: "Config") -> bool:
    """Whether each agent is tested on held-out tasks of its own data (``HeldOutTasks``): its data stays with it
    (``data.agent_root``) and no test folder is shared (``data.test_root``)."""
    return cfg.data.agent_root is not None and cfg.data.test_root is None


def held_out_set(cfg: "Config", family: TaskFamily, agent: int, num_agents: int, num_tasks: int) -> TaskSet:
    """Agent ``agent``'s held-out test tasks (``ValueError`` when the family has none to give)."""
    if not hasattr(family, "held_out_set"):
        name = cfg.task._target_ or cfg.task.name
        raise ValueError(f"with data.agent_root and no data.test_root each agent is tested on held-out tasks of its "
                         f"own data, which {name} does not provide (held_out_set, tasks.protocol.HeldOutTasks): "
                         f"set data.test_root=DIR, a test folder every node holds")
    return family.held_out_set(agent, num_agents, cfg.seed, num_tasks)


def check_task_data(cfg: "Config", agents: Iterable[int], num_agents: int,
                    family: Optional[TaskFamily] = None) -> None:
    """Raise ``ValueError`` now if the data cannot serve the configured episodes to ``agents`` (this process's:
    one under torchrun, so that no agent opens another's data) and the test set (missing files, too few classes
    for N-way, too few images for K + Q): called before any process group or run directory exists. Decodes a
    dataset into its cache on first use (``family``: check this one, if built)."""
    from dif_maml_dist import seeding

    family = family or task_family(cfg)
    sampler, per_agent = None, tests_held_out_per_agent(cfg)
    if per_agent and not hasattr(family, "held_out_set"):
        held_out_set(cfg, family, 0, num_agents, 1)  # says what is missing, once for all agents
    for agent in agents:
        try:
            sampler = family.sampler(agent, num_agents)
            if per_agent:
                held_out_set(cfg, family, agent, num_agents, 1)
        except AgentDataError:
            raise
        except ValueError as err:
            if cfg.data.agent_root is None:  # shared data: every process meets the same mistake
                raise
            said = str(err)
            raise AgentDataError(said if said.startswith(f"agent {agent}") else f"agent {agent}: {said}") from None
    if not per_agent:
        family.eval_set(cfg.seed, 1)
    if sampler is not None:  # one task from a stream of its own (the agents' task streams are left untouched)
        check_model(cfg, family, sampler.sample(seeding.generator(cfg.seed, seeding.Stream.MODEL_CHECK), 1))


__all__ = ["FAMILIES", "TARGET_TYPES", "TASKS", "MiniImagenetFamily", "OmniglotFamily", "SinusoidFamily",
           "SinusoidTasks", "TableFamily", "AgentDataError", "HeldOutTasks", "TaskFamily", "TaskSampler", "TaskSet",
           "agent_root", "check_task_data", "held_out_set", "task_family", "tests_held_out_per_agent"]
