"""Every check of a config that its types cannot make: names, ranges, consistency, each a one-line
``ValueError`` naming the key and the fix. Names are read from each component's registry (``tasks.TASKS``,
``graphs.topology.GRAPHS``, ``graphs.weights.WEIGHT_RULES``, ``graphs.schedules.SCHEDULES``,
``gossip.combiners.STRATEGIES``, ``gossip.compression.COMPRESSORS``, ``engine.agent.OPTIMIZERS`` and
``LR_SCHEDULES``, ``learning.algorithms.ALGORITHMS`` and ``META_GRADIENT_PATHS``, ``tasks.TARGET_TYPES``), so a new
component is a new registry entry, not a new check here.

Size: one check per setting and one refusal per pair of settings that do not combine, each with its own message;
they are kept together so that what the runtime accepts can be read in one place."""

from __future__ import annotations

import math

from dif_maml_dist.config import (
    BACKENDS,
    DEVICES,
    DTYPES,
    INITS,
    MIN_TIMEOUT_S,
    ON_PEER_FAILURE,
    RUNTIME_MODES,
    SHARING,
    SPLITS,
    Config,
)
from dif_maml_dist.engine.agent import LR_SCHEDULES, OPTIMIZERS
from dif_maml_dist.gossip.combiners import STRATEGIES
from dif_maml_dist.gossip.compression import COMPRESSORS
from dif_maml_dist.graphs.schedules import SCHEDULES
from dif_maml_dist.graphs.topology import GRAPHS
from dif_maml_dist.graphs.weights import WEIGHT_RULES
from dif_maml_dist.learning.algorithms import META_GRADIENT_PATHS, algorithm_refusal
from dif_maml_dist.tasks import CUSTOM, FAMILIES, TARGET_TYPES, TASKS, tests_held_out_per_agent


def _choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {key} {value!r}; choose one of: {', '.join(allowed)}")


def _positive(value: float, key: str, hint: str = "") -> None:
    if not (value > 0) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{key} must be a positive number, got {value!r}{hint}")


def validate(cfg: Config) -> Config:
    """Check what the schema's types cannot: names, ranges, consistency. Raises ``ValueError`` (one line)."""
    for key, value in (("seed", cfg.seed), ("task.split_seed", cfg.task.split_seed),
                       ("topology.graph_seed", cfg.topology.graph_seed)):
        if value < 0:  # numpy's seed sequences take non-negative integers only
            raise ValueError(f"{key} must be a non-negative integer, got {value}")
    t = cfg.task
    _choice(t.name, TASKS, "task")
    if t.name == CUSTOM and not t._target_:
        raise ValueError("task=custom needs your family's class: add task._target_=package.module.Family "
                         "(README: Your own problem)")
    if t._target_ and t.name != CUSTOM:
        raise ValueError(f"task._target_ names your own family, but task={t.name} is a built-in one: use "
                         f"task=custom task._target_={t._target_}")
    if t.args and not t._target_:
        raise ValueError("task.args are the keyword arguments of task._target_ (task=custom); the built-in families "
                         "take none")
    if cfg.model.args and not cfg.model._target_:
        raise ValueError("model.args are the keyword arguments of model._target_; set model._target_=package.module.Net")
    if not t.amplitude_min < t.amplitude_max:
        raise ValueError(f"task.amplitude_min ({t.amplitude_min}) must be below task.amplitude_max ({t.amplitude_max})")
    if not t.phase_min <= t.phase_max:
        raise ValueError(f"task.phase_min ({t.phase_min}) must not exceed task.phase_max ({t.phase_max})")
    if not t.x_min < t.x_max:
        raise ValueError(f"task.x_min ({t.x_min}) must be below task.x_max ({t.x_max})")
    for key in ("num_support", "num_query", "meta_batch", "eval_tasks", "n_way", "k_shot", "q_query", "image_size"):
        _positive(getattr(t, key), f"task.{key}")
    if t.final_eval_tasks is not None:
        _positive(t.final_eval_tasks, "task.final_eval_tasks")
    _choice(t.sharing, SHARING, "task.sharing")
    if t.name == "omniglot" and not cfg.data.root:
        raise ValueError("task=omniglot_* needs the dataset: add data.root=DIR (the folder holding omniglot-py/)")
    if t.name == "miniimagenet" and not cfg.data.root:
        raise ValueError("task=miniimagenet_* needs the dataset: add data.root=DIR (the folder holding "
                         "mini-imagenet-cache-{train,test}.pkl, or images/ with train.csv and test.csv)")
    _choice(t.split, SPLITS, "task.split")
    if t.split != "random" and t.name != "omniglot":
        raise ValueError(f"task.split={t.split} is Omniglot's background/evaluation protocol; {t.name} has its own "
                         f"splits: drop task.split")
    if t.val_alphabets < 0:
        raise ValueError(f"task.val_alphabets must be 0 or more, got {t.val_alphabets}")
    if t.sharing == "alphabets" and t.name != "omniglot":
        raise ValueError(f"task.sharing=alphabets needs Omniglot's alphabets; for {t.name} use same or "
                         f"disjoint_classes")
    if cfg.data.agent_root is not None and t.name in FAMILIES and not FAMILIES[t.name].reads_agent_data:
        readers = [name for name, family in FAMILIES.items() if family.reads_agent_data]
        raise ValueError(f"task={t.name} reads one shared dataset (data.root); each agent's own data "
                         f"(data.agent_root) is read by task={', '.join(readers)} or {CUSTOM}")
    if cfg.data.agent_root is not None and t.sharing != "same":
        raise ValueError(f"task.sharing={t.sharing} deals the shared data.root's classes or files out to the agents; "
                         f"with data.agent_root each agent has data of its own: drop task.sharing")
    _positive(cfg.model.filters, "model.filters")
    if t.channels not in (1, 3):
        raise ValueError(f"task.channels must be 1 (grayscale) or 3 (RGB), got {t.channels}")
    _choice(t.target_type, tuple(TARGET_TYPES), "task.target_type")
    if not t.target.strip():
        raise ValueError("task.target must name the target column, got an empty name")
    if t.features is not None:
        if not t.features:
            raise ValueError("task.features=[] names no feature column: list the columns, or drop it (every column "
                             "but the target)")
        repeated = sorted({c for c in t.features if t.features.count(c) > 1})
        if repeated:
            raise ValueError(f"task.features names column {repeated[0]!r} twice")
        if t.target in t.features:
            raise ValueError(f"task.features holds the target column {t.target!r} (task.target): drop it from the "
                             f"features")
    if (t.invert or not t.standardise) and t.name not in ("image_folder", CUSTOM):
        raise ValueError(f"task.invert and task.standardise are image_folder's decoding switches; task={t.name} "
                         f"decodes its dataset its own way: drop them")

    if not cfg.model.hidden or any(h <= 0 for h in cfg.model.hidden):
        raise ValueError(f"model.hidden must be a non-empty list of positive widths, got {cfg.model.hidden}")

    g = cfg.topology
    _choice(g.name, tuple(GRAPHS), "topology")
    _choice(g.weights, (*WEIGHT_RULES, "file"), "topology.weights")
    if g.num_agents is not None and g.num_agents < 1:
        raise ValueError(f"topology.num_agents must be at least 1, got {g.num_agents}")
    if g.name in ("grid", "torus") and (g.rows < 1 or g.cols < 1):
        raise ValueError(f"topology.rows and topology.cols must be at least 1, got {g.rows}x{g.cols}")
    if g.name == "erdos_renyi" and not 0.0 < g.edge_prob <= 1.0:
        raise ValueError(f"topology.edge_prob must be in (0, 1], got {g.edge_prob}")
    if g.weights == "file" and not g.weight_matrix:
        raise ValueError("topology.weights=file needs the matrix: add topology.weight_matrix=PATH")
    if g.name == "edge_list" and not g.edge_list:
        raise ValueError("topology=edge_list needs a file: add topology.edge_list=PATH")

    _choice(g.schedule, SCHEDULES, "topology.schedule")
    if not 0.0 < g.active_prob <= 1.0:
        raise ValueError(f"topology.active_prob must be in (0, 1], got {g.active_prob}")
    if g.schedule != "static" and g.weights == "file":
        raise ValueError(f"topology.schedule={g.schedule} computes each round's weights from its graph; a weight "
                         f"matrix file fits the static schedule only: use topology.weights=metropolis")

    s = cfg.strategy
    _choice(s.name, tuple(STRATEGIES), "strategy")
    if s.combine_every < 1:
        raise ValueError(f"strategy.combine_every must be at least 1 (combine every N-th iteration), "
                         f"got {s.combine_every}")
    if s.name != "noncooperative" and s.combine_every > cfg.train.iterations:
        raise ValueError(f"strategy.combine_every={s.combine_every} is above train.iterations={cfg.train.iterations}: "
                         f"the agents would never combine; use at most {cfg.train.iterations} (or "
                         f"strategy=noncooperative)")
    if g.schedule != "static" and s.name != "dif_maml":
        raise ValueError(f"topology.schedule={g.schedule} changes dif_maml's neighbour graph; strategy={s.name} "
                         f"uses no graph: drop the schedule or use strategy=dif_maml")

    c = cfg.compression
    _choice(c.name, tuple(COMPRESSORS), "compression")
    if c.name != "none" and s.name != "dif_maml":
        raise ValueError(f"compression={c.name} compresses dif_maml's neighbour exchange; strategy={s.name} has "
                         f"none: drop compression or use strategy=dif_maml")
    if not 0.0 < c.ratio <= 1.0:
        raise ValueError(f"compression.ratio must be in (0, 1] (the fraction of entries sent), got {c.ratio}")
    if not 1 <= c.bits <= 16:
        raise ValueError(f"compression.bits must be in 1..16, got {c.bits}")
    if c.name == "qsgd" and c.bits < 2:
        raise ValueError("compression=qsgd needs at least 2 bits (a sign and one level); for 1 bit per entry use "
                         "compression=sign")
    if c.gamma is not None and not 0.0 < c.gamma <= 1.0:
        raise ValueError(f"compression.gamma must be in (0, 1] (the consensus step), got {c.gamma}")
    if c.zeta is not None and not 0.0 < c.zeta <= 1.0:
        raise ValueError(f"compression.zeta must be in (0, 1] (the reference copies' step), got {c.zeta}")
    _validate_staleness(cfg)

    o = cfg.optim
    _choice(o.name, tuple(OPTIMIZERS), "optim")
    _choice(o.schedule, tuple(LR_SCHEDULES), "optim.schedule")
    if not 0.0 <= o.min_lr <= o.lr:
        raise ValueError(f"optim.min_lr must be in [0, optim.lr={o.lr:g}], got {o.min_lr:g}")
    _positive(o.lr, "optim.lr", " (the meta step size mu)")
    if o.name == "adam":
        if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        _positive(o.eps, "optim.eps")
    if o.momentum < 0:
        raise ValueError(f"optim.momentum must be non-negative, got {o.momentum}")

    m = cfg.maml
    _positive(m.inner_lr, "maml.inner_lr", " (the inner step size alpha)")
    _positive(m.inner_steps, "maml.inner_steps")
    _positive(m.eval_inner_steps, "maml.eval_inner_steps")
    if m.final_adapt_steps < 0:
        raise ValueError(f"maml.final_adapt_steps must be non-negative, got {m.final_adapt_steps}")
    _choice(m.meta_grad_path, ("auto", *META_GRADIENT_PATHS), "maml.meta_grad_path")
    refusal = algorithm_refusal(m)  # the algorithm names and their combinations, from the algorithms' registry
    if refusal:
        raise ValueError(refusal)
    for key in ("multi_step_loss_until", "order_annealing_until"):
        if getattr(m, key) < 0:
            raise ValueError(f"maml.{key} must be an iteration (0: none), got {getattr(m, key)}")
    for key in ("vmap_min_tasks", "vmap_chunk"):
        if getattr(m, key) is not None:
            _positive(getattr(m, key), f"maml.{key}")

    tr = cfg.train
    _positive(tr.iterations, "train.iterations")
    _positive(tr.eval_every, "train.eval_every")
    _positive(tr.log_every, "train.log_every")
    _choice(tr.init, INITS, "train.init")
    if tr.checkpoint_every < 0:
        raise ValueError(f"train.checkpoint_every must be 0 (no checkpoints) or positive, got {tr.checkpoint_every}")
    if tr.keep_checkpoints < 2:
        raise ValueError(f"train.keep_checkpoints must be at least 2 (agents may be one checkpoint apart when a "
                         f"job dies), got {tr.keep_checkpoints}")
    _choice(tr.dtype, DTYPES, "train.dtype")
    if tr.validate and t.name != "omniglot":
        raise ValueError(f"train.validate=true selects the best model on Omniglot's validation characters; {t.name} "
                         f"has no validation split here: drop train.validate")

    r = cfg.runtime
    _choice(r.mode, RUNTIME_MODES, "runtime.mode")
    _choice(r.device, DEVICES, "runtime.device")
    _choice(r.backend, BACKENDS, "runtime.backend")
    if r.threads is not None:
        _positive(r.threads, "runtime.threads")
    for key, why in (("timeout_s", "a neighbour merely descheduled on a loaded machine would count as hung"),
                     ("init_timeout_s", "starting the process group alone takes seconds")):
        value = getattr(r, key)
        _positive(value, f"runtime.{key}")
        if value < MIN_TIMEOUT_S:
            raise ValueError(f"runtime.{key}={value:g} is too short: {why}; use at least {MIN_TIMEOUT_S:g}")
    if r.eval_timeout_s is not None:
        _positive(r.eval_timeout_s, "runtime.eval_timeout_s")
        if r.eval_timeout_s < r.timeout_s:
            raise ValueError(f"runtime.eval_timeout_s={r.eval_timeout_s:g} is shorter than runtime.timeout_s="
                             f"{r.timeout_s:g}: an evaluation waits for other agents' work, not for one message; "
                             f"give at least {r.timeout_s:g} (or null: sized to the evaluation)")
    for key in ("eval_chunk", "agent_chunk", "chunk_threads"):
        if getattr(r, key) is not None:
            _positive(getattr(r, key), f"runtime.{key}")
    if r.backend == "nccl" and r.device == "cpu":
        raise ValueError("runtime.backend=nccl needs GPUs: use runtime.device=cuda (or auto), or runtime.backend=gloo")
    _validate_departures(cfg)
    for entry in r.slowdown:
        numbers = isinstance(entry, (list, tuple)) and all(isinstance(x, (int, float)) for x in entry)
        if not numbers or len(entry) != 2 or entry[0] < 0 or entry[0] != int(entry[0]) or not entry[1] >= 1:
            raise ValueError(f"runtime.slowdown entry {entry} is not [agent, factor] with agent >= 0 and "
                             f"factor >= 1 (how many times slower the agent computes)")
    if len({e[0] for e in r.slowdown}) != len(r.slowdown):
        raise ValueError("runtime.slowdown names an agent twice; give each slow agent one factor")
    return cfg


def _refuse(setting: str, refusals: tuple[tuple[bool, str], ...]) -> None:
    """The first of ``refusals`` (condition, why) that holds, as ``setting: why``."""
    for refused, why in refusals:
        if refused:
            raise ValueError(f"{setting}: {why}")


def _validate_staleness(cfg: Config) -> None:
    s = cfg.strategy
    if s.staleness < 0:
        raise ValueError(f"strategy.staleness must be 0 (synchronous) or a number of rounds, got {s.staleness}")
    if s.stale_step is not None and not 0.0 < s.stale_step <= 1.0:
        raise ValueError(f"strategy.stale_step must be in (0, 1] (the stale combine's consensus step), got "
                         f"{s.stale_step}")
    if not s.staleness:
        if s.stale_step is not None:
            raise ValueError("strategy.stale_step is the step of strategy.staleness's combine: set "
                             "strategy.staleness too, or drop it")
        return
    refusals = (
        (s.name != "dif_maml", f"it delays dif_maml's neighbour messages; strategy={s.name} exchanges none: use "
                               f"strategy=dif_maml"),
        (s.overlap, "a stale round already computes while its messages travel: drop strategy.overlap"),
        (cfg.compression.name != "none", "compressed gossip updates each edge's reference copies at both ends in "
                                         "the same round: use compression=none"),
        (cfg.topology.schedule != "static", "a stale message comes from an earlier round's neighbours, weighted by "
                                            "this round's graph: use topology.schedule=static"),
        (cfg.runtime.on_peer_failure == "continue", "a departure would be noticed s rounds late: use "
                                                    "runtime.on_peer_failure=stop"),
    )
    _refuse(f"strategy.staleness={s.staleness}", refusals)


def _validate_departures(cfg: Config) -> None:
    r = cfg.runtime
    _choice(r.on_peer_failure, ON_PEER_FAILURE, "runtime.on_peer_failure")
    if r.departures and r.on_peer_failure != "continue":
        raise ValueError("runtime.departures needs the others to go on without the departed: add "
                         "runtime.on_peer_failure=continue")
    for entry in r.departures:
        if len(entry) != 2 or not 0 <= entry[0] or not 1 <= entry[1] <= cfg.train.iterations:
            raise ValueError(f"runtime.departures entry {list(entry)} is not [agent, iteration] with agent >= 0 and "
                             f"1 <= iteration <= train.iterations ({cfg.train.iterations})")
    if len({e[0] for e in r.departures}) != len(r.departures):
        raise ValueError("runtime.departures names an agent twice; an agent leaves once")
    if r.on_peer_failure != "continue":
        return
    refusals = (
        (cfg.strategy.name == "centralized", "strategy=centralized averages over every agent (an all-reduce that "
                                             "needs them all): use strategy=dif_maml"),
        (cfg.compression.name != "none", "compressed gossip keeps per-edge reference copies that a departure "
                                         "would leave inconsistent: use compression=none"),
        (cfg.topology.weights != "metropolis", "the weights of the surviving graph are computed by each agent from "
                                               "its neighbours' degrees (Metropolis): use topology.weights=metropolis"),
        (cfg.train.validate, "the best centroid needs every agent's model at every evaluation: drop train.validate"),
        (cfg.train.resume, "an agent restarted into a running network is not supported yet; resume the whole run "
                           "with runtime.on_peer_failure=stop"),
        (tests_held_out_per_agent(cfg), "the network's figures are computed after the run in one process, which "
                                        "would read every agent's held-out data: set data.test_root=DIR (a test "
                                        "folder every node holds), or launch with runtime.on_peer_failure=stop"),
        (r.backend == "nccl", "its exchanges use per-edge gloo groups: use runtime.backend=gloo (GPU tensors are "
                              "staged through host memory)"),
        (cfg.strategy.overlap, "a departed neighbour is noticed inside the exchange, after the local step it would "
                               "have overlapped: use strategy.overlap=false"),
    )
    _refuse("runtime.on_peer_failure=continue", refusals)
