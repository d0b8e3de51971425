r"""Parameter groups for structured SG-MCMC (Alexos, Boyd & Mandt, ICML 2022).

A grouping gives every sampled scalar weight an integer group id: a ``dict`` mapping a
parameter name (as in ``model.named_parameters()``) to a ``LongTensor`` of ids with the
parameter's shape. Parameters missing from the dict are not sampled (held fixed). Ids are
relabelled to ``0 .. K-1`` in increasing order by :func:`normalize_groups`.

Built-in protocols:

- :func:`layer_groups`: one group per module that owns parameters (weight and bias together).
- :func:`neuron_groups`: one group per output unit: row ``i`` of a weight with ``ndim >= 2``
  (all incoming weights of unit ``i``) together with entry ``i`` of the module's bias; a
  module without such a weight forms one group.
- :func:`random_groups`: ``K`` balanced random groups over all scalars (a random permutation
  dealt round-robin, the ``use_permuted_groups`` of the reference code), seeded.
- :func:`groups_from_names`: one group per list of parameter names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from bdl.core.validation import check_int

__all__ = [
    "layer_groups",
    "neuron_groups",
    "random_groups",
    "groups_from_names",
    "normalize_groups",
]


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def layer_groups(model: nn.Module) -> dict[str, Tensor]:
    """One group per module owning trainable parameters (in module order).

    Returns
    -------
    dict of str to LongTensor
        Group id of every scalar, each tensor with its parameter's shape.
    """
    ids: dict[str, Tensor] = {}
    k = 0
    for module_name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        for n, p in own:
            name = f"{module_name}.{n}" if module_name else n
            ids[name] = torch.full(p.shape, k, dtype=torch.long, device=p.device)
        k += bool(own)
    return ids


def neuron_groups(model: nn.Module) -> dict[str, Tensor]:
    """One group per output unit of every module with a ``weight`` of ``ndim >= 2``.

    Unit ``i`` owns ``weight[i, ...]`` (its incoming weights; for ``nn.Linear`` a row, for a
    convolution a filter) and ``bias[i]`` when the module's ``bias`` has shape
    ``(weight.shape[0],)``. Other trainable parameters of a module form one group per module.
    """
    ids: dict[str, Tensor] = {}
    k = 0
    for module_name, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        prefix = f"{module_name}." if module_name else ""
        weight = own.pop("weight", None)
        if weight is not None and weight.dim() >= 2:
            units = weight.shape[0]
            rows = torch.arange(k, k + units, device=weight.device)
            ids[prefix + "weight"] = rows.view(-1, *([1] * (weight.dim() - 1))).expand(weight.shape)
            bias = own.get("bias")
            if bias is not None and bias.shape == (units,):
                ids[prefix + "bias"] = rows.clone()
                del own["bias"]
            k += units
        elif weight is not None:
            own = {"weight": weight, **own}
        for n, p in own.items():
            ids[prefix + n] = torch.full(p.shape, k, dtype=torch.long, device=p.device)
        k += bool(own)
    return {n: t.contiguous() for n, t in ids.items()}


def random_groups(model: nn.Module, num_groups: int, *, seed: int = 0) -> dict[str, Tensor]:
    """``num_groups`` balanced random groups over all trainable scalars.

    A random permutation (``torch.Generator().manual_seed(seed)``, on the CPU) of the ``D``
    scalars is dealt round-robin, so group sizes differ by at most one.
    """
    num_groups = check_int("num_groups", num_groups)
    params = _trainable(model)
    sizes = [p.numel() for p in params.values()]
    total = sum(sizes)
    if num_groups > total:
        raise ValueError(f"num_groups must be <= the number of scalars {total}, got {num_groups}")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))
    flat = torch.empty(total, dtype=torch.long)
    flat[perm] = torch.arange(total) % num_groups
    return {
        n: chunk.view(p.shape).to(p.device)
        for (n, p), chunk in zip(params.items(), flat.split(sizes), strict=True)
    }


def groups_from_names(model: nn.Module, names: Sequence[Sequence[str]]) -> dict[str, Tensor]:
    """One group per list of parameter names; parameters not named are held fixed."""
    params = _trainable(model)
    ids: dict[str, Tensor] = {}
    for k, group in enumerate(names):
        if isinstance(group, str) or not isinstance(group, Sequence) or len(group) == 0:
            raise ValueError(f"groups[{k}] must be a non-empty list of parameter names")
        for n in group:
            if n not in params:
                raise ValueError(
                    f"groups[{k}] names {n!r}, not a trainable parameter of the model "
                    f"(known: {sorted(params)})"
                )
            if n in ids:
                raise ValueError(f"groups: parameter {n!r} appears in more than one group")
            ids[n] = torch.full(params[n].shape, k, dtype=torch.long, device=params[n].device)
    return ids


def normalize_groups(
    model: nn.Module, groups: Mapping[str, Tensor]
) -> tuple[list[tuple[str, Tensor]], Tensor, int]:
    """Check a ``name -> ids`` grouping and flatten it.

    Returns
    -------
    params : list of (str, Parameter)
        The grouped parameters in ``model.named_parameters()`` order.
    flat_ids : LongTensor, shape (D,)
        Group id of every sampled scalar, relabelled to ``0 .. K-1`` in increasing order.
    num_groups : int
        ``K``.
    """
    params = _trainable(model)
    for n, t in groups.items():
        if n not in params:
            raise ValueError(f"groups names {n!r}, not a trainable parameter of the model")
        if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"groups[{n!r}] must be an integer tensor of group ids")
        if t.shape != params[n].shape:
            raise ValueError(
                f"groups[{n!r}] must have the parameter's shape {tuple(params[n].shape)}, "
                f"got {tuple(t.shape)}"
            )
    chosen = [(n, p) for n, p in params.items() if n in groups]
    if not chosen:
        raise ValueError("groups selects no parameter to sample")
    device = chosen[0][1].device
    raw = torch.cat([groups[n].reshape(-1).to(device=device, dtype=torch.long) for n, _ in chosen])
    _, flat = torch.unique(raw, return_inverse=True)
    return chosen, flat, int(flat.max().item()) + 1
