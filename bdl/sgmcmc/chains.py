r"""Many SG-MCMC chains: one per torch.distributed rank, gathered on every rank.

Inside an initialised process group (``torchrun`` or :func:`bdl.core.distributed.spawn`),
outside :func:`~bdl.core.distributed.data_parallel`, every rank runs its own chain from its
own seed (:func:`chain_seed`: rank 0's seed plus the rank) and :func:`gather_chains` collects
every rank's stored samples into one :class:`~bdl.sgmcmc.SampleCollector` on every rank
(an all-gather of the sample vectors), so its ``posterior`` is the mixture over all chains
wherever it is called. :func:`merge_chains` does the same for chains run in one process, and
:func:`chain_diagnostics` reports the cross-chain split-:math:`\hat R` and the multi-chain ESS
of :mod:`bdl.sgmcmc.diagnostics`, of the weights and of the predictions.

The estimators :class:`~bdl.sgmcmc.SGMCMCRegressor` and :class:`~bdl.sgmcmc.SGMCMCClassifier`
do all of this in ``fit`` when called inside a process group (no new argument)::

    # torchrun --nproc-per-node 4 chains.py
    torch.distributed.init_process_group("gloo")
    model = bdl.SGMCMCRegressor(random_state=0).fit(X, y)   # chain r: seed 0 + r
    model.n_chains_, model.chain_diagnostics_["function_rhat_max"]

and at the torch level::

    collector = SampleCollector(net, ...)     # filled by this rank's chain
    everything = gather_chains(collector)     # every rank's samples, on every rank
    chain_diagnostics(everything, X_check)
"""

from __future__ import annotations

import collections
import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from bdl.core import distributed
from bdl.core.validation import check_int
from bdl.sgmcmc.collector import SampleCollector
from bdl.sgmcmc.diagnostics import effective_sample_size, rhat

__all__ = [
    "chain_diagnostics",
    "chain_draws",
    "chain_seed",
    "gather_chains",
    "merge_chains",
    "multichain_active",
]


def multichain_active(group: distributed.Group = None) -> bool:
    """Whether a process group of more than one rank is initialised and no
    :func:`~bdl.core.distributed.data_parallel` block is active: one chain per rank."""
    return distributed.get_world_size(group) > 1 and distributed.active() is None


def chain_seed(seed: int, group: distributed.Group = None) -> int:
    """The seed of this rank's chain: rank 0's ``seed`` plus the rank when
    :func:`multichain_active` (so ``random_state=None`` also gives distinct, reproducible
    seeds), else ``seed``.

    The chains of ``P`` ranks equal ``P`` single-process runs with seeds ``seed + r``.
    """
    if not multichain_active(group):
        return int(seed)
    return distributed.broadcast_int(seed, 0, group) + distributed.get_rank(group)


def _sizes(collector: SampleCollector) -> list[int]:
    sizes = getattr(collector, "chain_sizes", None)
    sizes = [len(collector)] if sizes is None else list(sizes)
    if sum(sizes) != len(collector):
        raise ValueError(
            f"collector.chain_sizes {sizes} do not add up to its {len(collector)} samples "
            "(samples were collected or dropped after the chains were merged)"
        )
    return sizes


def merge_chains(collectors: Sequence[SampleCollector]) -> SampleCollector:
    """One collector holding the samples of every collector, chain after chain.

    Parameters
    ----------
    collectors : sequence of SampleCollector
        Chains of the same network (equal parameter and buffer counts), e.g. one per seed.

    Returns
    -------
    SampleCollector
        A new collector with the settings (network, task, noise, dtype, device) of the first,
        without ``max_samples``; its ``chain_sizes`` lists the samples of every chain (those
        of an already merged collector count as its chains), ``num_steps`` and
        ``num_collected`` are sums.
    """
    if isinstance(collectors, SampleCollector) or not collectors:
        raise ValueError("collectors must be a non-empty sequence of SampleCollector")
    first = collectors[0]
    for c in collectors:
        if not isinstance(c, SampleCollector):
            raise ValueError(f"collectors must hold SampleCollector, got {type(c).__name__}")
        if (c.num_params, c.num_buffer_values) != (first.num_params, first.num_buffer_values):
            raise ValueError(
                "collectors must sample the same network: got "
                f"{c.num_params} and {first.num_params} parameters"
            )
    return _merged(
        first,
        [c.samples for c in collectors],
        [c.buffer_samples for c in collectors],
        [k for c in collectors for k in _sizes(c)],
        sum(c.num_steps for c in collectors),
        sum(c.num_collected for c in collectors),
    )


def _merged(
    template: SampleCollector,
    samples: list[Tensor],
    buffers: list[Tensor],
    sizes: list[int],
    num_steps: int,
    num_collected: int,
) -> SampleCollector:
    merged = copy.copy(template)
    merged.max_samples = None
    merged._store = collections.deque()
    merged.load_state_dict(
        {
            "samples": torch.cat([s.to(template.device) for s in samples]),
            "buffer_samples": torch.cat([b.to(template.device) for b in buffers]),
            "num_steps": num_steps,
            "num_collected": num_collected,
            "chain_sizes": sizes,
        }
    )
    return merged


def gather_chains(collector: SampleCollector, group: distributed.Group = None) -> SampleCollector:
    """Every rank's samples, in rank order, in one new collector on every rank.

    Every rank of ``group`` must call it (a collective: the sample vectors of all ranks are
    all-gathered; the counts may differ between ranks). With one rank (or outside a process
    group) it returns :func:`merge_chains` of ``[collector]``.

    Parameters
    ----------
    collector : SampleCollector
        This rank's chain (or chains, if already merged); the same network on every rank.
    group : ProcessGroup, optional
        Default: the default group.

    Returns
    -------
    SampleCollector
        As :func:`merge_chains` of all ranks' collectors: ``chain_sizes`` has one entry per
        rank (more if a rank's collector already held several chains).
    """
    if not isinstance(collector, SampleCollector):
        raise ValueError(f"collector must be a SampleCollector, got {type(collector).__name__}")
    if distributed.get_world_size(group) == 1:
        return merge_chains([collector])
    sizes = torch.tensor(_sizes(collector), dtype=torch.float64)
    meta = torch.tensor([collector.num_steps, collector.num_collected], dtype=torch.float64)
    samples = distributed.all_gather_rows(collector.samples, group)
    buffers = distributed.all_gather_rows(collector.buffer_samples, group)
    all_sizes = distributed.all_gather_rows(sizes, group)
    metas = distributed.all_gather_rows(meta, group)
    return _merged(
        collector,
        samples,
        buffers,
        [int(k) for s in all_sizes for k in s.tolist()],
        int(sum(m[0].item() for m in metas)),
        int(sum(m[1].item() for m in metas)),
    )


def chain_draws(collector: SampleCollector, values: Tensor | None = None) -> Tensor:
    """Per-chain draws ``(C, S, ...)``: the last ``S`` samples of every chain (``S`` the
    shortest chain's length).

    Parameters
    ----------
    collector : SampleCollector
        With ``chain_sizes`` (one chain when None).
    values : Tensor, shape (len(collector), ...), optional
        One row per stored sample (e.g. predictions of every sample); default the parameter
        vectors ``collector.samples``.
    """
    sizes = _sizes(collector)
    values = collector.samples if values is None else values
    if values.shape[0] != len(collector):
        raise ValueError(
            f"values must have one row per sample ({len(collector)}), got {values.shape[0]}"
        )
    length = min(sizes)
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return torch.stack([values[end - length : end] for end in ends])


def _summary(draws: Tensor, prefix: str) -> dict[str, float]:
    """Max / median split-R-hat and min / median multi-chain ESS of ``(C, S, K)`` draws."""
    nan = math.nan
    out = {f"{prefix}rhat_max": nan, f"{prefix}rhat_median": nan}
    out.update({f"{prefix}ess_min": nan, f"{prefix}ess_median": nan})
    draws = draws.double()
    num_chains, length = draws.shape[:2]
    if length >= 2:
        ess = effective_sample_size(draws, multichain=True)
        ess = ess[torch.isfinite(ess) & (ess > 0)]  # <= 0: too few draws for the estimate
        if ess.numel():
            out[f"{prefix}ess_min"] = float(ess.min())
            out[f"{prefix}ess_median"] = float(ess.median())
    if num_chains >= 2 and length >= 4:
        r = rhat(draws)
        r = r[torch.isfinite(r)]
        if r.numel():
            out[f"{prefix}rhat_max"] = float(r.max())
            out[f"{prefix}rhat_median"] = float(r.median())
    return out


@torch.no_grad()
def chain_diagnostics(
    collector: SampleCollector,
    X: Tensor | None = None,
    *,
    max_coordinates: int | None = 10_000,
) -> dict[str, float]:
    r"""Cross-chain convergence diagnostics of a multi-chain collector.

    The rank-normalised split-:math:`\hat R` (:func:`~bdl.sgmcmc.rhat`; needs two chains of
    four draws) and the multi-chain effective sample size
    (:func:`~bdl.sgmcmc.effective_sample_size`) of every coordinate of the weights, and with
    ``X`` of every prediction at ``X`` (the network's outputs for regression, the class
    probabilities for classification): in a network the weights of different chains sit in
    different, equivalent modes (hidden units permute), so the weight :math:`\hat R` is
    large even when the predictions mix; the function-space values are the ones to read.
    Uses the last ``S`` draws of every chain, ``S`` the shortest chain's length; constant
    coordinates are left out, and so are ESS estimates that are not positive (Geyer's
    truncation on a handful of strongly anti-correlated draws).

    Parameters
    ----------
    collector : SampleCollector
        From :func:`gather_chains` or :func:`merge_chains` (one chain when its
        ``chain_sizes`` is None: ESS only).
    X : Tensor, shape (n, d), optional
        Inputs for the function-space diagnostics.
    max_coordinates : int or None, default 10000
        Use at most this many evenly spaced coordinates of the weights and of the
        predictions (None: all).

    Returns
    -------
    dict of str to float
        ``num_chains``, ``draws_per_chain``, ``rhat_max``, ``rhat_median``, ``ess_min``,
        ``ess_median`` (weights) and, with ``X``, the same with the prefix ``function_``.
        NaN where undefined (one chain, fewer than 4 draws, only constant coordinates).
    """
    sizes = _sizes(collector)
    if not collector:
        raise ValueError("collector holds no samples")
    if max_coordinates is not None:
        max_coordinates = check_int("max_coordinates", max_coordinates)

    def subset(values: Tensor) -> Tensor:
        values = values.reshape(values.shape[0], -1)
        k = values.shape[1]
        if max_coordinates is None or k <= max_coordinates:
            return values
        return values[:, torch.linspace(0, k - 1, max_coordinates).round().long()]

    out: dict[str, float] = {"num_chains": len(sizes), "draws_per_chain": min(sizes)}
    out.update(_summary(chain_draws(collector, subset(collector.samples)), ""))
    if X is not None:
        post = collector.posterior(X)
        values = post.prob_samples if collector.task == "classification" else post.samples
        out.update(_summary(chain_draws(collector, subset(values)), "function_"))
    return out
