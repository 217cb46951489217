"""Typed configuration: the schema hydra validates against, and the checks hydra cannot express.

Every field is documented where it is declared. Library code receives these dataclasses, never a raw
``DictConfig``: ``train.py`` converts hydra's config once with :func:`from_omegaconf` and validates it.
This module imports no torch, so it is cheap to load from tests and launch scripts.

Size: the schema is one tree of dataclasses, each field documented where it is declared; split by section, a
user looking up a setting would have to know which file holds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

SHARING = ("same", "disjoint_classes", "alphabets")
SPLITS = ("random", "background_evaluation")
DTYPES = ("float32", "float64")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
#: The shortest runtime.timeout_s accepted: below it, process-group start-up alone would time out.
MIN_TIMEOUT_S = 5.0
RUNTIME_MODES = ("torchrun", "simulate")
ON_PEER_FAILURE = ("stop", "continue")
INITS = ("shared", "per_agent")


@dataclass
class TaskConfig:
    """A task family and how its tasks are split among agents."""

    name: str = "sinusoid"  #: task family: one of tasks.TASKS (custom: your own, ``_target_``)
    #: task=custom: your family's class as ``package.module.Class`` (the ``TaskFamily`` protocol,
    #: ``dif_maml_dist.tasks.protocol``), importable where every agent runs; built as ``Class(cfg, **args)``
    _target_: Optional[str] = None
    args: dict[str, Any] = field(default_factory=dict)  #: keyword arguments of ``_target_`` (``+task.args.NAME=VALUE``)
    amplitude_min: float = 0.1  #: sinusoid amplitude range; agent k samples from the k-th of K equal slices
    amplitude_max: float = 5.0
    phase_min: float = 0.0  #: phase range (radians), the same for every agent
    phase_max: float = math.pi
    x_min: float = -5.0  #: input range of the sampled points
    x_max: float = 5.0
    num_support: int = 10  #: points (table_tasks regression: rows) per task used for adaptation (x_in, "K-shot")
    num_query: int = 10  #: points per task used for the meta-loss (x_o), drawn separately from the support
    meta_batch: int = 1  #: tasks per agent per iteration (|S_k|)
    eval_tasks: int = 1000  #: size of the shared test set (full amplitude/phase range), identical on every agent
    final_eval_tasks: Optional[int] = None  #: test tasks for the final figures (None: the eval_tasks set)
    # -- few-shot classification (omniglot, miniimagenet, image_folder, table_tasks classification) --
    n_way: int = 5  #: classes per task
    k_shot: int = 1  #: support images per class
    q_query: int = 15  #: query images per class
    image_size: int = 28  #: images are resized to image_size x image_size (28 Omniglot, 84 MiniImagenet)
    rotations: bool = True  #: rotations by 90, 180, 270 degrees count as extra training classes (Omniglot)
    channels: int = 1  #: image_folder: 1 (grayscale) or 3 (RGB); transparent images are composited onto white
    #: image_folder: pixels decoded as 255 - pixel, so that dark strokes on light paper (scans, Omniglot's PNGs)
    #: become bright on a dark 0 background, as task=omniglot decodes its drawings
    invert: bool = False
    #: image_folder with shared data (data.root): standardise pixels per channel with the training classes' mean
    #: and deviation; false: pixels stay on [0, 1], as task=omniglot feeds them (with data.agent_root they always do)
    standardise: bool = True
    #: training classes (tables: files) per agent: same (all), disjoint_classes (a partition), alphabets (Omniglot)
    sharing: str = "same"
    #: Omniglot: seed of the train / validation / test character split (MiniImagenet has its own); image_folder,
    #: table_tasks: of the class or file split when the folders do not give it
    split_seed: int = 0
    #: Omniglot's protocol, one of SPLITS: random (1623 characters split 1100 / 100 / 423 at random with
    #: split_seed: Finn et al.'s MAML protocol) or background_evaluation (Lake et al.'s: train on the 30 background
    #: alphabets, less val_alphabets of them held out for validation; test on the 20 evaluation alphabets only)
    split: str = "random"
    val_alphabets: int = 5  #: split=background_evaluation: background alphabets held out as validation (seeded)
    # -- tables (table_tasks: one task per CSV file) --
    #: the feature columns by name, in the model's input order; None: every column but the target of the first
    #: file (data.test_root's with each agent's own data, else the shared training files'), and every file must
    #: have just those columns
    features: Optional[list[str]] = None
    target: str = "y"  #: the target column: a number (regression) or a label, any text (classification)
    #: one of tasks.table_tasks.TARGET_TYPES: regression (num_support + num_query rows of a file per episode, MSE)
    #: or classification (n_way of a file's labels with k_shot + q_query rows each, cross-entropy, accuracy)
    target_type: str = "regression"


@dataclass
class ModelConfig:
    """The learner."""

    #: sinusoid, table_tasks: hidden widths of the MLP (inputs -> ... -> outputs)
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    filters: int = 64  #: classification: Conv4 filters per layer (64 Omniglot, 32 MiniImagenet)
    #: your own ``nn.Module`` instead of the family's model, as ``package.module.Class``, built as ``Class(**args)``
    #: (BatchNorm layers normalise with each batch's own statistics, as MAML does: README "Your own problem")
    _target_: Optional[str] = None
    args: dict[str, Any] = field(default_factory=dict)  #: keyword arguments of ``_target_`` (``+model.args.NAME=VALUE``)


@dataclass
class DataConfig:
    """Where datasets live."""

    root: Optional[str] = None  #: folder holding the extracted dataset (for Omniglot: ROOT/omniglot-py/...)
    #: each agent's own data folder, on the machine the agent runs on: ``{agent}`` becomes the agent's id (e.g.
    #: /data/site{agent}); relative to the working directory. Families that read it (custom ones through
    #: ``tasks.agent_root``) open no other agent's files
    agent_root: Optional[str] = None
    #: a test location every node holds a copy of (the same files on each): the test tasks that every agent and the
    #: centroid are evaluated on, for families that read each agent's own data; relative to the working directory
    test_root: Optional[str] = None
    #: where decoded datasets are cached (Omniglot, MiniImagenet, image_folder), one file per dataset named by a
    #: fingerprint of its files relative to its root (found again after a move); the dataset folders themselves
    #: are only read, so they may be read-only. None: $XDG_CACHE_HOME/dif_maml_dist, else ~/.cache/dif_maml_dist
    cache_dir: Optional[str] = None
    download: bool = False  #: Omniglot: fetch the dataset into root through torchvision if missing (needs internet)


@dataclass
class TopologyConfig:
    """The communication graph and its combination weights."""

    name: str = "paper6"  #: one of TOPOLOGIES
    #: K for ring/complete/star/erdos_renyi (default 6); edge_list: nodes 0..K-1 (default: largest node id + 1)
    num_agents: Optional[int] = None
    rows: int = 2  #: grid/torus height
    cols: int = 3  #: grid/torus width
    edge_prob: float = 0.5  #: erdos_renyi edge probability
    graph_seed: int = 0  #: erdos_renyi seed; the graph is re-drawn (seed, seed+1, ...) until connected
    #: edge_list: path to a text file with one "u v" pair of node ids per line (# comments allowed)
    edge_list: Optional[str] = None
    weights: str = "metropolis"  #: combination rule; one of WEIGHT_RULES (file: read from weight_matrix)
    #: weights=file: a K x K text file (whitespace- or comma-separated) holding A, where A[l, k] is the weight
    #: agent k gives agent l's state; it must be non-negative, doubly stochastic and supported on the graph's edges
    weight_matrix: Optional[str] = None
    #: how the graph changes from one combination round to the next; one of SCHEDULES (static: the base graph
    #: every round; one_peer_exponential: one peer at distance 2^(round mod ceil(log2 K)), whatever the base graph;
    #: random_matching: a random maximal matching of the base edges; resample: each base edge active with
    #: probability active_prob). Rounds are derived from seed and round number alone (graphs/schedules.py)
    schedule: str = "static"
    active_prob: float = 0.5  #: schedule=resample: probability that a base edge is active in a round


@dataclass
class StrategyConfig:
    """How agents cooperate; everything else is shared code."""

    name: str = "dif_maml"  #: dif_maml (graph weights), centralized (all-reduce mean), noncooperative (no exchange)
    #: combine every N-th iteration only (local steps in between); 1: every iteration, as in the paper
    combine_every: int = 1
    #: adapt while combining: each iteration posts the agent's current state to its neighbours, computes the
    #: meta-gradient while the messages travel, then adds the local step to the combination,
    #: w_i = sum_l a_lk w_{l,i-1} - mu * step(w_{k,i-1}) (README, "Overlapped combine"). false: the paper's
    #: adapt-then-combine, where every exchange waits for the computation before it
    overlap: bool = False
    #: bounded staleness: each combination round corrects the agent's fresh state by the disagreement of ``s``
    #: rounds before, w_{k,i} = phi_{k,i} + gamma * sum_l a_lk (phi_{l,i-s} - phi_{k,i-s}) (the initial models before
    #: round 0), so a message has s iterations to arrive before it is needed (README, "Bounded staleness").
    #: 0: every round waits for the neighbours' states of the same round
    staleness: int = 0
    #: staleness: the consensus step gamma in (0, 1]. None: 0.9 x the largest stable one for the graph's weights,
    #: 2 cos(s pi / (2s + 1)) / (1 - lambda_min(A)), at most 1 (gossip/stale.py)
    stale_step: Optional[float] = None


@dataclass
class CompressionConfig:
    """What dif_maml's neighbour exchange sends. ``none`` sends the full state and combines exactly as the paper;
    the others send a compressed difference to reference copies and combine CHOCO-style (gossip/schemes.py)."""

    name: str = "none"  #: one of COMPRESSIONS
    ratio: float = 0.1  #: topk / randk: fraction of the entries sent, in (0, 1]
    bits: int = 4  #: qsgd: bits per entry on the wire, sign included, 2..16 (2^(bits-1) - 1 levels)
    #: consensus step gamma in (0, 1]: how far an agent moves towards its neighbours' reference copies per round.
    #: None: a step found stable on the sinusoid, which shrinks with what the compressor keeps
    #: (gossip.consensus_steps: topk 2.5 x ratio, randk ratio, qsgd and sign 0.5)
    gamma: Optional[float] = None
    #: step of the reference copies in (0, 1]: copy += zeta * decompressed message (ACTC's damping, for unbiased
    #: compressors whose noise rivals the signal). None: 1, except qsgd with 2 bits (0.3) or 3 bits (0.5)
    zeta: Optional[float] = None


@dataclass
class OptimConfig:
    """The local optimizer applied to the meta-gradient (its state is never combined)."""

    name: str = "adam"  #: one of OPTIMIZERS
    lr: float = 0.001  #: meta step size mu
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  #: Adam only
    eps: float = 1e-8  #: Adam only
    momentum: float = 0.0  #: SGD only (the paper uses plain SGD)
    #: constant | cosine: mu annealed from optim.lr at the first iteration to optim.min_lr at the last (MAML++'s
    #: outer schedule): engine.agent.LR_SCHEDULES
    schedule: str = "constant"
    min_lr: float = 0.0  #: cosine only: mu at the last iteration


@dataclass
class MamlConfig:
    """The meta-learning algorithm: inner adaptation and the meta-gradient (README, *Algorithms*)."""

    #: maml | anil (adapt the head only) | metasgd (a learned rate per parameter) | reptile (the step towards the
    #: adapted model, no second order and no query loss in the update): learning.algorithms.ALGORITHMS
    algorithm: str = "maml"
    inner_lr: float = 0.01  #: alpha, the inner (adaptation) step size; learned rates start at it
    inner_steps: int = 1  #: inner SGD steps in training
    first_order: bool = False  #: drop the Hessian term (FO-MAML); default is the exact second-order gradient
    #: MAML++'s learned rates: none | per_layer_per_step (a rate per parameter tensor and inner step, LSLR) |
    #: per_parameter (Meta-SGD's); learned rates are in the state: combined, checkpointed, saved, used to adapt
    learned_inner_lr: str = "none"
    #: MAML++'s multi-step loss: the objective weighs the query loss after every inner step, annealed from equal
    #: weights to the last step's (learning.algorithms.maml.step_loss_weights)
    multi_step_loss: bool = False
    multi_step_loss_until: int = 0  #: the iteration by which the multi-step weights have annealed (0: at once)
    #: MAML++'s derivative-order annealing: first order up to and including this iteration, second order after
    order_annealing_until: int = 0
    eval_inner_steps: int = 1  #: adaptation steps for the "after adaptation" test loss logged during training
    final_adapt_steps: int = 10  #: the final loss-vs-steps curve covers 0..final_adapt_steps
    #: loop | vmap | auto: per model kind, the faster on a 2-core CPU (maml.AUTO_VMAP_FROM, benchmarks/bench_peers.py)
    meta_grad_path: str = "auto"
    #: auto picks vmap from this many tasks per batch up; None: the model kind's measured crossover (MLP: 4;
    #: Conv4: never, the per-task loop is faster and leaner)
    vmap_min_tasks: Optional[int] = None
    #: vmap path: tasks differentiated at once (memory grows with it); None: the whole meta-batch
    vmap_chunk: Optional[int] = None


@dataclass
class TrainConfig:
    """The schedule."""

    iterations: int = 24000  #: meta-iterations (the paper: 4000 tasks x 6 epochs)
    eval_every: int = 200  #: evaluate on the shared test tasks every N iterations (and at the end)
    log_every: int = 50  #: write a per-agent training record every N iterations
    init: str = "shared"  #: shared: every agent starts from one model; per_agent: each from its own random draw
    dtype: str = "float32"  #: parameter/data precision; float64 for numerical reference runs
    save_models: bool = True  #: write final per-agent and centroid models to DIR/models/
    #: Omniglot: at every evaluation also score the centroid on task.eval_tasks tasks of the validation characters
    #: (network.jsonl: centroid_val_*), keep the best centroid (models/best_centroid.pt, by validation accuracy)
    #: and report its test figures in summary.json (best_centroid) next to the final model's
    validate: bool = False
    #: write the loop state to DIR/checkpoints/ (every agent's, or the simulator's) every N iterations and at the
    #: last one, so that a finished run can be extended (0: never, and such a run cannot be continued)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  #: newest checkpoints kept per agent (at least 2: agents may be one apart at a crash)
    #: continue the run in hydra.run.dir from the newest iteration all agents (or the simulator) have a checkpoint
    #: of (torchrun restarts after a failure, under --max-restarts, do this by themselves)
    resume: bool = False


@dataclass
class RuntimeConfig:
    """Process, device and communication settings for one agent process."""

    mode: str = "torchrun"  #: torchrun: one agent per process; simulate: all agents in one process (python -m ...)
    vectorize: bool = True  #: simulate only: vmap over agents (fast) or per-agent code (bit-identical to torchrun)
    device: str = "auto"  #: auto: cuda:LOCAL_RANK if CUDA is available and the backend is nccl, else cpu
    backend: str = "auto"  #: auto: nccl on cuda, gloo on cpu
    #: torch intra-op threads per process; None: 1, for torchrun agents and the simulator alike (more threads
    #: only pay on an idle machine, and cost up to 25x on a busy one; runtime.intra_op_threads says why)
    threads: Optional[int] = None
    #: how long a training round (a neighbour exchange, or centralized's all-reduce) may wait before the agent
    #: stops and names who is behind (at least ``MIN_TIMEOUT_S``); on nccl the watchdog backstop is twice this
    timeout_s: float = 300.0
    #: how long process-group start-up may take: every agent's rendezvous, connections and the first barrier (all
    #: agents must have started within it; at least ``MIN_TIMEOUT_S``)
    init_timeout_s: float = 900.0
    #: how long a wait off the training path may take: evaluation gathers, resuming, the end-of-run barrier.
    #: None: timeout_s plus 4 x the time this agent's own share of the same work took (evaluations are split
    #: evenly, so a healthy agent finishes within that); at least timeout_s when given
    eval_timeout_s: Optional[float] = None
    #: PyTorch's deterministic algorithms (torch.use_deterministic_algorithms, cuDNN without autotuning, a fixed
    #: cuBLAS workspace): runs repeat bit for bit on a GPU too, a little slower. CPU runs are deterministic anyway
    deterministic: bool = False
    #: synchronise the GPU at the boundaries of compute and exchange so that compute_s / exchange_s are the
    #: device's times; false: no host synchronisation per iteration (the figures are then host time). No effect
    #: on the CPU, where both are the same
    time_phases: bool = False
    #: test tasks gathered and adapted at once in evaluation (bounds memory); None: by device, the task family's
    #: CPU figure (sinusoid 1000, Omniglot 8, MiniImagenet 2), 8 times that on a GPU
    eval_chunk: Optional[int] = None
    #: simulator, vectorised engine: agents per vmap call; None: by device, on the CPU half the agents, at least
    #: 32 and at most 256 (measured: cache-bound above), every agent at once on a GPU
    agent_chunk: Optional[int] = None
    #: simulator, vectorised engine on the CPU: threads computing chunks of agents side by side, each with one
    #: intra-op thread; None: every core this process may use. Results do not depend on it (each chunk is
    #: computed alone), unlike runtime.threads
    chunk_threads: Optional[int] = None
    #: what the agents do when one of them dies or does not answer within timeout_s. stop: the run fails (every
    #: agent stops; torchrun --max-restarts restarts all from the newest common checkpoint). continue: its
    #: neighbours drop it and the others go on; weights are recomputed locally, the network's figures come from
    #: per-agent snapshots (README, "Agents that leave")
    on_peer_failure: str = "stop"
    #: planned departures ``[[agent, iteration], ...]`` (on_peer_failure=continue): the agent leaves at that
    #: iteration (1-based) without a word, its last state is the one after the iteration before. In the simulator
    #: this studies churn; under torchrun the agent's process ends there as if it had been killed
    departures: list[list[int]] = field(default_factory=list)
    #: stragglers, for fault injection: ``[[agent, factor], ...]`` makes each named agent's meta-gradient take
    #: ``factor`` (>= 1) times as long as it does (it sleeps the difference), as a slower machine would. Results do
    #: not change, only time. The simulator's per-agent engine sleeps too (lock-step: everyone waits for it); the
    #: vectorised engine computes all agents at once and has no agent to slow
    slowdown: list[Any] = field(default_factory=list)


@dataclass
class MetricsConfig:
    """Where the records go besides ``metrics/*.jsonl`` (always written)."""

    #: also write every agent's records (and rank 0's network records) as TensorBoard event files under
    #: RUN_DIR/tensorboard/agent<k>/ and RUN_DIR/tensorboard/network/ (needs the tensorboard package: the
    #: ``tensorboard`` extra, pip install -e '.[tensorboard]')
    tensorboard: bool = False


@dataclass
class Config:
    """The whole run. Composed by hydra from conf/ (see conf/config.yaml)."""

    seed: int = 0  #: master seed: task streams, model init and the test set derive from it
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    maml: MamlConfig = field(default_factory=MamlConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def iterations_fraction(fraction: Any, *, _root_: Any) -> int:
    """``${iterations_fraction:F}`` in a config: the iteration that is fraction F of ``train.iterations`` (rounded),
    so that a schedule written for a paper's epochs scales with the run's length (``conf/algorithm/mamlpp.yaml``)."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"iterations_fraction:{fraction} must be a fraction of train.iterations in [0, 1]")
    return int(round(value * int(_root_.train.iterations)))


def from_omegaconf(node) -> Config:
    """Turn hydra's composed config into a :class:`Config` (the only place DictConfig is touched, and where its
    interpolations resolve); the entry points then check it (``run.validate.validate``)."""
    from omegaconf import OmegaConf

    # Registered here, where every config is resolved, so that a run's recorded config (.hydra/config.yaml keeps
    # the interpolation) resolves in evaluate and resume as it did in training.
    OmegaConf.register_new_resolver("iterations_fraction", iterations_fraction, replace=True)
    obj = OmegaConf.to_object(node)
    if not isinstance(obj, Config):  # composed without the structured schema (e.g. a plain YAML)
        obj = Config(**obj)
    return obj
