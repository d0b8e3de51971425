r"""Structured SG-MCMC (S-SGMCMC; Alexos, Boyd & Mandt, ICML 2022).

The parameters are split into groups :math:`\theta = (\theta_1, \dots, \theta_K)` and the
sampler targets the structured mean-field fixed point :math:`q(\theta) = \prod_g
q_g(\theta_g)`, :math:`q_g \propto \exp(-U_g / T)`, whose *self-averaged energy*
:math:`U_g(\theta_g)` is the full-data potential averaged over the other groups drawn from
the chain's own stored samples. Every :meth:`StructuredSampler.step` evaluates the mean
minibatch loss at *composite* parameters (one group at its current value, the others at
stored samples; ``K`` composites for the ``"full"`` variant, ``num_masks`` random-mask
composites for ``"dropout"``), gives every group the gradient of its own composites' loss,
and lets the wrapped SG-MCMC optimizer (default :class:`~bdl.sgmcmc.SGLD`) apply its usual
update; with one group, or ``dropout_p = 0``, this is that optimizer exactly. The equations,
and the reasons to start from a MAP solution and flush the burn-in transient from the
buffer, are in the user guide's structured SG-MCMC section.

The sampler is a :class:`bdl.core.Model`: ``posterior(X)`` averages the network over the
buffered states, as :class:`~bdl.sgmcmc.SampleCollector` does over its samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from bdl.core.validation import check_choice, check_int
from bdl.sgmcmc._base import SGMCMCOptimizer, _check_real
from bdl.sgmcmc._predict import SamplePredictive
from bdl.sgmcmc.buffer import ChainBuffer
from bdl.sgmcmc.groups import (
    groups_from_names,
    layer_groups,
    neuron_groups,
    normalize_groups,
    random_groups,
)
from bdl.sgmcmc.sgld import SGLD

__all__ = ["ChainBuffer", "StructuredSampler"]


class _LossModule(nn.Module):
    """``forward() = loss_fn(model)``, so ``functional_call`` can swap the model's weights."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self) -> Tensor:
        return self.loss_fn(self.model)


def _resolve_groups(
    model: nn.Module,
    groups: str | Sequence[Sequence[str]] | Mapping[str, Tensor],
    num_groups: int | None,
    group_seed: int,
) -> Mapping[str, Tensor]:
    """The group-id dict of ``groups`` (a protocol name, lists of names, or a dict)."""
    if isinstance(groups, str):
        check_choice("groups", groups, ("layer", "neuron", "random"))
        if groups != "random" and num_groups is not None:
            raise ValueError("num_groups is only used with groups='random'")
        if groups == "random":
            if num_groups is None:
                raise ValueError("num_groups is required with groups='random'")
            return random_groups(model, num_groups, seed=group_seed)
        return layer_groups(model) if groups == "layer" else neuron_groups(model)
    if num_groups is not None:
        raise ValueError("num_groups is only used with groups='random'")
    if isinstance(groups, Mapping):
        return groups
    if isinstance(groups, Sequence):
        return groups_from_names(model, groups)
    raise ValueError(
        "groups must be 'layer', 'neuron', 'random', a list of lists of parameter "
        f"names or a dict of group-id tensors, got {type(groups).__name__}"
    )


class StructuredSampler(SamplePredictive):
    """Structured SG-MCMC over parameter groups, driven from an ordinary training loop.

    Parameters
    ----------
    model : nn.Module
        Its grouped parameters are sampled in place (start them at a MAP solution).
    groups : {"layer", "neuron", "random"}, list of list of str, or dict of str to LongTensor
        ``"layer"``/``"neuron"``/``"random"``: :func:`~bdl.sgmcmc.groups.layer_groups`,
        :func:`~bdl.sgmcmc.groups.neuron_groups`, :func:`~bdl.sgmcmc.groups.random_groups`
        (needs ``num_groups``; seeded by ``group_seed``). A list of lists of parameter names
        makes one group per list. A dict gives the group id of every scalar (tensors of the
        parameters' shapes). Parameters left out are held fixed.
    num_data, lr, temperature, prior_precision
        As for :class:`~bdl.sgmcmc.SGLD` (``lr = eta * N``, mean minibatch loss).
    sampler : subclass of SGMCMCOptimizer
        Update rule applied to the structured gradients (SGLD, PSGLD, SGHMC).
    sampler_kwargs : dict, optional
        Extra arguments of ``sampler`` (e.g. ``{"momentum_decay": 0.1}``).
    num_groups : int, optional
        ``K`` for ``groups="random"``.
    group_seed : int
        Seed of the random grouping.
    buffer_size : int
        Stored samples ``S`` (memory ``S x D``).
    buffer : {"ring", "reservoir"}
        Keep the newest ``S`` samples, or a uniform subset of all of them.
    variant : {"full", "dropout"}
        ``K`` composites per step, or ``num_masks`` random-mask composites.
    dropout_p : float
        Probability in ``[0, 1)`` that a group is replaced by a stored sample (dropout).
    num_masks : int
        ``L``, composites per step of the dropout variant.
    vectorize : bool
        Evaluate the composites as one ``torch.func.vmap`` batch (needs a vmap-able model and
        loss: no in-place BatchNorm statistics); ``False`` loops over them.
    generator : torch.Generator, optional
        Source of noise, buffer indices, masks and reservoir draws (params' device).
    task, noise_variance, log_noise_std, num_outputs
        How :meth:`posterior` reads the network's outputs, as for
        :class:`~bdl.sgmcmc.SampleCollector` (``log_noise_std`` must name a grouped
        parameter).

    Attributes
    ----------
    optimizer : SGMCMCOptimizer
        The wrapped sampler over the grouped parameters.
    buffer : ChainBuffer
        Stored flat samples, shape ``(S, D)``; initialised with the starting values.
    group_ids : LongTensor, shape (D,)
        Group of every sampled scalar (flattened in ``named_parameters`` order).
    num_groups : int
        ``K``.
    num_steps : int
        Number of :meth:`step` calls so far.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: str | Sequence[Sequence[str]] | Mapping[str, Tensor] = "layer",
        *,
        num_data: float,
        lr: float,
        temperature: float = 1.0,
        prior_precision: float = 0.0,
        sampler: type[SGMCMCOptimizer] = SGLD,
        sampler_kwargs: Mapping[str, Any] | None = None,
        num_groups: int | None = None,
        group_seed: int = 0,
        buffer_size: int = 1000,
        buffer: str = "ring",
        variant: str = "full",
        dropout_p: float = 0.5,
        num_masks: int = 1,
        vectorize: bool = True,
        generator: torch.Generator | None = None,
        task: str = "classification",
        noise_variance: float | Tensor | None = None,
        log_noise_std: str | None = None,
        num_outputs: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        groups = _resolve_groups(model, groups, num_groups, group_seed)
        if not (isinstance(sampler, type) and issubclass(sampler, SGMCMCOptimizer)):
            raise ValueError(f"sampler must be an SGMCMCOptimizer subclass, got {sampler!r}")
        self.variant = check_choice("variant", variant, ("full", "dropout"))
        self.dropout_p = _check_real("dropout_p", dropout_p, 0.0, 1.0, high_open=True)
        self.num_masks = check_int("num_masks", num_masks)
        self.vectorize = bool(vectorize)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError("generator must be a torch.Generator or None")
        self.generator = generator
        self.model = model
        named, self.group_ids, self.num_groups = normalize_groups(model, groups)
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._shapes = [p.shape for p in self._params]
        self._sizes = [p.numel() for p in self._params]
        self._init_predictive(task, noise_variance, log_noise_std, num_outputs)
        if log_noise_std is not None and log_noise_std not in self._names:
            raise ValueError(f"log_noise_std={log_noise_std!r} is not a grouped parameter")
        self.optimizer = sampler(
            self._params,
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            prior_precision=prior_precision,
            generator=generator,
            **dict(sampler_kwargs or {}),
        )
        theta = self._flat()
        self.buffer = ChainBuffer(
            buffer_size,
            theta.numel(),
            mode=buffer,
            dtype=theta.dtype,
            device=theta.device,
            generator=generator,
        )
        self.buffer.push(theta)
        self.num_steps = 0

    # -- helpers ---------------------------------------------------------------------------
    def _flat(self) -> Tensor:
        """Current values of the grouped parameters, shape ``(D,)`` (a detached copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def _unflatten(self, flat: Tensor, prefix: str = "") -> dict[str, Tensor]:
        """Split ``(..., D)`` into ``{prefix + name: (..., *shape)}``."""
        lead = flat.shape[:-1]
        parts = flat.split(self._sizes, dim=-1)
        return {
            prefix + n: t.reshape(*lead, *s)
            for n, t, s in zip(self._names, parts, self._shapes, strict=True)
        }

    def _randint(self, high: int, size: tuple[int, ...]) -> Tensor:
        device = self.group_ids.device
        if high == 1:
            return torch.zeros(size, dtype=torch.long, device=device)
        return torch.randint(high, size, generator=self.generator, device=device)

    def _composite_masks(self) -> tuple[Tensor, Tensor] | None:
        """Boolean ``(M, K)`` keep-masks and weights ``(M,)``; ``None`` means plain SGLD."""
        k, device = self.num_groups, self.group_ids.device
        if self.variant == "full":
            if k == 1:
                return None
            return torch.eye(k, dtype=torch.bool, device=device), torch.ones(k, device=device)
        if self.dropout_p == 0.0:
            return None
        keep = 1.0 - self.dropout_p
        u = torch.rand(self.num_masks, k, generator=self.generator, device=device)
        weight = 1.0 / (keep * self.num_masks)
        return u < keep, torch.full((self.num_masks,), weight, device=device)

    # -- public ----------------------------------------------------------------------------
    def step(self, loss_fn: Callable[[nn.Module], Tensor]) -> Tensor:
        """One structured update of every group.

        Parameters
        ----------
        loss_fn : callable
            ``loss_fn(model)`` returns the mean minibatch negative log-likelihood (a scalar)
            for the model's *current* parameters; it is called with the composite
            parameters swapped in (``torch.func.functional_call``), once per composite, all
            on the same minibatch.

        Returns
        -------
        Tensor
            Mean of the composites' losses (detached scalar).
        """
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable: loss_fn(model) -> scalar mean loss")
        plan = self._composite_masks()
        if plan is None:
            loss = loss_fn(self.model)
            self._check_loss(loss)
            grads = torch.autograd.grad(loss, self._params)
        else:
            masks, weights = plan
            theta = self._flat().requires_grad_(True)
            stored = self.buffer.samples
            idx = self._randint(len(stored), tuple(masks.shape))  # (M, K)
            others = stored.gather(0, idx[:, self.group_ids])  # (M, D)
            composite = torch.where(masks[:, self.group_ids], theta, others)
            wrapper = _LossModule(self.model, loss_fn)

            def one(row: Tensor) -> Tensor:
                return functional_call(wrapper, self._unflatten(row, "model."), ())

            if self.vectorize:
                losses = vmap(one, randomness="different")(composite)
            else:
                losses = torch.stack([one(row) for row in composite])
            self._check_loss(losses[0] if losses.dim() == 1 else losses)
            loss = losses.mean()
            (flat_grad,) = torch.autograd.grad((weights.to(losses) * losses).sum(), theta)
            grads = flat_grad.split(self._sizes)
        for p, g in zip(self._params, grads, strict=True):
            p.grad = g.reshape(p.shape)
        self.optimizer.step()
        self.buffer.push(self._flat())
        self.num_steps += 1
        return loss.detach()

    @staticmethod
    def _check_loss(loss: Any) -> None:
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor (the mean minibatch loss)")

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> StructuredSampler:
        """Apply ``fn`` to the network and the buffered states (as ``nn.Module._apply``); the
        optimizer's state is not moved (the sampler is for predicting after a move)."""
        self.model._apply(fn)
        self.buffer.data = fn(self.buffer.data)
        return self

    def clear_buffer(self) -> None:
        """Forget the stored samples (e.g. the burn-in transient) and store the current one."""
        self.buffer.reset()
        self.buffer.push(self._flat())

    # -- serialisation -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the chain, except the model's own parameters.

        Save it next to ``model.state_dict()`` (which holds the current parameters);
        loading both into a sampler built with the same arguments continues the run
        bit-identically. Loadable with ``torch.load(..., weights_only=True)``.

        Returns
        -------
        dict
            ``"optimizer"``: the wrapped sampler's state (velocities or preconditioner,
            hyper-parameters, noise-generator state); ``"buffer"``, ``"buffer_steps"``:
            stored samples ``(S, D)`` and their push numbers ``(S,)``; ``"buffer_pushes"``,
            ``"num_steps"``: counters; ``"group_ids"`` ``(D,)`` (checked on load);
            ``"generator_state"``: state of ``generator`` (absent without one: the global
            RNG is then the caller's to save).
        """
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "buffer": self.buffer.data.clone(),
            "buffer_steps": self.buffer.stamps.clone(),
            "buffer_pushes": self.buffer.num_pushed,
            "num_steps": self.num_steps,
            "group_ids": self.group_ids.clone(),
        }
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (same model layout, groups, buffer size).

        Raises
        ------
        ValueError
            If keys are missing, or the grouping or buffer shape differs from this sampler's.
        """
        keys = {"optimizer", "buffer", "buffer_steps", "buffer_pushes", "num_steps", "group_ids"}
        missing = keys - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing keys {sorted(missing)}")
        group_ids = state_dict["group_ids"]
        if not isinstance(group_ids, Tensor) or not torch.equal(
            group_ids.to(self.group_ids.device), self.group_ids
        ):
            raise ValueError(
                "state_dict['group_ids'] differs from this sampler's grouping: build the sampler "
                "with the same model and groups before loading"
            )
        data = state_dict["buffer"]
        if not isinstance(data, Tensor) or data.shape != self.buffer.data.shape:
            raise ValueError(
                f"state_dict['buffer'] must have shape {tuple(self.buffer.data.shape)} "
                f"(buffer_size x D), got {tuple(getattr(data, 'shape', ()))}"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.buffer.data.copy_(data)
        self.buffer.stamps.copy_(state_dict["buffer_steps"])
        self.buffer.num_pushed = check_int(
            "buffer_pushes", int(state_dict["buffer_pushes"]), minimum=0
        )
        self.num_steps = check_int("num_steps", int(state_dict["num_steps"]), minimum=0)
        generator_state = state_dict.get("generator_state")
        if generator_state is not None and self.generator is not None:
            self.generator.set_state(generator_state.cpu())

    def sample_parameters(self, num_samples: int = 1) -> dict[str, Tensor]:
        """Mean-field draws: every group from an independent uniform buffer entry.

        Returns
        -------
        dict of str to Tensor
            ``name -> (num_samples, *shape)``, ready for ``torch.func.functional_call``
            under ``vmap`` (or index ``[s]`` for one sample).
        """
        num_samples = check_int("num_samples", num_samples)
        stored = self.buffer.samples
        idx = self._randint(len(stored), (num_samples, self.num_groups))
        return self._unflatten(stored.gather(0, idx[:, self.group_ids]))

    # -- prediction (the model protocol) ------------------------------------------------------
    def _sampled_names(self) -> set[str]:
        return set(self._names)

    def _num_states(self) -> int:
        return len(self.buffer)

    def _states(self, dtype: torch.dtype, device: torch.device) -> Iterator[dict[str, Tensor]]:
        """Every buffered state in slot order; parameters outside the groups stay as they are."""
        for row in self.buffer.samples.clone():
            yield self._unflatten(row.to(dtype=dtype, device=device))
