"""Feature-selection criteria for SAE features (stage `select`): pure numpy/torch, no I/O.

Every score is computed from the SAE's *real* encoder output (JumpReLU threshold / TopK), passed
in by the caller as a dense activation matrix A [tokens, d_sae]; a feature is *active* at a token
when its activation is > 0. Each criterion has a fixed orientation (`ORIENTATION`: +1 = higher is
better); `select.weights` are non-negative importances, so no weight can flip a criterion's sign.

- rate_band (+) — activation: 0 when the feature's activation rate lies inside the band
  [lo·r₀, hi·r₀] around the SAE's sparse regime r₀ = mean L0 / d_sae (= k/width for TopK), minus
  the distance in decades outside it (`rate_band_score`). Rewards sparse features, penalises
  dense directions and near-dead ones alike.
- token_entropy (−) — coherence: Shannon entropy of the token ids at the positions where the
  feature is active, divided by the expected entropy of as many tokens drawn at random from the
  scored ones (`FeatureActivationStats.token_entropy_ratio`; NaN if never active). Low = the
  feature fires on a coherent set of tokens. The ratio, not the raw entropy: a plug-in entropy of n
  tokens is at most log n, so the raw value would reward a feature merely for firing rarely.
- vocab_focus (+) — excess kurtosis of the logit vector the decoder direction writes through the
  unembedding (`excess_kurtosis`): invariant to the scale and shift of the logits, high when the
  direction promotes a handful of tokens.
- redundancy (−) — max |cos| of the feature's decoder row with any other live feature's row
  (`decoder_redundancy`): a near-duplicate direction scores close to 1.
- causal_effect (+) — exact change of the next-token loss per ablated activation (`ato.sae.effects`),
  measured only for the `select.exact_budget` best candidates by the other criteria.

Scoring is a funnel (`composite_score`, `exact_candidates`, `select_ranking`), each criterion
z-scored over the features it is measured on:
1. eligible features (activation rate ≥ `select.min_activation_rate`): cheap score = Σ w·o·z over
   rate_band, token_entropy and redundancy;
2. shortlist (the best 4 × exact_budget by the cheap score): + w·z(vocab_focus) = pre-score;
3. candidates (the best `exact_budget` of the shortlist by pre-score): exact ablation, + w·z(causal
   effect) (a candidate that never fires in the causal pool adds 0) = final score.
Ranking: candidates by final score, then the rest of the shortlist and of the eligible features by
pre-score, then the ineligible ones by activation rate. Kept: the first round(keep_fraction·d_sae).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# orientation of each criterion: +1 higher is better, −1 lower is better
ORIENTATION = {"rate_band": 1.0, "token_entropy": -1.0, "vocab_focus": 1.0, "redundancy": -1.0, "causal_effect": 1.0}
METRICS = tuple(ORIENTATION)
CAUSAL = "causal_effect"


@dataclass
class FeatureActivationStats:
    """Streaming sums over chunks of activations: active counts, (feature, token) pairs, top-k.

    Memory is O(active pairs) for the token histogram plus O(d_sae · top_k), so the number of scored
    tokens only costs time.
    """

    d_sae: int
    top_k: int = 5
    n: int = 0
    n_active: np.ndarray = field(init=False)
    _pair_keys: list[np.ndarray] = field(init=False, default_factory=list)
    _tokens: list[np.ndarray] = field(init=False, default_factory=list)  # every scored token id
    top_values: torch.Tensor = field(init=False)
    top_index: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.n_active = np.zeros(self.d_sae, dtype=np.int64)
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
        rows, feats = torch.nonzero(active, as_tuple=True)
        tok = np.asarray(token_ids, dtype=np.int64)[rows.numpy()]
        self._pair_keys.append(feats.numpy().astype(np.int64) * (1 << 32) + tok)
        self._tokens.append(np.asarray(token_ids, dtype=np.int64))
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

    def token_entropy_ratio(self, reps: int = 16, seed: int = 0) -> np.ndarray:
        """Token entropy relative to that of as many scored tokens drawn at random (NaN if never
        active): 0 = one token, ≈ 1 = no more coherent than random positions. The plug-in entropy of
        n tokens grows with n, so the raw entropy would reward rare features for being rare."""
        tokens = np.concatenate(self._tokens) if self._tokens else np.zeros(0, np.int64)
        expected = expected_token_entropy(tokens, self.n_active, reps, seed)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(expected > 0, self.token_entropy() / expected, np.nan)

    def top_contexts(self, feature: int) -> list[tuple[float, int]]:
        """(activation, global row index) of the feature's strongest activations, best first."""
        out = []
        for v, i in zip(self.top_values[feature].tolist(), self.top_index[feature].tolist()):
            if v > 0 and i >= 0:
                out.append((float(v), int(i)))
        return out


def plugin_entropy(values: np.ndarray) -> float:
    """Shannon entropy (nats) of the empirical distribution of `values`."""
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def expected_token_entropy(tokens: np.ndarray, sizes: np.ndarray, reps: int = 16, seed: int = 0) -> np.ndarray:
    """E[plug-in entropy] of n tokens drawn without replacement from `tokens`, for each n in `sizes`
    (Monte Carlo on a geometric grid of n, interpolated in log n; 0 for n ≤ 1)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    out = np.zeros(len(sizes))
    top = int(min(sizes.max(initial=0), len(tokens)))
    if top < 2:
        return out
    rng = np.random.default_rng(seed)
    grid = np.unique(np.round(np.geomspace(2, top, 48)).astype(int))
    mean = [np.mean([plugin_entropy(rng.choice(tokens, n, replace=False)) for _ in range(reps)]) for n in grid]
    big = sizes >= 2
    out[big] = np.interp(np.log(np.minimum(sizes[big], top)), np.log(grid), mean)
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


def rate_band_score(rate: np.ndarray, target: float, band: tuple[float, float]) -> np.ndarray:
    """0 inside [band[0]·target, band[1]·target], −(decades outside) beyond it; NaN for rate 0.

    E.g. with target 0.0125 and band (0.1, 10): rate 0.0125 → 0, 0.5 → −log10(0.5/0.125) = −0.60."""
    rate = np.asarray(rate, dtype=np.float64)
    lo, hi = band[0] * target, band[1] * target
    out = np.full(rate.shape, np.nan)
    live = rate > 0
    out[live] = -np.abs(np.log10(rate[live] / np.clip(rate[live], lo, hi)))
    return out


@torch.no_grad()
def decoder_redundancy(directions: torch.Tensor, live: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """max_{j≠f, j live} |cos(d_f, d_j)| for every row f of `directions` [d_sae, d_in]; a feature is
    never compared with itself or with dead rows (dead latents' rows are untrained noise). 0 when
    there is no other live row; NaN for a zero row."""
    d = directions.double()
    norms = d.norm(dim=1)
    u = d / norms.clamp(min=1e-300)[:, None]
    live_t = torch.as_tensor(np.asarray(live, dtype=bool), device=d.device)
    idx = torch.nonzero(live_t).flatten()
    out = torch.zeros(len(d), dtype=torch.float64, device=d.device)
    for start in range(0, len(d), chunk):
        cos = (u[start : start + chunk] @ u[idx].T).abs()  # [chunk, n_live]
        rows = torch.arange(start, min(start + chunk, len(d)), device=d.device)
        cos[idx[None, :] == rows[:, None]] = -1.0  # never with itself
        out[start : start + chunk] = cos.max(dim=1).values.clamp(min=0) if len(idx) else 0.0
    out[norms == 0] = torch.nan
    return out.cpu().numpy()


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


def check_weights(weights: dict[str, float]) -> None:
    """Weights are importances: known criteria, finite, ≥ 0 (the sign is `ORIENTATION`'s)."""
    for name, w in weights.items():
        if name not in ORIENTATION:
            raise KeyError(f"weight for unknown criterion {name!r}; known: {', '.join(METRICS)}")
        if not (np.isfinite(w) and w >= 0):
            raise ValueError(f"weight {name}={w}: must be a finite number ≥ 0 (the criterion's sign is fixed)")


def composite_score(metrics: dict[str, np.ndarray], weights: dict[str, float], eligible: np.ndarray) -> np.ndarray:
    """Σ_m w_m·o_m·z_m over the criteria in `weights` (z over the eligible features; o = ORIENTATION);
    NaN for ineligible features."""
    check_weights(weights)
    total = np.zeros(len(eligible))
    for name, w in weights.items():
        if w:
            total += float(w) * ORIENTATION[name] * zscore(metrics[name], eligible)
    total[~eligible] = np.nan
    return total


def _order(score: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`ids` by `score` descending, ties → lower id."""
    return ids[np.lexsort((ids, -score[ids]))]


@dataclass
class Ranking:
    """The outcome of `select_ranking`."""

    composite: np.ndarray  # [d_sae] final score of candidates, pre-score of other eligible, NaN else
    ranked: list[int]  # every feature: candidates, other eligible, ineligible
    candidates: list[int] = field(default_factory=list)  # features whose causal effect was measured


def exact_candidates(pre: np.ndarray, eligible: np.ndarray, budget: int) -> list[int]:
    """The best `budget` eligible features by pre-score (ties → lower id)."""
    order = _order(np.nan_to_num(pre, nan=-np.inf), np.flatnonzero(eligible))
    return [int(f) for f in order[: max(0, budget)]]


def select_ranking(
    pre: np.ndarray,
    causal: np.ndarray,
    candidates: list[int],
    causal_weight: float,
    tiers: list[np.ndarray],
    activation_rate: np.ndarray,
) -> Ranking:
    """Final scores and ranking (module docstring): the candidates' pre-score + w·z(causal over the
    candidates), ranked first; then each tier (bool masks, e.g. shortlist, eligible) by pre-score;
    the rest (ineligible) by activation rate. Composite is NaN outside the last tier."""
    n = len(activation_rate)
    cand = np.zeros(n, dtype=bool)
    cand[candidates] = True
    composite = np.where(tiers[-1], pre, np.nan) if tiers else np.full(n, np.nan)
    composite[cand] = pre[cand] + causal_weight * ORIENTATION[CAUSAL] * zscore(causal, cand)[cand]
    ids, done = np.arange(n), cand.copy()
    order = [_order(composite, ids[cand])]
    for tier in tiers:
        order.append(_order(composite, ids[tier & ~done]))
        done |= tier
    rate = np.asarray(activation_rate, dtype=np.float64)
    rest = ids[~done]
    order.append(rest[np.lexsort((rest, -rate[rest]))])
    return Ranking(composite, [int(i) for i in np.concatenate(order)], [int(f) for f in candidates])


def n_keep(keep_fraction: float, d_sae: int, n_eligible: int) -> int:
    """round(keep_fraction · d_sae), at least 1, at most the number of eligible features."""
    return int(min(max(1, round(keep_fraction * d_sae)), n_eligible))
