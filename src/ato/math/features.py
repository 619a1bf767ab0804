"""Feature-quality scores for SAE features (stage `select`): pure numpy/torch, no I/O.

Every score is computed from the SAE's *real* encoder output (JumpReLU threshold / TopK), passed
in by the caller as a dense activation matrix A [tokens, d_sae]; a feature is *active* at a token
when its activation is > 0.

Scores (one value per feature):

- activation_rate — fraction of scored tokens where the feature is active.
- token_entropy — Shannon entropy (nats) of the token ids at the positions where the feature is
  active; only active positions count (NaN for a feature that is never active). Low entropy means
  a token-identity feature.
- vocab_focus — excess kurtosis of the logit vector the feature's decoder direction writes
  through the unembedding (see `excess_kurtosis`). Kurtosis is invariant to the scale and shift of
  the logits, so it needs no softmax temperature, is unaffected by the per-token division of the
  final RMS/LayerNorm, and a direction that promotes a handful of tokens scores high.
- redundancy — max |Pearson correlation| of the feature's activations with any *other* feature's
  activations over the scored tokens (never with itself); 0 for a feature with zero variance.
- causal_effect — increase of the mean next-token loss when the feature's contribution a_f·d_f is
  removed at every position where it is active (see `first_order_ablation_effect`).

The composite score is Σ_m w_m · z_m, with z_m the metric z-scored over the *eligible* features
(those whose activation rate reaches the minimum); ineligible features get no composite score and
rank last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

METRICS = ("activation_rate", "token_entropy", "vocab_focus", "redundancy", "causal_effect")


@dataclass
class FeatureActivationStats:
    """Streaming sums over chunks of activations: counts, moments, Gram, token pairs, top-k.

    Memory is O(d_sae²) for the Gram (float64) plus O(active pairs) for the token histogram, so
    the number of scored tokens only costs time.
    """

    d_sae: int
    top_k: int = 5
    n: int = 0
    n_active: np.ndarray = field(init=False)
    sum_a: torch.Tensor = field(init=False)
    gram: torch.Tensor = field(init=False)
    _pair_keys: list[np.ndarray] = field(init=False, default_factory=list)
    top_values: torch.Tensor = field(init=False)
    top_index: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.n_active = np.zeros(self.d_sae, dtype=np.int64)
        self.sum_a = torch.zeros(self.d_sae, dtype=torch.float64)
        self.gram = torch.zeros(self.d_sae, self.d_sae, dtype=torch.float64)
        self.top_values = torch.full((self.d_sae, max(self.top_k, 0)), -torch.inf)
        self.top_index = torch.full((self.d_sae, max(self.top_k, 0)), -1, dtype=torch.int64)

    def update(self, acts: torch.Tensor, token_ids: np.ndarray, index: np.ndarray | None = None) -> None:
        """Add a chunk: `acts` [m, d_sae] encoder output, `token_ids` [m], `index` [m] global ids
        of the rows (for the top-activating contexts; defaults to a running count)."""
        acts = acts.detach().to("cpu", torch.float32)
        m = acts.shape[0]
        if m == 0:
            return
        if index is None:
            index = np.arange(self.n, self.n + m)
        active = acts > 0
        self.n += m
        self.n_active += active.sum(0).numpy()
        self.sum_a += acts.sum(0, dtype=torch.float64)
        # float32 products per chunk, float64 accumulation across chunks
        self.gram += (acts.T @ acts).double()
        rows, feats = torch.nonzero(active, as_tuple=True)
        tok = np.asarray(token_ids, dtype=np.int64)[rows.numpy()]
        self._pair_keys.append(feats.numpy().astype(np.int64) * (1 << 32) + tok)
        if self.top_k > 0:
            k = min(self.top_k, m)
            vals, idx = torch.topk(acts.T, k, dim=1)
            gidx = torch.as_tensor(np.asarray(index, dtype=np.int64))[idx]
            all_vals = torch.cat([self.top_values, vals], dim=1)
            all_idx = torch.cat([self.top_index, gidx], dim=1)
            best_vals, pos = torch.topk(all_vals, self.top_k, dim=1)
            self.top_values, self.top_index = best_vals, torch.gather(all_idx, 1, pos)

    def activation_rate(self) -> np.ndarray:
        return self.n_active / max(self.n, 1)

    def token_entropy(self) -> np.ndarray:
        keys = np.concatenate(self._pair_keys) if self._pair_keys else np.zeros(0, np.int64)
        return token_entropy_from_pairs(keys >> 32, keys & ((1 << 32) - 1), self.d_sae)

    def correlation(self) -> torch.Tensor:
        return correlation_from_moments(self.n, self.sum_a, self.gram)

    def redundancy(self) -> np.ndarray:
        return redundancy_from_correlation(self.correlation())

    def top_contexts(self, feature: int) -> list[tuple[float, int]]:
        """(activation, global row index) of the feature's strongest activations, best first."""
        out = []
        for v, i in zip(self.top_values[feature].tolist(), self.top_index[feature].tolist()):
            if v > 0 and i >= 0:
                out.append((float(v), int(i)))
        return out


def token_entropy_from_pairs(features: np.ndarray, tokens: np.ndarray, d_sae: int) -> np.ndarray:
    """Entropy (nats) of the token-id distribution per feature from (feature, token) pairs, one
    pair per active position. Features without any pair get NaN."""
    features = np.asarray(features, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    out = np.full(d_sae, np.nan)
    if len(features) == 0:
        return out
    keys = features * (1 << 32) + tokens
    uniq, counts = np.unique(keys, return_counts=True)
    feat = uniq >> 32
    totals = np.bincount(features, minlength=d_sae).astype(np.float64)
    p = counts / totals[feat]
    h = np.bincount(feat, weights=-p * np.log(p), minlength=d_sae)
    seen = totals > 0
    out[seen] = h[seen]
    return out


def correlation_from_moments(n: int, sum_a: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Pearson correlation matrix from n, Σa and Σaaᵀ (float64). Zero-variance features get
    correlation 0 with everything (including the diagonal)."""
    n = max(int(n), 1)
    mean = sum_a / n
    cov = gram / n - torch.outer(mean, mean)
    var = cov.diagonal().clamp(min=0)
    tiny = 1e-12 * float(var.max()) if var.numel() and float(var.max()) > 0 else 0.0
    alive = var > tiny
    inv_sd = torch.where(alive, 1.0 / var.clamp(min=1e-300).sqrt(), torch.zeros_like(var))
    corr = cov * inv_sd[:, None] * inv_sd[None, :]
    return corr.clamp(-1.0, 1.0)


def redundancy_from_correlation(corr: torch.Tensor) -> np.ndarray:
    """max_{j≠i} |corr_ij| per feature; a feature is never compared with itself."""
    c = corr.abs().clone()
    c.fill_diagonal_(-1.0)
    if c.shape[0] < 2:
        return np.zeros(c.shape[0])
    return c.max(dim=1).values.clamp(min=0).numpy().astype(np.float64)


def excess_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Excess kurtosis along the last dimension: E[(x-μ)⁴]/σ⁴ − 3 (0 for a constant row).

    Used on logit vectors W_U·norm(d_f): invariant to their scale and shift, large when a few
    vocabulary entries stand out (a Gaussian-like logit vector scores ≈ 0)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 is plenty for a ratio of moments
    c = x - x.mean(-1, keepdim=True)
    m2 = (c * c).mean(-1)
    m4 = (c**4).mean(-1)
    safe = m2.clamp(min=torch.finfo(m2.dtype).tiny)
    return torch.where(m2 > 0, m4 / safe / safe - 3.0, torch.zeros_like(m2)).double()


def first_order_ablation_effect(acts: torch.Tensor, grads: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of the first-order change in summed loss when feature f's contribution is
    removed: ΔL_f ≈ −Σ_t a_{t,f} (g_t · d_f), with g_t = ∂L/∂h_t.

    acts [T, F] (zero where the feature is inactive or not ablated), grads [T, d], directions
    [F, d] (the decoder contribution of one unit of activation). Divide by the number of loss
    tokens to get the change of the mean loss.
    """
    proj = grads.double() @ directions.double().T  # [T, F]
    return -(acts.double() * proj).sum(0)


def zscore(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """z-score of `x` over the entries in `mask`; NaN, masked-out entries and a zero-sd metric → 0."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    valid = mask & np.isfinite(x)
    if valid.sum() == 0:
        return out
    mu, sd = x[valid].mean(), x[valid].std()
    if sd > 0:
        out[valid] = (x[valid] - mu) / sd
    return out


def composite_score(metrics: dict[str, np.ndarray], weights: dict[str, float], eligible: np.ndarray) -> np.ndarray:
    """Σ_m w_m z_m over eligible features; NaN for ineligible ones."""
    unknown = sorted(set(weights) - set(metrics))
    if unknown:
        raise KeyError(f"weights for unknown metric(s) {unknown}; known: {sorted(metrics)}")
    n = len(eligible)
    total = np.zeros(n)
    for name, w in weights.items():
        total += float(w) * zscore(metrics[name], eligible)
    total[~eligible] = np.nan
    return total


def rank_features(composite: np.ndarray, eligible: np.ndarray, activation_rate: np.ndarray) -> list[int]:
    """Eligible features by composite (desc, ties → lower id), then the rest by activation rate."""
    ids = np.arange(len(composite))
    el = ids[eligible]
    el = el[np.lexsort((el, -composite[el]))]
    rest = ids[~eligible]
    rest = rest[np.lexsort((rest, -np.asarray(activation_rate)[rest]))]
    return [int(i) for i in np.concatenate([el, rest])]


def n_keep(keep_fraction: float, d_sae: int, n_eligible: int) -> int:
    """round(keep_fraction · d_sae), at least 1, at most the number of eligible features."""
    return int(min(max(1, round(keep_fraction * d_sae)), n_eligible))
