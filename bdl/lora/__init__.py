"""Training-free Bayesianization of peft LoRA adapters (needs the ``lora`` extra).

- :func:`bayesianize`: a fine-tuned peft LoRA classifier turned into a Bayesian model
  (:class:`TFBModel`) by a one-dimensional search on an unlabelled anchor set, without any
  training (Shi et al., "Training-Free Bayesianization for Low-Rank Adapters of Large
  Language Models", 2025).
- Batches may be tensors or mappings of tensors (a tokenizer's output) and outputs
  ``ModelOutput`` records with ``logits`` (:mod:`bdl.core.batches`).
"""

from __future__ import annotations

try:
    import peft  # noqa: F401
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "bdl.lora needs peft and transformers; install the extra: pip install 'bdlgp[lora]' "
        "(keep your torch on the same command line)"
    ) from err

from bdl.lora.tfb import METRICS, TFBModel, bayesianize, column_covariance, lora_layers

__all__ = ["METRICS", "TFBModel", "bayesianize", "column_covariance", "lora_layers"]
