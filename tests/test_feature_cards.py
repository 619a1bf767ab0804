"""Feature cards (`ato.reporting.feature_cards`): built from tiny synthetic select / evaluate / sae
records, rendered to reports/features.html and loaded in headless Chromium (Debian's `chromium`,
installed by scripts/test.sh): what the browser shows — one card per kept feature, the active token
highlighted and HTML-escaped, the verdicts, the UNRELIABLE banner only on the failed SAE's layer."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_report import fake_budget

SCRIPT_TOKEN = "<script>alert('x')</script>"  # must render as text, never as an element
FAILURES = ["dead_fraction 0.31 > 0.05", "fve_val 0.57 < 0.8"]
KEPT = {1: [5, 2, 7], 2: [1, 3]}  # target layer → kept features, in selection order
ACTIVE = {(1, 5): " river", (1, 2): SCRIPT_TOKEN, (1, 7): "\n", (2, 1): " a & b", (2, 3): '"quoted"'}


def _sae_info(layer: int, reliable: bool):
    from ato.artifacts import SaeInfo

    return SaeInfo(
        layer=layer,
        architecture="topk",
        d_in=8,
        d_sae=8,
        store_digest="s0",
        fve_val=0.9 if reliable else 0.57,
        mean_l0=1.0,
        dead_fraction=0.0 if reliable else 0.31,
        n_val_tokens=100,
        hook=f"blocks.{layer}.hook_resid_post",
        source="train",
        reliable=reliable,
        gate_failures=[] if reliable else FAILURES,
    )


def build_cards_project(root: Path):
    """Params with two pairs targeting layers 1 and 2; select, evaluate and sae records for both; the
    layer-2 SAE missed its gates. Returns the params."""
    from ato.artifacts import (
        FeatureContext,
        FeatureContexts,
        FeatureScores,
        FeatureSet,
        Layout,
        TokenContext,
        TransportVerdicts,
    )
    from ato.params import load_params

    pairs = {"L00_k1": {"L": 0, "k": 1}, "L01_k1": {"L": 1, "k": 1}}
    (root / "params.yaml").write_text(yaml.safe_dump({"pairs": pairs}))
    params = load_params(root / "params.yaml")
    layout = Layout.from_params(params)
    for layer, kept in KEPT.items():
        _sae_info(layer, reliable=layer == 1).write(layout.sae_report(layer))
        rate = [0.01 * (f + 1) for f in range(8)]
        scores = FeatureScores(rate, *([[None] * 8] * 5))
        ranked = [*kept, *(f for f in range(8) if f not in kept)]
        FeatureSet(layer=layer, ranked=ranked, kept=kept, scores=scores).write(layout.feature_set(layer))
        entries = []
        for f in kept:
            tokens = ["The", " city", ACTIVE[(layer, f)], " of", " music"]
            ctx = TokenContext(2.5, 0, 3, tokens, 2, "".join(tokens))
            entries.append(FeatureContext(f, [ctx, TokenContext(1.0, 1, 4, ["x", " y"], 1, "x y")], [" sea", "<b>"]))
        FeatureContexts(layer=layer, features=entries).write(layout.feature_contexts(layer))
    TransportVerdicts(
        pair="L00_k1",
        layer_in=0,
        layer_out=1,
        transported_r2=0.5,
        min_active_tokens=20,
        transported=[5],
        synthesised=[2],
        undetermined=[7],  # its interval straddles the threshold
        no_verdict=[],
        sae_reliable=True,
        features=KEPT[1],
        r2=[0.91, 0.12, 0.77],
        identity_r2=[0.40, -0.30, None],
        active_tokens=[120, 45, 33],
        r2_low=[0.85, 0.05, 0.45],
        r2_high=[0.95, 0.2, 0.82],
    ).write(layout.transport("L00_k1"))
    # L00_k1's context budget reads 5 transported, 2 moved by lagged, 7 moved by routed (and two features
    # that are not kept); L01_k1 (target 2) has no evaluate or context output yet: its verdict cells read "—"
    fake_budget("L00_k1", 0, 1).write(layout.context("L00_k1"))
    return params


class DomSummary(HTMLParser):
    """What a test needs from a DOM: elements by class, their text, and every tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.stack: list[tuple[str, set[str], list[str]]] = []
        self.by_class: dict[str, list[str]] = {}
        self.sections: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        classes = set((dict(attrs).get("class") or "").split())
        if tag == "section":
            self.sections.append(dict(attrs).get("id") or "")
        if tag not in {"meta", "br", "link", "img"}:
            self.stack.append((tag, classes, []))

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            name, classes, text = self.stack.pop()
            joined = "".join(text)
            for c in classes:
                self.by_class.setdefault(c, []).append(joined)
            if self.stack:
                self.stack[-1][2].append(joined)
            if name == tag:
                break

    def handle_data(self, data: str) -> None:
        if self.stack:
            self.stack[-1][2].append(data)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: scripts/test.sh installs Debian's `chromium` (apt-get install)")
    return exe


def _browser(*args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def test_cards_html_renders_in_chromium(tmp_path):
    from ato.artifacts import Layout
    from ato.reporting.feature_cards import cards_html, load_cards

    params = build_cards_project(tmp_path)
    layout = Layout.from_params(params)
    layers = load_cards(layout, params.pairs)
    page = tmp_path / "reports" / "features.html"
    page.write_text(cards_html(layers, "tiny"))
    assert "http" not in page.read_text().replace("https://", "").split("<body>")[0]  # no external assets

    dom = DomSummary()
    dom.feed(_browser("--dump-dom", page.as_uri()).stdout)
    assert dom.sections == ["layer-01", "layer-02"]
    assert len(dom.by_class["card"]) == sum(len(k) for k in KEPT.values())  # one card per kept feature
    strongest = [ACTIVE[(n, f)].replace("\n", "↵") for n, kept in KEPT.items() for f in kept]
    assert dom.by_class["active-token"] == [t for s in strongest for t in (s, " y")]  # in card, context order
    assert "script" not in dom.tags  # the script token is text, escaped
    banners = dom.by_class["unreliable"]  # the banner and the failed layer's cards carry the class
    banner = [b for b in banners if b.startswith("UNRELIABLE SAE")]
    assert banner == [f"UNRELIABLE SAE: {'; '.join(FAILURES)} — every number on these cards rests on an SAE "
                      "that missed its quality gates."]  # fmt: skip
    assert len(banners) == 1 + len(KEPT[2])  # only layer 2: its banner and its two cards
    assert dom.by_class["verdict-transported"] == ["transported"]
    assert dom.by_class["verdict-synthesised"] == ["synthesised"]
    assert dom.by_class["verdict-undetermined"] == ["undetermined"]
    card_text = dom.by_class["card"][0]
    assert "feature 5" in card_text and "0.910" in card_text and "0.400" in card_text and "6.00%" in card_text
    assert "[0.85, 0.95]" in card_text
    # the budget's reading across maps, with the union map's feature R² and its interval
    assert dom.by_class["context-transported"] == ["transported"]
    assert dom.by_class["context-moved"] == ["moved by lagged", "moved by routed"]
    assert "0.920 [0.88, 0.95]" in card_text
    assert "L01_k1" in dom.by_class["card"][3] and "—" in dom.by_class["card"][3]  # no evaluate output yet


def test_cards_screenshot_shows_the_banner(tmp_path):
    """The rendered pixels: the red UNRELIABLE banner is on screen and the cards are laid out."""
    from PIL import Image

    from ato.artifacts import Layout
    from ato.plotting import UNRELIABLE_COLOUR
    from ato.reporting.feature_cards import cards_html, load_cards

    params = build_cards_project(tmp_path)
    layers = load_cards(Layout.from_params(params), params.pairs)
    page = tmp_path / "page.html"
    page.write_text(cards_html(layers[::-1], "tiny"))  # the unreliable layer first: the banner near the top
    shot = tmp_path / "shot.png"
    _browser(f"--screenshot={shot}", "--window-size=1200,900", "--hide-scrollbars", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    red = np.array([int(UNRELIABLE_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(pixels - red).sum(1) < 30).sum() > 2000  # a banner-sized red area
    assert len(np.unique(pixels, axis=0)) > 50  # text and cards, not a blank page


def test_cards_markdown_is_compact_and_escaped(tmp_path):
    from ato.artifacts import Layout
    from ato.reporting import feature_cards

    params = build_cards_project(tmp_path)
    layers = feature_cards.load_cards(Layout.from_params(params), params.pairs)
    text = "\n".join(feature_cards.cards_markdown(layers))
    assert f"> **UNRELIABLE SAE: {'; '.join(FAILURES)}.**" in text and text.count("UNRELIABLE SAE") == 1
    assert "**\\<script\\>alert('x')\\</script\\>**" in text  # markdown- and HTML-safe
    assert "transported (R² 0.910 [0.85, 0.95] vs id 0.400)" in text
    assert "synthesised (R² 0.120 [0.05, 0.20] vs id -0.300)" in text
    assert (
        "undetermined (R² 0.770 [0.45, 0.82] vs id —); across maps: moved by routed (R² context 0.640 [0.55, 0.70])"
        in text
    )
    assert "[features.html](features.html)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| feature")]
    assert len(rows) == sum(len(k) for k in KEPT.values())
    # missing inputs are listed, not fatal
    (tmp_path / "data" / "features" / "layer_02_contexts.json").unlink()
    again = feature_cards.load_cards(Layout.from_params(params), params.pairs)
    assert again[1].cards == [] and any("layer_02_contexts.json" in m for m in again[1].missing)
    assert feature_cards.SUMMARY_CARDS >= 1
