"""The mean Jacobian of a stack of transformer blocks, estimated without bias by forward-mode AD.

`f` maps the residual at layer L, h [B, T, d], to the residuals at later layers (a tuple of
[B, T, d]). For a token t, J_ts = ∂y_t/∂x_s is the response of position t's output to position s's
input. Two averages over the tokens t (a `mask` selects them, e.g. every non-BOS position):

* **same-position Jacobian** E_t[J_tt]: every other position held fixed (what a per-token map
  y_t = W x_t + b competes with);
* **total response** E_t[Σ_s J_ts]: the response to one shift of the whole residual stream (the
  masked positions all move by the same v).

**Random-sign position mixing.** One jvp with the tangent s_t·v at every masked position (s_t = ±1,
independent and fair) gives at position t the output Σ_s s_s J_ts v; multiplying by s_t,

    s_t Σ_s s_s J_ts v = J_tt v + Σ_{s≠t} s_t s_s J_ts v,

whose expectation over the signs is J_tt v (E[s_t s_s] = 0 for s ≠ t): an unbiased estimate of every
token's same-position response, at the cost of one jvp per direction for all tokens at once. The
cross terms are noise with mean zero; with two independent sign draws a and b, E[â_t · b̂_t] = ‖J_tt v‖²
exactly (their noises are uncorrelated), which makes the token-to-token variance of J_tt v and the
squared error of a per-token linearisation unbiased too. A tangent equal to v at every masked position
(no signs) gives the total response Σ_s J_ts v exactly.

**Lagged terms from the same jvps.** Multiplying the output at t by the sign of an earlier position
t − ℓ instead, s_{t−ℓ} Σ_s s_s J_ts v has expectation J_{t,t−ℓ} v: one jvp per direction gives
E[∂y_t/∂x_{t−ℓ}] v for every lag ℓ = 0 … m (over the tokens t whose t − ℓ is masked too, in the same
sequence). These are what a lagged map's slopes W_ℓ compete with: by Stein's lemma with positions,
Cov(y_t, x_s) = Σ_u E[J_tu] Cov(x_u, x_s), so with correlated positions the same-position slope W₀
differs from E[J_tt] even for a linear f, while the lagged regression's W_ℓ recover E[J_{t,t−ℓ}] when
the response reaches back no further than m. Their noise is taken with sequences as the unit (tokens of
one sequence are not independent; each sequence has its own signs): `lag_standard_error`.

Directions: `V` [d, r] (orthonormal columns, e.g. the top right singular vectors of a ridge map, or
the identity for the whole matrix). The token's own residual is a direction too: x_t itself (signed)
gives J_tt x_t, the per-token linearisation, and unsigned Σ_s J_ts x_s.

All tangents of one call share one primal forward (torch.func.vmap over torch.func.jvp), processed
`chunk` tangents at a time. The model must support forward-mode AD (for HF attention: the eager
implementation). See docs/method.md#atlas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import jvp, vmap

from .intervals import ratio_standard_error

BlockFn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # residual [B, T, d] → outputs [B, T, d] per target
DRAWS = 2  # independent sign draws: two make second moments unbiased


def random_signs(
    shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Independent fair ±1 signs of the given shape (drawn on the CPU generator, then moved)."""
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(device=device, dtype=dtype)


def batched_jvp(f: BlockFn, x: torch.Tensor, tangents: torch.Tensor, chunk: int = 16) -> list[torch.Tensor]:
    """Jacobian-vector products of f at x for every tangent [m, *x.shape]: per output of f, a tensor
    [m, *output.shape]; vmap over `chunk` tangents at a time (one shared primal per chunk)."""
    if tangents.shape[1:] != x.shape:
        raise ValueError(f"tangents of shape {tuple(tangents.shape[1:])} for a primal of shape {tuple(x.shape)}")
    outputs: list[list[torch.Tensor]] = []
    for start in range(0, tangents.shape[0], chunk):
        part = vmap(lambda t: jvp(f, (x,), (t,))[1])(tangents[start : start + chunk])
        for i, out in enumerate(part):
            if len(outputs) <= i:
                outputs.append([])
            outputs[i].append(out.detach())
    return [torch.cat(o) for o in outputs]


@dataclass
class JacobianProbe:
    """Estimates for one output of f over the n masked tokens, restricted to the directions V [d_in, r]."""

    mean_draws: torch.Tensor  # [DRAWS, d_out, r]: Ê_t[J_tt] V from each sign draw (unbiased each)
    second_moment: torch.Tensor  # [r]: Ê_t[â_t · b̂_t] per direction (unbiased for E_t‖J_tt v‖²)
    total: torch.Tensor  # [d_out, r]: E_t[Σ_s J_ts] V (exact on these tokens)
    lin_draws: torch.Tensor  # [DRAWS, n, d_out]: per-token J_tt x_t, one unbiased estimate per draw
    lin_total: torch.Tensor  # [n, d_out]: per-token Σ_s J_ts x_s (exact)
    x: torch.Tensor  # [n, d_in]: the masked tokens' inputs
    y: torch.Tensor  # [n, d_out]: their outputs f(x)
    lag_sums: torch.Tensor  # [B, m+1, d_out, r]: per sequence, Σ_t of s_{t−ℓ}·(jvp at t), mean of the draws
    lag_counts: torch.Tensor  # [B, m+1]: tokens t of each sequence in those sums (t and t − ℓ masked)

    @property
    def mean(self) -> torch.Tensor:
        """[d_out, r]: Ê_t[J_tt] V, the average of the draws."""
        return self.mean_draws.mean(0)

    @property
    def n_tokens(self) -> int:
        return int(self.x.shape[0])

    @property
    def lag_mean(self) -> torch.Tensor:
        """[m+1, d_out, r]: Ê_t[J_{t,t−ℓ}] V for ℓ = 0 … m (ℓ = 0: `mean`)."""
        return self.lag_sums.sum(0) / self.lag_counts.sum(0).clamp(min=1)[:, None, None]


def probe(
    f: BlockFn,
    x: torch.Tensor,
    V: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    chunk: int = 16,
    lags: int = 0,
) -> list[JacobianProbe]:
    """Every estimate of the module docstring for each output of f, with 3r + 3 tangents.

    x [B, T, d_in] (the residual at L), V [d_in, r] directions, mask [B, T] bool (tokens averaged over
    and shifted; the others' tangents are zero, so they are held fixed), `lags` m: the lagged
    Jacobians ℓ = 1 … m from the same tangents. Tangents go through in groups of `chunk` and are
    reduced at once, so memory does not grow with r."""
    if V.ndim != 2 or V.shape[0] != x.shape[-1]:
        raise ValueError(f"V must be [d_in={x.shape[-1]}, r], got {tuple(V.shape)}")
    if not mask.any():
        raise ValueError("the mask selects no token")
    if not 0 <= lags < mask.shape[1]:
        raise ValueError(f"lags must lie in 0 … {mask.shape[1] - 1} (sequence length {mask.shape[1]}), got {lags}")
    m = mask.to(x.dtype)[..., None]  # [B, T, 1]
    signs = random_signs((DRAWS, *mask.shape), generator, x.dtype, x.device)[..., None] * m  # [DRAWS, B, T, 1]
    keep = mask.reshape(-1)
    s_keep = signs.reshape(DRAWS, -1, 1)[:, keep].double().cpu()  # [DRAWS, n, 1]
    with torch.no_grad():
        ys = f(x)

    def at_tokens(out: torch.Tensor) -> torch.Tensor:  # [m, B, T, d] → [m, n, d] float64
        return out.reshape(out.shape[0], -1, out.shape[-1])[:, keep].double().cpu()

    r, per_dir = V.shape[1], max(1, chunk // (DRAWS + 1))
    mean_draws = [torch.zeros(DRAWS, y.shape[-1], r, dtype=torch.float64) for y in ys]
    second = [torch.zeros(r, dtype=torch.float64) for _ in ys]
    total = [torch.zeros(y.shape[-1], r, dtype=torch.float64) for y in ys]
    lag_sums = [torch.zeros(mask.shape[0], lags + 1, y.shape[-1], r, dtype=torch.float64) for y in ys]
    for lo in range(0, r, per_dir):
        dirs = V[:, lo : lo + per_dir].T.to(x.dtype)[:, None, None, :]  # [c, 1, 1, d]
        c = dirs.shape[0]
        signed = (signs[:, None] * dirs[None]).reshape(DRAWS * c, *x.shape)
        tangents = torch.cat([signed, (m[None] * dirs).expand(c, *x.shape)])
        for i, out in enumerate(batched_jvp(f, x, tangents, chunk)):
            flat = at_tokens(out)
            est = flat[: DRAWS * c].reshape(DRAWS, c, -1, flat.shape[-1]) * s_keep[:, None]  # [DRAWS, c, n, d]
            mean_draws[i][:, :, lo : lo + c] = est.mean(2).transpose(1, 2)
            second[i][lo : lo + c] = (est[0] * est[1]).sum(-1).mean(-1)
            total[i][:, lo : lo + c] = flat[DRAWS * c :].mean(1).T
            lag_sums[i][..., lo : lo + c] = _lag_sums(out[: DRAWS * c].reshape(DRAWS, c, *out.shape[1:]), signs, lags)
    x_tangents = torch.cat([signs * x[None], (m * x)[None]])  # signed x per draw, then unsigned x
    lin = [at_tokens(out) for out in batched_jvp(f, x, x_tangents, chunk)]
    x_keep = x.reshape(-1, x.shape[-1])[keep].double().cpu()
    T = mask.shape[1]
    lag_counts = torch.stack([(mask[:, lag:] & mask[:, : T - lag]).sum(1) for lag in range(lags + 1)], 1)
    lag_counts = lag_counts.double().cpu()
    return [
        JacobianProbe(
            mean_draws=mean_draws[i],
            second_moment=second[i],
            total=total[i],
            lin_draws=lin[i][:DRAWS] * s_keep,
            lin_total=lin[i][DRAWS],
            x=x_keep,
            y=y.reshape(-1, y.shape[-1])[keep].double().cpu(),
            lag_sums=lag_sums[i],
            lag_counts=lag_counts,
        )
        for i, y in enumerate(ys)
    ]


def _lag_sums(out: torch.Tensor, signs: torch.Tensor, lags: int) -> torch.Tensor:
    """[B, m+1, d, c]: per sequence, Σ_t s_{t−ℓ}·out_t averaged over the draws, from the signed jvps
    out [DRAWS, c, B, T, d] and signs [DRAWS, B, T, 1] (zero at unmasked positions, so a t or t − ℓ
    outside the mask adds nothing)."""
    out, T = out.double(), out.shape[3]
    present = (signs != 0).double()
    sums = []
    for lag in range(lags + 1):
        weight = (signs[:, :, : T - lag] * present[:, :, lag:]).double()  # s_{t−ℓ}, zero unless t masked too
        sums.append((out[:, :, :, lag:] * weight[:, None]).sum(3).mean(0))  # [c, B, d]
    return torch.stack(sums).permute(2, 0, 3, 1).cpu()


# --------------------------------------------------------------------------------------------
# Summaries of a probe (pure tensor algebra; float64 on the host)


def token_variation(p: JacobianProbe) -> float:
    """Σ_v Var_t(J_tt v) / ‖E_t[J_tt] V‖²_F: how much the same-position Jacobian moves from token to
    token, relative to its mean (0 for a linear f). Unbiased numerator and denominator: the two draws'
    products E_t[â·b̂] and ā·b̄ (noise-free in expectation)."""
    a, b = p.mean_draws[0].double(), p.mean_draws[1].double()
    mean_sq = float((a * b).sum())
    if mean_sq <= 0:
        return float("nan")
    return (float(p.second_moment.double().sum()) - mean_sq) / mean_sq


def estimate_noise(p: JacobianProbe) -> float:
    """Relative standard error of Ê_t[J_tt] V from the spread of the draws: ‖a − b‖_F / (2 ‖(a + b)/2‖_F)."""
    a, b = p.mean_draws[0].double(), p.mean_draws[1].double()
    denom = float(((a + b) / 2).norm())
    return float((a - b).norm()) / (2 * denom) if denom > 0 else float("nan")


def linearisation_r2(p: JacobianProbe) -> dict[str, float]:
    """Variance-weighted R² on the probe tokens of ŷ_t = J_tt x_t + c (same-position linearisation,
    squared error unbiased through the two draws) and of ŷ_t = Σ_s J_ts x_s + c (total), each with c
    the mean residual: how much of y a per-token linear response to the token's own residual explains."""
    y = p.y.double()
    yc = y - y.mean(0)
    sst = float((yc**2).sum())
    a, b = p.lin_draws[0].double(), p.lin_draws[1].double()
    jx = (a + b) / 2
    c = (y - jx).mean(0)
    resid = y - c
    # Σ‖y − c − J x‖² with ‖J x‖² estimated by a·b (unbiased); the linear term by the mean of the draws
    sse_same = float((resid**2).sum() - 2 * (resid * jx).sum() + (a * b).sum())
    tot = p.lin_total.double()
    err = y - tot
    sse_total = float(((err - err.mean(0)) ** 2).sum())
    if sst <= 0:
        return {"same": float("nan"), "total": float("nan")}
    return {"same": 1 - sse_same / sst, "total": 1 - sse_total / sst}


def lag_standard_error(p: JacobianProbe) -> torch.Tensor:
    """[m+1, d_out, r]: standard error of Ê_t[J_{t,t−ℓ}] V with sequences as the unit (the delta-method
    error of a ratio of per-sequence sums): it holds the token sampling, the tokens' dependence within a
    sequence and the sign noise at once. nan with fewer than two sequences."""
    sums = p.lag_sums.double().permute(1, 2, 3, 0).numpy()  # [m+1, d_out, r, B]
    counts = np.broadcast_to(p.lag_counts.double().T.numpy()[:, None, None, :], sums.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        return torch.from_numpy(ratio_standard_error(sums, counts))


def slope_gaps(slopes: list[np.ndarray], V: np.ndarray, p: JacobianProbe) -> tuple[list[float], list[float]]:
    """Per lag ℓ (slopes[ℓ] = a map's W_ℓ [d_out, d_in], ℓ ≤ m): ‖(W_ℓ − E[J_{t,t−ℓ}])V‖_F / ‖W_ℓ V‖_F and
    its noise ‖SE(Ê[J_{t,t−ℓ}]V)‖_F / ‖W_ℓ V‖_F, sequences as the unit (the expected size of the
    estimate's error on the gap's scale)."""
    if len(slopes) > p.lag_counts.shape[1]:
        raise ValueError(f"{len(slopes)} slopes for a probe of lags 0 … {p.lag_counts.shape[1] - 1}")
    lagged, se = p.lag_mean.numpy(), lag_standard_error(p).numpy()
    gaps, noise = [], []
    for lag, W in enumerate(slopes):
        scale = float(np.linalg.norm(W @ V))
        gaps.append(float(np.linalg.norm(W @ V - lagged[lag])) / scale if scale > 0 else float("nan"))
        noise.append(float(np.linalg.norm(se[lag])) / scale if scale > 0 else float("nan"))
    return gaps, noise
