"""Stage `evaluate`: how well each operator transports the residual, on the held-out TEST split.

Per pair (L, k), with T = L + k:

* residual-space scores (streamed over the test split: R² uniform and variance-weighted,
  per-dimension quantiles, MSE, token cosine) for the ATO and the baselines identity (ŷ = x),
  train mean (ŷ = ȳ_train) and OLS (ridge with α = 0 on the train statistics);
* feature-space scores for every kept feature of layer T's SAE along its unit decoder direction,
  over the test tokens where that SAE's own encoder (TopK / JumpReLU, never a plain ReLU) says the
  feature is active on the TRUE y; each feature is transported, synthesised, or gets no verdict
  (too few active tokens);
* the CCA ceiling on the train statistics, η(r) for SVD truncation and reduced-rank regression on
  train and test over a log-spaced rank sweep (one decomposition per pair, see `ato.math.cca`),
  the participation ratio and the transported-subspace size.

BOS / special tokens are excluded unless `stats.include_bos` (the same choice as the statistics,
which is checked: the streamed test token count must equal the test statistics' n).

Outputs: `reports/metrics/<pair>.json` (flat numeric keys, the MLflow metric names; non-finite
values are left out), `reports/evaluate/<pair>/{features.csv, efficiency.csv, transport.json}`,
`reports/figures/<pair>_{efficiency, feature_r2, dim_r2}.png`; all logged to the pair's MLflow run.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..errors import AtoError
from ..math.cca import CCA, efficiency_table, rank_grid
from ..math.metrics import (NO_VERDICT, SYNTHESISED, TRANSPORTED, FeatureAccumulator, ResidualAccumulator,
                            feature_verdicts, unit_directions)
from ..math.ridge import r2_from_stats, ridge_fit
from ..operators import load_operator
from ..params import Params
from ..store import ActivationStore, write_json_atomic
from .stats import load_pair_stats

PREDICTORS = ("ato", "identity", "mean", "ols")  # metric prefixes: "" for the ATO, else "<name>_"
SAE_ENCODE_ROWS = 2048  # rows per SAE encode call: bounds the [rows, d_sae] activation buffer


class EvaluateError(AtoError):
    pass


def _prefix(name: str) -> str:
    return "" if name == "ato" else f"{name}_"


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass
class FeatureSet:
    layer: int
    sae: Any  # sae_lens.SAE
    kept: list[int]
    directions: np.ndarray  # [d, F] unit decoder directions


def sae_path(params: Params, layer: int) -> Path:
    return params.path("sae_dir") / f"layer_{layer:02d}"


def features_path(params: Params, layer: int) -> Path:
    return params.path("features") / f"layer_{layer:02d}.json"


def load_feature_set(params: Params, layer: int, d_model: int, pair_name: str) -> FeatureSet:
    """Layer T's SAE (sae-lens disk format) and its kept features; clear errors when missing."""
    directory = sae_path(params, layer)
    if not (directory / "cfg.json").exists():
        raise EvaluateError(
            f"pair {pair_name}: no SAE for target layer {layer} at {directory} (expected sae-lens "
            "files cfg.json + sae_weights.safetensors); run `ato sae`"
        )
    fpath = features_path(params, layer)
    if not fpath.exists():
        raise EvaluateError(f"pair {pair_name}: no selected features for layer {layer}: {fpath} is "
                            "missing; run `ato select`")
    try:
        info = json.loads(fpath.read_text())
    except json.JSONDecodeError as exc:
        raise EvaluateError(f"{fpath}: not valid JSON: {exc}") from None
    kept = info.get("kept") if isinstance(info, dict) else None
    if not isinstance(kept, list) or not kept:
        raise EvaluateError(f"{fpath}: needs a non-empty list `kept` of feature ids")

    from sae_lens import SAE

    try:
        sae = SAE.load_from_disk(str(directory), device="cpu")
    except Exception as exc:  # sae-lens raises many kinds on a bad directory
        raise EvaluateError(f"{directory}: cannot load the SAE for layer {layer}: {exc}") from exc
    sae.eval()
    if int(sae.cfg.d_in) != d_model:
        raise EvaluateError(f"{directory}: SAE d_in={sae.cfg.d_in} but the store's d_model={d_model}")
    bad = [f for f in kept if not isinstance(f, int) or not 0 <= f < int(sae.cfg.d_sae)]
    if bad:
        raise EvaluateError(f"{fpath}: kept ids {bad[:5]} outside 0..{sae.cfg.d_sae - 1} of the layer-{layer} SAE")
    try:
        directions = unit_directions(sae.W_dec.detach(), kept)
    except ValueError as exc:
        raise EvaluateError(f"{directory}: {exc}") from None
    return FeatureSet(layer, sae, [int(f) for f in kept], directions)


def sae_active(sae: Any, y: np.ndarray, kept: list[int]) -> np.ndarray:
    """[m, F] bool: feature active on the true y according to the SAE's own encode()."""
    idx = torch.as_tensor(kept, dtype=torch.long)
    out = np.zeros((len(y), len(kept)), dtype=bool)
    dtype = next(sae.parameters()).dtype
    with torch.inference_mode():
        for start in range(0, len(y), SAE_ENCODE_ROWS):
            rows = torch.as_tensor(y[start:start + SAE_ENCODE_ROWS]).to(dtype)
            out[start:start + len(rows)] = (sae.encode(rows)[:, idx] > 0).cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# The stage


def main(params: Params, pair: str | None = None) -> None:
    names = [pair] if pair else list(params.pairs)
    for name in tqdm(names, desc="evaluate", unit="pair", disable=len(names) < 2):
        evaluate_pair(params, name)


def evaluate_pair(params: Params, name: str) -> dict[str, float]:
    """Evaluate one pair; writes every output and returns the flat metrics."""
    if name not in params.pairs:
        raise EvaluateError(f"pair {name} is not in params.pairs ({', '.join(params.pairs)})")
    pair, ev = params.pairs[name], params.evaluate
    L, T = pair.L, pair.target
    store = ActivationStore.open(params.path("store"))
    store.require_layers([L, T], f"pair {name}")
    d = store.d_model
    op = load_operator(params.path("operators") / name, expect={
        "store_digest": store.digest, "model_digest": store.manifest.get("model", {}).get("weights_digest"),
        "d_model": d, "layer_in": L, "layer_out": T,
    })
    train, val, test = (load_pair_stats(params, split, name, store_digest=store.digest)
                        for split in ("train", "val", "test"))
    features = load_feature_set(params, T, d, name)

    W = op.W.double().numpy()
    b = op.b.double().numpy()
    W_ols, b_ols = ridge_fit(train, 0.0)
    maps = {"ato": (W, b), "ols": (W_ols, b_ols)}
    mean_y = train.mean_y

    # ---- one streaming pass over the test split -------------------------------------------
    res = {k: ResidualAccumulator(d) for k in PREDICTORS}
    feat = {k: FeatureAccumulator(len(features.kept)) for k in PREDICTORS}
    U = features.directions
    with tqdm(total=int(test.n), desc=f"evaluate {name} (test)", unit="tok", leave=False) as bar:
        for chunk in store.iter_chunks("test", [L, T], chunk_tokens=params.stats.chunk_tokens,
                                       include_special=params.stats.include_bos):
            x = chunk[L].astype(np.float64)
            y = chunk[T].astype(np.float64)
            active = sae_active(features.sae, chunk[T], features.kept)
            a = y @ U
            for k in PREDICTORS:
                if k == "identity":
                    y_hat = x
                elif k == "mean":
                    y_hat = np.broadcast_to(mean_y, y.shape)
                else:
                    Wk, bk = maps[k]
                    y_hat = x @ Wk.T + bk
                res[k].update(y, y_hat)
                feat[k].update_projected(a, y_hat @ U, active)
            bar.update(len(x))
    if res["ato"].n != test.n:
        raise EvaluateError(
            f"pair {name}: the test split streams {int(res['ato'].n)} tokens (include_bos="
            f"{params.stats.include_bos}) but the test statistics have {int(test.n)}; rerun `ato stats`"
        )

    # ---- scores ----------------------------------------------------------------------------
    metrics: dict[str, float] = {"n_test_tokens": float(test.n), "n_train_tokens": float(train.n),
                                 "alpha": float(op.config.get("alpha", float("nan")))}
    per_dim: dict[str, np.ndarray] = {}
    for k in PREDICTORS:
        out = res[k].result()
        out.pop("n_tokens")
        metrics.update({f"{_prefix(k)}{key}": v for key, v in out.items()})
        per_dim[k] = res[k].r2_per_dim()
    val_scores = r2_from_stats(val, W, b)
    metrics["val_r2"], metrics["val_r2_weighted"] = val_scores["r2"], val_scores["r2_weighted"]

    feat_res = {k: feat[k].result() for k in PREDICTORS}
    fr = feat_res["ato"]
    verdicts = feature_verdicts(fr["r2"], fr["active"], ev.transported_r2, ev.min_active_tokens)
    judged = verdicts != NO_VERDICT
    metrics.update({
        "n_features": float(len(features.kept)),
        "n_transported": float((verdicts == TRANSPORTED).sum()),
        "n_synthesised": float((verdicts == SYNTHESISED).sum()),
        "n_no_verdict": float((verdicts == NO_VERDICT).sum()),
    })
    metrics["transported_fraction"] = (metrics["n_transported"] / judged.sum()) if judged.any() else float("nan")
    for k in PREDICTORS:
        r2k = feat_res[k]["r2"][judged]
        r2k = r2k[np.isfinite(r2k)]
        metrics[f"{_prefix(k)}feature_r2_median"] = float(np.median(r2k)) if r2k.size else float("nan")
        metrics[f"{_prefix(k)}feature_r2_mean"] = float(np.mean(r2k)) if r2k.size else float("nan")
    for key in ("pearson", "rms_ratio"):
        v = fr[key][judged]
        v = v[np.isfinite(v)]
        metrics[f"feature_{key}_median"] = float(np.median(v)) if v.size else float("nan")

    cca = CCA.from_stats(train, ridge=ev.cca_ridge)
    ranks = rank_grid(min(cca.d_in, cca.d_out), ev.n_ranks)
    table = efficiency_table(cca, W, train, test, ranks)
    width = max(3, len(str(max(ranks))))
    metrics.update({
        "ceiling_full": cca.ceiling(),
        "participation_ratio": cca.participation_ratio(),
        "subspace_size": float(cca.subspace_size(ev.subspace_fraction)),
        "whitened_r2_train": cca.whitened_r2(train, W, b),
        "whitened_r2_test": cca.whitened_r2(test, W, b),
        "ols_whitened_r2_test": cca.whitened_r2(test, W_ols, b_ols),
    })
    ceil = metrics["ceiling_full"]
    metrics["eta_train"] = metrics["whitened_r2_train"] / ceil if ceil > 0 else float("nan")
    metrics["eta_test"] = metrics["whitened_r2_test"] / ceil if ceil > 0 else float("nan")
    for i, r in enumerate(ranks):
        for col in ("eta_svd_train", "eta_svd_test", "eta_rrr_train", "eta_rrr_test"):
            metrics[f"{col}_r{r:0{width}d}"] = float(table[col][i])
    metrics = {k: float(v) for k, v in metrics.items()}

    # ---- outputs ---------------------------------------------------------------------------
    reports = params.path("reports")
    out_dir = reports / "evaluate" / name
    fig_dir = reports / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = reports / "metrics" / f"{name}.json"
    write_json_atomic(metrics_path, {k: v for k, v in sorted(metrics.items()) if math.isfinite(v)})

    features_csv = out_dir / "features.csv"
    _write_csv(features_csv, ["feature", "kept_index", "active_tokens", "r2", "pearson", "rms_ratio", "verdict",
                              "identity_r2", "mean_r2", "ols_r2"],
               [[f, i, int(fr["active"][i]), fr["r2"][i], fr["pearson"][i], fr["rms_ratio"][i], verdicts[i],
                 feat_res["identity"]["r2"][i], feat_res["mean"]["r2"][i], feat_res["ols"]["r2"][i]]
                for i, f in enumerate(features.kept)])
    efficiency_csv = out_dir / "efficiency.csv"
    cols = ["rank", "ceiling", "eta_svd_train", "eta_svd_test", "eta_rrr_train", "eta_rrr_test"]
    _write_csv(efficiency_csv, cols, [[table[c][i] for c in cols] for i in range(len(ranks))])
    transport_json = out_dir / "transport.json"
    write_json_atomic(transport_json, {
        "pair": name, "layer_in": L, "layer_out": T,
        "transported_r2": ev.transported_r2, "min_active_tokens": ev.min_active_tokens,
        "transported": [f for f, v in zip(features.kept, verdicts) if v == TRANSPORTED],
        "synthesised": [f for f, v in zip(features.kept, verdicts) if v == SYNTHESISED],
        "no_verdict": [f for f, v in zip(features.kept, verdicts) if v == NO_VERDICT],
    })
    figures = [
        plot_efficiency(fig_dir / f"{name}_efficiency.png", name, table, cca, ev.subspace_fraction,
                        int(metrics["subspace_size"]), params.report.dpi),
        plot_feature_r2(fig_dir / f"{name}_feature_r2.png", name, fr, feat_res["identity"]["r2"], verdicts,
                        ev.transported_r2, params.report.dpi),
        plot_dim_r2(fig_dir / f"{name}_dim_r2.png", name, per_dim, params.report.dpi),
    ]

    _log_mlflow(params, name, metrics, table, [metrics_path, features_csv, efficiency_csv, transport_json, *figures])
    tqdm.write(f"evaluate {name}: R²={metrics['r2']:.4f} (identity {metrics['identity_r2']:.4f}, OLS "
               f"{metrics['ols_r2']:.4f}); transported {int(metrics['n_transported'])}/"
               f"{int(judged.sum())} features; ceiling {ceil:.4f}; η_test {metrics['eta_test']:.3f}; "
               f"subspace {int(metrics['subspace_size'])}")
    return metrics


def _fmt(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return "nan" if not np.isfinite(v) else repr(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return v


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_fmt(v) for v in row])
    tmp.replace(path)


def _log_mlflow(params: Params, name: str, metrics: dict[str, float], table: dict[str, np.ndarray],
                artifacts: list[Path]) -> None:
    import mlflow

    from ..tracking import log_flat_metrics, pair_run

    with pair_run(params, name, "evaluate"):
        log_flat_metrics(metrics)
        for i, r in enumerate(table["rank"]):  # the sweep as step-indexed curves (step = rank)
            log_flat_metrics({f"sweep_{c}": float(table[c][i]) for c in
                              ("ceiling", "eta_svd_train", "eta_svd_test", "eta_rrr_train", "eta_rrr_test")},
                             step=int(r))
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="evaluate")


# --------------------------------------------------------------------------------------------
# Figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_efficiency(path: Path, name: str, table: dict[str, np.ndarray], cca: CCA, fraction: float,
                    size: int, dpi: int) -> Path:
    plt = _plt()
    ranks = table["rank"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.plot(ranks, table["ceiling"], "k-", lw=2.2, label="CCA ceiling(r) (train)")
    styles = {"svd": ("tab:blue", "SVD truncation"), "rrr": ("tab:orange", "reduced-rank regression")}
    for kind, (color, label) in styles.items():
        ax1.plot(ranks, table[f"r2w_{kind}_train"], "-", color=color, marker="o", ms=3, label=f"{label}, train")
        ax1.plot(ranks, table[f"r2w_{kind}_test"], "--", color=color, marker="s", ms=3, label=f"{label}, test")
        ax2.plot(ranks, table[f"eta_{kind}_train"], "-", color=color, marker="o", ms=3, label=f"{label}, train")
        ax2.plot(ranks, table[f"eta_{kind}_test"], "--", color=color, marker="s", ms=3, label=f"{label}, test")
    ax1.axvline(size, color="grey", ls=":", label=f"subspace size {size} ({fraction:.0%} of ceiling)")
    ax1.set(xscale="log", xlabel="rank r", ylabel="whitened R²",
            title=f"{name}: whitened R² vs CCA ceiling (PR {cca.participation_ratio():.1f})")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set(xscale="log", xlabel="rank r", ylabel="η(r) = R²_w(r) / ceiling(r)", title=f"{name}: transport efficiency")
    for ax, keys in ((ax1, ("r2w_svd_train", "r2w_svd_test", "r2w_rrr_train", "r2w_rrr_test", "ceiling")),
                     (ax2, ("eta_svd_train", "eta_svd_test", "eta_rrr_train", "eta_rrr_test"))):
        values = np.concatenate([table[k][np.isfinite(table[k])] for k in keys] + [np.array([0.0, 1.0])])
        if values.min() < -1.0:  # a few very negative SVD-truncation scores would flatten everything else
            ax.set_ylim(-1.05, max(1.05, values.max() + 0.05))
            ax.set_ylabel(ax.get_ylabel() + "  (axis clipped at −1)")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_feature_r2(path: Path, name: str, fr: dict[str, np.ndarray], identity_r2: np.ndarray,
                    verdicts: np.ndarray, threshold: float, dpi: int) -> Path:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    lo = -1.0
    bins = np.linspace(lo, 1.0, 41)
    colors = {TRANSPORTED: "tab:green", SYNTHESISED: "tab:red", NO_VERDICT: "tab:grey"}
    groups, group_colors, group_labels = [], [], []
    for verdict, color in colors.items():
        sel = (verdicts == verdict) & np.isfinite(fr["r2"])
        if sel.any():
            groups.append(np.clip(fr["r2"][sel], lo, 1.0))
            group_colors.append(color)
            group_labels.append(f"{verdict} ({int((verdicts == verdict).sum())})")
            ax2.scatter(np.clip(identity_r2[sel], lo, 1.0), np.clip(fr["r2"][sel], lo, 1.0), s=12, color=color,
                        alpha=0.8, label=verdict)
    if groups:  # stacked, so no verdict hides another
        ax1.hist(groups, bins=bins, color=group_colors, label=group_labels, stacked=True, alpha=0.85)
    ax1.axvline(threshold, color="k", ls="--", label=f"threshold R² = {threshold}")
    ax1.set(xlabel=f"feature R² of the ATO (clipped at {lo})", ylabel="features",
            title=f"{name}: feature-space R² on test (active tokens only)")
    ax2.plot([lo, 1], [lo, 1], "k:", lw=1, label="y = x")
    ax2.axhline(threshold, color="k", ls="--", lw=0.8)
    ax2.set(xlim=(lo - 0.05, 1.05), ylim=(lo - 0.05, 1.05), xlabel=f"feature R² of identity (ŷ = x), clipped at {lo}",
            ylabel=f"feature R² of the ATO, clipped at {lo}", title=f"{name}: ATO vs identity per feature")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_dim_r2(path: Path, name: str, per_dim: dict[str, np.ndarray], dpi: int) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    lo = -1.0
    bins = np.linspace(lo, 1.0, 51)
    styles = {"ato": ("ATO", "tab:blue", "-", 2.6), "ols": ("OLS (α = 0)", "tab:orange", "--", 1.6),
              "identity": ("identity (ŷ = x)", "tab:green", "-", 1.6)}
    for k, (label, color, ls, lw) in styles.items():
        v = per_dim[k][np.isfinite(per_dim[k])]
        if v.size:
            ax.hist(np.clip(v, lo, 1.0), bins=bins, histtype="step", lw=lw, ls=ls, color=color,
                    label=f"{label}: median {np.median(v):.3f}")
    ax.set(xlabel=f"R² per residual dimension (clipped at {lo})", ylabel="dimensions",
           title=f"{name}: per-dimension R² on test")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
