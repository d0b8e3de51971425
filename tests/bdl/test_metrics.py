import math

import numpy as np
import pytest
import torch
from scipy.special import erf, erfinv
from scipy.stats import norm
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    log_loss,
    mean_squared_error,
    roc_auc_score,
)

from bdl.metrics import (
    ReliabilityData,
    accuracy,
    brier_score,
    categorical_nll,
    expected_calibration_error,
    gaussian_nll,
    interval_calibration_error,
    interval_coverage,
    ood_auroc,
    predictive_entropy,
    reliability_diagram,
    rmse,
)

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def labels(x):
    return torch.tensor(x, dtype=torch.long)


def assert_close(actual, expected, rtol=1e-12, atol=1e-14):
    # torch.testing.assert_close costs ~0.6 s of imports on first use; this is all we need
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), f"{actual} != {expected}"


# Shared small classification example.
PROBS = [[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]
Y = [0, 2]


# ------------------------------------------------------------------------------ gaussian_nll


def test_gaussian_nll_hand_example():
    mean, var, y = t([0.0, 1.0]), t([1.0, 4.0]), t([1.0, 1.0])
    # point 0: 0.5 * (log(2π·1) + (1-0)²/1) = 0.5 * (1.8378770664093453 + 1) = 1.4189385332046727
    # point 1: 0.5 * (log(2π·4) + 0)       = 0.5 * 3.2241714275292360       = 1.612085713764618
    per_point = gaussian_nll(mean, var, y, reduction="none")
    assert_close(per_point, t([1.4189385332046727, 1.612085713764618]))
    # mean = (1.4189385332046727 + 1.612085713764618) / 2
    assert gaussian_nll(mean, var, y).item() == pytest.approx(1.5155121234846454, rel=1e-14)
    assert gaussian_nll(mean, var, y, "sum").item() == pytest.approx(3.0310242469692907, rel=1e-14)


def test_gaussian_nll_multi_output_sums_over_outputs():
    mean = t([[0.0, 0.0], [1.0, 2.0]])
    var = t([[1.0, 1.0], [4.0, 2.0]])
    y = t([[1.0, -1.0], [1.0, 4.0]])
    # row 0: 2 · 0.5 · (log 2π + 1)                       = 2.8378770664093453
    # row 1: 0.5 · log 8π + 0.5 · (log 4π + (4-2)²/2)     = 1.612085713764618 + 2.2655121234846454
    per_point = gaussian_nll(mean, var, y, reduction="none")
    assert per_point.shape == (2,)
    assert_close(per_point, t([2.8378770664093453, 3.8775978372492634]))
    expected = -norm.logpdf(y.numpy(), mean.numpy(), np.sqrt(var.numpy())).sum(axis=1)
    assert_close(per_point, torch.from_numpy(expected))


def test_gaussian_nll_matches_torch_loss():
    mean, y = torch.randn(50, dtype=D), torch.randn(50, dtype=D)
    var = torch.rand(50, dtype=D) + 0.1
    ref = torch.nn.functional.gaussian_nll_loss(mean, y, var, full=True, eps=0.0)
    assert_close(gaussian_nll(mean, var, y), ref)


# --------------------------------------------------------------------------- categorical_nll


def test_categorical_nll_hand_example_and_sklearn():
    probs, y = t(PROBS), labels(Y)
    # -log 0.7 = 0.35667494393873245, -log 0.5 = 0.6931471805599453, mean = 0.5249110622493389
    assert_close(
        categorical_nll(probs, y, reduction="none"), t([0.35667494393873245, 0.6931471805599453])
    )
    assert categorical_nll(probs, y).item() == pytest.approx(0.5249110622493389, rel=1e-14)
    assert categorical_nll(probs, y, "sum").item() == pytest.approx(1.0498221244986778, rel=1e-14)
    assert categorical_nll(probs, y).item() == pytest.approx(
        log_loss(Y, PROBS, labels=[0, 1, 2]), rel=1e-12
    )


def test_categorical_nll_random_matches_sklearn():
    probs = torch.softmax(torch.randn(40, 5, dtype=D), dim=1)
    y = torch.randint(0, 5, (40,))
    ref = log_loss(y.numpy(), probs.numpy(), labels=list(range(5)))
    assert categorical_nll(probs, y).item() == pytest.approx(ref, rel=1e-12)


def test_categorical_nll_zero_probability_is_finite():
    out = categorical_nll(t([[1.0, 0.0]]), labels([1]))
    # clamped at the smallest normal float64: -log(2.2250738585072014e-308) = 708.3964185322641
    assert out.item() == pytest.approx(708.3964185322641)


# ------------------------------------------------------------------------------ rmse, accuracy


def test_rmse_hand_example_and_sklearn():
    pred, y = t([1.0, 2.0, 3.0]), t([1.0, 4.0, 0.0])
    # squared errors 0, 4, 9 -> sqrt(13 / 3) = 2.0816659994661326
    assert rmse(pred, y).item() == pytest.approx(2.0816659994661326, rel=1e-14)
    pred2, y2 = torch.randn(30, 3, dtype=D), torch.randn(30, 3, dtype=D)
    ref = math.sqrt(mean_squared_error(y2.numpy(), pred2.numpy()))
    assert rmse(pred2, y2).item() == pytest.approx(ref, rel=1e-12)


def test_accuracy_probs_labels_and_sklearn():
    # argmaxes: 0, 2, 1, 0 (the tie [0.5, 0.5, 0] goes to the first index) vs y = 0, 1, 1, 0
    probs = t([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.5, 0.5, 0.0]])
    y = labels([0, 1, 1, 0])
    assert accuracy(probs, y).item() == pytest.approx(0.75)  # 3 of 4 correct
    assert accuracy(labels([0, 2, 1, 0]), y).item() == pytest.approx(0.75)
    pred = torch.randint(0, 4, (50,))
    y2 = torch.randint(0, 4, (50,))
    assert accuracy(pred, y2).item() == pytest.approx(accuracy_score(y2.numpy(), pred.numpy()))


# ------------------------------------------------------------------------------- brier_score


def test_brier_score_hand_example():
    # row 0: 0.3² + 0.2² + 0.1² = 0.14; row 1: 0.25² + 0.25² + 0.5² = 0.375; mean = 0.2575
    assert brier_score(t(PROBS), labels(Y)).item() == pytest.approx(0.2575, rel=1e-14)


def test_brier_score_binary_is_twice_sklearn():
    p = torch.rand(60, dtype=D)
    y = torch.randint(0, 2, (60,))
    probs = torch.stack([1 - p, p], dim=1)
    ref = brier_score_loss(y.numpy(), p.numpy())
    assert brier_score(probs, y).item() == pytest.approx(2 * ref, rel=1e-12)


# ---------------------------------------------------------------------- calibration (ECE)


# Top-label confidences and correctness with n_bins = 5 (bins (0,.2], ..., (.8,1]):
#   A conf .90 correct, B conf .85 wrong   -> bin (.8, 1]:  count 2, conf .875, acc .5
#   C conf .70 correct                     -> bin (.6, .8]: count 1, conf .70,  acc 1
#   D conf .60 wrong (on the edge), E conf .55 correct -> bin (.4, .6]: count 2, conf .575, acc .5
# ECE = (2·|.5-.875| + 1·|1-.7| + 2·|.5-.575|) / 5 = (.75 + .3 + .15) / 5 = 0.24
ECE_PROBS = [[0.9, 0.1], [0.85, 0.15], [0.3, 0.7], [0.4, 0.6], [0.55, 0.45]]
ECE_Y = [0, 1, 1, 0, 0]


def test_reliability_diagram_hand_example():
    data = reliability_diagram(t(ECE_PROBS), labels(ECE_Y), n_bins=5)
    assert isinstance(data, ReliabilityData)
    assert_close(data.bin_lower, t([0.0, 0.2, 0.4, 0.6, 0.8]))
    assert_close(data.bin_upper, t([0.2, 0.4, 0.6, 0.8, 1.0]))
    assert data.count.tolist() == [0, 0, 2, 1, 2]
    assert_close(data.confidence, t([0.0, 0.0, 0.575, 0.7, 0.875]))
    assert_close(data.accuracy, t([0.0, 0.0, 0.5, 1.0, 0.5]))
    assert not data.confidence.isnan().any()
    assert data.expected_calibration_error().item() == pytest.approx(0.24, rel=1e-12)


def test_expected_calibration_error_hand_example():
    ece = expected_calibration_error(t(ECE_PROBS), labels(ECE_Y), n_bins=5)
    assert ece.dim() == 0
    assert ece.item() == pytest.approx(0.24, rel=1e-12)
    # one bin: |mean acc - mean conf| = |3/5 - (.9+.85+.7+.6+.55)/5| = |0.6 - 0.72| = 0.12
    one = expected_calibration_error(t(ECE_PROBS), labels(ECE_Y), n_bins=1)
    assert one.item() == pytest.approx(0.12, rel=1e-12)


def test_expected_calibration_error_matches_naive_loop():
    probs = torch.softmax(3 * torch.randn(300, 4, dtype=D), dim=1)
    y = torch.randint(0, 4, (300,))
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    n_bins, ref = 10, 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if b > 0 else conf <= hi
        if in_bin.any():
            gap = (correct[in_bin].mean() - conf[in_bin].mean()).abs().item()
            ref += in_bin.double().mean().item() * gap
    assert expected_calibration_error(probs, y, n_bins).item() == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------------- interval calibration


def test_interval_coverage_hand_example():
    mean, var = torch.zeros(4, dtype=D), torch.ones(4, dtype=D)
    y = t([0.1, -0.5, 1.0, 2.0])
    # z(0.5) = 0.6745, z(0.9) = 1.6449; |residuals| = .1, .5, 1, 2 -> covered 2/4 and 3/4
    cov = interval_coverage(mean, var, y, [0.5, 0.9])
    assert_close(cov, t([0.5, 0.75]))
    # error = (|0.5 - 0.5| + |0.9 - 0.75|) / 2 = 0.075
    err = interval_calibration_error(mean, var, y, t([0.5, 0.9]))
    assert err.item() == pytest.approx(0.075, rel=1e-12)


def test_interval_calibration_default_levels_and_calibrated_data():
    n = 200_000
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(n, dtype=D, generator=gen)
    var = torch.rand(n, dtype=D, generator=gen) * 1.5 + 0.5
    y = mean + var.sqrt() * torch.randn(n, dtype=D, generator=gen)
    levels = torch.arange(1, 16, dtype=D) / 16
    cov = interval_coverage(mean, var, y)
    assert cov.shape == (15,)
    # each coverage is a binomial proportion: within 4 standard deviations of its level
    assert ((cov - levels).abs() <= 4 * torch.sqrt(levels * (1 - levels) / n)).all()
    bound = 4 * math.sqrt(0.25 / n)  # 4 · the largest binomial std (p = 1/2) ≈ 0.0045
    assert interval_calibration_error(mean, var, y).item() < bound
    # overconfident: σ halved, so coverage(p) = erf(erfinv(p) / 2); mean gap over levels ≈ 0.212
    p = np.arange(1, 16) / 16
    expected = np.mean(np.abs(p - erf(erfinv(p) / 2)))
    over = interval_calibration_error(mean, var / 4, y).item()
    assert over > 0.15
    assert over == pytest.approx(expected, abs=0.005)


# ----------------------------------------------------------------------------------- AUROC


def test_ood_auroc_hand_example_with_tie():
    score_in, score_out = t([0.1, 0.4, 0.35]), t([0.8, 0.4])
    # 0.8 beats all 3 in-scores -> 3; 0.4 beats 0.1 and 0.35, ties 0.4 -> 2.5; (3 + 2.5) / 6
    assert ood_auroc(score_in, score_out).item() == pytest.approx(0.9166666666666666, rel=1e-14)
    y = [0, 0, 0, 1, 1]
    ref = roc_auc_score(y, torch.cat([score_in, score_out]).numpy())
    assert ood_auroc(score_in, score_out).item() == pytest.approx(ref, rel=1e-14)


def test_ood_auroc_matches_sklearn_with_many_ties():
    score_in = torch.randint(0, 6, (200,))  # integer scores: lots of ties
    score_out = torch.randint(2, 9, (150,))
    y = np.r_[np.zeros(200), np.ones(150)]
    ref = roc_auc_score(y, torch.cat([score_in, score_out]).numpy())
    out = ood_auroc(score_in, score_out)
    assert out.dtype == torch.get_default_dtype()  # float32: only the final division rounds
    assert out.item() == pytest.approx(ref, rel=1e-6)
    s_in, s_out = torch.randn(300, dtype=D), torch.randn(100, dtype=D) + 1
    ref2 = roc_auc_score(np.r_[np.zeros(300), np.ones(100)], torch.cat([s_in, s_out]).numpy())
    assert ood_auroc(s_in, s_out).item() == pytest.approx(ref2, rel=1e-12)


def test_ood_auroc_extremes():
    assert ood_auroc(t([0.0, 1.0]), t([2.0, 3.0])).item() == 1.0
    assert ood_auroc(t([2.0, 3.0]), t([0.0, 1.0])).item() == 0.0
    assert ood_auroc(t([1.0, 1.0]), t([1.0])).item() == 0.5
    assert ood_auroc(t([-math.inf, 0.0]), t([math.inf])).item() == 1.0


# ----------------------------------------------------------------------- predictive_entropy


def test_predictive_entropy_hand_example():
    probs = t([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    # log 2 = 0.6931471805599453, 0 (0·log 0 = 0), log 3 = 1.0986122886681098
    assert_close(predictive_entropy(probs), t([0.6931471805599453, 0.0, 1.0986122886681098]))


# ------------------------------------------------------------------------- dtype and shape


def test_scalar_metrics_are_0dim_tensors_in_input_dtype():
    f32 = torch.float32
    probs, y = t(PROBS, f32), labels(Y)
    mean, var, yr = torch.zeros(5, dtype=f32), torch.ones(5, dtype=f32), torch.randn(5)
    outs = [
        gaussian_nll(mean, var, yr),
        rmse(mean, yr),
        interval_calibration_error(mean, var, yr),
        categorical_nll(probs, y),
        accuracy(probs, y),
        brier_score(probs, y),
        expected_calibration_error(probs, y),
        ood_auroc(yr, mean),
    ]
    for out in outs:
        assert isinstance(out, torch.Tensor)
        assert out.dim() == 0
        assert out.dtype == f32
    assert predictive_entropy(probs).dtype == f32
    assert reliability_diagram(probs, y).confidence.dtype == f32


# ---------------------------------------------------------------------------- bad input

_P, _Y = t(PROBS), labels(Y)
_M, _V, _R = torch.zeros(3, dtype=D), torch.ones(3, dtype=D), torch.ones(3, dtype=D)
_NAN3 = t([0.0, math.nan, 1.0])
_E = torch.zeros(0, dtype=D)

BAD_INPUTS = [
    # (argument named in the message, call)
    ("mean", lambda: gaussian_nll(_NAN3, _V, _R)),
    ("mean", lambda: gaussian_nll(_E, _E, _E)),
    ("mean", lambda: gaussian_nll(torch.zeros(3, 1, 1, dtype=D), _V, _R)),
    ("y", lambda: gaussian_nll(_M, _V, torch.ones(4, dtype=D))),
    ("y", lambda: gaussian_nll(_M, _V, _NAN3)),
    ("variance", lambda: gaussian_nll(_M, torch.ones(2, dtype=D), _R)),
    ("variance", lambda: gaussian_nll(_M, t([1.0, 0.0, 1.0]), _R)),
    ("variance", lambda: gaussian_nll(_M, t([1.0, -1.0, 1.0]), _R)),
    ("reduction", lambda: gaussian_nll(_M, _V, _R, reduction="avg")),
    ("pred", lambda: rmse(_NAN3, _R)),
    ("pred", lambda: rmse(_E, _E)),
    ("y", lambda: rmse(_M, torch.ones(2, dtype=D))),
    ("probs", lambda: categorical_nll(t([[1.2, -0.2], [0.5, 0.5]]), labels([0, 1]))),
    ("probs", lambda: categorical_nll(t([[0.5, 0.4], [0.5, 0.5]]), labels([0, 1]))),
    ("probs", lambda: categorical_nll(t([[math.nan, 1.0]]), labels([0]))),
    ("probs", lambda: categorical_nll(t([0.5, 0.5]), labels([0, 1]))),
    ("probs", lambda: categorical_nll(torch.zeros(0, 3, dtype=D), labels([]))),
    ("y", lambda: categorical_nll(_P, labels([0, 3]))),
    ("y", lambda: categorical_nll(_P, labels([-1, 0]))),
    ("y", lambda: categorical_nll(_P, labels([0, 1, 2]))),
    ("y", lambda: categorical_nll(_P, t([0.0, 2.0]))),
    ("reduction", lambda: categorical_nll(_P, _Y, reduction="max")),
    ("y", lambda: accuracy(_P, labels([0]))),
    ("y", lambda: accuracy(labels([0, 1]), labels([0]))),
    ("probs_or_labels", lambda: accuracy(torch.zeros(2, 2, 2), _Y)),
    ("probs_or_labels", lambda: accuracy(t([0.0, 1.0]), _Y)),
    ("probs_or_labels", lambda: accuracy(t([[0.5, 0.6], [0.5, 0.5]]), _Y)),
    ("probs_or_labels", lambda: accuracy(labels([[0], [1]]), _Y)),
    ("y", lambda: brier_score(_P, labels([0, 5]))),
    ("probs", lambda: brier_score(t([[0.5, 0.6]]), labels([0]))),
    ("n_bins", lambda: expected_calibration_error(_P, _Y, n_bins=0)),
    ("n_bins", lambda: expected_calibration_error(_P, _Y, n_bins=2.5)),
    ("n_bins", lambda: reliability_diagram(_P, _Y, n_bins=-3)),
    ("y", lambda: reliability_diagram(_P, labels([0, 7]))),
    ("levels", lambda: interval_coverage(_M, _V, _R, [0.0, 0.5])),
    ("levels", lambda: interval_coverage(_M, _V, _R, [0.5, 1.0])),
    ("levels", lambda: interval_coverage(_M, _V, _R, [math.nan])),
    ("levels", lambda: interval_coverage(_M, _V, _R, t([[0.5]]))),
    ("levels", lambda: interval_calibration_error(_M, _V, _R, [])),
    ("levels", lambda: interval_calibration_error(_M, _V, _R, [1.5])),
    ("variance", lambda: interval_calibration_error(_M, -_V, _R)),
    ("y", lambda: interval_calibration_error(_M, _V, _NAN3)),
    ("score_in", lambda: ood_auroc(_NAN3, _R)),
    ("score_in", lambda: ood_auroc(torch.zeros(2, 2), _R)),
    ("score_out", lambda: ood_auroc(_R, _E)),
    ("probs", lambda: predictive_entropy(t([0.5, 0.5]))),
    ("probs", lambda: predictive_entropy(t([[0.5, 0.7]]))),
]


@pytest.mark.parametrize("name, call", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_argument(name, call):
    # every message starts with the name of the offending argument
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()
