"""Streams of residual rows (the store's, or a forward pass with the collect hooks) and the float64
statistics they leave: fit statistics in two halves by document, test statistics and feature-space sums."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from ato.accumulate import LayerPairs, LayerStatsAccumulator
from ato.corpus import TokenSequence
from ato.evaluate.features import SaeFeatures, sae_active
from ato.kinds import keys_for
from ato.languages.inputs import Inputs, LanguagesError, Map, Text
from ato.languages.maps import PairFits
from ato.math.metrics import FeatureR2Accumulator
from ato.math.stats import PairStats
from ato.params import Params
from ato.residuals import iter_batches
from ato.store import ActivationStore


def feature_predictors() -> tuple[str, ...]:
    """operator, own, identity: the predictors of the feature scores (`ato.kinds`, asked at each use)."""
    return keys_for("languages_features")


# --------------------------------------------------------------------------------------------
# Streams of residual rows


@dataclass
class Chunk:
    """Residual rows of some tokens, with per-token flags."""

    rows: dict[int, np.ndarray]  # layer → [m, d] float32
    special: np.ndarray  # [m] bool: BOS and other special tokens
    doc_id: np.ndarray  # [m] int

    def without_special(self) -> Chunk:
        keep = ~self.special
        return Chunk({k: v[keep] for k, v in self.rows.items()}, self.special[keep], self.doc_id[keep])


def forward_chunks(
    model: Any, seqs: list[TokenSequence], layers: list[int], pad_id: int, batch_size: int, desc: str
) -> Iterator[Chunk]:
    """One chunk per forward batch (`ato.residuals.iter_batches`: the collect hooks)."""
    device = next(model.parameters()).device
    with tqdm(total=sum(len(s.token_ids) for s in seqs), unit="tok", unit_scale=True, desc=desc, leave=False) as bar:
        for idx, acts in iter_batches(model, seqs, layers, pad_id, device, batch_size):
            special = np.concatenate([np.asarray(seqs[i].special, dtype=bool) for i in idx])
            doc_id = np.concatenate([np.asarray(seqs[i].doc_ids, dtype=np.int64) for i in idx])
            bar.update(len(special))
            yield Chunk(acts, special, doc_id)


def store_chunks(
    store: ActivationStore, split: str, layers: list[int], max_tokens: int, chunk_tokens: int
) -> Iterator[Chunk]:
    """The first `max_tokens` rows (BOS included, as a token budget counts them) of a store split."""
    left = max_tokens
    for chunk in store.iter_chunks(split, layers, chunk_tokens, include_special=True, with_tokens=True):
        take = min(left, len(chunk["special"]))
        yield Chunk(
            {k: chunk[k][:take] for k in layers}, chunk["special"][:take], chunk["doc_id"][:take].astype(np.int64)
        )
        left -= take
        if left <= 0:
            return


def _chunks(params: Params, inputs: Inputs, text: Text, split: str, lang: str) -> Any:
    layers = sorted({layer for lt in inputs.pairs.values() for layer in lt})
    lp = params.languages
    if text.fit is None:  # the reference language: the store's own split
        budget = lp.fit_tokens if split == "train" else lp.test_tokens
        return store_chunks(inputs.store, split, layers, budget, params.stats.chunk_tokens)
    seqs = text.fit if split == "train" else text.test
    assert seqs is not None
    pad = inputs.tokenizer.pad_token_id if inputs.tokenizer.pad_token_id is not None else 0
    return forward_chunks(inputs.model, seqs, layers, pad, lp.batch_size, f"languages {lang} {split}")


# --------------------------------------------------------------------------------------------
# Statistics


class HalfStats:
    """Fit statistics of every pair in two halves by document parity (even / odd doc_id)."""

    def __init__(self, pairs: LayerPairs, d: int, include_bos: bool):
        self.halves = (LayerStatsAccumulator(pairs, d), LayerStatsAccumulator(pairs, d))
        self.include_bos = include_bos
        self.documents: set[int] = set()

    def update(self, chunk: Chunk) -> None:
        chunk = chunk if self.include_bos else chunk.without_special()
        self.documents.update(np.unique(chunk.doc_id).tolist())
        for parity, acc in enumerate(self.halves):
            rows = chunk.doc_id % 2 == parity
            if rows.any():
                acc.update({layer: x[rows] for layer, x in chunk.rows.items() if layer in acc.layers})

    def pair(self, name: str) -> tuple[PairStats, PairStats, PairStats]:
        """(whole, even half, odd half) statistics of one pair."""
        even, odd = (acc.pair_stats(name) for acc in self.halves)
        return even.merge(odd), even, odd


@dataclass
class FeatureScorer:
    """Feature-space sums on a language's test tokens: per pair and predictor, along the target layer's
    kept SAE features, over the tokens where the SAE says the feature is active on the true y."""

    features: dict[int, SaeFeatures]  # target layer → its SAE and kept features
    pairs: LayerPairs
    maps: dict[str, dict[str, Map]]  # pair → predictor ("operator", "own") → map; identity is implicit
    acc: dict[str, dict[str, FeatureR2Accumulator]] = field(init=False)

    def __post_init__(self) -> None:
        self.acc = {
            name: {p: FeatureR2Accumulator(len(self.features[T].kept)) for p in feature_predictors()}
            for name, (_L, T) in self.pairs.items()
        }

    def update(self, rows: dict[int, np.ndarray]) -> None:
        for T, feats in self.features.items():
            y = rows[T]
            active = sae_active(feats.sae, y, feats.kept)
            U = feats.directions
            a = y.astype(np.float64) @ U
            for name, (L, target) in self.pairs.items():
                if target != T:
                    continue
                x = rows[L].astype(np.float64)
                for pred in self.acc[name]:
                    y_hat = x if pred == "identity" else x @ self.maps[name][pred][0].T + self.maps[name][pred][1]
                    self.acc[name][pred].update_projected(a, y_hat @ U, active)


@dataclass
class TestPass:
    """What one language's test stream leaves behind."""

    stats: dict[str, PairStats]
    features: dict[str, dict[str, dict[str, np.ndarray]]]  # pair → predictor → FeatureR2Accumulator.result()
    documents: int


def test_pass(chunks: Iterator[Chunk], pairs: LayerPairs, d: int, scorer: FeatureScorer, include_bos: bool) -> TestPass:
    """Test statistics and feature-space sums of one language, in one pass over its test rows."""
    acc = LayerStatsAccumulator(pairs, d)
    documents: set[int] = set()
    for chunk in chunks:
        chunk = chunk if include_bos else chunk.without_special()
        if not len(chunk.special):
            continue
        documents.update(np.unique(chunk.doc_id).tolist())
        acc.update({layer: chunk.rows[layer] for layer in acc.layers})
        scorer.update(chunk.rows)
    if acc.n == 0:
        raise LanguagesError("a test split left no tokens after excluding BOS/special tokens")
    features = {name: {p: a.result() for p, a in preds.items()} for name, preds in scorer.acc.items()}
    return TestPass(acc.all_pair_stats(), features, len(documents))


def feature_summary(result: dict[str, np.ndarray], min_active: int, transported_r2: float) -> dict[str, float]:
    """Median feature R² and transported fraction over the features active on ≥ min_active test tokens."""
    judged = result["active"] >= min_active
    r2 = result["r2"][judged]
    r2 = r2[np.isfinite(r2)]
    return {
        "median": float(np.median(r2)) if r2.size else float("nan"),
        "transported_fraction": float(np.mean(r2 >= transported_r2)) if r2.size else float("nan"),
        "n_judged": float(judged.sum()),
    }


def fit_statistics(params: Params, inputs: Inputs, lang: str, text: Text) -> HalfStats:
    acc = HalfStats(inputs.pairs, inputs.store.d_model, params.stats.include_bos)
    for chunk in _chunks(params, inputs, text, "train", lang):
        acc.update(chunk)
    return acc


def test_statistics(params: Params, inputs: Inputs, lang: str, text: Text, fits: dict[str, PairFits]) -> TestPass:
    maps = {name: {"operator": inputs.operators[name], "own": fits[name].own[lang]} for name in inputs.pairs}
    scorer = FeatureScorer(inputs.features, inputs.pairs, maps)
    chunks = _chunks(params, inputs, text, "test", lang)
    return test_pass(chunks, inputs.pairs, inputs.store.d_model, scorer, params.stats.include_bos)
