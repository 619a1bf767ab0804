"""Transport across languages: the compute behind `ato languages` (docs/method.md#languages).

Every language ℓ gets the same treatment. Its text is split by document with the corpus' seeded rule
(`ato.corpus.split_of`): `fit_tokens` of its TRAIN documents and `test_tokens` of its TEST documents.
The reference language (the one in the activation store, `corpus.language`) is read from the store's
train and test splits; every other language is tokenised from its own corpus and streamed through the
model with the collect hooks (`ato.residuals`). Nothing but float64 sufficient statistics is kept:

* fit statistics per pair, in two halves by document parity (`HalfStats`): the whole for the
  per-language ridge map, the halves for the split-half reference of the subspace overlap;
* test statistics per pair, plus feature-space sums along the target layer's kept SAE features for
  the English operator, the language's own map and the identity (`FeatureScorer`).

Scores, each beside its reference: residual R² of the English operator on ℓ beside ℓ's own map, a
pooled map (all languages) and the identity; η on ℓ (its own CCA ceiling) beside η_expected of an
exactly linear map at ℓ's n; the transfer matrix of the per-language maps; the overlap of their update
subspaces beside the same language's split-half overlap and the random-subspace r/d
(`ato.math.transfer`); causal Δ log-perplexity of patching ℓ's text with the English operator, with
intervals over sequences, beside ℓ's mean ablation (`ato.patching.run_conditions`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .accumulate import LayerPairs, LayerStatsAccumulator
from .corpus import Corpus, TokenSequence, sequences_for_split
from .errors import AtoError
from .math.cca import CCA
from .math.linear_reference import linear_reference
from .math.metrics import FeatureR2Accumulator
from .math.ridge import ridge_fit
from .math.stats import PairStats
from .math.transfer import overlap, pooled, principal_cosines, random_overlap, shared_dimension, update_subspaces
from .params import CorpusParams
from .patching import Condition, HeldOut, position_mask, run_conditions
from .residuals import iter_batches
from .scoring import SaeFeatures, sae_active
from .store import ActivationStore

log = logging.getLogger(__name__)

Map = tuple[np.ndarray, np.ndarray]  # (W [d, d], b [d]) float64
FEATURE_PREDICTORS = ("operator", "own", "identity")
_UNLIMITED = 1 << 40  # a token budget no corpus reaches: the causal sequences stop by count instead


class LanguagesError(AtoError):
    """Inputs of the language comparison that do not fit; the message names the language or file."""


# --------------------------------------------------------------------------------------------
# Text of one language


def language_corpus(
    corpus: CorpusParams, language: str, source: str, fit_tokens: int, test_tokens: int
) -> CorpusParams:
    """The reference corpus settings (split rule, max_length, packing) with another source/language and
    the comparison's budgets: train → fit, test → test (val is never read)."""
    return dataclasses.replace(
        corpus, source=source, language=language, tokens={"train": fit_tokens, "val": 1, "test": test_tokens}
    )


def split_sequences(corpus: Corpus, tokenizer: Any, split: str, language: str) -> list[TokenSequence]:
    seqs = list(sequences_for_split(corpus, tokenizer, split))
    if not seqs:
        raise LanguagesError(f"language {language} ({corpus.params.source}): no {split} documents")
    return seqs


def causal_sequences(corpus: Corpus, tokenizer: Any, n: int, seq_len: int, language: str) -> list[TokenSequence]:
    """The first `n` TEST-split sequences of at least `seq_len` tokens, cut to `seq_len` (for the
    reference language the same sequences `ato causal` takes from the store)."""
    unlimited = copy.copy(corpus)  # same documents; only the token budget differs
    unlimited.params = dataclasses.replace(corpus.params, tokens={**corpus.params.tokens, "test": _UNLIMITED})
    out: list[TokenSequence] = []
    for seq in sequences_for_split(unlimited, tokenizer, "test"):
        if len(seq.token_ids) >= seq_len:
            out.append(TokenSequence(*(getattr(seq, f.name)[:seq_len] for f in dataclasses.fields(seq))))
            if len(out) == n:
                return out
    raise LanguagesError(
        f"language {language}: only {len(out)} test sequences have ≥ {seq_len} tokens, "
        f"{n} needed (languages.causal_sequences / languages.causal_seq_len)"
    )


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
            name: {p: FeatureR2Accumulator(len(self.features[T].kept)) for p in FEATURE_PREDICTORS}
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
                for pred in FEATURE_PREDICTORS:
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


# --------------------------------------------------------------------------------------------
# Per-language maps and their scores (from statistics, exact)


@dataclass
class PairFits:
    """One pair's maps: each language's own (whole fit split and its two halves) and the pooled one."""

    own: dict[str, Map]
    halves: dict[str, tuple[Map, Map]]
    pooled: Map
    alpha: dict[str, float]  # the α each language's map was fitted at (and "pooled")


def language_alpha(alpha: float, n_operator: float, n: float, scaling: str) -> float:
    """The English α for a fit on n tokens: the same penalty per token (α·n/n_operator; ridge penalises
    XᵀX, which grows with n) or the same absolute α."""
    return alpha * n / n_operator if scaling == "per_token" else alpha


def fit_pair(
    fit: dict[str, tuple[PairStats, PairStats, PairStats]], alpha: float, n_operator: float, scaling: str
) -> PairFits:
    """Ridge maps of every language (whole and halves) and of all languages pooled, at the English α."""
    own, halves, alphas = {}, {}, {}
    for lang, (whole, even, odd) in fit.items():
        alphas[lang] = language_alpha(alpha, n_operator, whole.n, scaling)
        own[lang] = ridge_fit(whole, alphas[lang])
        halves[lang] = (
            ridge_fit(even, language_alpha(alpha, n_operator, even.n, scaling)),
            ridge_fit(odd, language_alpha(alpha, n_operator, odd.n, scaling)),
        )
    all_rows = pooled([whole for whole, _, _ in fit.values()])
    alphas["pooled"] = language_alpha(alpha, n_operator, all_rows.n, scaling)
    return PairFits(own, halves, ridge_fit(all_rows, alphas["pooled"]), alphas)


def eta_scores(fit: PairStats, test: PairStats, maps: dict[str, Map]) -> dict[str, float]:
    """η of each map on a language: whitened R² on its test rows over the CCA ceiling of its fit rows,
    beside η_expected of an exactly linear map fitted on as many rows (`ato.math.linear_reference.linear_reference`)."""
    cca = CCA.from_stats(fit)
    ceiling = float(cca.ceiling())
    out = {"ceiling": ceiling}
    for name, (W, b) in maps.items():
        out[f"eta_{name}"] = float(cca.whitened_r2(test, W, b)) / ceiling if ceiling > 0 else float("nan")
    d_in, d_out = fit.xtx.shape[0], fit.yty.shape[0]
    lin = linear_reference(out.get("eta_own", float("nan")), cca.rho, int(fit.n), int(test.n), d_in, d_out)
    out["eta_expected"] = lin.eta_expected
    return out


@dataclass
class Overlaps:
    """Update-subspace overlaps of one pair between languages (rows/columns in `languages` order)."""

    write: np.ndarray  # [m, m] mean cos², half-maps; diagonal: the same language's two halves
    read: np.ndarray  # [m, m] the same for the read subspaces
    shared_write: np.ndarray  # [m, m] principal cos² ≥ threshold among the top-r write directions
    shared_dimension: int  # write directions (mean cos² ≥ threshold) shared by every language's whole map
    random: float  # r/d: the overlap of independent random subspaces


def overlap_tables(fits: PairFits, languages: list[str], metric: np.ndarray, rank: int, threshold: float) -> Overlaps:
    """Overlaps of the maps' update subspaces; across languages from half-maps (two per language, all
    four combinations averaged) so that the same-language diagonal is at the same n."""
    bases = {lang: [update_subspaces(W, metric, rank) for W, _ in fits.halves[lang]] for lang in languages}
    m = len(languages)
    write, read, shared = np.zeros((m, m)), np.zeros((m, m)), np.zeros((m, m))
    for i, a in enumerate(languages):
        for j, c in enumerate(languages):
            combos = [(0, 1)] if i == j else [(p, q) for p in range(2) for q in range(2)]
            write[i, j] = np.mean([overlap(bases[a][p][0], bases[c][q][0]) for p, q in combos])
            read[i, j] = np.mean([overlap(bases[a][p][1], bases[c][q][1]) for p, q in combos])
            shared[i, j] = np.mean(
                [np.sum(principal_cosines(bases[a][p][0], bases[c][q][0]) ** 2 >= threshold) for p, q in combos]
            )
    whole = [update_subspaces(fits.own[lang][0], metric, rank)[0] for lang in languages]
    d = metric.shape[0]
    return Overlaps(write, read, shared, shared_dimension(whole, threshold), random_overlap(min(rank, d), d))


# --------------------------------------------------------------------------------------------
# Causal: patch a language's text with the English operator, its own map, and mean ablation


CAUSAL_CONDITIONS = ("operator", "own", "mean")  # per pair; "mean" (ȳ of the language's fit rows) per target


def held_out(seqs: list[TokenSequence]) -> HeldOut:
    """`ato.patching.HeldOut` of equally long BOS-led sequences (offsets: their index)."""
    return HeldOut(
        tokens=torch.tensor([s.token_ids for s in seqs], dtype=torch.long),
        special=torch.tensor([s.special for s in seqs], dtype=torch.bool),
        offsets=list(range(len(seqs))),
        doc_ids=[int(s.doc_ids[0]) for s in seqs],
    )


def _linear(W: np.ndarray, b: np.ndarray, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    Wt = torch.as_tensor(W, dtype=torch.float32, device=device)
    bt = torch.as_tensor(b, dtype=torch.float32, device=device)
    return lambda x: torch.nn.functional.linear(x, Wt, bt)


def _constant(value: np.ndarray, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    v = torch.as_tensor(value, dtype=torch.float32, device=device)
    return lambda x: v.expand(x.shape[0], -1)


def causal_sums(
    model: Any,
    held: HeldOut,
    pairs: LayerPairs,
    maps: dict[str, dict[str, Map]],
    means: dict[int, np.ndarray],
    batch_size: int,
    chunk_rows: int,
    own: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """Per pair: per-sequence NLL sums of clean and of every `CAUSAL_CONDITIONS` patch (residual L+k at
    every position but BOS; "own" only with `own`), over the predictions at/after the first patched
    position, and their token counts ("count"). One traced forward per target layer and batch serves
    its pairs (`ato.patching.run_conditions`); the clean loss is computed once."""
    preds = ("operator", "own") if own else ("operator",)
    device = next(model.parameters()).device
    seq_len = int(held.tokens.shape[1])
    masks, specs = {"all": position_mask("all", seq_len)}, {"all": "all"}
    out: dict[str, dict[str, np.ndarray]] = {}
    clean = None
    for T in sorted({t for _L, t in pairs.values()}):
        names = [name for name, (_L, t) in pairs.items() if t == T]
        conditions = [Condition("mean", None, _constant(means[T], device))]
        conditions += [
            Condition(f"{name}/{pred}", pairs[name][0], _linear(*maps[name][pred], device))
            for name in names
            for pred in preds
        ]
        results, clean = run_conditions(
            model, held, T, conditions, masks, specs, batch_size, chunk_rows, clean_nll=clean
        )
        res = results["all"]
        for name in names:
            out[name] = {
                "clean": _after(res.nll_sum["clean"]),
                "mean": _after(res.nll_sum["mean"]),
                "count": _after(res.count),
                **{pred: _after(res.nll_sum[f"{name}/{pred}"]) for pred in preds},
            }
    return out


def _after(by_scope: dict[str, Any]) -> np.ndarray:
    return np.asarray(by_scope["after"], dtype=np.float64)
