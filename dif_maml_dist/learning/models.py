"""Learners: an ``nn.Module`` for names, shapes and initialisation, and a pure function of a parameter tuple for
everything MAML computes (:func:`functional`).

The MAML code runs a model thousands of times per meta-gradient on parameters that are not the module's own
(adapted weights, other agents' states). ``torch.func.functional_call`` swaps them into the module on every
call, which costs more than the forward pass of the paper's sinusoid MLP; the written-out forwards below call
the same ``torch.nn.functional`` ops on the tuple directly. ``tests/test_maml.py`` (MLP) and
``tests/test_conv4.py`` check each against its module. Any other module is traced once by ``torch.fx`` into such a
function (:func:`_traced_forwards`; as fast as the written-out forwards, ``benchmarks/bench_general_path.py``),
checked against the module in ``tests/test_custom.py``.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dif_maml_dist.learning.flat import FlatLayout

log = logging.getLogger(__name__)

#: ``forward(params, x)``: a model evaluated on a parameter tuple (in its :class:`FlatLayout` order).
Forward = Callable[[Sequence[Tensor], Tensor], Tensor]


class MLP(nn.Sequential):
    """Fully connected ReLU network ``in -> hidden... -> out`` (the paper's sinusoid model is 1-40-40-1)."""

    def __init__(self, in_features: int = 1, hidden: list[int] | tuple[int, ...] = (40, 40), out_features: int = 1):
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


class BatchStatNorm2d(nn.Module):
    """Batch normalisation on the statistics of the current batch only, written out in plain tensor ops.

    MAML normalises each task's images with that task's own batch statistics (no running averages). PyTorch's
    ``batch_norm`` under ``torch.vmap`` over tasks gives meta-gradients that differ from the per-task loop by
    2e-4 to 7e-3 relative in float64 (a functorch batching-rule bug, benchmarks/bench_peers.py); mean/var
    written out are exact under both. One task at a time, the native kernel is exact and faster, so
    :func:`functional` uses it there (:func:`batch_stat_norm`). The affine ``weight`` and ``bias`` are ordinary
    parameters, adapted and combined like every other.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_stat_norm(x, self.weight, self.bias, self.eps, native=False)


def batch_stat_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, native: bool) -> Tensor:
    """Batch norm of ``x`` ``[N, C, ...]`` on its own statistics (biased variance, as in training mode):
    PyTorch's kernel (``native``: fast, exact one task at a time, inexact under vmap) or written out (exact
    under vmap). ``weight`` and ``bias`` None: no affine transform."""
    if native:
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    x_hat = (x - mean) / torch.sqrt(var + eps)
    if weight is None:
        return x_hat
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x_hat * weight.view(shape) + bias.view(shape)


class Conv4(nn.Sequential):
    """The few-shot classification backbone of MAML: 4 x [conv 3x3 -> batch norm -> ReLU -> max-pool 2x2] -> linear.

    Omniglot: 1 x 28 x 28 inputs, 64 filters (features 64 x 1 x 1); MiniImagenet: 3 x 84 x 84, 32 filters
    (features 32 x 5 x 5).
    """

    def __init__(self, in_channels: int, num_classes: int, filters: int = 64, image_size: int = 28):
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            layers += [nn.Conv2d(channels, filters, 3, padding=1), BatchStatNorm2d(filters), nn.ReLU(),
                       nn.MaxPool2d(2)]
            channels, size = filters, size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 max-pool stages")
        layers += [nn.Flatten(), nn.Linear(filters * size * size, num_classes)]
        super().__init__(*layers)


def reset_parameters(model: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default Linear/Conv initialisation, drawn from ``gen`` instead of the global RNG.

    The global RNG is shared by every thread of a process (agents of the in-memory network are threads), so
    seeding it per agent would race; an explicit generator makes each agent's draw its own.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                # kaiming_uniform(a=sqrt(5)) and the bias rule of nn.Linear.reset_parameters: U(-1/sqrt(fan_in), ...)
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
                if module.bias is not None:
                    bound = 1 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(module.weight)[0])
                    nn.init.uniform_(module.bias, -bound, bound, generator=gen)
            elif isinstance(module, BatchStatNorm2d):  # the identity transform, as nn.BatchNorm2d starts
                module.weight.fill_(1.0)
                module.bias.zero_()


# ------------------------------------------------------------------------------------------ functional models
def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    if weight.shape[1] == 1:
        # One input feature (the sinusoid's x): a broadcast product, not a matrix product with an inner
        # dimension of one, which batched (vmapped) matrix kernels handle poorly.
        y = x * weight.t()
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _mlp_forward(params: Sequence[Tensor], x: Tensor) -> Tensor:
    last = len(params) // 2 - 1
    for layer in range(last + 1):
        x = _linear(x, params[2 * layer], params[2 * layer + 1])
        if layer < last:
            x = F.relu(x)
    return x


def _conv4_forward(eps: float, native_norm: bool, channels_last: bool = False) -> Forward:
    def forward(params: Sequence[Tensor], x: Tensor) -> Tensor:
        for block in range(4):  # per block: conv weight, conv bias, norm weight, norm bias
            w, b, gamma, beta = params[4 * block:4 * block + 4]
            x = F.conv2d(x, w, b, padding=1)
            if channels_last:
                # A one-channel input leaves the first convolution's output in NCHW; every later layer follows
                # the layout of its input. Max-pooling is several times faster on channels-last tensors.
                x = x.contiguous(memory_format=torch.channels_last)
            x = F.max_pool2d(F.relu(batch_stat_norm(x, gamma, beta, eps, native_norm)), 2)
        return F.linear(x.flatten(1), params[16], params[17])

    return forward


@dataclass(frozen=True)
class FunctionalModel:
    """A model as pure functions of its parameter tuple (see :class:`~dif_maml_dist.learning.flat.FlatLayout`)."""

    module: nn.Module  #: the architecture: names, shapes, initialisation; its own weights are not used
    layout: FlatLayout
    #: mlp | conv4 | module (any other nn.Module: traced by torch.fx into a function of the parameter tuple, or
    #: where it cannot be traced, run through functional_call)
    kind: str
    forward: Forward  #: one task at a time, differentiated twice (the per-task meta-gradient loop)
    batched_forward: Forward  #: exact under ``torch.vmap`` over tasks or agents
    #: one task at a time, where at most first derivatives are taken (evaluation, and the query loss of the
    #: per-task meta-gradient). Conv4: channels-last, ~2x faster there, but slower under second-order backward
    first_order_forward: Forward


def normalise_per_batch(module: nn.Module) -> None:
    """Make ``module`` a function of its parameters and input only, as MAML needs it: batch-norm layers use the
    statistics of the batch at hand (each task's own, as MAML normalises; no running averages, which would be
    state outside the meta-parameters that no combine step shares), and the module is put in eval mode (dropout
    off: a meta-gradient must not draw from the global random stream). Other buffers stay as constants."""
    module.eval()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
            m.forward = _batch_stat_forward(m)  # written out: PyTorch's kernel is inexact under vmap (above)


def _batch_stat_forward(m: nn.modules.batchnorm._BatchNorm) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:  # reads m.weight / m.bias at call time: functional_call swaps them in
        return batch_stat_norm(x, m.weight, m.bias, m.eps, native=False)

    return forward


#: torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` for the whole process while it traces, and
#: restores them when done: two traces at once (agents as threads, each building its model) would undo each other's
#: patches.
_TRACING = threading.Lock()


class _Tracer(torch.fx.Tracer):
    """Traces through every submodule down to tensor operations, so that each parameter is read by a ``get_attr``
    node; batch-norm layers stay whole, to be replaced by :func:`batch_stat_norm`."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _traced_forwards(module: nn.Module) -> tuple[Forward, Forward, Forward]:
    """``module``'s forward as pure functions of ``(parameter tuple, x)``, for :class:`FunctionalModel`'s
    ``forward``, ``batched_forward`` and ``first_order_forward``: traced once with ``torch.fx``
    (:func:`_pure_function`). Raises whatever tracing raises for a module ``torch.fx`` cannot trace (control flow
    on the input)."""
    with _TRACING:
        graph = _Tracer().trace(module)
    return (_pure_function(module, copy.deepcopy(graph), native_norm=True, channels_last=False),
            _pure_function(module, copy.deepcopy(graph), native_norm=False, channels_last=False),
            _pure_function(module, graph, native_norm=True, channels_last=True))


def _pure_function(module: nn.Module, graph: torch.fx.Graph, native_norm: bool, channels_last: bool) -> Forward:
    """The traced ``graph`` of ``module`` (changed in place) as a function of ``(parameter tuple, x)``: each
    parameter read from the tuple, by its place in ``module.parameters()`` (:class:`FlatLayout`'s order; a tied
    parameter appears once there), and buffers read from the module as constants. A call runs the graph's
    operations on the tuple directly, where ``functional_call`` swaps every parameter into the module first (~5x
    the sinusoid MLP's own forward). Batch norm on each batch's own statistics (:func:`batch_stat_norm`;
    ``native_norm``: PyTorch's kernel, exact one task at a time only), linear layers as :func:`_linear`, and with
    ``channels_last``, 2-d convolution outputs channels-last, as in the Conv4 forwards."""
    index = {id(p): i for i, p in enumerate(module.parameters())}
    with graph.inserting_before(next(iter(graph.nodes))):
        params = graph.placeholder("_params")  # an unusual name: it must not clash with the forward's arguments

    def read(p: Optional[Tensor], before: torch.fx.Node) -> Optional[torch.fx.Node]:
        """A node reading parameter ``p`` from the tuple."""
        if p is None:
            return None
        with graph.inserting_before(before):
            return graph.call_function(operator.getitem, (params, index[id(p)]))

    for node in list(graph.nodes):
        if node.op == "get_attr":
            *path, name = node.target.split(".")
            value = getattr(module.get_submodule(".".join(path)), name)
            if isinstance(value, nn.Parameter):  # else a buffer or a constant: read from the module
                node.replace_all_uses_with(read(value, node))
                graph.erase_node(node)
        elif node.op == "call_module":  # a batch-norm layer (the only leaves)
            m = module.get_submodule(node.target)
            with graph.inserting_before(node):
                norm = graph.call_function(batch_stat_norm, (node.args[0], read(m.weight, node), read(m.bias, node),
                                                             m.eps, native_norm))
            node.replace_all_uses_with(norm)
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is F.linear:
            node.target = _linear
        elif channels_last and node.op == "call_function" and node.target is F.conv2d:
            with graph.inserting_after(node):
                dense = graph.call_function(_channels_last, (node,))
            node.replace_all_uses_with(dense, delete_user_cb=lambda user: user is not dense)
    graph.lint()
    # The generated function itself, not the GraphModule: calling the module would add nn.Module.__call__'s
    # hook handling to every forward.
    return torch.fx.GraphModule(module, graph).forward


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def functional(module: nn.Module) -> FunctionalModel:
    """The fastest exact forwards for ``module``: written out for :class:`MLP` and :class:`Conv4`; any other
    module is changed in place by :func:`normalise_per_batch` and traced (:func:`_traced_forwards`), or where it
    cannot be traced, run through ``functional_call`` (slower; said once per module class on the log)."""
    layout = FlatLayout.of(module)
    if type(module) is MLP:
        return FunctionalModel(module, layout, "mlp", _mlp_forward, _mlp_forward, _mlp_forward)
    if type(module) is Conv4:
        eps = module[1].eps
        return FunctionalModel(module, layout, "conv4", _conv4_forward(eps, True), _conv4_forward(eps, False),
                               _conv4_forward(eps, True, channels_last=True))

    normalise_per_batch(module)
    try:
        return FunctionalModel(module, layout, "module", *_traced_forwards(module))
    except Exception as err:  # tracing runs the user's forward on symbolic values: it can fail in any way
        _note_untraceable(module, err)

    def call(params: Sequence[Tensor], x: Tensor) -> Tensor:
        return functional_call(module, dict(zip(layout.names, params)), (x,))

    return FunctionalModel(module, layout, "module", call, call, call)


_UNTRACEABLE_NOTED: set[str] = set()


def _note_untraceable(module: nn.Module, err: Exception) -> None:
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    if name not in _UNTRACEABLE_NOTED:
        _UNTRACEABLE_NOTED.add(name)
        reason = (str(err).strip().splitlines() or [""])[0]
        log.warning("%s cannot be traced by torch.fx (%s: %s): it runs through torch.func.functional_call, "
                    "slower (see README, 'Your own problem')", name, type(err).__name__, reason)
