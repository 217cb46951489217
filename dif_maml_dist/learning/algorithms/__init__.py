"""The meta-learning algorithms, each decentralized by the same Combine step (``maml.algorithm``).

Every algorithm is an :class:`~dif_maml_dist.learning.algorithms.base.Algorithm`: an inner rule (how a task
adapts, ``learning/adaptation.py``) and a meta-gradient. The Combine step averages the agent's whole state, so
an algorithm's learned inner rates are combined with the neighbours' like its weights.
"""

from __future__ import annotations

from typing import Callable

from dif_maml_dist.config import MamlConfig
from dif_maml_dist.learning.adaptation import RATES, InnerRule, head_indices
from dif_maml_dist.learning.algorithms.base import (
    AUTO_VMAP_FROM,
    META_GRADIENT_PATHS,
    Algorithm,
    BatchedMetaGradient,
    choose_path,
)
from dif_maml_dist.learning.algorithms.maml import GradientThroughAdaptation, step_loss_weights
from dif_maml_dist.learning.algorithms.reptile import Reptile
from dif_maml_dist.learning.flat import FlatLayout

__all__ = ["ALGORITHMS", "AUTO_VMAP_FROM", "Algorithm", "BatchedMetaGradient", "META_GRADIENT_PATHS", "build_algorithm",
           "choose_path", "state_layout", "step_loss_weights"]


def _through_adaptation(name: str, adapt_head: bool, rates: str | None) -> Callable[[MamlConfig, FlatLayout],
                                                                                     Algorithm]:
    def build(m: MamlConfig, model: FlatLayout) -> Algorithm:
        adapted = head_indices(model) if adapt_head else tuple(range(len(model.names)))
        inner = InnerRule(model, m.inner_lr, m.inner_steps, adapted, rates or _learned(m.learned_inner_lr))
        return GradientThroughAdaptation(name, inner, m.first_order, m.order_annealing_until, m.multi_step_loss,
                                         m.multi_step_loss_until)

    return build


def _reptile(m: MamlConfig, model: FlatLayout) -> Algorithm:
    return Reptile("reptile", InnerRule(model, m.inner_lr, m.inner_steps, tuple(range(len(model.names)))))


def _learned(setting: str) -> str:
    return "fixed" if setting == "none" else setting


#: maml.algorithm -> builder from the config and the model's layout
ALGORITHMS: dict[str, Callable[[MamlConfig, FlatLayout], Algorithm]] = {
    "maml": _through_adaptation("maml", adapt_head=False, rates=None),
    "anil": _through_adaptation("anil", adapt_head=True, rates=None),
    "metasgd": _through_adaptation("metasgd", adapt_head=False, rates="per_parameter"),
    "reptile": _reptile,
}
#: maml.learned_inner_lr's choices (metasgd implies per_parameter)
LEARNED_INNER_LR = ("none",) + RATES[1:]


def algorithm_refusal(m: MamlConfig) -> str | None:
    """Why ``m`` asks for a combination no algorithm defines, or None."""
    if m.algorithm not in ALGORITHMS:
        return f"unknown maml.algorithm {m.algorithm!r}; choose one of: {', '.join(ALGORITHMS)}"
    if m.learned_inner_lr not in LEARNED_INNER_LR:
        return (f"unknown maml.learned_inner_lr {m.learned_inner_lr!r}; choose one of: "
                f"{', '.join(LEARNED_INNER_LR)}")
    if m.algorithm == "metasgd" and m.learned_inner_lr != "none":
        return "maml.algorithm=metasgd learns a rate per parameter already: leave maml.learned_inner_lr=none"
    if m.algorithm == "reptile":
        mamlpp = {"maml.learned_inner_lr": m.learned_inner_lr != "none", "maml.multi_step_loss": m.multi_step_loss,
                  "maml.order_annealing_until": m.order_annealing_until > 0, "maml.first_order": m.first_order}
        chosen = [k for k, on in mamlpp.items() if on]
        if chosen:
            return (f"maml.algorithm=reptile does not differentiate through the adaptation: {', '.join(chosen)} "
                    f"has no meaning there; leave it at its default")
    return None


def build_algorithm(m: MamlConfig, model: FlatLayout) -> Algorithm:
    """The algorithm ``m`` selects, for a model with parameters ``model``. ``ValueError`` for a combination no
    algorithm defines (:func:`algorithm_refusal`)."""
    refusal = algorithm_refusal(m)
    if refusal:
        raise ValueError(refusal)
    return ALGORITHMS[m.algorithm](m, model)


def state_layout(m: MamlConfig, model: FlatLayout) -> FlatLayout:
    """What an agent's state holds with this algorithm: the model's parameters, then any learned inner rates."""
    return build_algorithm(m, model).inner.layout
