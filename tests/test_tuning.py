"""Tune's α diagnostics on planted data: flatness, gain over the least-regularised end, the R² noise
at n_val, `alpha_immaterial` and the edge warning, as `summarise` records, logs and plots them."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from ato.artifacts import TuningResult
from ato.math.ridge import HeldOutR2, RidgePath
from ato.math.stats import PairStats
from ato.params import TuneParams
from ato.plotting.tuning import alpha_note, plot_alpha_curve
from ato.stages import tune


def planted(d: int, n_train: int, n_val: int, noise: float, w_scale: float, seed: int = 0) -> tuple[HeldOutR2, int]:
    """y = x W + b + noise·ε with x ~ N(0, I): the val-split objective and the val token count."""
    rng = np.random.default_rng(seed)
    W, b = rng.normal(scale=w_scale, size=(d, d)), rng.normal(size=d)

    def split(n: int) -> PairStats:
        x = rng.normal(size=(n, d))
        return PairStats.from_data(x, x @ W + b + noise * rng.normal(size=(n, d)))

    train, val = split(n_train), split(n_val)
    return HeldOutR2([(RidgePath.from_stats(train), val)]), int(val.n)


def tuned(objective: HeldOutR2, n_val: int, t: TuneParams, caplog: pytest.LogCaptureFixture) -> TuningResult:
    """A real (in-memory) Optuna study over [alpha_min, alpha_max], summarised as the stage does."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=t.seed))
    study.optimize(lambda tr: objective(tr.suggest_float("alpha", t.alpha_min, t.alpha_max, log=True)), t.n_trials)
    with caplog.at_level(logging.WARNING, logger="ato.stages.tune"):
        return tune.summarise(study, "L01_k1", t, objective, 0.0, n_val)


def curve(result: TuningResult) -> tuple[np.ndarray, np.ndarray]:
    return np.array([c.alpha for c in result.curve]), np.array([c.val_r2 for c in result.curve])


def test_best_alpha_at_the_top_of_a_narrow_range_warns(tmp_path, caplog):
    # n ≈ d with strong noise wants α ≫ 0.1: on [1e-3, 0.1] the curve rises to the top edge.
    objective, n_val = planted(d=6, n_train=10, n_val=2000, noise=3.0, w_scale=0.3)
    t = TuneParams(alpha_min=1e-3, alpha_max=0.1, n_trials=25, curve_points=16)
    result = tuned(objective, n_val, t, caplog)
    alphas, r2 = curve(result)
    assert np.all(np.diff(r2) > 0)  # planted as intended: the optimum lies beyond alpha_max
    assert result.alpha >= alphas[-2]
    assert result.alpha_edge_warning is not None and "highest" in result.alpha_edge_warning
    assert "L01_k1" in result.alpha_edge_warning and "alpha_max" in result.alpha_edge_warning
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "ato.stages.tune"]
    assert len(warned) == 1 and result.alpha_edge_warning in warned[0].getMessage()
    assert "warning: best α" in alpha_note(result)
    # The record round-trips with its new fields; the figure is written.
    result.write(tmp_path / "L01_k1.json")
    assert TuningResult.read(tmp_path / "L01_k1.json") == result
    assert plot_alpha_curve(result, tmp_path / "alpha.png").stat().st_size > 0


def test_alpha_is_immaterial_when_n_far_exceeds_d(tmp_path, caplog):
    objective, n_val = planted(d=4, n_train=20_000, n_val=5_000, noise=0.01, w_scale=1.0)
    t = TuneParams(n_trials=12, curve_points=32)  # the default range, [1e-3, 1e7]
    result = tuned(objective, n_val, t, caplog)
    alphas, r2 = curve(result)
    assert result.n_val == 5_000
    assert result.alpha_flatness == pytest.approx(r2.max() - r2.min())
    assert result.alpha_flatness > 0.5  # the range runs deep into over-regularisation…
    assert result.alpha_gain == pytest.approx(r2.max() - r2[0]) and result.alpha_gain < 1e-6  # …yet α buys nothing
    assert result.val_r2_noise == pytest.approx((1 - r2.max()) * math.sqrt(2 / 5_000))
    assert result.alpha_gain < result.val_r2_noise and result.alpha_immaterial
    assert alpha_note(result).startswith("α immaterial at n_val = 5,000: gain")
    for record in caplog.records:  # on a flat curve the best α may land on an edge: the warning says it is noise
        assert record.name != "ato.stages.tune" or "α is immaterial at n_val = 5000" in record.getMessage()
    plot_alpha_curve(result, tmp_path / "alpha.png")


def test_alpha_is_material_when_n_is_close_to_d(caplog):
    # n_train = 2d with unit noise: the unregularised fit overfits, a tuned α wins well beyond the noise.
    objective, n_val = planted(d=8, n_train=16, n_val=4_000, noise=1.0, w_scale=0.5)
    t = TuneParams(n_trials=30, curve_points=48)
    result = tuned(objective, n_val, t, caplog)
    alphas, _ = curve(result)
    assert result.alpha_gain > 10 * result.val_r2_noise and not result.alpha_immaterial
    assert alphas[1] < result.alpha < alphas[-2] and result.alpha_edge_warning is None
    assert not [r for r in caplog.records if r.name == "ato.stages.tune"]
    assert alpha_note(result).startswith("α material at n_val = 4,000")
