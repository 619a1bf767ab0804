"""reports/headline.json (`HeadlineMetrics`): the few numbers per pair and per target layer's SAE that
`dvc metrics diff` and `dvc exp show` compare; everything else stays in the per-stage reports."""

from __future__ import annotations

import math

from ato.artifacts import HeadlineMetrics, Layout, PairHeadline, SaeHeadline, SaeInfo

from .results import PairResults


def pair_headline(res: PairResults, scope: str) -> PairHeadline:
    """One pair's headline numbers; NaN where its evaluate, causal or context output is missing."""
    flat, budget = res.m.flat(), res.context
    return PairHeadline(
        **{name: flat[key] for name, key in PairHeadline.copied_keys().items()},
        d_ato=res.causal_delta("ato", scope)[0],
        d_ato_hw=res.causal_half_width("ato", scope),
        recovered=res.recovered(scope)[0],
        recovered_mean_abl=res.recovered(scope, "train_mean")[0],
        recovered_identity=res.recovered(scope, "identity")[0],
        moved=math.nan if budget is None else budget.moved.value,
        computed=math.nan if budget is None else budget.computed.value,
    )


def sae_headline(info: SaeInfo | None) -> SaeHeadline:
    """An SAE's quality against its gates; every value NaN without a quality report."""
    if info is None:
        return SaeHeadline()
    ce_rec = info.ce_recovered_mean if info.gates.get("ce_reference") == "mean" else info.ce_recovered_zero
    return SaeHeadline(
        fve=info.fve_val,
        dead=info.dead_fraction,
        ce_rec=math.nan if ce_rec is None else ce_rec,
        reliable=float(info.reliable),
    )


def build_headline(layout: Layout, results: list[PairResults], scope: str) -> HeadlineMetrics:
    """Every pair's headline (params order) and the SAE gates of every target layer (ascending)."""
    targets = sorted({res.pair.target for res in results})
    reports = {t: layout.sae_report(t) for t in targets}
    return HeadlineMetrics(
        pairs={res.name: pair_headline(res, scope) for res in results},
        saes={t: sae_headline(SaeInfo.read(path) if path.exists() else None) for t, path in reports.items()},
    )
