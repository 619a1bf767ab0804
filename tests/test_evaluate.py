"""End-to-end `ato evaluate` on a tiny hand-built project: store, statistics, operator, TopK SAE,
feature list — checked against independent numpy/sklearn computations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import r2_score

from ato.artifacts import write_json_atomic
from ato.errors import AtoError
from ato.math.ridge import ridge_fit
from ato.math.stats import PairStats
from ato.operators import save_operator
from ato.params import load_params
from ato.store import STORE_FORMAT, layer_key, write_part

D = 8
PAIR = "L00_k1"
SEQ = 10
N_SEQ = {"train": 60, "val": 20, "test": 30}
KEPT = [0, 2, 5, 7, 9, 11, 13]
STORE_DIGEST = "store-digest-0"
MODEL_DIGEST = "model-digest-0"


def _split_data(rng: np.random.Generator, n_seq: int, W: np.ndarray) -> dict[str, np.ndarray]:
    """Sequences of SEQ tokens; position 0 is BOS with a huge, constant residual (must be excluded)."""
    n = n_seq * SEQ
    position = np.tile(np.arange(SEQ), n_seq).astype(np.int32)
    special = position == 0
    x = rng.normal(size=(n, D)) * np.logspace(0, 1, D) + 2.0
    y = x @ W.T + rng.normal(size=(n, D)) * 0.7 + 1.0
    x[special], y[special] = 500.0, -800.0
    return {
        layer_key(0): x.astype(np.float32),
        layer_key(1): y.astype(np.float32),
        "token_id": rng.integers(4, 50, size=n).astype(np.int32),
        "doc_id": np.repeat(np.arange(n_seq), SEQ).astype(np.int32),
        "position": position,
        "special": special,
    }


def build_project(root: Path, include_bos: bool = False) -> dict:
    """Write params, store (+ manifest), stats, operator, SAE and features; return the raw data."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    from ato.artifacts import FeatureScores, FeatureSet, Layout, PairStatsMeta, write_pair_stats

    params_raw = {
        "pairs": {PAIR: {"L": 0, "k": 1}},
        "stats": {"include_bos": include_bos, "chunk_tokens": 64},
        "evaluate": {"n_ranks": 5, "min_active_tokens": 3, "transported_r2": 0.5, "null_replicates": 5},
        "report": {"dpi": 60},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params_raw))
    params = load_params(root / "params.yaml")
    layout = Layout.from_params(params)

    rng = np.random.default_rng(0)
    W_true = 0.8 * np.eye(D) + 0.3 * rng.normal(size=(D, D))
    store = params.path("store")
    data, splits = {}, {}
    for split, n_seq in N_SEQ.items():
        arrays = _split_data(rng, n_seq, W_true)
        data[split] = arrays
        half = (n_seq // 2) * SEQ  # two parts per split: exercises the part loop
        names, counts = [], []
        for i, sl in enumerate((slice(0, half), slice(half, None))):
            write_part(store / split, i, {k: v[sl] for k, v in arrays.items()}, chunk_tokens=16)
            names.append(f"part-{i:05d}.zarr")
            counts.append(len(arrays["token_id"][sl]))
        splits[split] = {
            "tokens": n_seq * SEQ,
            "special_tokens": n_seq,
            "sequences": n_seq,
            "documents": n_seq,
            "parts": names,
            "part_tokens": counts,
        }
    write_json_atomic(
        store / "manifest.json",
        {
            "format": STORE_FORMAT,
            "model": {
                "name": "tiny",
                "source": "tiny",
                "model_type": "gemma3_text",
                "weights_digest": MODEL_DIGEST,
                "n_layers": 2,
                "d_model": D,
            },
            "tokenizer": {"bos_token_id": 2, "pad_token_id": 0, "vocab_size": 64, "special_ids": [0, 1, 2]},
            "layers": [0, 1],
            "d_model": D,
            "dtype": "float32",
            "hook": "decoder_block_output",
            "corpus": {
                "source": "synthetic",
                "kind": "synthetic",
                "digest": "c0",
                "split_rule": "doc",
                "split_seed": 0,
                "split_fractions": {"train": 0.6, "val": 0.2, "test": 0.2},
                "max_length": SEQ,
                "packing": False,
            },
            "splits": splits,
            "fingerprint": "f0",
            "content_digest": STORE_DIGEST,
        },
    )

    stats = {}
    for split, arrays in data.items():
        keep = np.ones(len(arrays["special"]), bool) if include_bos else ~arrays["special"]
        x, y = arrays[layer_key(0)][keep], arrays[layer_key(1)][keep]
        stats[split] = PairStats.from_data(x, y)
        # stats always saved without BOS: with include_bos=True the evaluate check must refuse them
        s = PairStats.from_data(arrays[layer_key(0)][~arrays["special"]], arrays[layer_key(1)][~arrays["special"]])
        meta = PairStatsMeta(
            store_digest=STORE_DIGEST, include_bos=False, split=split, pair=PAIR, layer_in=0, layer_out=1
        )
        write_pair_stats(layout.pair_stats(split, PAIR), s, meta)

    W, b = ridge_fit(stats["train"], 1.0)
    save_operator(
        params.path("operators") / PAIR,
        W,
        b,
        {
            "model": "tiny",
            "model_digest": MODEL_DIGEST,
            "layer_in": 0,
            "layer_out": 1,
            "alpha": 1.0,
            "method": "ridge",
            "d_model": D,
            "n_train_tokens": int(stats["train"].n),
            "store_digest": STORE_DIGEST,
        },
    )

    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=16, k=3, dtype="float32", device="cpu"))
    sae.save_model(params.path("sae_dir") / "layer_01")
    # live (active in select's scan): every feature but 15, and the kept ones whatever their rate says
    rates: list[float | None] = [0.2] * 15 + [0.0]
    rates[KEPT[0]] = None
    scores = FeatureScores(rates, *([] for _ in range(5)))
    FeatureSet(layer=1, ranked=KEPT + [1, 3], kept=KEPT, scores=scores).write(layout.feature_set(1))
    return {"params": params, "data": data}


def _test_xy(data: dict) -> tuple[np.ndarray, np.ndarray]:
    arrays = data["test"]
    keep = ~arrays["special"]
    return arrays[layer_key(0)][keep].astype(np.float64), arrays[layer_key(1)][keep].astype(np.float64)


def test_evaluate_end_to_end(tmp_path: Path):
    import mlflow
    from sae_lens import SAE

    from ato.operators import load_operator
    from ato.stages import evaluate

    built = build_project(tmp_path)
    params = built["params"]
    evaluate.main(params, PAIR)

    reports = tmp_path / "reports"
    metrics = json.loads((reports / "metrics" / f"{PAIR}.json").read_text())
    for key in (
        "r2",
        "r2_weighted",
        "mse",
        "cosine",
        "identity_r2",
        "mean_r2",
        "ols_r2",
        "feature_r2_median",
        "n_transported",
        "n_synthesised",
        "ceiling_full",
        "participation_ratio",
        "subspace_size",
    ):
        assert key in metrics, key
    assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in metrics.values())

    x, y = _test_xy(built["data"])
    op = load_operator(tmp_path / "models" / "operators" / PAIR)
    y_hat = x @ op.W.double().numpy().T + op.b.double().numpy()
    assert metrics["n_test_tokens"] == len(x) == N_SEQ["test"] * (SEQ - 1)  # BOS excluded
    assert metrics["n_val_tokens"] == N_SEQ["val"] * (SEQ - 1)
    assert metrics["identity_r2"] == pytest.approx(r2_score(y, x), rel=1e-6)
    assert metrics["r2"] == pytest.approx(r2_score(y, y_hat), rel=1e-6)
    assert metrics["r2_weighted"] == pytest.approx(r2_score(y, y_hat, multioutput="variance_weighted"), rel=1e-6)
    assert metrics["r2"] > 0.8 and metrics["ols_r2"] > 0.8 and metrics["mean_r2"] < 0.05
    assert metrics["eta_train"] <= 1 + 1e-9  # the ceiling is a true in-sample bound (no ridge on Σxx)
    assert 1 <= metrics["subspace_size"] <= D

    # feature table: one row per kept feature; R² recomputed independently with the SAE's encoder
    with open(reports / "evaluate" / PAIR / "features.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["feature"]) for r in rows] == KEPT
    sae = SAE.load_from_disk(str(tmp_path / "models" / "sae" / "layer_01"))
    import torch

    with torch.no_grad():
        acts = sae.encode(torch.as_tensor(y, dtype=torch.float32)).numpy()
    W_dec = sae.W_dec.detach().double().numpy()
    for row in rows:
        f = int(row["feature"])
        m = acts[:, f] > 0
        assert int(row["active_tokens"]) == m.sum()
        if m.sum() >= 2:
            u = W_dec[f] / np.linalg.norm(W_dec[f])
            a, ah = y[m] @ u, y_hat[m] @ u
            assert float(row["r2"]) == pytest.approx(
                1 - ((a - ah) ** 2).sum() / ((a - a.mean()) ** 2).sum(), rel=1e-6, abs=1e-9
            )
        low, high = float(row["r2_low"] or "nan"), float(row["r2_high"] or "nan")
        expected = (
            "no_verdict" if m.sum() < 3
            else "transported" if low >= 0.5
            else "synthesised" if high < 0.5
            else "undetermined"
        )  # fmt: skip
        assert row["verdict"] == expected
        if m.sum() >= 3 and np.isfinite(low):  # NaN: absent from too many document resamples
            assert low <= float(row["r2"]) <= high
    assert any(row["r2_low"] for row in rows)
    transport = json.loads((reports / "evaluate" / PAIR / "transport.json").read_text())
    verdict_lists = ("transported", "synthesised", "undetermined", "no_verdict")
    assert sorted(sum((transport[v] for v in verdict_lists), [])) == sorted(KEPT)
    for verdict in verdict_lists:
        assert metrics.get(f"n_{verdict}", 0) == len(transport[verdict])
    assert "document_bootstrap" in transport["interval"]
    # every live feature is judged the same way; the kept ones keep their verdict among them
    live = transport["live_features"]
    assert live == list(range(15)) and metrics["live_n_features"] == len(live)  # 15 is dead
    live_verdict = dict(zip(live, transport["live_verdicts"]))
    assert [live_verdict[int(r["feature"])] for r in rows] == [r["verdict"] for r in rows]
    judged = [f for f, v in live_verdict.items() if v != "no_verdict"]
    assert metrics["live_n_judged"] == len(judged) > metrics["n_features"] - metrics.get("n_no_verdict", 0)
    f = next(f for f in judged if f not in KEPT)  # a live feature outside the kept set, recomputed
    m, u = acts[:, f] > 0, W_dec[f] / np.linalg.norm(W_dec[f])
    a, ah = y[m] @ u, y_hat[m] @ u
    r2_live = transport["live_r2"][live.index(f)]
    assert r2_live == pytest.approx(1 - ((a - ah) ** 2).sum() / ((a - a.mean()) ** 2).sum(), rel=1e-6)
    assert (
        metrics["transported_fraction_low"] <= metrics["transported_fraction"] <= metrics["transported_fraction_high"]
    )
    assert metrics["live_feature_r2_median_low"] <= metrics["live_feature_r2_median"]

    with open(reports / "evaluate" / PAIR / "efficiency.csv") as fh:
        eff = list(csv.DictReader(fh))
    assert list(eff[0]) == [
        "rank",
        "ceiling",
        "eta_svd_train",
        "eta_svd_test",
        "eta_rrr_train",
        "eta_rrr_test",
        "eta_svd_test_shift_removed",
        "eta_rrr_test_shift_removed",
    ]
    ranks = [int(r["rank"]) for r in eff]
    assert ranks[0] == 1 and ranks[-1] == D and len(ranks) >= 5
    assert all(float(r["eta_rrr_train"]) == pytest.approx(1.0, abs=1e-9) for r in eff)
    assert all(float(r["eta_svd_train"]) <= 1 + 1e-9 for r in eff)
    # shift removed: η(r) + (−R²_w(0))/ceiling(r), the same R²_w(0) at every rank
    shift = [(float(r["eta_rrr_test_shift_removed"]) - float(r["eta_rrr_test"])) * float(r["ceiling"]) for r in eff]
    assert shift == pytest.approx([shift[0]] * len(shift), abs=1e-9) and shift[0] > 0

    for fig in ("efficiency", "feature_r2", "dim_r2"):
        assert (reports / "figures" / f"{PAIR}_{fig}.png").stat().st_size > 5000

    mlflow.set_tracking_uri(params.mlflow_uri())
    runs = mlflow.search_runs(
        experiment_names=["ato"], filter_string=f"tags.`ato.pair` = '{PAIR}'", output_format="list"
    )
    assert len(runs) == 1
    logged = runs[0].data.metrics
    assert {k: pytest.approx(v) for k, v in metrics.items()} == {k: logged[k] for k in metrics}  # the same metrics
    assert runs[0].data.tags["ato.stage.evaluate"] == "done"
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "sweep_eta_rrr_test_shift_removed")
    assert sorted(m.step for m in history) == ranks  # the per-rank series: step-indexed, not in the file


def test_metrics_file_is_headline_first_and_each_number_beside_its_reference(tmp_path: Path):
    """The metrics file: numbers only (no digests, no per-rank series), a readable count, the headline
    keys first in `PairMetrics.HEADLINE` order; held-out subspace statistics beside their null, η beside
    its linear reference — and the record reads back by attribute."""
    from ato.artifacts import PairMetrics
    from ato.evaluate import shared_null
    from ato.math.heldout import cca_null
    from ato.stages import evaluate

    built = build_project(tmp_path)
    params = built["params"]
    shared_null.cache_clear()
    returned = evaluate.evaluate_pair(params, PAIR)
    path = tmp_path / "reports" / "metrics" / f"{PAIR}.json"
    text = path.read_text()
    metrics = json.loads(text)
    assert not any(isinstance(v, (str, bool, list, dict)) or v is None for v in metrics.values())
    assert "format" not in metrics and not any("_r0" in k or "digest" in k for k in metrics)
    assert 30 <= len(metrics) <= 110  # directions count (8 keys), learning curve, feature verdicts (26)
    assert list(metrics)[: len(PairMetrics.HEADLINE)] == list(PairMetrics.HEADLINE)
    assert text.index('"r2"') < text.index('"eta_test"') < text.index('"heldout_subspace_size"')

    m = PairMetrics.read(path)
    assert m == returned and m.ato.r2 == metrics["r2"] and m.identity.r2 == metrics["identity_r2"]
    for stat in ("heldout_subspace_size", "heldout_pr"):
        observed, null = getattr(m, stat), getattr(m, f"{stat}_null")
        assert getattr(m, f"{stat}_excess") == pytest.approx(observed - null, abs=1e-12)
        assert getattr(m, f"{stat}_null_std") >= 0
    assert 1 <= m.heldout_subspace_size <= D and 1 <= m.heldout_pr <= D
    # a full-rank planted map: every canonical direction carries transport; 270 test tokens in 30
    # documents may miss the weakest, which carry little of the ceiling
    assert m.canonical_directions == D
    assert m.transport_directions_low <= m.transport_directions <= m.transport_directions_high
    assert D - 2 <= m.transport_directions <= D and m.transport_directions_share >= 0.9
    assert 0 < m.transport_directions_threshold < 1
    # the learning curve ends at the whole train split, where its η is the headline η (float32 operator)
    assert m.curve_n_f1 == pytest.approx(m.n_train_tokens) and m.curve_n_f8 < m.curve_n_f4 < m.curve_n_f2 < m.curve_n_f1
    assert m.curve_eta_f1 == pytest.approx(m.eta_test, rel=1e-4)
    assert m.eta_shortfall == pytest.approx(1 - m.eta_inf) and m.eta_shortfall_lo < m.eta_shortfall_hi
    assert m.eta_inf_lo < m.eta_inf < m.eta_inf_hi and m.heteroscedasticity > 0
    # the null is the Wishart simulation at this pair's n and d, replicates and seed from params
    n_train, n_test = int(m.n_train_tokens), int(m.n_test_tokens)
    null = cca_null(n_train, n_test, D, D, 0.9, replicates=5, seed=0)
    assert m.heldout_pr_null == pytest.approx(null.heldout_pr.mean(), rel=1e-12)
    assert m.participation_ratio_null == pytest.approx(null.insample_pr.mean(), rel=1e-12)
    assert m.subspace_size_null == pytest.approx(null.insample_size.mean(), rel=1e-12)
    assert shared_null.cache_info().currsize == 1
    # η beside what an exactly linear map reaches here; the data are exactly linear, so the ratio is ≈ 1
    assert 0.5 < m.eta_expected < 1 and m.eta_expected_std > 0
    assert m.eta_ratio == pytest.approx(m.eta_test / m.eta_expected, rel=1e-12)
    assert abs(m.eta_ratio - 1) < 0.1
    assert m.eta_train <= 1 + 1e-9


def test_evaluate_missing_sae_or_features_is_a_clear_error(tmp_path: Path):
    import shutil

    from ato.stages import evaluate

    built = build_project(tmp_path)
    params = built["params"]
    (tmp_path / "data" / "features" / "layer_01.json").unlink()
    with pytest.raises(AtoError, match=r"layer_01\.json"):
        evaluate.main(params, PAIR)
    shutil.rmtree(tmp_path / "models" / "sae" / "layer_01")
    with pytest.raises(AtoError, match=r"layer_01: no SAE here .*run `ato sae`"):
        evaluate.main(params, PAIR)


def test_evaluate_refuses_mismatched_operator_and_stats(tmp_path: Path):
    from ato.stages import evaluate

    built = build_project(tmp_path, include_bos=True)
    params = built["params"]
    # stats were computed without BOS but params ask to include it: refused, naming the fix
    with pytest.raises(AtoError, match="rerun `ato stats`"):
        evaluate.main(params, PAIR)
    # an operator fitted on another store is refused before any compute
    cfg_path = tmp_path / "models" / "operators" / PAIR / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "store_digest": "other"}))
    with pytest.raises(AtoError, match="store_digest"):
        evaluate.main(params, PAIR)


def test_a_failure_after_the_first_output_leaves_every_output_as_it_was(tmp_path: Path, monkeypatch):
    """evaluate's seven files lie in three directories: a failure while writing the last one (all six
    others already written) changes none of the files of an earlier run and adds none."""
    from ato.artifacts import Layout
    from ato.stages import evaluate

    params = build_project(tmp_path)["params"]
    layout = Layout.from_params(params)
    outputs = [layout.metrics(PAIR), layout.feature_table(PAIR), layout.efficiency(PAIR), layout.transport(PAIR)]
    outputs += [layout.pair_figure(PAIR, kind) for kind in ("efficiency", "feature_r2", "dim_r2")]
    earlier = outputs[::2]  # an earlier run's files (in all three directories); the others are new
    for path in earlier:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"earlier {path.name}")
    written: list[Path] = []

    def fail_on_the_last_figure(path: Path, *args, **kwargs):
        written.extend(p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-") and p.is_file())
        raise RuntimeError("disk full")

    monkeypatch.setattr(evaluate, "plot_dim_r2", fail_on_the_last_figure)
    with pytest.raises(RuntimeError, match="disk full"):
        evaluate.evaluate_pair(params, PAIR)

    assert len(written) == 6  # the failure came after every other output was written (to temporaries)
    assert [p.read_text() for p in earlier] == [f"earlier {p.name}" for p in earlier]
    assert not any(p.exists() for p in outputs if p not in earlier)
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_feature_intervals_need_two_test_documents():
    """One test document cannot be resampled: the error names the param, no interval is invented."""
    from ato.evaluate import EvaluateError
    from ato.evaluate.scores import judge_live_features
    from ato.math.metrics import DocumentFeatureSums
    from ato.params import EvaluateParams

    sums = DocumentFeatureSums(2)
    a = np.arange(10.0).reshape(5, 2)
    sums.update(a, a + 1, np.ones((5, 2), dtype=bool), np.zeros(5, dtype=int))
    with pytest.raises(EvaluateError, match="evaluate.feature_interval.*has 1"):
        judge_live_features(sums, [3, 4], EvaluateParams())
