"""Transport across languages: the pure math of `ato.math.transfer` on planted maps, and `ato languages`
end to end on a tiny random model with two extra "languages", checked against independent
computations (raw-row ridge fits, one forward per sequence, a full-forward patch)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.linalg import subspace_angles

from ato.math.cca import CCA
from ato.math.ridge import r2_from_stats, ridge_fit
from ato.math.stats import PairStats
from ato.math.transfer import (
    canonical_tracking,
    overlap,
    pooled,
    principal_cosines,
    random_overlap,
    residual_scatter,
    shared_dimension,
    transfer_matrix,
    update_subspaces,
    variance_split_r2,
)
from conftest import WORDS, make_prepared_model

D = 24


def _orthonormal(rng: np.random.Generator, d: int, r: int) -> np.ndarray:
    return np.linalg.qr(rng.normal(size=(d, r)))[0]


def _language(rng: np.random.Generator, W: np.ndarray, n: int, scale: np.ndarray, noise: float = 0.3) -> PairStats:
    """Rows of one synthetic 'language': its own input distribution, y = W x + noise."""
    x = rng.normal(size=(n, W.shape[1])) * scale + rng.normal(size=W.shape[1])
    return PairStats.from_data(x, x @ W.T + noise * rng.normal(size=(n, W.shape[0])))


# --------------------------------------------------------------------------------------------
# ato.math.transfer


def test_principal_cosines_match_scipy_and_overlap_is_their_mean_square():
    rng = np.random.default_rng(0)
    A, B = _orthonormal(rng, D, 5), _orthonormal(rng, D, 5)
    cos = principal_cosines(A, B)
    assert np.allclose(np.sort(cos), np.sort(np.cos(subspace_angles(A, B))), atol=1e-10)
    assert overlap(A, B) == pytest.approx(float(np.mean(cos**2)), abs=1e-12)
    assert overlap(A, A @ np.linalg.qr(rng.normal(size=(5, 5)))[0]) == pytest.approx(1.0)  # same span, other basis
    # random r-dim subspaces overlap r/d on average
    draws = [overlap(_orthonormal(rng, D, 4), _orthonormal(rng, D, 4)) for _ in range(400)]
    assert np.mean(draws) == pytest.approx(random_overlap(4, D), abs=0.01)


def test_shared_dimension_counts_the_directions_in_every_subspace():
    rng = np.random.default_rng(1)
    Q = _orthonormal(rng, D, 3 + 3 * 4)
    common = Q[:, :3]
    bases = [np.linalg.qr(np.hstack([common, Q[:, 3 + 4 * i : 7 + 4 * i]]))[0] for i in range(3)]
    assert shared_dimension(bases, 0.9) == 3
    assert shared_dimension(bases[:1], 0.9) == 7  # one subspace shares all of itself
    assert shared_dimension([_orthonormal(rng, D, 7) for _ in range(3)], 0.9) == 0


def test_planted_shared_map_overlaps_fully_and_different_maps_do_not():
    """Two languages with different input statistics and the SAME map: their ridge maps' update
    subspaces coincide (overlap ≈ 1, far above r/d); a language with another map overlaps at chance."""
    rng = np.random.default_rng(2)
    low_rank = _orthonormal(rng, D, 3) @ np.diag([3.0, 2.0, 1.5]) @ _orthonormal(rng, D, 3).T
    W_shared = np.eye(D) + low_rank
    other = np.eye(D) + _orthonormal(rng, D, 3) @ np.diag([3.0, 2.0, 1.5]) @ _orthonormal(rng, D, 3).T
    a = _language(rng, W_shared, 20000, np.logspace(0, 0.5, D))
    b = _language(rng, W_shared, 20000, np.logspace(0.5, 0, D))
    c = _language(rng, other, 20000, np.ones(D))
    from ato.math.transfer import input_metric

    S = input_metric(pooled([a, b, c]))
    (wa, ra), (wb, rb), (wc, rc) = (update_subspaces(ridge_fit(s, 1e-3)[0], S, 3) for s in (a, b, c))
    assert overlap(wa, wb) > 0.99 and overlap(ra, rb) > 0.99
    assert overlap(wa, wc) < 0.5 and overlap(ra, rc) < 0.5
    assert shared_dimension([wa, wb], 0.9) == 3 and shared_dimension([wa, wb, wc], 0.9) < 3


def _planted_language(seed: int, n: int = 6000, d: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x with scales spanning 1 … 30; y = A x + noise, so y's variance sits in a few directions."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.geomspace(1, 30, d)
    A = np.eye(d) + 0.5 * rng.normal(size=(d, d))
    return x, x @ A.T + rng.normal(size=(n, d)), A


def test_canonical_tracking_is_bounded_where_whitened_r2_is_not():
    """The true map tracks ≈ 1; a map that is wrong everywhere stays in [0, 1] while its whitened R² (η's
    numerator) is far below 0; a gain error costs R², not tracking; the score matches raw rows."""
    x, y, A = _planted_language(0)
    test = PairStats.from_data(x, y)
    b = np.zeros(len(A))
    wrong = np.random.default_rng(1).normal(size=A.shape) * 5
    tracking = canonical_tracking(test, {"true": (A, b), "wrong": (wrong, b), "gain": (3 * A, b + 7)})
    assert tracking["true"] == pytest.approx(1.0, abs=0.01)
    cca = CCA.from_stats(test)
    assert float(cca.whitened_r2(test, wrong, b)) < -1
    assert 0 <= tracking["wrong"] < 0.5
    assert tracking["gain"] == pytest.approx(tracking["true"], rel=1e-9)
    assert r2_from_stats(test, 3 * A, b + 7)["r2_weighted"] < 0
    a = cca.wy @ cca.u  # the raw-row computation of Σ_j corr²(v_j, v̂_j) / Σ_j ρ_j²
    v, v_hat = (y - y.mean(0)) @ a, (x @ wrong.T) @ a
    r2 = [np.corrcoef(v[:, j], v_hat[:, j])[0, 1] ** 2 for j in range(a.shape[1])]
    assert tracking["wrong"] == pytest.approx(sum(r2) / np.sum(cca.rho**2), rel=1e-6)


def test_variance_split_finds_a_map_that_errs_only_in_low_variance_directions():
    """A map equal to the truth on y's top principal directions and wrong on the rest: R²_w on the top
    directions as the true map's, on the rest far below it; the residual scatter is exact."""
    x, y, A = _planted_language(2)
    test = PairStats.from_data(x, y)
    b = np.zeros(len(A))
    _, axes = np.linalg.eigh(np.cov(y.T))
    low = axes[:, :6]  # the six lowest-variance principal directions of y
    spoiled = A + low @ np.random.default_rng(3).normal(size=(6, len(A))) * 3  # changes ŷ only along `low`
    top, split = variance_split_r2(test, {"true": (A, b), "spoiled": (spoiled, b)}, 0.9)
    assert 1 <= top <= 6
    assert split["spoiled"][0] == pytest.approx(split["true"][0], abs=1e-6)
    assert split["true"][1] > 0.5 and split["spoiled"][1] < split["true"][1] - 1
    residual = y - x @ spoiled.T - b
    assert np.allclose(residual_scatter(test, spoiled, b), residual.T @ residual, rtol=1e-9, atol=1e-6)


def test_transfer_matrix_diagonal_is_each_own_fit_and_off_diagonal_the_carried_map():
    rng = np.random.default_rng(3)
    Ws = [np.eye(D) + 0.3 * rng.normal(size=(D, D)) for _ in range(3)]
    fits, tests, raw = [], [], []
    for W in Ws:
        x = rng.normal(size=(3000, D))
        y = x @ W.T + 0.5 * rng.normal(size=(3000, D))
        fits.append(ridge_fit(PairStats.from_data(x[:2000], y[:2000]), 1.0))
        tests.append(PairStats.from_data(x[2000:], y[2000:]))
        raw.append((x[2000:], y[2000:]))
    m = transfer_matrix(fits, tests)
    for i, (W, b) in enumerate(fits):
        for j, (x, y) in enumerate(raw):
            y_hat = x @ W.T + b
            per_dim = 1 - ((y - y_hat) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
            assert m["r2"][i, j] == pytest.approx(per_dim.mean(), abs=1e-9)
    diag, off = np.diag(m["r2"]), m["r2"][~np.eye(3, dtype=bool)]
    assert diag.min() > off.max()  # each language's own map is best on its own data
    assert np.allclose(diag, [r2_from_stats(t, *f)["r2"] for t, f in zip(tests, fits)])


# --------------------------------------------------------------------------------------------
# The stage on a tiny model


def _jsonl(path: Path, words: list[str], n_docs: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n_docs):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(10, 30)))}) + "\n")
    return path


LANG_PARAMS = {
    "sources": {"fr-fr": "fr.jsonl", "es-es": "es.jsonl"},
    "fit_tokens": 400,
    "test_tokens": 200,
    "overlap_rank": 4,
    "causal_sequences": 4,
    "causal_seq_len": 10,
    "causal_own": True,
    "batch_size": 4,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project after collect, with ridge operators, TopK SAEs and feature sets for its pairs,
    and two more 'languages' (other word distributions of the same vocabulary)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    from ato.accumulate import accumulate_local
    from ato.artifacts import FeatureScores, FeatureSet, Layout, SaeInfo
    from ato.operators import save_operator
    from ato.params import load_params
    from ato.stages import collect
    from ato.store import ActivationStore
    from conftest import TINY_PARAMS, make_corpus

    root = tmp_path_factory.mktemp("languages")
    make_prepared_model(root / "models" / "base")
    make_corpus(root / "corpus.jsonl", n_docs=200)
    _jsonl(root / "fr.jsonl", WORDS[:20], 200, seed=1)
    _jsonl(root / "es.jsonl", WORDS[15:], 200, seed=2)
    raw = {**TINY_PARAMS, "languages": LANG_PARAMS}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(root / "params.yaml")
    collect.main(params)
    store, layout = ActivationStore.open(params.path("store")), Layout.from_params(params)
    pairs = {n: (p.L, p.target) for n, p in params.pairs.items()}
    train = accumulate_local(store, "train", pairs, 256, include_bos=False)
    info = json.loads((root / "models" / "base" / "ato_model.json").read_text())
    for name, (L, T) in pairs.items():
        W, b = ridge_fit(train[name], 10.0)
        config = {"model": "tiny", "model_digest": info["weights_digest"], "layer_in": L, "layer_out": T}
        config |= {"alpha": 10.0, "method": "ridge", "d_model": store.d_model, "n_train_tokens": int(train[name].n)}
        save_operator(layout.operator(name), W, b, {**config, "store_digest": store.digest})
    for T in sorted({T for _, T in pairs.values()}):
        sae = TopKSAE(TopKSAEConfig(d_in=store.d_model, d_sae=48, k=4, dtype="float32", device="cpu"))
        sae.save_model(layout.sae(T))
        failures = [] if T != 3 else ["fve_val 0.5 < 0.7"]  # layer 3's SAE "failed its gates"
        hook = f"blocks.{T}.hook_resid_post"
        info = SaeInfo(T, "topk", store.d_model, 48, store.digest, 0.5, 4.0, 0.0, 100, hook, "train")
        dataclasses.replace(info, reliable=not failures, gate_failures=failures).write(layout.sae_info(T))
        no_scores = FeatureScores(**{f.name: [] for f in dataclasses.fields(FeatureScores)})
        FeatureSet(layer=T, ranked=list(range(48)), kept=list(range(0, 48, 3)), scores=no_scores).write(
            layout.feature_set(T)
        )
    return root


@pytest.fixture(scope="module")
def report(project: Path):
    from ato.params import load_params
    from ato.stages import languages

    return languages.main(load_params(project / "params.yaml"))


def test_outputs_exist_and_read_back(project: Path, report):
    from ato.artifacts import LanguageReport, Layout
    from ato.params import load_params

    params = load_params(project / "params.yaml")
    layout = Layout.from_params(params)
    again = LanguageReport.read(layout.languages)
    assert again.languages == ["en-us", *params.languages.sources] == report.languages
    assert set(again.languages) == {"en-us", "fr-fr", "es-es"}
    assert set(again.pairs) == {"L00_k1", "L01_k2"}
    metrics = json.loads(layout.languages_metrics.read_text())
    assert metrics["L00_k1"]["fr-fr"]["r2_operator"] == pytest.approx(
        report.pairs["L00_k1"].scores["fr-fr"].r2_operator
    )
    # R²_w beside every R², in the metrics and the table
    assert metrics["L00_k1"]["fr-fr"]["r2w_identity"] == pytest.approx(
        report.pairs["L00_k1"].scores["fr-fr"].r2w_identity
    )
    rows = layout.languages_scores.read_text().splitlines()
    assert len(rows) == 1 + 2 * 3
    for predictor in ("operator", "recentred", "own", "pooled", "identity"):
        assert f"r2_{predictor},r2w_{predictor}" in rows[0]
    for kind in ("transfer", "overlap", "scores"):
        assert layout.languages_figure(kind).stat().st_size > 10_000
    # the SAE of layer 3 failed its gates: its pair's feature numbers are flagged, the other's not
    assert not again.pairs["L01_k2"].feature_reliable and again.pairs["L00_k1"].feature_reliable
    assert any("layer 3" in note for note in again.notes)


def test_transfer_diagonal_equals_each_own_fit_recomputed_from_raw_rows(project: Path, report):
    """The reference language's own map, refitted from the store's raw rows (first fit_tokens of train,
    BOS excluded) and scored on the first test_tokens of test, gives the matrix diagonal; a non-reference
    language's own map, from one forward per sequence, likewise."""
    from ato.corpus import Corpus, sequences_for_split
    from ato.languages import language_alpha, language_corpus
    from ato.models import load_prepared
    from ato.operators import load_operator
    from ato.params import CorpusParams, load_params
    from ato.residuals import capture_batch
    from ato.store import ActivationStore

    params = load_params(project / "params.yaml")
    store = ActivationStore.open(params.path("store"))
    model, tok, _ = load_prepared(params.path("model_dir"), "cpu")
    L, T = 1, 3
    pair = report.pairs["L01_k2"]

    def store_rows(split: str, budget: int) -> tuple[np.ndarray, np.ndarray]:
        chunks = list(store.iter_chunks(split, [L, T], 10**6, include_special=True, with_tokens=True))
        rows = {k: np.concatenate([c[k] for c in chunks])[:budget] for k in (L, T, "special")}
        keep = ~rows["special"]
        return rows[L][keep].astype(np.float64), rows[T][keep].astype(np.float64)

    def forward_rows(split: str, corpus: Corpus) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for seq in sequences_for_split(corpus, tok, split):
            acts = capture_batch(model, [seq], [L, T], 0, torch.device("cpu"))
            keep = ~np.asarray(seq.special)
            xs.append(acts[L][keep])
            ys.append(acts[T][keep])
        return np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64)

    W_op = load_operator(params.path("operators") / "L01_k2").W.double().numpy()
    lp = params.languages
    fr = Corpus(language_corpus(CorpusParams(**dataclasses.asdict(params.corpus)), "fr-fr", "fr.jsonl",
                                lp.fit_tokens, lp.test_tokens), project)  # fmt: skip
    data = {"en-us": (store_rows("train", lp.fit_tokens), store_rows("test", lp.test_tokens))}
    data["fr-fr"] = (forward_rows("train", fr), forward_rows("test", fr))
    for lang in ["en-us", "fr-fr"]:
        i = report.languages.index(lang)
        (x, y), (xt, yt) = data[lang]
        alpha = language_alpha(pair.alpha_operator, pair.n_operator_tokens, len(x), "per_token")
        assert pair.scores[lang].alpha == pytest.approx(alpha)
        W, b = ridge_fit(PairStats.from_data(x, y), alpha)
        y_hat = xt @ W.T + b
        r2 = np.mean(1 - ((yt - y_hat) ** 2).sum(0) / ((yt - yt.mean(0)) ** 2).sum(0))
        assert pair.transfer_r2[i][i] == pytest.approx(r2, abs=1e-5)
        assert pair.scores[lang].r2_own == pytest.approx(pair.transfer_r2[i][i], abs=1e-9)
        assert report.sources[lang].n_fit_tokens == len(x) and report.sources[lang].n_test_tokens == len(xt)
        # the English W with this language's intercept (its fit rows' means), scored on its test rows
        b_own = y.mean(0) - W_op @ x.mean(0)
        y_rc = xt @ W_op.T + b_own
        r2_rc = np.mean(1 - ((yt - y_rc) ** 2).sum(0) / ((yt - yt.mean(0)) ** 2).sum(0))
        assert pair.scores[lang].r2_recentred == pytest.approx(r2_rc, abs=1e-5)


def test_every_number_stands_beside_its_reference(report):
    for pair in report.pairs.values():
        for lang in report.languages:
            s = pair.scores[lang]
            scores = (s.r2_operator, s.r2_recentred, s.r2_own, s.r2_pooled, s.r2_identity, s.r2w_own)
            for value in (*scores, s.r2w_top_operator, s.r2w_rest_operator, s.r2w_top_own, s.r2w_rest_own):
                assert np.isfinite(value)
            for value in (s.tracking_operator, s.tracking_own):
                assert 0 <= value <= 1
            assert s.top_directions >= 1
            for whole, top, rest in (
                (s.r2w_operator, s.r2w_top_operator, s.r2w_rest_operator),
                (s.r2w_own, s.r2w_top_own, s.r2w_rest_own),
            ):
                assert min(top, rest) - 1e-9 <= whole <= max(top, rest) + 1e-9  # R²_w is their SST-weighted mean
            assert s.r2_own == pytest.approx(
                pair.transfer_r2[report.languages.index(lang)][report.languages.index(lang)]
            )
            assert s.delta_operator.lo <= s.delta_operator.mean <= s.delta_operator.hi
            assert s.delta_mean.lo <= s.delta_mean.mean <= s.delta_mean.hi
            assert s.delta_own.lo <= s.delta_own.mean <= s.delta_own.hi  # languages.causal_own is on here
            assert np.isfinite(s.feature_r2_operator) or s.n_judged_features == 0
        m = np.asarray(pair.overlap_write)
        assert m.shape == (3, 3) and np.all((m >= 0) & (m <= 1 + 1e-9))
        assert pair.overlap_random == pytest.approx(4 / 32)


def test_causal_delta_matches_a_full_forward_patch(project: Path, report):
    """Δ log-ppl of the operator patch on the reference language equals a full forward with the
    patching hook (`ato.causal.patched_token_nll`) on the same sequences."""
    from ato.causal import patched_token_nll, token_nll
    from ato.corpus import Corpus
    from ato.languages import causal_sequences
    from ato.models import load_prepared
    from ato.operators import load_operator
    from ato.params import CorpusParams, load_params

    params = load_params(project / "params.yaml")
    lp = params.languages
    model, tok, _ = load_prepared(params.path("model_dir"), "cpu")
    corpus = Corpus(CorpusParams(**dataclasses.asdict(params.corpus)), project)
    seqs = causal_sequences(corpus, tok, lp.causal_sequences, lp.causal_seq_len, "en-us")
    ids = torch.tensor([s.token_ids for s in seqs])
    op = load_operator(params.path("operators") / "L00_k1")
    patch = torch.ones_like(ids, dtype=torch.bool)
    patch[:, 0] = False
    with torch.inference_mode():
        clean = token_nll(model, ids, 64)
        patched = patched_token_nll(model, ids, 0, 1, patch, lambda x: op(x), 64)
    delta = float((patched - clean)[:, 1:].sum() / clean[:, 1:].numel())  # scope "after": from position 1
    assert report.pairs["L00_k1"].scores["en-us"].delta_operator.mean == pytest.approx(delta, abs=1e-4)


@pytest.mark.parametrize(
    "sources, message",
    [
        ({"fr-fr": "missing.jsonl"}, "languages.sources.fr-fr"),
        ({"xx-yy": "embedded"}, "languages.sources.xx-yy.*no embedded corpus for language 'xx-yy'"),
    ],
)
def test_a_bad_language_source_is_named_before_any_forward_pass(project: Path, sources, message, monkeypatch):
    from ato.languages import LanguagesError, streams
    from ato.params import load_params
    from ato.stages import languages

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["languages"]["sources"] = sources
    (project / "bad.yaml").write_text(yaml.safe_dump(raw))
    calls = {"n": 0}
    monkeypatch.setattr(streams, "iter_batches", lambda *a, **k: calls.update(n=calls["n"] + 1) or iter(()))
    with pytest.raises(LanguagesError, match=message):
        languages.main(load_params(project / "bad.yaml"))
    assert calls["n"] == 0


def test_a_failure_after_the_first_output_leaves_every_output_as_it_was(project: Path, report, tmp_path, monkeypatch):
    """languages' six files lie in two directories: a failure while drawing the last figure (the five
    others already written) changes none of the files of an earlier run and adds none."""
    from ato.artifacts import Layout
    from ato.params import load_params
    from ato.stages import languages

    params = load_params(project / "params.yaml")
    layout = dataclasses.replace(Layout.from_params(params), reports=tmp_path / "reports")
    outputs = [layout.languages, layout.languages_metrics, layout.languages_scores]
    outputs += [layout.languages_figure(kind) for kind in ("transfer", "overlap", "scores")]
    earlier = outputs[::2]  # an earlier run's files (in both directories); the others are new
    for path in earlier:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"earlier {path.name}")
    written: list[Path] = []

    def fail_on_the_last_figure(path: Path, *args, **kwargs):
        written.extend(p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-") and p.is_file())
        raise RuntimeError("disk full")

    monkeypatch.setattr("ato.plotting.languages.plot_scores", fail_on_the_last_figure)
    with pytest.raises(RuntimeError, match="disk full"):
        languages.write_outputs(layout, params, report)

    assert len(written) == 5  # the failure came after every other output was written (to temporaries)
    assert [p.read_text() for p in earlier] == [f"earlier {p.name}" for p in earlier]
    assert not any(p.exists() for p in outputs if p not in earlier)
    assert not [p for p in tmp_path.rglob(".tmp-*")]
