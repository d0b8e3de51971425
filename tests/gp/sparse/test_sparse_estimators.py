"""SparseGPRegressor and SparseGPClassifier: sklearn contract, pickle, accuracy, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel
from sklearn.utils.estimator_checks import parametrize_with_checks

from bdl.core.posterior import CategoricalPosterior, GaussianPosterior
from gp import SVGP, SparseGPClassifier, SparseGPRegressor
from gp.sparse.swsgp import SWSGP

# Tiny configurations: 25 full-batch steps at a larger step size fit the checks' data sets
# (check_regressors_train asks for R^2 > 0.5); float64 because the row-invariance checks
# compare predictions to 1e-7, below float32 rounding. The SWSGP classifier is not run
# through the checks: most of them use three classes, which it does not support (it is
# tested on two classes below).
TINY = dict(num_inducing=8, num_neighbors=4, epochs=25, lr=0.1, dtype="float64", random_state=0)
CHECKED = [
    SparseGPRegressor(**TINY),
    SparseGPRegressor(method="swsgp", **TINY),
    SparseGPClassifier(**TINY),
]


@parametrize_with_checks(CHECKED)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def _data(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 3-D test function on a shifted, scaled cube (standardisation matters)."""
    rng = np.random.default_rng(seed)
    U = rng.uniform(-1, 1, size=(n, 3))
    f = np.sin(3 * U[:, 0]) + np.cos(2 * U[:, 1]) * U[:, 2] + 0.5 * U[:, 0] * U[:, 1]
    X = U * np.array([10.0, 0.1, 1.0]) + np.array([100.0, -5.0, 0.0])
    return X, 50.0 + 20.0 * (f + 0.1 * rng.standard_normal(n)), 50.0 + 20.0 * f


@pytest.mark.parametrize("method", ["svgp", "swsgp"])
def test_regressor_fits_in_original_units(method):
    X, y, f = _data()
    model = SparseGPRegressor(method, num_inducing=64, num_neighbors=16, random_state=0).fit(X, y)
    assert isinstance(model.model_.model, SVGP if method == "svgp" else SWSGP)
    assert model.n_iter_ == len(model.loss_curve_) >= 200  # epochs=None: >= MIN_STEPS steps
    mean, std = model.predict(X, return_std=True)
    assert mean.dtype == std.dtype == np.float64 and mean.shape == std.shape == (300,)
    # the truth has sd ~ 20 * 0.8 and the noise sd is 2: the fit is far better than the mean
    rmse = np.sqrt(np.mean((mean - f) ** 2))
    assert rmse < 0.25 * np.std(f)
    assert 1.0 < np.sqrt(model.noise_) < 6.0
    post = model.posterior(X[:5])
    noisy = model.posterior(X[:5], observation_noise=True)
    assert isinstance(post, GaussianPosterior) and post.mean.shape == (5, 1)
    mean, std = model.predict(X[:5], return_std=True)  # the same rows: the same float32 sums
    np.testing.assert_array_equal(noisy.mean[:, 0].double().numpy(), mean)
    np.testing.assert_array_equal(noisy.stddev[:, 0].double().numpy(), std)
    # observation noise adds the fitted noise variance (original units) to the latent one
    np.testing.assert_allclose(noisy.variance - post.variance, model.noise_, rtol=1e-4)


def test_num_inducing_clamps_to_the_training_set_size():
    X, y, _ = _data(n=40)
    model = SparseGPRegressor(num_inducing=256, epochs=1, random_state=0).fit(X, y)
    assert model.num_inducing_ == 40 and model.model_.model.num_inducing == 40
    sw = SparseGPRegressor("swsgp", num_inducing=256, num_neighbors=64, epochs=1).fit(X, y)
    assert sw.num_inducing_ == 40 and sw.model_.model.num_neighbors == 40


def test_classifier_binary_and_multiclass_with_string_labels():
    X, _, f = _data(n=200)
    labels = np.array(["low", "mid", "high"])[np.digitize(f, [40.0, 60.0])]
    kw = dict(num_inducing=16, epochs=60, lr=0.1, random_state=0)
    clf = SparseGPClassifier(**kw).fit(X, labels)
    assert list(clf.classes_) == ["high", "low", "mid"]
    proba = clf.predict_proba(X)
    assert proba.shape == (200, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-12)
    assert clf.score(X, labels) > 0.85
    assert set(clf.predict(X[:20])) <= set(labels)
    post = clf.posterior(X[:4])
    assert isinstance(post, CategoricalPosterior) and post.probs.shape == (4, 3)
    binary = np.where(f > 50.0, "yes", "no")
    for method in ["svgp", "swsgp"]:
        clf = SparseGPClassifier(method, num_neighbors=8, **kw).fit(X, binary)
        assert clf.predict_proba(X).shape == (200, 2) and clf.score(X, binary) > 0.9


@pytest.mark.parametrize(
    "est",
    [
        SparseGPRegressor(num_inducing=16, epochs=3, random_state=0),
        SparseGPRegressor("swsgp", num_inducing=16, num_neighbors=4, epochs=3, random_state=0),
        SparseGPClassifier(num_inducing=16, epochs=3, random_state=0),
    ],
    ids=["svgp-regressor", "swsgp-regressor", "svgp-classifier"],
)
def test_pickle_round_trip(est):
    X, y, _ = _data(n=60)
    if isinstance(est, SparseGPClassifier):
        y = np.where(y > np.median(y), 1, 0)
    model = est.fit(X, y)
    loaded = pickle.loads(pickle.dumps(model))
    X_new, _, _ = _data(n=25, seed=1)
    if isinstance(est, SparseGPClassifier):
        np.testing.assert_array_equal(model.predict_proba(X_new), loaded.predict_proba(X_new))
    else:
        for a, b in zip(
            model.predict(X_new, return_std=True),
            loaded.predict(X_new, return_std=True),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)


def test_user_kernel_is_copied_and_float64_is_honoured():
    X, y, _ = _data(n=50)
    kernel = ScaleKernel(MaternKernel(nu=1.5, ard_num_dims=3))
    before = {k: v.clone() for k, v in kernel.state_dict().items()}
    model = SparseGPRegressor(kernel=kernel, num_inducing=10, epochs=5, dtype="float64")
    model.fit(X, y)
    assert model.model_.model.kernel is not kernel
    assert all(torch.equal(before[k], v) for k, v in kernel.state_dict().items())
    assert model.dtype_ == torch.float64 and model.posterior(X[:3]).mean.dtype == torch.float64
    assert isinstance(model.model_.model.kernel.base_kernel, MaternKernel)


def test_sample_y_is_joint_and_seeded():
    X, y, _ = _data(n=80)
    model = SparseGPRegressor(num_inducing=16, epochs=10, dtype="float64", random_state=0)
    model.fit(X, y)
    X_new = X[:3]
    S = 20000
    draws = model.sample_y(X_new, n_samples=S)
    assert draws.shape == (3, S)
    np.testing.assert_array_equal(draws, model.sample_y(X_new, n_samples=S))
    mean, std = model.predict(X_new, return_std=True)
    # Monte Carlo mean and variance: 5 standard errors (sd / sqrt(S), sd^2 sqrt(2 / S))
    assert np.all(np.abs(draws.mean(1) - mean) < 5 * std / np.sqrt(S))
    assert np.all(np.abs(draws.var(1) - std**2) < 5 * std**2 * np.sqrt(2 / S))
    # SWSGP: joint draws with the marginal predictive's mean and spread (H < M), correlated as
    # the union-neighbourhood joint
    sw = SparseGPRegressor(
        "swsgp", num_inducing=16, num_neighbors=4, epochs=1, dtype="float64", random_state=0
    ).fit(X, y)
    draws = sw.sample_y(X_new, n_samples=S)
    joint = sw.posterior(X_new, joint=True, observation_noise=True)
    cov = joint.covariance_matrix.numpy()
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(draws.mean(1) - joint.mean[:, 0].numpy()) < 5 * sd / np.sqrt(S))
    assert np.all(np.abs(draws.var(1) - sd**2) < 5 * sd**2 * np.sqrt(2 / S))
    mean, std = sw.predict(X_new, return_std=True)
    np.testing.assert_allclose(joint.mean[:, 0].numpy(), mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sd, std, rtol=1e-10)
    corr = np.corrcoef(draws)[0, 1]
    expected = cov[0, 1] / (sd[0] * sd[1])
    assert abs(corr - expected) < 5 * (1 - expected**2) / np.sqrt(S)  # sd of a sample corr.


def test_device_option_on_cpu():
    X, y, _ = _data(n=50)
    ref = SparseGPRegressor(num_inducing=8, epochs=3, random_state=0).fit(X, y).predict(X)
    for device in ["cpu", torch.device("cpu")]:
        model = SparseGPRegressor(num_inducing=8, epochs=3, random_state=0, device=device)
        np.testing.assert_array_equal(model.fit(X, y).predict(X), ref)
        assert model.device_ == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["svgp", "swsgp"])
def test_cuda_fit_predict_and_pickle(method):
    X, y, _ = _data(n=200)
    model = SparseGPRegressor(method, num_inducing=32, num_neighbors=8, epochs=5, device="cuda")
    model.fit(X, y)
    assert model.device_.type == "cuda" and model.posterior(X[:4]).mean.device.type == "cuda"
    mean = model.predict(X)
    assert isinstance(mean, np.ndarray) and np.isfinite(mean).all()
    loaded = pickle.loads(pickle.dumps(model))
    assert next(loaded.model_.parameters()).device.type == "cuda"
    np.testing.assert_allclose(loaded.predict(X), mean, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    X, y, _ = _data(n=30)
    Xn = X.copy()
    Xn[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SparseGPRegressor(epochs=1).fit(Xn, y)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        SparseGPRegressor(epochs=1).fit(X, y[:-1])
    with pytest.raises(ValueError, match="numeric"):
        SparseGPRegressor(epochs=1).fit(X, np.array(["a"] * 30))
    with pytest.raises(ValueError, match="1 sample"):
        SparseGPRegressor(epochs=1).fit(X[:1], y[:1])
    bad_params = [
        ("method", dict(method="exact")),
        ("num_inducing", dict(num_inducing=0)),
        ("num_neighbors", dict(num_neighbors=0)),
        ("init", dict(init="grid")),
        ("epochs", dict(epochs=0)),
        ("batch_size", dict(batch_size=-1)),
        ("lr", dict(lr=-0.1)),
        ("kernel", dict(kernel="rbf")),
        ("dtype", dict(dtype="float16")),
        ("device", dict(device="tpu")),
    ]
    for name, params in bad_params:
        with pytest.raises(ValueError, match=name):
            SparseGPRegressor(**params).fit(X, y)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            SparseGPRegressor(device="cuda").fit(X, y)
    model = SparseGPRegressor(num_inducing=8, epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        model.predict(X[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        model.predict(Xn)
    labels = np.array([0, 1, 2] * 10)
    with pytest.raises(ValueError, match="2 classes"):
        SparseGPClassifier("swsgp", epochs=1).fit(X, labels)
    with pytest.raises(ValueError, match="class"):
        SparseGPClassifier(epochs=1).fit(X, np.zeros(30))
    with pytest.raises(ValueError, match="Unknown label type"):
        SparseGPClassifier(epochs=1).fit(X, y)


@pytest.mark.parametrize("Est", [SparseGPRegressor, SparseGPClassifier])
def test_pandas_input_keeps_feature_names(Est):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.uniform(-2, 2, (30, 3)), columns=["a", "b", "c"])
    y = (X["a"] > 0).astype(int).to_numpy() if Est is SparseGPClassifier else X["a"].to_numpy()
    model = Est(num_inducing=8, epochs=2, random_state=0).fit(X, y)
    np.testing.assert_array_equal(model.feature_names_in_, ["a", "b", "c"])
    assert model.predict(X).shape == (30,)
    with pytest.warns(UserWarning, match="feature names"):
        model.predict(X.to_numpy())  # scikit-learn's warning: fitted with names


def test_classifier_log_prob_with_original_labels_points_to_classes():
    X = np.random.default_rng(0).uniform(-2, 2, (30, 3))
    labels = np.where(X[:, 0] > 0, "yes", "no")
    model = SparseGPClassifier(num_inducing=8, epochs=2, random_state=0).fit(X, labels)
    post = model.posterior(X)
    with pytest.raises(ValueError, match="classes_"):
        post.log_prob(labels)
    indices = torch.as_tensor(np.searchsorted(model.classes_, labels))
    assert bool(torch.isfinite(post.log_prob(indices)).all())
