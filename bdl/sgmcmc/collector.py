"""Collect SG-MCMC samples of a network's weights and predict with them.

Usage (call :meth:`SampleCollector.update` once after every optimizer step)::

    opt = bdl.sgmcmc.SGHMC(model.parameters(), lr=0.1, num_data=N, prior_precision=1.0)
    collector = bdl.sgmcmc.SampleCollector(model, burn_in=1000, thin=100)
    for x, y in loader:
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
        collector.update()
    posterior = collector.posterior(x_test)        # CategoricalPosterior

Each sample is the vector of the model's trainable parameters (flattened in
``model.parameters()`` order, as :func:`torch.nn.utils.parameters_to_vector` does) plus the
vector of its floating-point buffers: BatchNorm running statistics are not parameters of the
posterior, but they are functions of the weights they were accumulated under, so each sample
keeps its own.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from bdl.core.validation import check_int
from bdl.sgmcmc._predict import SamplePredictive
from bdl.sgmcmc.schedule import CyclicalSchedule

__all__ = ["SampleCollector"]


def _flatten(tensors: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Detached copy of ``tensors`` concatenated into one vector of ``dtype`` on ``device``."""
    if not tensors:
        return torch.empty(0, dtype=dtype, device=device)
    parts = [t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors]
    return torch.cat(parts)  # always a new tensor, never a view of the parameters


@torch.no_grad()
def _assign(tensors: list[Tensor], vector: Tensor) -> None:
    """Copy consecutive slices of ``vector`` into ``tensors`` (casting dtype and device)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(vector[offset : offset + n].view_as(t))
        offset += n


class SampleCollector(SamplePredictive):
    """Thinned, compactly stored weight samples of an SG-MCMC chain, with a predictive.

    Collection rule (``t`` counts calls of :meth:`update`, 1-based):

    - without ``schedule``: the state after step ``t`` is kept iff ``t > burn_in`` and
      ``(t - burn_in) % thin == 0``, so after ``T`` steps ``max(0, T - burn_in) // thin``
      samples have been collected;
    - with a :class:`~bdl.sgmcmc.CyclicalSchedule`: the state is kept iff ``t > burn_in``,
      ``schedule.is_sampling_step()`` and ``schedule.steps_to_end_of_cycle() % thin == 0``,
      i.e. every ``thin``-th step of each cycle's sampling (noisy, low-``lr``) phase counted
      back from the cycle's last step, which is always kept (``thin = 1``: every sampling
      step; ``thin`` >= the sampling-phase length: only the end of each cycle). Exploration
      steps are never kept. Call :meth:`update` after ``opt.step()`` and *before*
      ``schedule.step()``, so that the schedule still describes the step just taken.

    Storage: one vector of the trainable parameters (``requires_grad=True`` when the collector
    is built; frozen ones are not stored) and one vector of the floating-point buffers per
    sample, in ``dtype`` on ``device`` (e.g. ``torch.float16`` on ``"cpu"`` to offload a GPU
    chain: memory is ``S x P x 2`` bytes). With ``max_samples`` the samples live in a ring
    buffer that keeps the newest ``max_samples`` (older ones are dropped as new ones arrive).

    Prediction: the collector is a :class:`bdl.core.Model`; :meth:`posterior` puts every
    stored sample into the network (``torch.func.functional_call``, eval mode; the network's
    own parameters are never touched) and returns the equal-weight mixture over the samples,
    read according to ``task``, in the dtype and on the device of ``X``.

    Parameters
    ----------
    model : nn.Module
        The network the SG-MCMC optimizer updates in place.
    burn_in : int
        Number of initial steps (>= 0) never kept.
    thin : int
        Keep every ``thin``-th step (>= 1); see the collection rule above.
    max_samples : int, optional
        Keep at most this many (the newest) samples; unbounded when ``None``.
    dtype : torch.dtype, optional
        Floating dtype of the stored samples; the parameters' dtype by default.
    device : torch.device or str, optional
        Device of the stored samples; the parameters' device by default.
    schedule : CyclicalSchedule, optional
        Collect only in the sampling phases of its cycles (see above).
    task : {"classification", "regression"}, default "classification"
        What :meth:`posterior` reads the network's outputs as: logits ``(..., n, C)``
        (a :class:`~bdl.core.posterior.CategoricalPosterior` of the averaged softmax) or
        function values ``(..., n, m)`` (a :class:`~bdl.core.posterior.SamplePosterior`).
    noise_variance : float or Tensor, optional
        Regression: the observation-noise variance ``posterior(X, observation_noise=True)``
        adds (broadcastable to ``(..., n, m)``).
    log_noise_std : str, optional
        Regression, instead of ``noise_variance``: the name (as in ``named_parameters()``) of
        a parameter sampled with the weights that holds the log noise standard deviation per
        output; each sample's noise variance is ``exp(2 * value)``.
    num_outputs : int, optional
        Outputs ``m`` (classes) of the network; inferred from its last module with
        ``out_features`` when omitted.

    Attributes
    ----------
    task, noise_variance, log_noise_std
        As given; may be set after construction (checked by :meth:`posterior`).
    chain_sizes : list of int or None
        Samples of each chain, in storage order, when the collector holds several chains
        (set by :func:`~bdl.sgmcmc.merge_chains` and :func:`~bdl.sgmcmc.gather_chains`);
        None for one chain.
    """

    def __init__(
        self,
        model: nn.Module,
        burn_in: int = 0,
        thin: int = 1,
        max_samples: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        schedule: CyclicalSchedule | None = None,
        *,
        task: str = "classification",
        noise_variance: float | Tensor | None = None,
        log_noise_std: str | None = None,
        num_outputs: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (requires_grad=True) to collect")
        self._param_names = [n for n, _ in named]
        self._params = [p for _, p in named]
        buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        self._buffer_names = [n for n, _ in buffers]
        self._buffers = [b for _, b in buffers]
        self._init_predictive(task, noise_variance, log_noise_std, num_outputs)
        if log_noise_std is not None and log_noise_std not in self._param_names:
            raise ValueError(
                f"log_noise_std={log_noise_std!r} is not a trainable parameter of model"
            )
        self.burn_in = check_int("burn_in", burn_in, minimum=0)
        self.thin = check_int("thin", thin, minimum=1)
        self.max_samples = None if max_samples is None else check_int("max_samples", max_samples)
        first = self._params[0]
        if dtype is None:
            dtype = first.dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype
        try:
            self.device = first.device if device is None else torch.device(device)
        except (TypeError, RuntimeError) as err:
            raise ValueError(f"device must be a torch.device or str, got {device!r}") from err
        if schedule is not None and not isinstance(schedule, CyclicalSchedule):
            raise ValueError(
                f"schedule must be a bdl.sgmcmc.CyclicalSchedule, got {type(schedule).__name__}"
            )
        self.schedule = schedule
        self.num_params = sum(p.numel() for p in self._params)
        self.num_buffer_values = sum(b.numel() for b in self._buffers)
        self.num_steps = 0
        self.num_collected = 0
        self.chain_sizes: list[int] | None = None
        self._store: collections.deque[tuple[Tensor, Tensor]] = collections.deque(
            maxlen=self.max_samples
        )

    # -- collection --------------------------------------------------------------------------
    def should_collect(self) -> bool:
        """Whether the state after the current step (``num_steps``) is kept by the rule."""
        t = self.num_steps
        if t <= self.burn_in:
            return False
        if self.schedule is None:
            return (t - self.burn_in) % self.thin == 0
        return (
            self.schedule.is_sampling_step()
            and self.schedule.steps_to_end_of_cycle() % self.thin == 0
        )

    def update(self) -> bool:
        """Count one optimizer step and keep the model's current state if the rule says so.

        Returns
        -------
        bool
            Whether a sample was stored.
        """
        self.num_steps += 1
        if not self.should_collect():
            return False
        self.collect()
        return True

    def collect(self) -> None:
        """Store the model's current parameters and buffers unconditionally (no step counted)."""
        params = _flatten(self._params, self.dtype, self.device)
        buffers = _flatten(self._buffers, self.dtype, self.device)
        self._store.append((params, buffers))
        self.num_collected += 1

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> SampleCollector:
        """Apply ``fn`` to the network and every stored sample, as ``nn.Module._apply`` does
        (so that a :class:`~bdl.core.model.TransformedModel` around the collector moves it
        with ``.to(...)``, ``.cpu()`` or ``.double()``)."""
        self.model._apply(fn)
        self._store = collections.deque(
            ((fn(p), fn(b)) for p, b in self._store), maxlen=self._store.maxlen
        )
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        self.dtype, self.device = probe.dtype, probe.device
        return self

    def __len__(self) -> int:
        return len(self._store)

    @property
    def samples(self) -> Tensor:
        """Stored parameter vectors, oldest first, shape ``(S, P)`` (a new tensor)."""
        if not self._store:
            return torch.empty(0, self.num_params, dtype=self.dtype, device=self.device)
        return torch.stack([p for p, _ in self._store])

    @property
    def buffer_samples(self) -> Tensor:
        """Stored floating-point buffer vectors, oldest first, shape ``(S, B)``."""
        if not self._store:
            return torch.empty(0, self.num_buffer_values, dtype=self.dtype, device=self.device)
        return torch.stack([b for _, b in self._store])

    # -- prediction --------------------------------------------------------------------------
    def load_sample(self, index: int) -> None:
        """Overwrite the model's parameters and buffers with stored sample ``index``."""
        params, buffers = self._store[index]
        _assign(self._params, params)
        _assign(self._buffers, buffers)

    def named_samples(self) -> dict[str, Tensor]:
        """Stored values of every collected parameter, ``name -> (S, *shape)``, oldest first.

        E.g. ``effective_sample_size(collector.named_samples()["0.bias"])``.
        """
        samples = self.samples
        parts = samples.split([p.numel() for p in self._params], dim=1)
        return {
            name: part.reshape(samples.shape[0], *p.shape)
            for name, p, part in zip(self._param_names, self._params, parts, strict=True)
        }

    def _sampled_names(self) -> set[str]:
        return set(self._param_names) | set(self._buffer_names)

    def _num_states(self) -> int:
        return len(self._store)

    def _states(self, dtype: torch.dtype, device: torch.device) -> Iterator[dict[str, Tensor]]:
        names = self._param_names + self._buffer_names
        tensors = self._params + self._buffers
        for params, buffers in list(self._store):
            flat = torch.cat([params, buffers]).to(dtype=dtype, device=device)
            parts = flat.split([t.numel() for t in tensors])
            yield {n: part.view(t.shape) for n, t, part in zip(names, tensors, parts, strict=True)}

    def _empty_message(self) -> str:
        return (
            f"SampleCollector holds no samples: posterior needs at least one collected "
            f"sample (steps taken: {self.num_steps}, burn_in={self.burn_in}, thin={self.thin})"
        )

    # -- serialisation -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Stored samples (oldest first) and counters (and ``chain_sizes`` when set);
        loadable with ``weights_only=True``."""
        state = {
            "samples": self.samples,
            "buffer_samples": self.buffer_samples,
            "num_steps": self.num_steps,
            "num_collected": self.num_collected,
        }
        if getattr(self, "chain_sizes", None) is not None:
            state["chain_sizes"] = list(self.chain_sizes)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore samples and counters saved by :meth:`state_dict`.

        Samples are cast to this collector's ``dtype`` and ``device``; with ``max_samples``
        only the newest ``max_samples`` are kept.
        """
        missing = {"samples", "buffer_samples", "num_steps", "num_collected"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing keys {sorted(missing)}")
        samples, buffers = state_dict["samples"], state_dict["buffer_samples"]
        if samples.dim() != 2 or samples.shape[1] != self.num_params:
            raise ValueError(
                f"state_dict['samples'] must have shape (S, {self.num_params}), got "
                f"{tuple(samples.shape)}"
            )
        if buffers.shape != (samples.shape[0], self.num_buffer_values):
            raise ValueError(
                f"state_dict['buffer_samples'] must have shape ({samples.shape[0]}, "
                f"{self.num_buffer_values}), got {tuple(buffers.shape)}"
            )
        self._store.clear()
        for p, b in zip(samples, buffers, strict=True):
            self._store.append(
                (
                    p.to(device=self.device, dtype=self.dtype).clone(),
                    b.to(device=self.device, dtype=self.dtype).clone(),
                )
            )
        self.num_steps = check_int("num_steps", int(state_dict["num_steps"]), minimum=0)
        self.num_collected = check_int("num_collected", int(state_dict["num_collected"]), minimum=0)
        sizes = state_dict.get("chain_sizes")
        if sizes is not None and sum(int(k) for k in sizes) != samples.shape[0]:
            raise ValueError(
                f"state_dict['chain_sizes'] {list(sizes)} does not add up to the "
                f"{samples.shape[0]} samples"
            )
        kept_all = len(self._store) == samples.shape[0]  # max_samples may drop the oldest
        self.chain_sizes = None if sizes is None or not kept_all else [int(k) for k in sizes]

    def __repr__(self) -> str:
        return (
            f"SampleCollector(num_samples={len(self)}, num_params={self.num_params}, "
            f"task={self.task!r}, burn_in={self.burn_in}, thin={self.thin}, "
            f"max_samples={self.max_samples}, "
            f"dtype={self.dtype}, device={self.device})"
        )
