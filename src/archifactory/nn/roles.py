"""What each parameter is, for the optimizer: declared by the component that owns it.

A module declares the roles of its own parameters with ``param_roles() -> {name: ParamRole}``; names are
relative to the module and may reach into its sub-modules (``"lerp_down.weight"``), so a component
decides how the plain ``nn.Linear`` layers it uses are trained. Plain torch layers carry defaults
(``nn.Linear``: weight ``matrix``, bias ``vector``; ``nn.Embedding``: ``embedding``; ``nn.LayerNorm``:
``vector``); a declaration by an enclosing module wins over them. Nothing is inferred from a tensor's rank
or a parameter's name: :func:`parameter_roles` raises for any parameter that nobody declared.

How the optimizer treats each role (``archifactory.train.optim``):

=============  ============  ===========================  =============================================
role           weight decay  Muon's orthogonalised step   what it is
=============  ============  ===========================  =============================================
``matrix``     yes           yes                          a hidden linear map (2-D, out x in)
``experts``    yes           no (AdamW)                   stacked expert matrices (E, out, in)
``filter``     yes           no (AdamW)                   a depthwise convolution kernel (per-channel taps)
``head``       yes           no (AdamW)                   the output projection onto the vocabulary
``embedding``  optional      no (AdamW)                   a lookup table (tokens, learned positions)
``vector``     no            no (AdamW)                   gains, biases, per-channel/per-head coefficients,
                                                          and any weight its reference trainer leaves undecayed
=============  ============  ===========================  =============================================

Muon on hidden matrices only, AdamW for embeddings, the head, gains and biases: Jordan et al. (2024),
"Muon: an optimizer for hidden layers". Embeddings are decayed only when ``decay_embeddings`` is set.
"""

from __future__ import annotations

import enum
from typing import Mapping

from torch import nn


class ParamRole(str, enum.Enum):
    MATRIX = "matrix"
    EXPERTS = "experts"
    FILTER = "filter"
    HEAD = "head"
    EMBEDDING = "embedding"
    VECTOR = "vector"


MATRIX, EXPERTS, FILTER, HEAD, EMBEDDING, VECTOR = (
    ParamRole.MATRIX, ParamRole.EXPERTS, ParamRole.FILTER, ParamRole.HEAD, ParamRole.EMBEDDING, ParamRole.VECTOR,
)


class UndeclaredRoleError(ValueError):
    """A parameter whose optimizer role no module declared (or a declaration naming no parameter)."""


def torch_layer_roles(module: nn.Module) -> dict[str, ParamRole]:
    """Default roles of a plain torch layer's own parameters; ``{}`` for any other module."""
    if isinstance(module, nn.Linear):
        return {"weight": MATRIX, "bias": VECTOR}
    if isinstance(module, nn.Embedding):
        return {"weight": EMBEDDING}
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return {"weight": VECTOR, "bias": VECTOR}
    return {}


def declared_roles(module: nn.Module) -> Mapping[str, ParamRole]:
    """What ``module`` itself declares: its ``param_roles()``, or the torch default for a plain layer."""
    declare = getattr(module, "param_roles", None)
    return declare() if callable(declare) else torch_layer_roles(module)


def parameter_roles(model: nn.Module) -> dict[str, ParamRole]:
    """The role of every parameter of ``model``, keyed by its name in ``model.named_parameters()``.

    Modules are visited outermost first, so a component's declaration about a sub-layer's parameter
    (``"lerp_down.weight": VECTOR``) wins over that layer's default. A tensor shared under two names (tied
    embeddings) takes the role declared first. Raises :class:`UndeclaredRoleError` naming every parameter
    without a role, and any declaration that names no parameter of its module.
    """
    by_tensor: dict[int, ParamRole] = {}
    for prefix, module in model.named_modules():
        for name, role in declared_roles(module).items():
            try:
                p = module.get_parameter(name)
            except AttributeError:
                p = None
            if p is None:
                if _optional_absent(module, name):
                    continue  # e.g. a bias the layer was built without
                where = f"{prefix}." if prefix else ""
                raise UndeclaredRoleError(
                    f"{type(module).__name__}.param_roles() declares {where}{name}, which is not a parameter of it"
                )
            by_tensor.setdefault(id(p), ParamRole(role))
    missing = [f"{n} {tuple(p.shape)}" for n, p in model.named_parameters() if id(p) not in by_tensor]
    if missing:
        raise UndeclaredRoleError(
            "no optimizer role declared for " + ", ".join(missing)
            + "; declare it in the owning component's param_roles() (see archifactory.nn.roles)"
        )
    return {n: by_tensor[id(p)] for n, p in model.named_parameters()}


def _optional_absent(module: nn.Module, name: str) -> bool:
    """``name`` leads through an attribute that is ``None``: a layer built without its bias, or an
    optional sub-layer left out by the config. A name that does not exist at all is not optional."""
    owner: object = module
    for part in name.split("."):
        owner = getattr(owner, part, _MISSING)
        if owner is None:
            return True
        if owner is _MISSING:
            return False
    return False


_MISSING = object()
