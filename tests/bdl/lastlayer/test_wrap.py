"""Tests for :func:`bdl.lastlayer.wrap`: VBLL heads on top of trained networks."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bdl.core.posterior import CategoricalPosterior, GaussianPosterior
from bdl.lastlayer import VBLLClassification, VBLLRegression, VBLLWrapper, wrap

NOISE_STD = 0.1


# -- fixtures: tiny nets trained briefly on synthetic problems ---------------------------------
def _mlp(d_in: int, d_out: int, width: int = 32, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, width), act(), nn.Linear(width, width), act(), nn.Linear(width, d_out)
    )


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, steps: int) -> nn.Module:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = loss_fn(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def _regression_data(n: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 4.0 * torch.rand(n, 1, generator=g, dtype=dtype) - 2.0
    y = torch.sin(2.0 * x[:, 0]) + NOISE_STD * torch.randn(n, generator=g, dtype=dtype)
    return x, y


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[0.0, 1.5], [1.3, -0.75], [-1.3, -0.75]])
    return centres[y] + torch.randn(n, 2, generator=g), y


@pytest.fixture(scope="module")
def reg_problem():
    """1-D regression; net trained briefly by MSE in float32, then used in float64."""
    x, y = _regression_data(200, seed=1)
    torch.manual_seed(1)
    net = _mlp(1, 1)
    _train(net, x.float(), y.float(), lambda out, t: (out[:, 0] - t).pow(2).mean(), steps=300)
    return net.double(), x, y


@pytest.fixture(scope="module")
def reg_fitted(reg_problem):
    net, x, y = reg_problem
    return wrap(net).fit((x, y))


@pytest.fixture(scope="module")
def cls_problem():
    """Three overlapping Gaussian blobs in 2-D, ReLU net trained briefly by cross-entropy."""
    x, y = _blobs(300, seed=2)
    x_test, y_test = _blobs(2000, seed=3)
    torch.manual_seed(2)
    net = _mlp(2, 3, act=nn.ReLU)
    _train(net, x, y, nn.functional.cross_entropy, steps=200)
    return net, x, y, x_test, y_test


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# -- regression post hoc ----------------------------------------------------------------------
def test_regression_posthoc_mean_near_map_where_data_are(reg_problem, reg_fitted):
    net, x, y = reg_problem
    post = reg_fitted.posterior(x)
    assert isinstance(post, GaussianPosterior)
    assert post.mean.shape == (200, 1) and post.variance.shape == (200, 1)
    with torch.no_grad():
        map_out = net(x)
    noise_var = float(reg_fitted.fit_info_["noise_variance"][0])
    # the evidence-optimal noise is the residual scale of the data
    assert 0.5 * NOISE_STD**2 < noise_var < 2.0 * NOISE_STD**2
    rms_diff = float((post.mean - map_out).pow(2).mean().sqrt())
    assert rms_diff < 0.5 * math.sqrt(noise_var)
    # the BLR mean minimises ||y - Phi w - b||^2 / s2 + ||w||^2 / s_p over (w, b), and the net's
    # own last layer is one candidate: its penalised residual is a bound on the BLR's
    w_map = net[-1].weight.detach()
    s_p = float(reg_fitted.fit_info_["prior_variance"][0])
    sse_blr = float((post.mean[:, 0] - y).pow(2).sum())
    sse_map = float((map_out[:, 0] - y).pow(2).sum())
    assert sse_blr <= sse_map + noise_var / s_p * float(w_map.pow(2).sum())
    # forward() is the posterior mean
    torch.testing.assert_close(reg_fitted(x), post.mean)


def test_regression_posthoc_variance_grows_away_from_data(reg_fitted):
    near = reg_fitted.posterior(torch.linspace(-1.8, 1.8, 50, dtype=torch.float64)[:, None])
    far = reg_fitted.posterior(torch.tensor([[-8.0], [8.0]], dtype=torch.float64))
    assert float(far.variance.min()) > 10.0 * float(near.variance.max())
    noisy = reg_fitted.posterior(torch.zeros(3, 1, dtype=torch.float64), observation_noise=True)
    latent = reg_fitted.posterior(torch.zeros(3, 1, dtype=torch.float64))
    noise_var = reg_fitted.fit_info_["noise_variance"].to(latent.dtype)
    torch.testing.assert_close(noisy.variance - latent.variance, noise_var.expand(3, 1))


def test_regression_posthoc_head_equals_hand_computed_blr(reg_problem, reg_fitted):
    """Bayesian linear regression by hand on the cached features (centred, flat offset)."""
    _, x, y = reg_problem
    with torch.no_grad():
        phi = reg_fitted.extractor(x)
    n, d = phi.shape
    s2 = float(reg_fitted.fit_info_["noise_variance"][0])
    s_p = float(reg_fitted.fit_info_["prior_variance"][0])
    phi_bar, y_bar = phi.mean(0), y.mean()
    phi_c, y_c = phi - phi_bar, y - y_bar
    eye = torch.eye(d, dtype=phi.dtype)
    cov = torch.linalg.inv(phi_c.T @ phi_c / s2 + eye / s_p)
    w = cov @ phi_c.T @ y_c / s2

    x_test = torch.linspace(-4.0, 4.0, 41, dtype=torch.float64)[:, None]
    with torch.no_grad():
        phi_t = reg_fitted.extractor(x_test) - phi_bar
    mean = y_bar + phi_t @ w
    var = ((phi_t @ cov) * phi_t).sum(-1)
    post = reg_fitted.posterior(x_test)
    torch.testing.assert_close(post.mean[:, 0], mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(post.variance[:, 0], var, rtol=1e-6, atol=1e-9)

    # the noise and prior variance maximise the exact evidence with the offset integrated out
    # under a flat prior: log N(Q^T y | 0, s_p Q^T Phi Phi^T Q + s2 I), Q an orthonormal basis
    # of the complement of the constant vector
    basis, _ = torch.linalg.qr(
        torch.cat([torch.ones(n, 1, dtype=phi.dtype), torch.randn(n, n - 1, dtype=phi.dtype)], 1)
    )
    q = basis[:, 1:]
    z, zf = q.T @ y, q.T @ phi

    def log_evidence(noise: float, prior: float) -> float:
        k = prior * zf @ zf.T + noise * torch.eye(n - 1, dtype=phi.dtype)
        dist = torch.distributions.MultivariateNormal(torch.zeros_like(z), covariance_matrix=k)
        return float(dist.log_prob(z))

    best = log_evidence(s2, s_p)
    assert best == pytest.approx(float(reg_fitted.fit_info_["log_evidence"][0]), abs=1e-6)
    for f in (0.98, 1.02):
        assert log_evidence(s2 * f, s_p) < best
        assert log_evidence(s2, s_p * f) < best

    # with centred features the closed form is also the maximiser of the head's own ELBO: N *
    # ELBO equals the exact evidence given the point-estimated offset
    with torch.no_grad():
        elbo = float(reg_fitted.head.elbo(reg_fitted.features(x), y))
    k = s_p * phi_c @ phi_c.T + s2 * torch.eye(n, dtype=phi.dtype)
    exact = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=phi.dtype), k).log_prob(y_c)
    assert elbo == pytest.approx(float(exact), abs=1e-6)


def test_regression_multi_output_3d_inputs_float32():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(150, 3, generator=g)
    y = torch.stack([x.sum(-1), torch.sin(x[:, 0])], -1) + 0.1 * torch.randn(150, 2, generator=g)
    torch.manual_seed(4)
    net = _train(_mlp(3, 2, width=16), x, y, nn.functional.mse_loss, steps=150)
    model = wrap(net, covariance="diagonal").fit((x, y))
    post = model.posterior(x[:7], observation_noise=True)
    assert post.mean.shape == (7, 2) and post.dtype == torch.float32
    assert bool((post.variance > 0).all())
    assert model.posterior(x[:5], joint=True).covariance_matrix.shape == (10, 10)
    with pytest.raises(ValueError, match="y"):
        model.fit((x, y[:, 0]))  # (n,) targets for a 2-output net


# -- classification post hoc ------------------------------------------------------------------
def test_classification_posthoc_matches_map_accuracy_and_nll(cls_problem):
    net, x, y, x_test, y_test = cls_problem
    with torch.no_grad():
        log_p = net(x_test).log_softmax(-1)
    map_acc = float((log_p.argmax(-1) == y_test).double().mean())
    map_nll = float(-log_p.gather(1, y_test[:, None]).mean())
    model = wrap(net, "classification").fit((x, y), seed=0)
    assert isinstance(model.head, VBLLClassification) and model.head.num_data == 300
    post = model.posterior(x_test)
    assert isinstance(post, CategoricalPosterior) and post.probs.shape == (2000, 3)
    acc = float((post.probs.argmax(-1) == y_test).double().mean())
    nll = float(-post.log_prob(y_test).mean())
    # not worse than the MAP net by more than two points (a binomial standard error of accuracy
    # at n=2000 is ~0.9 points); the overfit MAP net is often beaten, which is fine
    assert acc >= map_acc - 0.02
    assert nll <= map_nll + 0.02
    assert len(model.history_) == 100 and model.history_[-1] < model.history_[0]
    assert model(x_test[:4]).shape == (4, 3)


# -- fine-tuning ------------------------------------------------------------------------------
def _full_loss(model: VBLLWrapper, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model.eval().head.loss(model.features(x), y))


def test_finetune_classification_improves_elbo(cls_problem):
    net, x, y, _, _ = cls_problem
    model = wrap(net, "classification", method="finetune")
    model.head.num_data = len(y)
    before = _full_loss(model, x, y)
    model.fit((x, y), epochs=10, lr=1e-3, seed=0)
    assert _full_loss(model, x, y) < before
    assert len(model.history_) == 10


def test_finetune_regression_runs_and_refreshes_closed_form(reg_problem):
    net, x, y = reg_problem
    model = wrap(net, method="finetune")
    model.fit((x, y), epochs=5, lr=1e-3, seed=0)
    assert len(model.history_) == 5 and model.history_[-1] < model.history_[0]
    # the final head is the closed form on the final (centred) features
    with torch.no_grad():
        phi = model.extractor(x)
    torch.testing.assert_close(model.feature_mean, phi.mean(0))
    refit = copy.deepcopy(model.head)
    refit.fit_closed_form(phi - phi.mean(0), y, learn_noise=True, learn_prior=True)
    torch.testing.assert_close(refit.weights.mean, model.head.weights.mean)
    torch.testing.assert_close(refit.noise_variance, model.head.noise_variance)


@pytest.mark.parametrize("method", ["posthoc", "finetune"])
def test_original_model_unchanged(cls_problem, method):
    net, x, y, x_test, _ = cls_problem
    params = _snapshot(net)
    with torch.no_grad():
        out = net(x_test)
    model = wrap(net, "classification", method=method)
    model.fit((x, y), epochs=2, lr=1e-2)
    for k, v in net.state_dict().items():
        assert torch.equal(v, params[k]), k
    assert all(isinstance(m, nn.Linear) for m in net[::2])
    with torch.no_grad():
        assert torch.equal(net(x_test), out)


def test_copy_false_modifies_in_place(reg_problem):
    net, x, y = reg_problem
    own = copy.deepcopy(net)
    model = wrap(own, copy=False).fit((x, y))
    assert model.extractor is own and isinstance(own[4], nn.Identity)


# -- choosing the layer -----------------------------------------------------------------------
def test_wrong_last_layer_raises_at_fit(reg_problem):
    net, x, y = reg_problem
    model = wrap(net, last_layer="0")  # a Linear, but the first layer, not the last operation
    with pytest.raises(ValueError, match="last_layer="):
        model.fit((x, y))


def test_output_transformed_after_last_linear_raises(reg_problem):
    net, x, y = reg_problem
    scaled = nn.Sequential(copy.deepcopy(net), nn.Softplus())
    with pytest.raises(ValueError, match="not the last operation"):
        wrap(scaled).fit((x, y))


class _NamedNet(nn.Module):
    """A body, a classifier, and a projection defined later that forward() does not use."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 16), nn.ReLU())
        self.classifier = nn.Linear(16, 3)
        self.projection = nn.Linear(16, 4)  # e.g. a contrastive head used elsewhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def test_named_submodule_last_layer(cls_problem):
    _, x, y, _, _ = cls_problem
    torch.manual_seed(5)
    net = _train(_NamedNet(), x, y, nn.functional.cross_entropy, steps=50)
    with pytest.raises(ValueError, match="not called"):
        wrap(net, "classification").fit((x, y), epochs=1)  # default picks `projection`
    model = wrap(net, "classification", last_layer="classifier")
    assert model.layer_name == "classifier" and model.head.num_classes == 3
    torch.testing.assert_close(model.head.weights.mean, net.classifier.weight)
    torch.testing.assert_close(model.head.bias, net.classifier.bias)
    with torch.no_grad():  # before fitting, the mean logits are the net's
        torch.testing.assert_close(model(x), net(x))
    model.fit((x, y), epochs=5)
    assert model.posterior(x[:10]).probs.shape == (10, 3)


def test_net_that_is_a_single_linear_layer():
    x, y = _regression_data(50, seed=6, dtype=torch.float32)
    model = wrap(nn.Linear(1, 1)).fit((x, y))
    assert isinstance(model.extractor, nn.Identity)
    assert model.posterior(x).mean.shape == (50, 1)


# -- data formats and serialisation -----------------------------------------------------------
def test_dataloader_and_tensor_tuple_agree(reg_problem):
    net, x, y = reg_problem
    from_tensors = wrap(net).fit((x, y), batch_size=37)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    from_loader = wrap(net).fit(loader)
    x_test = torch.linspace(-3, 3, 13, dtype=torch.float64)[:, None]
    a, b = from_tensors.posterior(x_test), from_loader.posterior(x_test)
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.variance, b.variance)


def test_classification_dataloader_finetune(cls_problem):
    net, x, y, _, _ = cls_problem
    loader = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True)
    model = wrap(net, "classification", method="finetune").fit(loader, epochs=2)
    assert model.head.num_data == 300 and len(model.history_) == 2


def test_state_dict_round_trip(cls_problem):
    net, x, y, x_test, _ = cls_problem
    model = wrap(net, "classification", covariance="lowrank").fit((x, y), epochs=5)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = wrap(_mlp(2, 3, act=nn.ReLU), "classification", covariance="lowrank")
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh.posterior(x_test).probs, model.posterior(x_test).probs)
    torch.testing.assert_close(fresh.feature_mean, model.feature_mean)


def test_posterior_keeps_gradients_only_for_inputs_that_need_them(reg_fitted):
    x = torch.zeros(4, 1, dtype=torch.float64, requires_grad=True)
    reg_fitted.posterior(x).mean.sum().backward()
    assert x.grad is not None and x.grad.shape == (4, 1)
    assert not reg_fitted.posterior(x.detach()).mean.requires_grad


def test_modes_are_restored(cls_problem):
    net, x, y, _, _ = cls_problem
    model = wrap(net, "classification", method="finetune").eval()
    model.fit((x, y), epochs=1)
    assert not any(m.training for m in model.modules())
    model.train().posterior(x[:3])
    assert all(m.training for m in model.modules())


def test_verbose_shows_progress(cls_problem, capsys):
    net, x, y, _, _ = cls_problem
    wrap(net, "classification").fit((x, y), epochs=2, verbose=True)
    assert "VBLL head" in capsys.readouterr().err
    wrap(net, "classification").fit((x, y), epochs=2)
    assert capsys.readouterr().err == ""


# -- errors -----------------------------------------------------------------------------------
def test_wrap_argument_errors():
    net = _mlp(1, 1)
    with pytest.raises(ValueError, match="task"):
        wrap(net, "density")
    with pytest.raises(ValueError, match="method"):
        wrap(net, method="laplace")
    with pytest.raises(ValueError, match="nn.Linear"):
        wrap(nn.Sequential(nn.Tanh()))
    with pytest.raises(ValueError, match="last_layer"):
        wrap(net, last_layer="head")
    with pytest.raises(ValueError, match="last_layer"):
        wrap(net, last_layer="1")  # a Tanh
    with pytest.raises(ValueError, match="out_features"):
        wrap(net, "classification")  # a single output is not a set of logits
    with pytest.raises(ValueError, match="net"):
        wrap("not a module")  # type: ignore[arg-type]


def test_fit_data_errors():
    x, y = _regression_data(20, seed=7, dtype=torch.float32)
    model = wrap(_mlp(1, 1))
    with pytest.raises(ValueError, match="empty"):
        model.fit((x[:0], y[:0]))
    with pytest.raises(ValueError, match="empty"):
        model.fit(DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4))
    bad_x = x.clone()
    bad_x[3] = float("nan")
    with pytest.raises(ValueError, match="X contains NaN"):
        model.fit((bad_x, y))
    bad_y = y.clone()
    bad_y[5] = float("inf")
    with pytest.raises(ValueError, match="y contains NaN"):
        model.fit(DataLoader(TensorDataset(x, bad_y), batch_size=4))
    with pytest.raises(ValueError, match="different lengths"):
        model.fit((x, y[:-1]))
    with pytest.raises(ValueError, match="data"):
        model.fit(x)
    with pytest.raises(ValueError, match="epochs"):
        model.fit((x, y), epochs=0)
    classifier = wrap(_mlp(1, 3), "classification")
    with pytest.raises(ValueError, match="labels"):
        classifier.fit((x, y))  # float labels


def test_model_dtype_is_followed():
    x, y = _regression_data(30, seed=8, dtype=torch.float32)
    model = wrap(_mlp(1, 1).double()).fit((x, y))  # float32 data, float64 net
    assert model.head.weights.mean.dtype == torch.float64
    # the posterior follows its input (the model protocol): computed in float64, returned in
    # the dtype of x
    assert model.posterior(x).mean.dtype == torch.float32
    post64 = model.posterior(x.double())
    assert post64.mean.dtype == torch.float64
    torch.testing.assert_close(model.posterior(x).mean, post64.mean.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(reg_problem):
    net, x, y = reg_problem
    model = wrap(copy.deepcopy(net).cuda()).fit((x, y))  # CPU data follows the net
    assert model.posterior(x).mean.device.type == "cuda"
    cls = wrap(_mlp(1, 3).cuda(), "classification").fit((x, (y > 0).long()), epochs=2)
    assert cls.posterior(x.cuda()).probs.device.type == "cuda"


def test_heads_are_the_expected_types(reg_fitted):
    assert isinstance(reg_fitted.head, VBLLRegression)
    assert reg_fitted.head.num_data == 200


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_last_layer_without_bias_keeps_predictions(task):
    # without an offset the head cannot absorb a centring shift: features stay uncentred and
    # the wrapped mean starts exactly at the original network's output
    torch.manual_seed(0)
    out = 1 if task == "regression" else 3
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, out, bias=False))
    x = torch.randn(64, 2)
    y = x[:, 0] if task == "regression" else (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = wrap(net, task=task)
    model.fit((x, y), epochs=1) if task == "classification" else model.fit((x, y))
    assert torch.all(model.feature_mean == 0)
    if task == "classification":
        # one short epoch of head training moves the logits only a little
        assert (model(x).argmax(-1) == net(x).argmax(-1)).float().mean() > 0.9
