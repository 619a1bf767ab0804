"""Feature cards of `ato report`: one card per kept feature of every target layer — its top activating
contexts with the active token highlighted, its activation rate beside the SAE's sparse regime (mean
L0 / d_sae), the verdict (transported / synthesised / undetermined / no verdict, from the R² interval) of
every pair that targets the layer, and the feature R² of the ATO with its interval beside the identity
map's; where the pair's context budget judged the feature, its reading across map kinds (transported /
moved, by which map / synthesised / undetermined) with the union map's feature R². Rendered twice: a
compact markdown section of summary.md and a self-contained HTML page (reports/features.html: inline
CSS, no external assets, every token HTML-escaped). An SAE that missed its quality gates puts an
UNRELIABLE banner on its layer's cards; missing inputs are listed, not fatal.

Inputs (records): `FeatureSet` and `FeatureContexts` of select, `SaeInfo` (reports/sae) of sae,
`TransportVerdicts` of evaluate, `ContextBudget` of context (its `features`).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from ato.artifacts import (
    ContextBudget,
    FeatureContexts,
    FeatureSet,
    Layout,
    SaeInfo,
    TokenContext,
    TransportVerdicts,
)
from ato.params import Pair

SUMMARY_CARDS = 16  # cards per layer in summary.md (the HTML page has them all)
SUMMARY_WINDOW = 6  # tokens each side of the active token in summary.md
VERDICT_LABELS = {
    "transported": "transported",
    "synthesised": "synthesised",
    "undetermined": "undetermined",
    "no_verdict": "no verdict",
}


@dataclass
class PairVerdict:
    """One pair's judgement of one feature."""

    verdict: str  # transported | synthesised | undetermined | no_verdict
    r2: float  # feature R² of the ATO (NaN: undefined)
    identity_r2: float  # feature R² of ŷ = x
    active_tokens: int  # test tokens where the feature is active
    r2_low: float = math.nan  # the interval of r2 (TransportVerdicts.interval)
    r2_high: float = math.nan
    context: ContextReading | None = None  # the budget's reading across map kinds (None: not judged there)


@dataclass
class ContextReading:
    """The context budget's reading of one feature (`ContextFeatureVerdicts`, one entry)."""

    verdict: str  # transported | moved | synthesised | undetermined
    by: str  # moved: the first context map reaching the threshold; else ""
    r2: float  # feature R² of the union map (test)
    r2_low: float  # its interval
    r2_high: float

    @property
    def label(self) -> str:
        return f"moved by {self.by}" if self.verdict == "moved" and self.by else self.verdict


@dataclass
class FeatureCard:
    feature: int
    rank: int  # 1-based position in FeatureSet.kept
    activation_rate: float
    contexts: list[TokenContext]
    top_logit_tokens: list[str]
    verdicts: dict[str, PairVerdict | None]  # pair → verdict; None when the pair has no evaluate output


@dataclass
class LayerCards:
    """The cards of one target layer and what qualifies them."""

    layer: int
    pairs: list[str]  # pairs whose target is this layer
    reliable: bool  # the SAE passed its quality gates (False when unknown)
    failures: list[str]  # SaeInfo.gate_failures, or why there is no gate result
    target_rate: float  # mean L0 / d_sae on the scored tokens (NaN without scores)
    cards: list[FeatureCard] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # input files that do not exist yet

    @property
    def banner(self) -> str | None:
        return None if self.reliable else "UNRELIABLE SAE: " + ("; ".join(self.failures) or "no gate result")


# --------------------------------------------------------------------------------------------
# Loading


def _float(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _gate(layout: Layout, layer: int) -> tuple[bool, list[str], list[str]]:
    path = layout.sae_report(layer)
    if not path.exists():
        return False, [f"no SAE quality report ({path.name} missing)"], [str(path)]
    info = SaeInfo.read(path)
    return bool(info.reliable), list(info.gate_failures), []


def _pair_verdicts(layout: Layout, names: list[str]) -> tuple[dict[str, dict[int, PairVerdict]], list[str]]:
    out, missing = {}, []
    for name in names:
        path = layout.transport(name)
        if not path.exists():
            missing.append(str(path))
            continue
        tv = TransportVerdicts.read(path)
        label = {f: "transported" for f in tv.transported} | {f: "synthesised" for f in tv.synthesised}
        label |= {f: "undetermined" for f in tv.undetermined} | {f: "no_verdict" for f in tv.no_verdict}
        no_interval: list[float | None] = [None] * len(tv.features)
        low, high = tv.r2_low or no_interval, tv.r2_high or no_interval
        out[name] = {
            f: PairVerdict(label.get(f, "no_verdict"), _float(r2), _float(ir2), int(n), _float(lo), _float(hi))
            for f, r2, ir2, n, lo, hi in zip(tv.features, tv.r2, tv.identity_r2, tv.active_tokens, low, high)
        }
        for f, v in label.items():  # a record without per-feature numbers still gives the verdict
            out[name].setdefault(f, PairVerdict(v, math.nan, math.nan, -1))
    return out, missing


def _add_context_readings(layout: Layout, verdicts: dict[str, dict[int, PairVerdict]], pairs: list[str]) -> None:
    """Attach each pair's budget reading to its features' verdicts. A missing budget adds nothing (the
    summary lists it among the missing inputs); a feature only the budget judged gets a card row too."""
    for name in pairs:
        path = layout.context(name)
        if not path.exists():
            continue
        fv = ContextBudget.read(path).features
        by_feature = verdicts.setdefault(name, {})
        for f, verdict, by, r2, lo, hi in zip(
            fv.features, fv.verdict, fv.by, fv.context_r2, fv.context_r2_low, fv.context_r2_high
        ):
            entry = by_feature.setdefault(f, PairVerdict("no_verdict", math.nan, math.nan, -1))
            entry.context = ContextReading(verdict, by, _float(r2), _float(lo), _float(hi))


def load_layer(layout: Layout, layer: int, pairs: list[str]) -> LayerCards:
    """The cards of one target layer; a missing input leaves its part empty and is listed."""
    reliable, failures, missing = _gate(layout, layer)
    verdicts, missing_pairs = _pair_verdicts(layout, pairs)
    _add_context_readings(layout, verdicts, pairs)
    lc = LayerCards(layer, pairs, reliable, failures, math.nan, missing=missing + missing_pairs)
    fs_path, ctx_path = layout.feature_set(layer), layout.feature_contexts(layer)
    for path in (fs_path, ctx_path):
        if not path.exists():
            lc.missing.append(str(path))
    if not (fs_path.exists() and ctx_path.exists()):
        return lc
    fs, ctx = FeatureSet.read(fs_path), FeatureContexts.read(ctx_path)
    rates = [_float(r) for r in fs.scores.activation_rate]
    finite = [r for r in rates if math.isfinite(r)]
    lc.target_rate = sum(finite) / len(rates) if rates and finite else math.nan
    by_feature = {entry.feature: entry for entry in ctx.features}
    for rank, f in enumerate(fs.kept, start=1):
        entry = by_feature.get(f)
        lc.cards.append(
            FeatureCard(
                feature=f,
                rank=rank,
                activation_rate=rates[f] if 0 <= f < len(rates) else math.nan,
                contexts=entry.contexts if entry else [],
                top_logit_tokens=entry.top_logit_tokens if entry else [],
                verdicts={p: verdicts[p].get(f) if p in verdicts else None for p in pairs},
            )
        )
    return lc


def load_cards(layout: Layout, pairs: dict[str, Pair]) -> list[LayerCards]:
    """Cards of every target layer (ascending), each with the pairs that target it."""
    targets = sorted({p.target for p in pairs.values()})
    return [load_layer(layout, t, [n for n, p in pairs.items() if p.target == t]) for t in targets]


# --------------------------------------------------------------------------------------------
# Shared formatting


def _pct(v: float) -> str:
    return f"{v:.2%}" if math.isfinite(v) else "—"


def _num(v: float, spec: str = ".3f") -> str:
    return format(v, spec) if math.isfinite(v) else "—"


def _rate_text(card: FeatureCard, target: float) -> str:
    ratio = card.activation_rate / target if math.isfinite(target) and target > 0 else math.nan
    return f"{_pct(card.activation_rate)} ({_num(ratio, '.2g')}× mean L0/d_sae)"


def _short(path: str) -> str:
    """The last three parts of a path: enough to tell which pair or layer a missing file belongs to."""
    return "/".join(Path(path).parts[-3:])


def _visible(token: str) -> str:
    """Whitespace a reader can see: newlines as ↵, tabs as →."""
    return token.replace("\n", "↵").replace("\t", "→")


def _window(ctx: TokenContext, width: int | None = None) -> tuple[list[str], str, list[str]]:
    """(tokens before, the active token, tokens after), at most `width` each side."""
    i = ctx.max_index
    lo = 0 if width is None else max(0, i - width)
    hi = len(ctx.tokens) if width is None else min(len(ctx.tokens), i + width + 1)
    return ctx.tokens[lo:i], ctx.tokens[i] if 0 <= i < len(ctx.tokens) else "", ctx.tokens[i + 1 : hi]


# --------------------------------------------------------------------------------------------
# Markdown (summary.md)

_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|#"})


def _md_text(tokens: list[str]) -> str:
    return _visible("".join(tokens)).translate(_MD_SPECIAL)


def _md_context(ctx: TokenContext) -> str:
    before, token, after = _window(ctx, SUMMARY_WINDOW)
    text = _md_text([token])
    core = text.strip() or "␣"  # markdown bold cannot start or end with a space: keep them outside
    lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :] if text.strip() else ""
    return f"{_md_text(before)}{lead}**{core}**{trail}{_md_text(after)}".replace("\n", " ")


def _md_verdict(v: PairVerdict | None) -> str:
    if v is None:
        return "—"
    text = f"{VERDICT_LABELS.get(v.verdict, v.verdict)} (R² {_r2_text(v)} vs id {_num(v.identity_r2)})"
    c = v.context
    return text if c is None else f"{text}; across maps: {c.label} (R² context {_r2_text(c)})"


def _interval_text(v: PairVerdict | ContextReading) -> str:
    return f"[{v.r2_low:.2f}, {v.r2_high:.2f}]" if math.isfinite(v.r2_low) and math.isfinite(v.r2_high) else "—"


def _r2_text(v: PairVerdict | ContextReading) -> str:
    """A feature R² with its interval, e.g. 0.512 [0.47, 0.55]."""
    interval = _interval_text(v)
    return _num(v.r2) if interval == "—" else f"{_num(v.r2)} {interval}"


def cards_markdown(layers: list[LayerCards], page: str = "features.html") -> list[str]:
    """The compact cards section of summary.md: per layer, the first SUMMARY_CARDS kept features with
    their strongest context; the HTML page has every card."""
    out = [
        "## Feature cards (kept SAE features of each target layer)",
        "",
        f"Per kept feature: activation rate beside the SAE's sparse regime (mean L0/d_sae), the verdict of "
        f"every pair that targets the layer with the feature R² of the ATO [its interval over test documents] "
        f"vs the identity map ŷ = x (test): *transported* / *synthesised* only when the interval lies wholly "
        f"on one side of the threshold, *undetermined* when it straddles it; across maps (the context "
        f"budget, where it judged the feature): *transported* (the ATO reaches the threshold), *moved by* the "
        f"first context map that does, *synthesised* (none does) or *undetermined*, with the union map's "
        f"feature R² [interval]; and its strongest activating context (train) with the active token in "
        f"**bold**. First {SUMMARY_CARDS} per layer in selection order; every card, with all its contexts: "
        f"[{page}]({page}).",
        "",
    ]
    for lc in layers:
        out += [f"### Layer {lc.layer} ({len(lc.cards)} kept features; mean L0/d_sae = {_pct(lc.target_rate)})", ""]
        if lc.banner:
            out += [
                f"> **{lc.banner}.** Every feature-level number of this layer (these cards, the transported and "
                f"synthesised counts of {', '.join(lc.pairs)}) rests on an SAE that missed its quality gates.",
                "",
            ]
        if lc.missing:
            out += [f"Missing input(s): {', '.join(f'`{_short(m)}`' for m in lc.missing)}.", ""]
        if not lc.cards:
            continue
        header = ["feature", "rate", *lc.pairs, "strongest context"]
        out += ["| " + " | ".join(header) + " |", "|" + "|".join([":--"] + ["--:"] + [":--"] * (len(header) - 2)) + "|"]
        for card in lc.cards[:SUMMARY_CARDS]:
            cells = [
                str(card.feature),
                _rate_text(card, lc.target_rate),
                *[_md_verdict(card.verdicts.get(p)) for p in lc.pairs],
                _md_context(card.contexts[0]) if card.contexts else "—",
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


# --------------------------------------------------------------------------------------------
# HTML (reports/features.html)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f5f5f7;color:#1d1d1f}
header,section.layer{max-width:1100px;margin:0 auto;padding:12px 20px}
h1{font-size:1.4em}h2{font-size:1.2em;border-bottom:2px solid #ccc;padding-bottom:4px}
.banner{padding:10px 14px;border-radius:6px;margin:10px 0;font-weight:600}
.banner.unreliable{background:#b00020;color:#fff}.banner.missing{background:#fff3cd;color:#5c4400}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px 12px}
.card.unreliable{border:2px solid #b00020}
.card h3{margin:0 0 4px 0;font-size:1.05em}.meta{color:#555;font-size:.9em;margin:2px 0 6px}
table.verdicts{border-collapse:collapse;font-size:.88em;margin:4px 0 8px}
table.verdicts td,table.verdicts th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}
table.verdicts td:first-child,table.verdicts th:first-child{text-align:left}
.verdict-transported{color:#1a7f37;font-weight:600}.verdict-synthesised{color:#b35900;font-weight:600}
.verdict-no_verdict{color:#777}.verdict-undetermined{color:#555;font-style:italic}
table.verdicts tr.across td{text-align:left;border-bottom:1px solid #ddd;padding-top:0}
.context-transported{color:#1a7f37}.context-moved{color:#1f5fbf;font-weight:600}
.context-synthesised{color:#b35900;font-weight:600}.context-undetermined{color:#555;font-style:italic}
ol.contexts{margin:0;padding-left:1.4em;font-size:.9em}
ol.contexts li{margin:3px 0}
.ctx{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
.act{color:#666;font-size:.85em;margin-right:6px}
mark.active-token{background:#ffd54f;border-radius:3px;padding:0 1px;font-weight:700}
.promotes{font-size:.85em;color:#444;margin-top:6px}
.promotes code{background:#eef;border-radius:3px;padding:0 3px;margin-right:3px}
nav a{margin-right:12px}
"""


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _html_context(ctx: TokenContext) -> str:
    before, token, after = _window(ctx)
    return (
        f'<li><span class="act">{ctx.activation:.3g}</span><span class="ctx">{_e(_visible("".join(before)))}'
        f'<mark class="active-token">{_e(_visible(token))}</mark>{_e(_visible("".join(after)))}</span></li>'
    )


def _html_verdicts(card: FeatureCard, pairs: list[str]) -> str:
    rows = []
    for p in pairs:
        v = card.verdicts.get(p)
        if v is None:
            rows.append(f"<tr><td>{_e(p)}</td><td>—</td><td>—</td><td>—</td><td>—</td><td>—</td></tr>")
            continue
        label = _e(VERDICT_LABELS.get(v.verdict, v.verdict))
        rows.append(
            f'<tr><td>{_e(p)}</td><td class="verdict verdict-{_e(v.verdict)}">{label}</td><td>{_num(v.r2)}</td>'
            f"<td>{_e(_interval_text(v))}</td><td>{_num(v.identity_r2)}</td>"
            f"<td>{v.active_tokens if v.active_tokens >= 0 else '—'}</td></tr>{_html_context_row(v.context)}"
        )
    head = (
        "<tr><th>pair</th><th>verdict</th><th>R² ATO</th><th>interval</th><th>R² identity</th>"
        "<th>active test tokens</th></tr>"
    )
    return f'<table class="verdicts">{head}{"".join(rows)}</table>'


def _html_context_row(c: ContextReading | None) -> str:
    """A row under the pair's: the budget's reading and the union map's feature R² (none without one)."""
    if c is None:
        return ""
    return (
        f'<tr class="across"><td></td><td colspan="5">across maps: <span class="context context-{_e(c.verdict)}">'
        f"{_e(c.label)}</span> · R² context {_e(_r2_text(c))}</td></tr>"
    )


def _html_card(card: FeatureCard, lc: LayerCards) -> str:
    cls = "card" if lc.reliable else "card unreliable"
    promotes = "".join(f"<code>{_e(_visible(t))}</code>" for t in card.top_logit_tokens)
    contexts = "".join(_html_context(c) for c in card.contexts) or "<li>no context recorded</li>"
    return (
        f'<article class="{cls}" id="L{lc.layer:02d}-f{card.feature}" data-layer="{lc.layer}" '
        f'data-feature="{card.feature}">'
        f"<h3>feature {card.feature} <small>(#{card.rank} of layer {lc.layer})</small></h3>"
        f'<p class="meta">activation rate {_e(_rate_text(card, lc.target_rate))}</p>'
        f"{_html_verdicts(card, lc.pairs)}"
        f'<ol class="contexts">{contexts}</ol>'
        + (f'<p class="promotes">promotes: {promotes}</p>' if promotes else "")
        + "</article>"
    )


def _html_layer(lc: LayerCards) -> str:
    parts = [
        f'<section class="layer" id="layer-{lc.layer:02d}">',
        f"<h2>Layer {lc.layer}: {len(lc.cards)} kept features (mean L0/d_sae = {_pct(lc.target_rate)}; pairs "
        f"{_e(', '.join(lc.pairs))})</h2>",
    ]
    if lc.banner:
        parts.append(
            f'<div class="banner unreliable" role="alert">{_e(lc.banner)} — every number on these cards rests '
            "on an SAE that missed its quality gates.</div>"
        )
    if lc.missing:
        names = ", ".join(_e(_short(m)) for m in lc.missing)
        parts.append(f'<div class="banner missing">Missing input(s): {names}</div>')
    parts.append('<div class="cards">' + "".join(_html_card(c, lc) for c in lc.cards) + "</div></section>")
    return "\n".join(parts)


def cards_html(layers: list[LayerCards], model: str) -> str:
    """The whole page: no external assets, every token HTML-escaped."""
    nav = " ".join(f'<a href="#layer-{lc.layer:02d}">layer {lc.layer}</a>' for lc in layers)
    intro = (
        "One card per kept SAE feature: its strongest activating contexts on train text (the active token "
        "highlighted, activation on the left), its activation rate beside the SAE's sparse regime "
        "(mean L0/d_sae), and for every pair (L → L+k) that targets the layer the verdict on test text — "
        "<em>transported</em> when the interval of its R² (resampling test documents) lies wholly at or above "
        "evaluate.transported_r2, <em>synthesised</em> when wholly below, <em>undetermined</em> when it "
        "straddles the threshold — with the feature R² of the ATO and its interval beside the identity map ŷ = x. "
        "<em>Across maps</em> (the pair's context budget, where it judged the feature): <em>transported</em> when "
        "the ATO reaches the threshold by the same interval rule, <em>moved by</em> the first context map that "
        "does (lagged, prefix, routed: it reads layer L at earlier positions), <em>synthesised</em> when none "
        "does, <em>undetermined</em> otherwise; beside it the union map's feature R² and its interval."
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>ato — feature cards</title>",
            f"<style>{CSS}</style></head><body>",
            f"<header><h1>ato — feature cards</h1><p>Model: {_e(model)}.</p><p>{intro}</p><nav>{nav}</nav></header>",
            *(_html_layer(lc) for lc in layers),
            "</body></html>",
            "",
        ]
    )
