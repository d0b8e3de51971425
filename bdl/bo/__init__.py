"""Bayesian optimisation with every model of the library (needs the ``bo`` extra: botorch).

- :func:`as_botorch_model`: any model or fitted estimator as a BoTorch model, so that
  BoTorch's acquisition functions and ``optimize_acqf`` run on it.
- :func:`draw_functions` / :func:`thompson_candidates`: Thompson sampling from deterministic
  function draws (weight samples of VBLL heads and SG-MCMC chains, GP sample paths).
- :class:`BayesOpt`: an ask/tell loop with a Sobol initial design, input normalisation,
  outcome standardisation, a refit policy, a progress bar, a history and save/resume.
"""

from __future__ import annotations

try:
    import botorch  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "bdl.bo needs botorch; install the extra: pip install 'bdlgp[bo]' (keep your torch)"
    ) from err

from bdl.bo.adapter import BotorchModel, ConditionedModel, as_botorch_model
from bdl.bo.loop import BayesOpt
from bdl.bo.thompson import NoFunctionDraws, draw_functions, thompson_candidates

__all__ = [
    "BayesOpt",
    "BotorchModel",
    "ConditionedModel",
    "NoFunctionDraws",
    "as_botorch_model",
    "draw_functions",
    "thompson_candidates",
]
