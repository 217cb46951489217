"""dif_maml_dist: decentralized multi-agent meta-learning (Dif-MAML) as a true multi-process runtime.

The names a user's code imports are here; the layout (one subpackage per concern, each importing only those below
it) is in the README's "How it works".
"""

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first use, so that importing a light module such as
#: ``dif_maml_dist.config`` does not import torch)
_PUBLIC = {
    "load_run": "dif_maml_dist.run.saved",  # a finished run's models: evaluate, adapt
    "Run": "dif_maml_dist.run.saved",
    "Config": "dif_maml_dist.config",  # the typed config every component takes
    "TaskFamily": "dif_maml_dist.tasks",  # what a kind of task provides (the built-in families implement it)
    "TaskSampler": "dif_maml_dist.tasks",
    "TaskSet": "dif_maml_dist.tasks",
    "agent_root": "dif_maml_dist.tasks",  # an agent's own data folder (data.agent_root), checked
    "TaskBatch": "dif_maml_dist.learning.batch",  # a batch of tasks' support and query sets
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dif_maml_dist' has no attribute {name!r}")
