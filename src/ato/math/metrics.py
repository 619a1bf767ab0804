"""Scores of a prediction ŷ against the truth y, computed by streaming over chunks (see
docs/method.md#r2 and docs/method.md#features).

* `ResidualAccumulator`: residual-space R² (uniform average over dimensions, as the reference reports,
  and variance-weighted), per-dimension R² and its quantiles, MSE and mean token cosine.
* `FeatureR2Accumulator`: feature-space scores per SAE feature f along its unit decoder direction u_f,
  over the tokens where the SAE's own encoder says f is active on the TRUE y:
  a = yᵀu_f, â = ŷᵀu_f, R² = 1 − Σ(a−â)²/Σ(a−ā)², Pearson r, rms(â)/rms(a), active count.
* `DocumentFeatureSums`: the same sums kept per document, so that `bootstrap_feature_scores` can
  resample documents (tokens of a document are dependent) and give every score an interval.
* `interval_verdicts`: transported / synthesised when a feature's R² interval lies wholly on one side of
  the threshold, undetermined when it straddles it, no verdict with too few active tokens.

Every accumulator holds O(d) or O(features) float64 sums, never tokens, so the test split need not
fit in memory; `merge` combines accumulators built on disjoint chunks (results equal one-shot).
Sums of squares are taken about a shift (the first chunk's mean) so float64 cancellation stays
harmless even for late-layer residuals with norms ~4e4.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "ResidualAccumulator",
    "FeatureR2Accumulator",
    "DocumentFeatureSums",
    "FeatureBootstrap",
    "bootstrap_feature_scores",
    "interval_verdicts",
    "percentile_interval",
    "set_statistics",
    "unit_directions",
    "TRANSPORTED",
    "SYNTHESISED",
    "NO_VERDICT",
    "UNDETERMINED",
    "QUANTILES",
]

TRANSPORTED, SYNTHESISED, UNDETERMINED, NO_VERDICT = "transported", "synthesised", "undetermined", "no_verdict"
QUANTILES = (0.1, 0.5, 0.9)


def _f64(a: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def _bool(a: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy().astype(bool)
    return np.asarray(a, dtype=bool)


# --------------------------------------------------------------------------------------------
# Residual space


@dataclass
class ResidualAccumulator:
    """Streaming residual-space scores of ŷ vs y ([m, d] chunks)."""

    d: int
    n: float = 0.0
    shift: np.ndarray | None = None  # reference point for the y sums (first chunk's mean)
    sum_y: np.ndarray = field(init=False)  # Σ (y − shift)
    sum_y2: np.ndarray = field(init=False)  # Σ (y − shift)²
    sse: np.ndarray = field(init=False)  # Σ (y − ŷ)² per dimension
    cos_sum: float = 0.0
    cos_count: float = 0.0

    def __post_init__(self) -> None:
        self.sum_y = np.zeros(self.d)
        self.sum_y2 = np.zeros(self.d)
        self.sse = np.zeros(self.d)

    def update(self, y: np.ndarray | torch.Tensor, y_hat: np.ndarray | torch.Tensor) -> None:
        y, y_hat = _f64(y), _f64(y_hat)
        if y.shape != y_hat.shape or y.ndim != 2 or y.shape[1] != self.d:
            raise ValueError(f"expected y and ŷ of shape [m, {self.d}], got {y.shape} and {y_hat.shape}")
        if len(y) == 0:
            return
        if self.shift is None:
            self.shift = y.mean(0)
        yc = y - self.shift
        self.n += len(y)
        self.sum_y += yc.sum(0)
        self.sum_y2 += (yc * yc).sum(0)
        self.sse += ((y - y_hat) ** 2).sum(0)
        ny, nh = np.linalg.norm(y, axis=1), np.linalg.norm(y_hat, axis=1)
        ok = (ny > 0) & (nh > 0)
        self.cos_sum += float(((y * y_hat).sum(1)[ok] / (ny[ok] * nh[ok])).sum())
        self.cos_count += float(ok.sum())

    def merge(self, other: ResidualAccumulator) -> ResidualAccumulator:
        """Combine with an accumulator over disjoint rows (shifts may differ: sums are re-centred)."""
        out = ResidualAccumulator(self.d)
        if self.n == 0:
            return other._copy()
        if other.n == 0:
            return self._copy()
        assert self.shift is not None and other.shift is not None  # set by the first non-empty update
        out.shift = self.shift
        out.n = self.n + other.n
        delta = other.shift - self.shift  # other's sums about self.shift
        out.sum_y = self.sum_y + other.sum_y + other.n * delta
        out.sum_y2 = self.sum_y2 + other.sum_y2 + 2 * delta * other.sum_y + other.n * delta**2
        out.sse = self.sse + other.sse
        out.cos_sum = self.cos_sum + other.cos_sum
        out.cos_count = self.cos_count + other.cos_count
        return out

    def _copy(self) -> ResidualAccumulator:
        out = ResidualAccumulator(self.d)
        out.n, out.shift = self.n, None if self.shift is None else self.shift.copy()
        out.sum_y, out.sum_y2, out.sse = self.sum_y.copy(), self.sum_y2.copy(), self.sse.copy()
        out.cos_sum, out.cos_count = self.cos_sum, self.cos_count
        return out

    def sst(self) -> np.ndarray:
        """Per-dimension Σ (y − ȳ)² about the accumulated rows' own mean."""
        if self.n == 0:
            return np.zeros(self.d)
        return np.clip(self.sum_y2 - self.sum_y**2 / self.n, 0.0, None)

    def r2_per_dim(self) -> np.ndarray:
        sst = self.sst()
        valid = sst > 0
        return np.where(valid, 1.0 - self.sse / np.where(valid, sst, 1.0), np.nan)

    def result(self) -> dict[str, float]:
        """Flat scores: r2 (uniform mean over dims), r2_weighted, r2_dim_q10/q50/q90, mse, cosine, n_tokens."""
        per_dim = self.r2_per_dim()
        sst = self.sst()
        finite = per_dim[np.isfinite(per_dim)]
        out = {
            "r2": float(finite.mean()) if finite.size else float("nan"),
            "r2_weighted": float(1.0 - self.sse.sum() / sst.sum()) if sst.sum() > 0 else float("nan"),
            "mse": float(self.sse.sum() / (self.n * self.d)) if self.n else float("nan"),
            "cosine": float(self.cos_sum / self.cos_count) if self.cos_count else float("nan"),
            "n_tokens": float(self.n),
        }
        for q in QUANTILES:
            out[f"r2_dim_q{round(q * 100):02d}"] = float(np.quantile(finite, q)) if finite.size else float("nan")
        return out


# --------------------------------------------------------------------------------------------
# Feature space


def unit_directions(W_dec: np.ndarray | torch.Tensor, ids: list[int] | np.ndarray) -> np.ndarray:
    """[d, F] float64 unit decoder directions u_f = d_f/‖d_f‖ for feature ids (W_dec is [d_sae, d])."""
    rows = _f64(W_dec)[np.asarray(ids, dtype=int)]
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if np.any(norms == 0):
        bad = np.asarray(ids)[norms[:, 0] == 0].tolist()
        raise ValueError(f"features {bad} have a zero decoder row")
    return (rows / norms).T


@dataclass
class FeatureR2Accumulator:
    """Streaming per-feature scores along unit directions, over tokens active on the true y."""

    n_features: int
    count: np.ndarray = field(init=False)
    sum_a: np.ndarray = field(init=False)
    sum_a2: np.ndarray = field(init=False)
    sum_h: np.ndarray = field(init=False)
    sum_h2: np.ndarray = field(init=False)
    sum_ah: np.ndarray = field(init=False)
    sse: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        for name in ("count", "sum_a", "sum_a2", "sum_h", "sum_h2", "sum_ah", "sse"):
            setattr(self, name, np.zeros(self.n_features))

    def update(
        self,
        y: np.ndarray | torch.Tensor,
        y_hat: np.ndarray | torch.Tensor,
        directions: np.ndarray,
        active: np.ndarray | torch.Tensor,
    ) -> None:
        """y, ŷ: [m, d]; directions: [d, F] unit vectors; active: [m, F] bool (SAE encoder on true y)."""
        self.update_projected(_f64(y) @ directions, _f64(y_hat) @ directions, active)

    def update_projected(
        self, a: np.ndarray | torch.Tensor, a_hat: np.ndarray | torch.Tensor, active: np.ndarray | torch.Tensor
    ) -> None:
        """Same with projections already taken: a = y U, â = ŷ U ([m, F]); lets several predictions
        share one projection of the truth."""
        a, a_hat, mask = _f64(a), _f64(a_hat), _bool(active)
        if a.shape != a_hat.shape or a.shape != mask.shape or a.shape[1] != self.n_features:
            raise ValueError(
                f"a, â and active must all be [m, {self.n_features}]; got {a.shape}, {a_hat.shape}, {mask.shape}"
            )
        w = mask.astype(np.float64)
        am, hm = a * w, a_hat * w
        self.count += w.sum(0)
        self.sum_a += am.sum(0)
        self.sum_a2 += (am * a).sum(0)
        self.sum_h += hm.sum(0)
        self.sum_h2 += (hm * a_hat).sum(0)
        self.sum_ah += (am * a_hat).sum(0)
        self.sse += (((a - a_hat) ** 2) * w).sum(0)

    def merge(self, other: FeatureR2Accumulator) -> FeatureR2Accumulator:
        out = FeatureR2Accumulator(self.n_features)
        for name in ("count", "sum_a", "sum_a2", "sum_h", "sum_h2", "sum_ah", "sse"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def result(self) -> dict[str, np.ndarray]:
        """Per-feature arrays: active, r2, pearson, rms_ratio (nan where undefined)."""
        return feature_scores_from_sums(*(getattr(self, name) for name in FEATURE_SUMS))


FEATURE_SUMS = ("count", "sum_a", "sum_a2", "sum_h", "sum_h2", "sum_ah", "sse")  # the order of every [.., 7, F]


def feature_scores_from_sums(
    n: np.ndarray,
    sum_a: np.ndarray,
    sum_a2: np.ndarray,
    sum_h: np.ndarray,
    sum_h2: np.ndarray,
    sum_ah: np.ndarray,
    sse: np.ndarray,
) -> dict[str, np.ndarray]:
    """active, r2, pearson, rms_ratio from the FEATURE_SUMS (any shape, elementwise: one split's [F]
    or a bootstrap's [B, F])."""
    with np.errstate(divide="ignore", invalid="ignore"):
        safe_n = np.where(n > 0, n, 1.0)
        ssa = np.clip(sum_a2 - sum_a**2 / safe_n, 0.0, None)  # Σ(a − ā)²
        ssh = np.clip(sum_h2 - sum_h**2 / safe_n, 0.0, None)
        sah = sum_ah - sum_a * sum_h / safe_n
        r2 = np.where((n > 0) & (ssa > 0), 1.0 - sse / np.where(ssa > 0, ssa, 1.0), np.nan)
        pearson = np.where((n > 1) & (ssa > 0) & (ssh > 0), sah / np.sqrt(ssa * ssh), np.nan)
        rms_ratio = np.where((n > 0) & (sum_a2 > 0), np.sqrt(sum_h2 / np.where(sum_a2 > 0, sum_a2, 1.0)), np.nan)
    return {"active": n.copy(), "r2": r2, "pearson": pearson, "rms_ratio": rms_ratio}


class DocumentFeatureSums:
    """The FEATURE_SUMS of one prediction per test document, for resampling documents: a document's
    tokens share their context, so they are not independent draws and tokens must not be resampled."""

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features
        self._documents: list[np.ndarray] = []  # per chunk: the document of each run of rows
        self._sums: list[np.ndarray] = []  # per chunk: [runs, 7, F]

    def update(self, a: np.ndarray, a_hat: np.ndarray, active: np.ndarray, documents: np.ndarray) -> None:
        """a = y U, â = ŷ U, active: [m, F] (float32 or float64: the sums are float64); documents: [m]
        document id of each row."""
        a, a_hat, mask, documents = np.asarray(a), np.asarray(a_hat), _bool(active), np.asarray(documents)
        if a.shape != a_hat.shape or a.shape != mask.shape or len(documents) != len(a):
            raise ValueError(f"a, â, active [m, F] and documents [m]: got {a.shape}, {a_hat.shape}, {mask.shape}")
        if len(a) == 0:
            return
        new_run = np.r_[True, documents[1:] != documents[:-1]]  # runs of one document
        run = np.cumsum(new_run) - 1
        n_runs, F = int(run[-1]) + 1, self.n_features
        rows, cols = np.nonzero(mask)  # SAE features are sparse: sum over the active (token, feature) cells only
        av, hv = a[rows, cols].astype(np.float64), a_hat[rows, cols].astype(np.float64)
        cell = run[rows] * F + cols
        per_cell = (np.ones_like(av), av, av * av, hv, hv * hv, av * hv, (av - hv) ** 2)  # FEATURE_SUMS order
        sums = np.stack([np.bincount(cell, weights=t, minlength=n_runs * F) for t in per_cell])
        self._sums.append(sums.reshape(len(FEATURE_SUMS), n_runs, F).transpose(1, 0, 2))
        self._documents.append(documents[new_run])

    def per_document(self) -> np.ndarray:
        """[n_documents, 7, F]: each document's sums (its runs added), documents in order of appearance."""
        if not self._sums:
            return np.zeros((0, len(FEATURE_SUMS), self.n_features))
        runs = np.concatenate(self._documents)
        ids, first, row = np.unique(runs, return_index=True, return_inverse=True)
        out = np.zeros((len(ids), len(FEATURE_SUMS), self.n_features))
        np.add.at(out, row, np.concatenate(self._sums))
        return out[np.argsort(first)]


@dataclass
class FeatureBootstrap:
    """Per-feature scores on all documents and on each document resample (`feature_scores_from_sums`)."""

    point: dict[str, np.ndarray]  # [F] each
    resampled: dict[str, np.ndarray]  # [B, F] each

    def columns(self, index: np.ndarray | list[int]) -> FeatureBootstrap:
        """The same for a subset of the features (e.g. the selected ones among the live ones)."""
        return FeatureBootstrap(
            {k: v[index] for k, v in self.point.items()}, {k: v[:, index] for k, v in self.resampled.items()}
        )


def bootstrap_feature_scores(per_document: np.ndarray, resamples: int, seed: int) -> FeatureBootstrap:
    """Document bootstrap of the feature scores: each resample draws as many documents as there are,
    with replacement (multinomial counts), and adds their sums (`DocumentFeatureSums.per_document`)."""
    n_documents = per_document.shape[0]
    if n_documents < 2 or resamples < 1:
        raise ValueError(f"a document bootstrap needs ≥ 2 documents and ≥ 1 resample; got {n_documents}, {resamples}")
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_documents, np.full(n_documents, 1.0 / n_documents), size=resamples)
    resampled = (counts.astype(np.float64) @ per_document.reshape(n_documents, -1)).reshape(
        resamples, len(FEATURE_SUMS), -1
    )
    return FeatureBootstrap(
        feature_scores_from_sums(*per_document.sum(axis=0)),
        feature_scores_from_sums(*np.moveaxis(resampled, 1, 0)),
    )


def percentile_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The central `level` percentile interval of bootstrap samples [B, ...] along axis 0, over the
    samples where the statistic is defined; NaN where it is undefined in more than a tail's share
    (1 − level)/2 of them (e.g. a feature absent from too many resamples), since that tail is unknown."""
    samples = np.asarray(samples, dtype=np.float64)
    tail = (1.0 - level) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN, as intended
        low, high = np.nanquantile(samples, [tail, 1.0 - tail], axis=0)
    unknown = np.isnan(samples).mean(axis=0) > tail
    return np.where(unknown, np.nan, low), np.where(unknown, np.nan, high)


def interval_verdicts(low: np.ndarray, high: np.ndarray, enough: np.ndarray, threshold: float) -> np.ndarray:
    """Per feature: `transported` when its R² interval lies wholly at or above `threshold`, `synthesised`
    when wholly below, `undetermined` when it straddles it (or is undefined); `no_verdict` where
    `enough` is false (too few active tokens). Any interval works: a bootstrap's, another SAE seed's."""
    low, high, enough = np.asarray(low, np.float64), np.asarray(high, np.float64), np.asarray(enough, bool)
    out = np.full(low.shape, NO_VERDICT, dtype=object)
    out[enough] = UNDETERMINED
    out[enough & (low >= threshold)] = TRANSPORTED
    out[enough & (high < threshold)] = SYNTHESISED
    return out


def set_statistics(scores: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    """Summaries over a set of features (the last axis of `scores`, [F] or [B, F]): the share whose R² is
    at or above `threshold` (an undefined R² counts as below) and the medians of R², Pearson r and rms
    ratio over the features where each is defined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an empty or all-NaN set: NaN, as intended
        r2 = scores["r2"]
        return {
            "transported_fraction": np.mean(np.nan_to_num(r2, nan=-np.inf) >= threshold, axis=-1),
            "feature_r2_median": np.nanmedian(r2, axis=-1),
            "feature_pearson_median": np.nanmedian(scores["pearson"], axis=-1),
            "feature_rms_ratio_median": np.nanmedian(scores["rms_ratio"], axis=-1),
        }
