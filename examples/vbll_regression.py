"""VBLL regression on a 1-D toy problem: epistemic vs aleatoric uncertainty.

Inputs lie in two clusters, [-4, -1] and [1, 4], leaving a gap around 0; the targets are
``sin(x) x / 2`` plus Gaussian noise whose standard deviation grows with ``|x|``. A 2x64 ReLU
MLP is trained jointly with a Bayesian last layer in a plain PyTorch loop (Adam on the head's
per-datum negative ELBO), once with ``HeteroscedasticVBLLRegression`` (input-dependent noise)
and once with the homoscedastic ``VBLLRegression``. The plot shows the predictive bands of
both and splits the heteroscedastic predictive variance into its epistemic part (weight
uncertainty, which grows in the gap and away from the data) and its aleatoric part (the
learned noise, which should follow the true noise).

Run:  python examples/vbll_regression.py --out out
"""

from __future__ import annotations

import torch
from _common import output_dir, smoke_mode
from matplotlib import pyplot as plt
from torch import Tensor, nn

from bdl import metrics
from bdl.lastlayer import HeteroscedasticVBLLRegression, VBLLRegression

X_LIM = (-7.0, 7.0)
PRIOR_SCALE = 10.0


def true_function(x: Tensor) -> Tensor:
    return torch.sin(x) * x / 2


def true_noise_std(x: Tensor) -> Tensor:
    return 0.05 + 0.12 * x.abs()


def make_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` points from the two clusters [-4, -1] and [1, 4]; shapes (n, 1) and (n,)."""
    u = torch.rand(n, generator=generator)
    side = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    x = side * (1.0 + 3.0 * u)
    y = true_function(x) + true_noise_std(x) * torch.randn(n, generator=generator)
    return x.unsqueeze(-1), y


def feature_extractor(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())


def train(body: nn.Module, head: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int) -> None:
    """Joint Adam training of extractor and head on the head's per-datum loss."""
    params = list(body.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    generator = torch.Generator().manual_seed(seed)
    n, batch = x.shape[0], 64
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            opt.zero_grad(set_to_none=True)
            loss = head.loss(body(x[idx]), y[idx])
            loss.backward()
            opt.step()
        sched.step()


def main() -> None:
    out = output_dir(__doc__.splitlines()[0])
    torch.set_num_threads(1)
    smoke = smoke_mode()
    n_train, n_test, epochs, width = (40, 40, 2, 16) if smoke else (400, 1000, 300, 64)
    generator = torch.Generator().manual_seed(0)
    x_train, y_train = make_data(n_train, generator)
    x_test, y_test = make_data(n_test, generator)

    torch.manual_seed(0)
    het_body = feature_extractor(width)
    # noise_prior_scale=1 (default 0.01) lets the log-noise layer follow a noise level that
    # changes tenfold over the inputs; prior_scale=10 widens the weight prior, so the
    # epistemic variance away from the data is visible on the plot.
    het_head = HeteroscedasticVBLLRegression(
        width, 1, num_data=n_train, noise_std=0.5, prior_scale=PRIOR_SCALE, noise_prior_scale=1.0
    )
    train(het_body, het_head, x_train, y_train, epochs, seed=1)

    torch.manual_seed(0)
    hom_body = feature_extractor(width)
    hom_head = VBLLRegression(width, 1, num_data=n_train, noise_std=0.5, prior_scale=PRIOR_SCALE)
    train(hom_body, hom_head, x_train, y_train, epochs, seed=1)

    grid = torch.linspace(*X_LIM, 500).unsqueeze(-1)
    test_nll = {}
    with torch.no_grad():
        # held-out NLL / RMSE on fresh points from the training distribution
        for name, body, head in (
            ("heteroscedastic", het_body, het_head),
            ("homoscedastic", hom_body, hom_head),
        ):
            post = head.posterior(body(x_test), observation_noise=True)
            mean, var = post.mean.squeeze(-1), post.variance.squeeze(-1)
            nll = test_nll[name] = metrics.gaussian_nll(mean, var, y_test).item()
            rmse = metrics.rmse(mean, y_test).item()
            cover = metrics.interval_coverage(mean, var, y_test, levels=[0.95]).item()
            label = f"{name} VBLL"
            print(f"{label:<21} test NLL {nll:.3f}  RMSE {rmse:.3f}  95% coverage {cover:.3f}")
        sd = true_noise_std(x_test.squeeze(-1))
        oracle = metrics.gaussian_nll(true_function(x_test.squeeze(-1)), sd**2, y_test).item()
        print(f"{'true noise model':<21} test NLL {oracle:.3f}  (the best achievable)")

        phi_het, phi_hom = het_body(grid), hom_body(grid)
        het_total = het_head.posterior(phi_het, observation_noise=True)
        het_latent = het_head.posterior(phi_het)
        aleatoric = het_head.noise_variance(phi_het).squeeze(-1)
        hom_total = hom_head.posterior(phi_hom, observation_noise=True)
        hom_latent = hom_head.posterior(phi_hom)
        hom_noise = hom_head.noise_variance.item()
    g = grid.squeeze(-1).numpy()
    epistemic = het_latent.variance.squeeze(-1)
    absx = grid.squeeze(-1).abs()
    regions = {"data": (absx > 1) & (absx < 4), "gap": absx < 1, "outside": absx > 4}
    print(
        "heteroscedastic head, mean epistemic variance: "
        + "  ".join(f"{k} {epistemic[m].mean():.4f}" for k, m in regions.items())
    )

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, title, total, latent in (
        (axes[0], "heteroscedastic", het_total, het_latent),
        (axes[1], "homoscedastic", hom_total, hom_latent),
    ):
        mean = total.mean.squeeze(-1).numpy()
        total_sd = total.stddev.squeeze(-1).numpy()
        latent_sd = latent.stddev.squeeze(-1).numpy()
        for lo, hi in ((X_LIM[0], -4), (-1, 1), (4, X_LIM[1])):
            ax.axvspan(lo, hi, color="0.93", lw=0)  # regions without training data
        ax.fill_between(
            g, mean - 2 * total_sd, mean + 2 * total_sd, color="C0", alpha=0.2,
            label="±2 sd predictive (with noise)",
        )  # fmt: skip
        ax.fill_between(
            g, mean - 2 * latent_sd, mean + 2 * latent_sd, color="C1", alpha=0.45,
            label="±2 sd epistemic (latent f)",
        )  # fmt: skip
        ax.scatter(x_train.squeeze(-1), y_train, s=6, c="k", alpha=0.6, label="training data")
        ax.plot(g, true_function(grid.squeeze(-1)).numpy(), "k--", lw=1, label="true function")
        ax.plot(g, mean, "C0", lw=2, label="predictive mean")
        ax.set_xlim(*X_LIM)
        ax.set_ylim(-5, 5)
        ax.set_xlabel("x")
        ax.set_title(f"{title} VBLL (test NLL {test_nll[title]:.3f})")
    axes[0].set_ylabel("y")
    axes[0].legend(loc="upper center", ncol=2, fontsize=7)

    ax = axes[2]
    for lo, hi in ((X_LIM[0], -4), (-1, 1), (4, X_LIM[1])):
        ax.axvspan(lo, hi, color="0.93", lw=0)
    ax.plot(g, epistemic.numpy(), "C1", lw=2, label="epistemic  φᵀSφ")
    ax.plot(g, aleatoric.numpy(), "C2", lw=2, label="aleatoric  E σ²(x)")
    ax.plot(g, (true_noise_std(grid.squeeze(-1)) ** 2).numpy(), "C2--", lw=1, label="true σ²(x)")
    ax.axhline(hom_noise, color="C7", ls=":", label="homoscedastic σ²")
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 3)
    ax.set_xlim(*X_LIM)
    ax.set_xlabel("x")
    ax.set_ylabel("variance")
    ax.set_title("heteroscedastic head: variance decomposition")
    ax.legend(loc="lower center", ncol=2, fontsize=7)
    fig.suptitle("VBLL on a 1-D toy problem (grey: no training data)")
    fig.tight_layout()
    path = out / "vbll_regression.png"
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
