"""The summary's SAE section: each target layer's SAE against its gates, and its own splice cost beside
the operators' causal Δ, naming the weaker of the two ingredients a feature verdict rests on."""

from __future__ import annotations

import math

from ato.artifacts import SaeInfo

from .cells import DASH, fmt, fmt_pm, how_to_read, md_table
from .results import PairResults
from .settings import SummarySettings

Z95 = 1.959964  # two-sided 95 % normal quantile


def _float(v: float | None) -> float:
    return math.nan if v is None else float(v)


def weaker_ingredient(delta_sae: float, se_sae: float, delta_ato: float, half_width_ato: float) -> str:
    """Which splice damages the model more: "SAE", "operator", or "neither resolved" when the 95 %
    interval of Δ_SAE − Δ_ATO contains 0. The two are measured on different sequences (VAL / TEST),
    so their errors add as independent."""
    values = (delta_sae, se_sae, delta_ato, half_width_ato)
    if not all(math.isfinite(v) for v in values):
        return DASH
    difference = delta_sae - delta_ato
    half_width = Z95 * math.hypot(se_sae, half_width_ato / Z95)
    if abs(difference) <= half_width:
        return "neither resolved"
    return "SAE" if difference > 0 else "operator"


def _delta_pm(delta: float | None, spread: float | None) -> str:
    """+0.690 ± 0.013: a signed Δ with an unsigned spread (left out where unknown)."""
    text, spread = fmt(delta, "+.3f"), _float(spread)
    return text + f" ± {spread:.3f}" if text != DASH and math.isfinite(spread) else text


def _layer_row(layer: int, info: SaeInfo | None) -> list[str]:
    if info is None:
        return [str(layer), *[DASH] * 7]
    return [
        str(layer),
        fmt(info.fve_val, ".3f"),
        f"{info.dead_fraction:.1%}",
        fmt_pm(info.ce_recovered_mean, info.ce_recovered_mean_se, ".3f"),
        fmt_pm(info.ce_recovered_zero, info.ce_recovered_zero_se, ".3f"),
        _delta_pm(info.delta_sae, info.delta_sae_se),
        str(info.gates.get("ce_reference", DASH)),
        "pass" if info.reliable else "**UNRELIABLE**: " + "; ".join(info.gate_failures),
    ]


def _pair_row(res: PairResults, info: SaeInfo | None, scope: str) -> list[str]:
    delta_sae, se_sae = (math.nan, math.nan) if info is None else (_float(info.delta_sae), _float(info.delta_sae_se))
    delta_ato, hw_ato = res.causal_delta("ato", scope)[0], res.causal_half_width("ato", scope)
    return [
        res.name,
        str(res.pair.target),
        _delta_pm(delta_sae, Z95 * se_sae),
        _delta_pm(delta_ato, hw_ato),
        weaker_ingredient(delta_sae, se_sae, delta_ato, hw_ato),
    ]


def sae_section(s: SummarySettings, results: list[PairResults]) -> list[str]:
    """The SAE quality table per target layer and the SAE-vs-operator splice table per pair."""
    layers = sorted({res.pair.target for res in results})
    paths = {n: s.layout.sae_report(n) for n in layers}
    infos = {n: SaeInfo.read(path) if path.exists() else None for n, path in paths.items()}
    scope = s.report.causal_scope
    return [
        "## SAEs: quality gates and their own splice cost beside the operators'",
        "",
        "Per target layer, on VAL (reports/sae): fraction of variance explained, dead latents, CE-loss recovered "
        "= (CE_abl − CE_SAE)/(CE_abl − CE_clean) with the SAE's reconstruction spliced in at every non-BOS "
        "position, against mean ablation (ȳ_train, the causal stage's value: `artifacts.read_train_means`) and "
        "zero ablation, and Δ SAE = CE_SAE − CE_clean (nats/token); ± jackknife standard errors over the "
        "evaluation sequences. The gates (`sae.gates`) judge CE-loss recovered against the reference named.",
        "",
        md_table(
            ["layer", "FVE", "dead", "CE recovered vs mean abl.", "… vs zero abl.", "Δ SAE", "gate reference", "gates"],
            [_layer_row(n, infos[n]) for n in layers],
        ),
        "",
        "Per pair: the SAE's Δ (± 95 % half-width, VAL sequences) beside the operator's causal Δ (± 95 % "
        f"half-width, TEST sequences, headline position set, scope `{scope}`) at the same target layer.",
        "",
        md_table(
            ["pair", "SAE layer", "Δ SAE", "Δ ATO", "weaker ingredient"],
            [_pair_row(res, infos[res.pair.target], scope) for res in results],
        ),
        "",
        *how_to_read(
            "A feature verdict compares the operator's prediction with the truth along SAE directions, so it "
            "rests on two approximations of layer L+k: the SAE's reconstruction and the operator's prediction. "
            "Δ is what each costs the model's next-token loss when spliced in. Where the SAE is the weaker "
            "ingredient, its own reconstruction loses more than the operator does: a *synthesised* verdict there "
            "may be a feature the SAE represents poorly rather than computation the operator misses. Mean "
            "ablation keeps the average residual, so CE recovered against it is the stricter share; against zero "
            "ablation every splice looks good. The two Δ come from different sequences; “neither resolved” "
            "means their difference lies within its 95 % interval.",
        ),
    ]
