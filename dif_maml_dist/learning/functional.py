"""Learners: an ``nn.Module`` for names, shapes and initialisation, and pure functions of a parameter tuple for
everything MAML computes (:func:`functional`): the written-out forwards of the built-in MLP and Conv4
(``learning/models.py``), and any other module traced once by ``torch.fx`` into such a function (as fast as the
written-out forwards, ``benchmarks/bench_general_path.py``), checked against the module in ``tests/test_custom.py``.
"""

from __future__ import annotations

import copy
import logging
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
from dif_maml_dist.learning.models import MLP, Conv4, Forward, batch_stat_norm, conv4_forward, linear, mlp_forward

log = logging.getLogger(__name__)


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
    ``native_norm``: PyTorch's kernel, exact one task at a time only), linear layers as :func:`linear`, and with
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
            node.target = linear
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
        return FunctionalModel(module, layout, "mlp", mlp_forward, mlp_forward, mlp_forward)
    if type(module) is Conv4:
        eps = module[1].eps
        return FunctionalModel(module, layout, "conv4", conv4_forward(eps, True), conv4_forward(eps, False),
                               conv4_forward(eps, True, channels_last=True))

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
