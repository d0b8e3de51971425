"""The pipeline of ``lora_sentiment.py`` (shared with ``benchmarks/bench_lora.py``): AFINN data,
MiniLM with a LoRA adapter, fine-tuning, scores and Bayesianization."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from bdl import metrics
from bdl.core.training import tensor_batches, train

LORA_RANK = 8
MAX_LENGTH = 16


@dataclass
class Words:
    """Tokenised words with binary labels (1: positive valence)."""

    inputs: dict[str, Tensor]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Words:
        index = torch.as_tensor(idx)
        return Words({k: v[index] for k, v in self.inputs.items()}, self.labels[index])


def load_data(tokenizer, seed: int = 0, smoke: bool = False) -> tuple[Words, Words, Words]:
    """English train / test split (80 / 20, stratified) and the Danish OOD words."""
    from sklearn.model_selection import train_test_split

    from bdl.lora.pretrained import afinn_lexicon

    words, scores = afinn_lexicon("en")
    labels = np.array([s > 0 for s in scores], dtype=np.int64)
    danish, _ = afinn_lexicon("da")
    if smoke:
        words, labels, danish = words[::20], labels[::20], danish[::20]

    def encode(texts, y=None) -> Words:
        # padded to the longest entry of the set (AFINN entries are 1-4 words)
        enc = tokenizer(
            list(texts), padding="longest", truncation=True, max_length=MAX_LENGTH,
            return_tensors="pt",
        )  # fmt: skip
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        return Words(inputs, torch.as_tensor(np.zeros(len(texts), np.int64) if y is None else y))

    everything = encode(words, labels)
    train_idx, test_idx = train_test_split(
        np.arange(len(words)), test_size=0.2, random_state=seed, stratify=labels
    )
    return everything.subset(train_idx), everything.subset(test_idx), encode(danish)


def lora_model(path, seed: int = 0) -> nn.Module:
    """MiniLM with a fresh 2-class head and a LoRA adapter (r = 8, alpha = 16) on the
    attention queries and values; the head is trained in full (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = LoraConfig(
        r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.1, target_modules=["query", "value"],
        modules_to_save=["classifier"], task_type="SEQ_CLS",
    )  # fmt: skip
    return get_peft_model(base, config)


def finetune(model: nn.Module, data: Words, epochs: int, seed: int = 0) -> list[float]:
    """AdamW (lr 1e-3, batch 32) on the cross-entropy; the seconds of each epoch."""
    keys = list(data.inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    batches = tensor_batches(
        [data.inputs[k] for k in keys] + [data.labels], 32, torch.Generator().manual_seed(seed)
    )

    def loss(*parts: Tensor) -> Tensor:
        out = model(**dict(zip(keys, parts[:-1], strict=True)))
        return nn.functional.cross_entropy(out.logits, parts[-1])

    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        train(loss, optimizer, batches, 1, module=model, max_grad_norm=1.0)
        seconds.append(time.perf_counter() - start)
    model.eval()
    return seconds


@torch.no_grad()
def map_probs(model: nn.Module, data: Words, batch: int = 256) -> Tensor:
    """Softmax of the adapter's logits (the MAP predictive)."""
    model.eval()
    out = []
    for start in range(0, len(data), batch):
        part = {k: v[start : start + batch] for k, v in data.inputs.items()}
        out.append(model(**part).logits.float().softmax(-1))
    return torch.cat(out)


def scores(probs: Tensor, data: Words, ood_probs: Tensor) -> dict[str, float]:
    """Accuracy, NLL and ECE on ``data`` and the entropy OOD AUROC against ``ood_probs``."""
    entropy_in = metrics.predictive_entropy(probs)
    entropy_out = metrics.predictive_entropy(ood_probs)
    return {
        "acc": float(metrics.accuracy(probs, data.labels)),
        "nll": float(metrics.categorical_nll(probs, data.labels)),
        "ece": float(metrics.expected_calibration_error(probs, data.labels)),
        "auroc": float(metrics.ood_auroc(entropy_in, entropy_out)),
    }


def bayesianize_adapter(model: nn.Module, train_data: Words, seed: int = 0, **kwargs):
    """TFB on 500 unlabelled training words; returns the model and the wall time."""
    from bdl.lora import bayesianize

    anchors = {k: v[:500] for k, v in train_data.inputs.items()}
    start = time.perf_counter()
    tfb = bayesianize(model, anchors, seed=seed, **kwargs)
    return tfb, time.perf_counter() - start


def lora_extra_missing() -> str | None:
    """The name of a missing package of the ``lora`` extra, or None."""
    import importlib.util

    for name in ("peft", "transformers", "all_minilm_l6_v2", "afinn"):
        if importlib.util.find_spec(name) is None:
            return name
    return None
