"""State-space GP against the dense GP for lengthscales from 1e-8 to 1e8 times the spacing.

Gold standard: :class:`gp.ExactGP` with the same kernel and noise, in float64. Its kernel
is a ``MaternKernel`` that evaluates ``|t - t'|`` directly (``_ExactMatern``): gpytorch's own
distance, ``sqrt(a^2 + b^2 - 2ab)``, loses every digit of ``|t - t'| / ell`` when the scaled
times are ~1e9 apart from the origin, so at short lengthscales it is the *reference* that
would be wrong. Errors are measured relative to the prior scale (``s`` for means, ``s^2``
for variances, per point for the log marginal likelihood).

Tolerances. The dense GP is backward stable: its error is at most about
``n kappa eps`` with ``kappa = cond(K + noise I) <= 1 + n s^2 / noise = 601`` here, i.e.
``40 * 601 * 1.1e-16 = 2.7e-12`` in float64; the state-space recursions err at the same
level, so float64 uses ``1e-10`` (observed <= 5e-14). In float32 the bound
``n kappa eps = 1.4e-3`` is loose (a float32 dense GP errs by ~1e-5 here); the test asks for
``3e-5 = 500 eps32`` against the float64 dense GP on the same (float32-rounded) inputs
(observed <= 1e-6).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel

import gp
from bdl.core.linalg import JitterWarning
from gp.statespace import StateSpaceGP, discretise, matern_sde, psd_factor
from gp.statespace.kalman import smoother_gain

N = 40
SPACING = 10.0 / (N - 1)
NOISE = 0.1
OUTPUTSCALE = 1.5
TOL = {torch.float64: 1e-10, torch.float32: 3e-5}
RATIOS = [10.0**e for e in range(-8, 9, 2)]


class _ExactMatern(MaternKernel):
    """Matérn kernel on one input with ``|t - t'|`` computed directly (no cancellation)."""

    def forward(self, x1, x2, diag=False, **params):  # noqa: ANN001, ANN201
        ell = self.lengthscale.reshape(())
        r = ((x1 - x2).abs().squeeze(-1) if diag else (x1 - x2.mT).abs()) / ell
        s = math.sqrt(2 * self.nu) * r
        poly = {0.5: 1.0, 1.5: 1 + s, 2.5: 1 + s + s**2 / 3}[self.nu]
        return poly * torch.exp(-s)


def _kernel(nu: float, ell: float, scale: float = OUTPUTSCALE) -> ScaleKernel:
    kernel = ScaleKernel(_ExactMatern(nu=nu)).double()
    kernel.base_kernel.lengthscale = ell
    kernel.outputscale = scale
    return kernel


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training times and targets, and query times at, next to (7e-4 and 1e-9 spacings),
    between and beyond the data — rounded to ``dtype`` and back (the reference sees the
    same inputs)."""
    t = torch.linspace(0, 10, N, dtype=torch.float64)
    y = torch.sin(t) + 0.3 * torch.cos(7 * t)
    near = torch.cat([t[:5], t[:5] + 7e-4 * SPACING, t[:5] + 1e-9 * SPACING])
    far = torch.tensor([-3.0, 13.0, 10.0 + 1e-6], dtype=torch.float64)
    tq = torch.cat([near, t[:4] + 0.5 * SPACING, far])
    return tuple(x.to(dtype).double() for x in (t, y, tq))


def _dense(kernel: ScaleKernel, t, y, tq, noise: float = NOISE):
    model = gp.ExactGP(kernel, noise=noise, mean="zero").double()
    model.noise = noise
    model.set_data(t[:, None], y)
    with torch.no_grad(), warnings.catch_warnings():
        # the reference's joint covariance is ~1e-14 at the short lengthscales; the dense
        # GP may add jitter of 1e-14 of that to factor it, far inside the tolerances
        warnings.simplefilter("ignore", JitterWarning)
        post = model.posterior(tq[:, None], joint=True)
        return (
            post.mean[:, 0],
            post.variance[:, 0],
            post.covariance_matrix,
            (model.log_marginal_likelihood()),
        )


def _statespace(kernel: ScaleKernel, t, y, dtype, method: str, noise: float = NOISE):
    model = StateSpaceGP(kernel, noise=noise, method=method).double()
    model.noise = noise
    return model.to(dtype).set_data(t.to(dtype), y.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["sequential", "parallel"])
@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
@pytest.mark.parametrize("ratio", RATIOS, ids=[f"ell={r:g}h" for r in RATIOS])
def test_posterior_and_lml_match_the_dense_gp(ratio, nu, method, dtype):
    t, y, tq = _data(dtype)
    kernel = _kernel(nu, ratio * SPACING)
    mean, var, cov, lml = _dense(kernel, t, y, tq)
    model = _statespace(kernel, t, y, dtype, method)
    with torch.no_grad():
        post = model.posterior(tq.to(dtype)[:, None])
        ss_lml = model.log_marginal_likelihood()
        draws = post.rsample(torch.Size([3]))
        ss_cov = post.covariance_matrix.double()
    tol = TOL[dtype]
    s = math.sqrt(OUTPUTSCALE)
    assert bool(torch.isfinite(draws).all())
    assert (post.mean[:, 0].double() - mean).abs().max() <= tol * s
    assert (post.variance[:, 0].double() - var).abs().max() <= tol * OUTPUTSCALE
    assert (ss_cov - cov).abs().max() <= tol * OUTPUTSCALE
    assert abs(float(ss_lml) - float(lml)) <= tol * N


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
@pytest.mark.parametrize("ratio", RATIOS[::2], ids=[f"ell={r:g}h" for r in RATIOS[::2]])
def test_compiled_lml_and_gradient_match_the_dense_gp(ratio, nu, dtype):
    t, y, _ = _data(dtype)
    kernel = _kernel(nu, ratio * SPACING)
    dense = gp.ExactGP(kernel, noise=NOISE, mean="zero").double()
    dense.noise = NOISE
    lml = dense.log_marginal_likelihood(t[:, None], y)
    (grad,) = torch.autograd.grad(lml, kernel.base_kernel.raw_lengthscale)
    for method in ("fast", "parallel", "sequential"):
        model = _statespace(kernel, t, y, dtype, method)
        ss = model.log_marginal_likelihood()
        (ss_grad,) = torch.autograd.grad(ss, model.kernel.base_kernel.raw_lengthscale)
        assert abs(float(ss.detach()) - float(lml.detach())) <= TOL[dtype] * N, method
        # d lml / d raw_lengthscale is a sum of n terms of the prior scale
        assert abs(float(ss_grad) - float(grad)) <= TOL[dtype] * N * (1 + abs(float(grad)))


def test_issue_reproducer_is_finite_and_exact():
    """float32, Matérn-5/2, ell = 1e-4 at spacing 0.26: the posterior used to be NaN."""
    k = ScaleKernel(MaternKernel(nu=2.5))
    k.base_kernel.lengthscale = 1e-4
    t = torch.linspace(0, 10, 40)
    model = gp.StateSpaceGP(k, noise=0.1).set_data(t, torch.sin(t))
    post = model.posterior(t[:3])
    assert bool(torch.isfinite(post.mean).all()) and bool(torch.isfinite(post.variance).all())
    ref = _kernel(2.5, float(k.base_kernel.lengthscale), float(k.outputscale))
    noise = float(model.noise)
    mean, var, _, _ = _dense(ref, t.double(), torch.sin(t).double(), t[:3].double(), noise)
    assert (post.mean[:, 0].double() - mean).abs().max() <= TOL[torch.float32]
    assert (post.variance[:, 0].double() - var).abs().max() <= TOL[torch.float32]
    assert bool(torch.isfinite(post.rsample(torch.Size([4]))).all())


def test_float32_near_a_training_point_is_accurate():
    """float32, Matérn-5/2, ell = 1e-3, 7e-4 from the data: used to be 2.6 % off."""
    t32 = torch.linspace(0, 10, 40)
    tq32 = t32[:4] + 7e-4
    kernel = _kernel(2.5, 1e-3, 1.0)
    t, y, tq = t32.double(), torch.sin(t32).double(), tq32.double()
    mean, var, _, _ = _dense(kernel, t, y, tq)
    model = _statespace(kernel, t, y, torch.float32, "parallel")
    post = model.posterior(tq32[:, None])
    assert (post.mean[:, 0].double() - mean).abs().max() <= TOL[torch.float32]
    assert (post.variance[:, 0].double() - var).abs().max() <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("ratios", [(1e-8, 1.0), (1e-4, 1e4), (1.0, 1e8)], ids=str)
def test_sum_of_very_different_lengthscales(ratios, dtype):
    """Blocks are exponentiated one at a time: a fast component used to wreck a slow one."""
    t, y, tq = _data(dtype)
    kernel = _kernel(0.5, ratios[0] * SPACING, 0.5) + _kernel(2.5, ratios[1] * SPACING, 2.0)
    mean, var, _, lml = _dense(kernel, t, y, tq)
    for method in ("parallel", "fast"):
        model = _statespace(kernel, t, y, dtype, method)
        with torch.no_grad():
            post = model.posterior(tq.to(dtype)[:, None])
            ss_lml = model.log_marginal_likelihood()
        assert (post.mean[:, 0].double() - mean).abs().max() <= TOL[dtype] * math.sqrt(2.5)
        assert (post.variance[:, 0].double() - var).abs().max() <= TOL[dtype] * 2.5
        assert abs(float(ss_lml) - float(lml)) <= TOL[dtype] * N


@pytest.mark.parametrize("method", ["sequential", "parallel", "fast"])
def test_degenerate_components_stay_finite(method):
    """A component with output scale 0 (singular predicted covariances) and a lengthscale
    that underflowed to 0: finite posterior, draws and likelihood, equal to the model
    without the dead component."""
    t, y, tq = _data(torch.float64)
    alive = _kernel(1.5, 2.0)
    dead = _kernel(0.5, 1.0)
    with torch.no_grad():
        dead.raw_outputscale.fill_(-1e4)  # softplus underflows: exactly 0
        dead.base_kernel.raw_lengthscale.fill_(-1e4)
    assert float(dead.outputscale) == 0.0 and float(dead.base_kernel.lengthscale) == 0.0
    model = _statespace(alive + dead, t, y, torch.float64, method)
    ref = _statespace(alive, t, y, torch.float64, method)
    with torch.no_grad():
        post, ref_post = model.posterior(tq[:, None]), ref.posterior(tq[:, None])
        assert bool(torch.isfinite(post.rsample(torch.Size([3]))).all())
        torch.testing.assert_close(post.mean, ref_post.mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(post.variance, ref_post.variance, rtol=0, atol=1e-12)
        lml, ref_lml = model.log_marginal_likelihood(), ref.log_marginal_likelihood()
        torch.testing.assert_close(lml, ref_lml, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_short_step_process_noise_is_relatively_accurate(dtype):
    """Matérn-1/2 has Q = s^2 (1 - e^{-2 lam dt}) in closed form; the series keeps it
    accurate relative to Q itself (the stationary difference lost all digits for short
    steps: absolute error eps s^2)."""
    lam_dt = torch.logspace(-12, 3, 61, dtype=torch.float64)
    sde = matern_sde(0.5, torch.tensor(1.0, dtype=dtype), torch.tensor(2.0, dtype=dtype))
    _, Q = discretise(sde, lam_dt.to(dtype))
    exact = -2.0 * torch.expm1(-2.0 * lam_dt)
    rel = (Q[:, 0, 0].double() - exact).abs() / exact
    assert rel.max() <= 20 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_short_step_process_noise_is_positive_semidefinite(dtype):
    sde = matern_sde(2.5, torch.tensor(1.0, dtype=dtype))
    dt = torch.logspace(-10, 1, 45, dtype=dtype)
    _, Q = discretise(sde, dt)
    eig = torch.linalg.eigvalsh(Q.double())
    assert bool(torch.isfinite(Q).all())
    assert bool((eig[:, 0] >= -10 * torch.finfo(dtype).eps * eig[:, -1]).all())
    # Q = O(dt) for short steps: its largest entry (the last state's) ~ Qc dt
    qc = float(sde.Qc)
    small = dt < 1e-6
    torch.testing.assert_close(Q[small, 2, 2].double(), qc * dt[small].double(), rtol=1e-5, atol=0)


def test_smoother_gain_of_a_singular_covariance_is_the_pseudo_inverse_gain():
    """A zero-variance state gets a zero gain column; the rest is the ordinary gain."""
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    P = torch.zeros(4, 4, dtype=torch.float64)
    P[:3, :3] = B @ B.mT + 0.1 * torch.eye(3, dtype=torch.float64)
    AP = torch.zeros(4, 4, dtype=torch.float64)
    AP[:3] = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    G = smoother_gain(P, AP)
    expected = AP.mT @ torch.linalg.pinv(P)
    torch.testing.assert_close(G, expected, rtol=1e-12, atol=1e-12)
    assert bool((G[:, 3] == 0).all())


def test_backward_sampling_errors_name_the_cause():
    bad = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(torch.linalg.LinAlgError, match="inconsistent") as info:
        psd_factor(bad, torch.ones(2, dtype=torch.float64))
    assert "float64 (" not in str(info.value)  # no advice to switch to float64 in float64
    with pytest.raises(torch.linalg.LinAlgError, match="run the model in float64"):
        psd_factor(bad.float(), torch.ones(2))
    with pytest.raises(torch.linalg.LinAlgError, match="NaN"):
        psd_factor(torch.full((2, 2), float("nan")), torch.ones(2))


def test_nan_hyperparameters_raise_a_clear_error():
    t, y, tq = _data(torch.float64)
    kernel = _kernel(1.5, 1.0)
    model = _statespace(kernel, t, y, torch.float64, "parallel")
    with torch.no_grad():
        model.kernel.base_kernel.raw_lengthscale.fill_(float("nan"))
    with pytest.raises(ValueError, match="hyperparameters or the noise are NaN"):
        model.posterior(tq[:, None])
