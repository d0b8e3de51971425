"""SG-MCMC regression on a 1-D toy problem: predictive bands from SGLD and SGHMC samples.

Inputs lie in two clusters, [-4, -1] and [1, 4], leaving a gap around 0; the targets are
``sin(x) x / 2`` plus Gaussian noise of known standard deviation 0.2. A 2x32 tanh MLP with a
Gaussian prior (``prior_precision=1``) and the Gaussian likelihood of that noise is sampled
with ``bdl.sgmcmc.SGLD`` and ``bdl.sgmcmc.SGHMC`` in the ordinary PyTorch loop: the loss is
the minibatch *mean* negative log-likelihood, the optimizer is told ``num_data`` and
``temperature=1``, and a ``SampleCollector`` keeps thinned samples after burn-in. Both chains
start from a short MAP pre-training (noise off, i.e. ``temperature=0``). The plot shows the
predictive mean and 95% bands (latent function and observations) of both samplers; the
script prints the test NLL / RMSE and the effective sample size of the training log-likelihood.

Run:  python examples/sgmcmc_regression.py --out out
"""

from __future__ import annotations

import torch
from _common import output_dir, smoke_mode
from matplotlib import pyplot as plt
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bdl import metrics
from bdl.sgmcmc import SGHMC, SGLD, SampleCollector, effective_sample_size

X_LIM = (-7.0, 7.0)
NOISE_STD = 0.2
PRIOR_PRECISION = 1.0


def true_function(x: Tensor) -> Tensor:
    return torch.sin(x) * x / 2


def make_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` points from the two clusters [-4, -1] and [1, 4]; shapes (n, 1) and (n,)."""
    u = torch.rand(n, generator=generator)
    side = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    x = side * (1.0 + 3.0 * u)
    y = true_function(x) + NOISE_STD * torch.randn(n, generator=generator)
    return x.unsqueeze(-1), y


def make_net(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    )


def mean_nll(pred: Tensor, y: Tensor) -> Tensor:
    """Mean Gaussian negative log-likelihood of a minibatch (up to a constant), noise known."""
    return 0.5 * ((pred.squeeze(-1) - y) ** 2).mean() / NOISE_STD**2


def sample(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    loader: DataLoader,
    steps: int,
    collector: SampleCollector | None,
    x_train: Tensor,
    y_train: Tensor,
) -> list[float]:
    """``steps`` optimizer steps of the ordinary loop; training log-likelihood of each sample."""
    log_lik = []
    done = 0
    while done < steps:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            mean_nll(net(x), y).backward()
            opt.step()
            done += 1
            if collector is not None and collector.update():
                with torch.no_grad():
                    log_lik.append(-len(y_train) * mean_nll(net(x_train), y_train).item())
            if done == steps:
                break
    return log_lik


def plot_bands(ax, x_grid: Tensor, post, name: str, x_train: Tensor, y_train: Tensor) -> None:
    mean = post.mean.squeeze(-1)
    f_std = post.variance.sqrt().squeeze(-1)
    y_std = (post.variance.squeeze(-1) + NOISE_STD**2).sqrt()
    xs = x_grid.squeeze(-1)
    ax.fill_between(
        xs,
        mean - 1.96 * y_std,
        mean + 1.96 * y_std,
        color="C0",
        alpha=0.15,
        label="95% observations",
    )
    ax.fill_between(
        xs, mean - 1.96 * f_std, mean + 1.96 * f_std, color="C0", alpha=0.35, label="95% latent f"
    )
    ax.plot(xs, mean, color="C0", lw=2, label="predictive mean")
    ax.plot(xs, true_function(xs), "k--", lw=1, label="true f")
    ax.scatter(x_train.squeeze(-1), y_train, s=6, color="k", alpha=0.5)
    ax.set_xlim(*X_LIM)
    ax.set_ylim(-4, 4)
    ax.set_xlabel("x")
    ax.set_title(name)
    ax.legend(loc="lower left", fontsize=7)


def main() -> None:
    out = output_dir(__doc__.splitlines()[0])
    torch.set_num_threads(1)
    smoke = smoke_mode()
    n_train, width = (40, 8) if smoke else (200, 32)
    map_steps, burn_in, steps, thin = (20, 10, 60, 5) if smoke else (3000, 2000, 22000, 100)
    generator = torch.Generator().manual_seed(0)
    x_train, y_train = make_data(n_train, generator)
    x_test, y_test = make_data(500, generator)
    x_grid = torch.linspace(*X_LIM, 300).unsqueeze(-1)
    loader = DataLoader(
        TensorDataset(x_train, y_train),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )

    # lr = eta * N: for SGLD the step must stay below 2 / (largest curvature of the mean loss);
    # SGHMC's velocity accumulates ~1 / momentum_decay steps, so it uses a smaller lr.
    samplers = {
        "SGLD": lambda p: SGLD(
            p,
            lr=2e-3,
            num_data=n_train,
            prior_precision=PRIOR_PRECISION,
            generator=torch.Generator().manual_seed(2),
        ),
        "SGHMC": lambda p: SGHMC(
            p,
            lr=2e-4,
            num_data=n_train,
            momentum_decay=0.1,
            prior_precision=PRIOR_PRECISION,
            generator=torch.Generator().manual_seed(3),
        ),
    }
    posteriors = {}
    for name, make_opt in samplers.items():
        net = make_net(width)
        # MAP start: the same update with the noise switched off (temperature 0)
        opt = make_opt(net.parameters())
        for group in opt.param_groups:
            group["temperature"] = 0.0
        sample(net, opt, loader, map_steps, None, x_train, y_train)
        for group in opt.param_groups:
            group["temperature"] = 1.0
        collector = SampleCollector(
            net, burn_in=burn_in, thin=thin, task="regression", noise_variance=NOISE_STD**2
        )
        log_lik = sample(net, opt, loader, steps, collector, x_train, y_train)
        post = collector.posterior(x_test, observation_noise=True)
        nll = -post.log_prob(y_test.unsqueeze(-1)).mean().item()
        rmse = metrics.rmse(post.mean.squeeze(-1), y_test).item()
        ess = (
            effective_sample_size(torch.tensor(log_lik)).item()
            if len(log_lik) > 3
            else float("nan")
        )
        print(
            f"{name:<6} samples {len(collector):4d}  test NLL {nll:.4f}  RMSE {rmse:.4f}  "
            f"ESS of the training log-likelihood {ess:.1f}"
        )
        posteriors[name] = collector.posterior(x_grid)  # the latent function

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (name, post) in zip(axes, posteriors.items(), strict=True):
        plot_bands(ax, x_grid, post, name, x_train, y_train)
    axes[0].set_ylabel("y")
    fig.suptitle(f"SG-MCMC predictive of a 2x{width} tanh MLP, {n_train} training points")
    fig.tight_layout()
    path = out / "sgmcmc_regression.png"
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
