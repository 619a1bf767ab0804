"""Stage `validate`: a consistent synthetic store passes; each kind of damage fails with a message
naming the split/part, layer and expectation; the report is always written; the CLI exits 1."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from ato import validation as V
from ato.artifacts import Layout, ValidationVerdict
from ato.params import Params, Paths, ValidateParams
from ato.stages import validate as stage
from ato.store import ActivationStore, StoreError, require_validated
from store_factory import (
    SyntheticStore,
    build_store,
    edit_manifest,
    flip_byte,
    set_values,
    shard_file,
    truncate_file,
    write_passing_verdict,
)

CHUNK = 16  # rows per read: parts hold ~40 rows, so every array is streamed in several chunks


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> SyntheticStore:
    return build_store(tmp_path_factory.mktemp("base") / "store")


@pytest.fixture
def store(base_store: SyntheticStore, tmp_path: Path) -> SyntheticStore:
    """A private copy of the base store, free to damage."""
    root = tmp_path / "store"
    shutil.copytree(base_store.root, root)
    return SyntheticStore(root, json.loads(json.dumps(base_store.manifest)), base_store.arrays)


def run(root: Path, **thresholds) -> V.ValidationReport:
    return V.validate_store(root, ValidateParams(**thresholds), chunk_tokens=CHUNK, progress=False)


def failed_checks(report: V.ValidationReport) -> set[tuple[str, str]]:
    return {
        (r.check.table, r.check.kwargs.get("column") or r.check.kwargs["column_A"])
        for r in report.results
        if not r.success
    }


def assert_named(report: V.ValidationReport, *needles: str) -> None:
    """Some failure line names all the needles at once (where + expectation + problem)."""
    lines = [f.message for f in report.failures]
    assert any(all(n in line for n in needles) for line in lines), f"{needles} not in {lines}"


# --------------------------------------------------------------------------------------------


def test_array_stats_streaming_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(103, 7)).astype(np.float32) * 3 + 1
    x[10] = 0.0
    x[20, 2] = np.nan
    x[30, 0] = np.inf
    stats = V.ArrayStats()
    for start in range(0, len(x), 16):
        stats.update(x[start : start + 16])
    row = stats.as_row()
    ok = np.isfinite(x).all(axis=1)
    good = x[ok].astype(np.float64)
    norms = np.linalg.norm(good, axis=1)
    assert row["token_count"] == 103 and row["nan_count"] == 1 and row["inf_count"] == 1
    assert row["zero_row_fraction"] == pytest.approx(1 / 103)
    assert row["mean_norm"] == pytest.approx(norms.mean(), rel=1e-10)
    assert row["max_norm"] == pytest.approx(norms.max(), rel=1e-10)
    assert row["max_abs"] == pytest.approx(np.abs(good).max(), rel=1e-10)
    assert row["mean"] == pytest.approx(good.mean(), rel=1e-9)
    assert row["std"] == pytest.approx(good.std(), rel=1e-9)


def test_valid_store_passes_with_exact_statistics(store: SyntheticStore):
    report = run(store.root)
    assert report.success, V.failure_message(report)
    assert report.failures == [] and report.n_failed == 0
    assert len(report.results) >= 30
    layers = report.tables.layers
    m = store.manifest
    n_parts = sum(len(m["splits"][s]["parts"]) for s in ("train", "val", "test"))
    assert len(layers) == n_parts * len(m["layers"])
    assert set(layers["n_cols"]) == {16} and set(layers["dtype"]) == {"float32"}
    # per-split token counts and the streamed statistics agree with the arrays that were written
    for split in ("train", "val", "test"):
        rows = layers[(layers["split"] == split) & (layers["layer"] == 1)]
        assert rows["token_count"].sum() == m["splits"][split]["tokens"]
        x = store.arrays[split]["resid/layer_01"].astype(np.float64)
        weighted = (rows["mean_norm"] * rows["token_count"]).sum() / rows["token_count"].sum()
        assert weighted == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-6)
        assert rows["max_abs"].max() == pytest.approx(np.abs(x).max(), rel=1e-6)
    splits = report.tables.splits.set_index("split")
    assert (splits["observed_tokens"] == splits["manifest_tokens"]).all()
    assert (splits["observed_documents"] == splits["manifest_documents"]).all()
    assert (report.tables.docs["n_splits"] == 1).all()
    assert len(report.tables.docs) == sum(m["splits"][s]["documents"] for s in ("train", "val", "test"))


def _nan(s):
    set_values(s.part("train", 1), "resid/layer_01", (5, 3), np.nan)


def _inf(s):
    set_values(s.part("val"), "resid/layer_02", (7, 0), np.inf)


def _zero_row(s):
    set_values(s.part("test"), "resid/layer_00", 4, 0.0)


def _truncate(s):
    truncate_file(shard_file(s.part("train", 0), "resid/layer_02"), 0.5)


def _delete_array(s):
    shutil.rmtree(s.part("train", 1) / "resid" / "layer_00")


def _flip(s):
    flip_byte(shard_file(s.part("val"), "resid/layer_01"))


def _delete_shard(s):  # zarr reads a missing shard as fill values (zeros) without complaint
    shard_file(s.part("test"), "resid/layer_02").unlink()


def _delete_part(s):
    shutil.rmtree(s.part("test"))


def _wrong_d_model(s):
    edit_manifest(s.root, lambda m: m.update(d_model=32))


def _split_tokens(s):
    edit_manifest(s.root, lambda m: m["splits"]["train"].update(tokens=m["splits"]["train"]["tokens"] + 5))


def _part_tokens(s):  # manifest sums agree with each other, but part 0 holds one token fewer than claimed
    def edit(m):
        m["splits"]["train"]["part_tokens"][0] += 1
        m["splits"]["train"]["tokens"] += 1

    edit_manifest(s.root, edit)


def _overlap(s):  # the first test document is relabelled as train document 0
    doc = s.arrays["test"]["doc_id"]
    n = int((doc == doc[0]).sum())
    set_values(s.part("test"), "doc_id", slice(0, n), 0)


def _position(s):
    set_values(s.part("val"), "position", 3, 9)


TOKEN_ROWS = {("parts", f"{name}_rows") for name in ("token_id", "doc_id", "position", "special")}

FAULTS = {
    # name: (damage, failed checks, needles that one failure line must contain)
    "nan": (
        _nan,
        {("layers", "nan_count")},
        ("train/part-00001.zarr layer 1", "expect_column_values_to_be_between", "nan_count = 1"),
    ),
    "inf": (_inf, {("layers", "inf_count")}, ("val/part-00000.zarr layer 2", "inf_count = 1")),
    "zero_rows": (_zero_row, {("layers", "zero_row_fraction")}, ("test/part-00000.zarr layer 0", "zero_row_fraction")),
    "truncated_shard": (
        _truncate,
        {("layers", "readable")},
        ("train/part-00000.zarr layer 2", "expect_column_values_to_be_in_set", "checksum"),
    ),
    "deleted_array": (
        _delete_array,
        {("layers", "readable"), ("parts", "missing_layers")},
        ("train/part-00001.zarr layer 0", "resid/layer_00 is missing"),
    ),
    "flipped_byte": (_flip, {("layers", "readable")}, ("val/part-00000.zarr layer 1", "checksum")),
    "deleted_shard": (
        _delete_shard,
        {("layers", "missing_chunks"), ("layers", "zero_row_fraction"), ("layers", "mean_norm")},
        ("test/part-00000.zarr layer 2", "missing_chunks"),
    ),
    "missing_part": (_delete_part, {("parts", "present")}, ("test/part-00000.zarr", "is missing")),
    "wrong_d_model": (
        _wrong_d_model,
        {("layers", "n_cols")},
        ("layer 0", "expect_column_values_to_be_in_set", "n_cols = 16", "d_model 32"),
    ),
    "split_token_count": (
        _split_tokens,
        {("splits", "manifest_part_tokens_sum"), ("splits", "observed_tokens")},
        ("split train", "observed_tokens = 85", "manifest_tokens = 90"),
    ),
    "part_token_count": (
        _part_tokens,
        {("parts", "n_tokens"), ("layers", "n_rows"), ("splits", "observed_tokens"), *TOKEN_ROWS},
        ("train/part-00000.zarr layer 1", "expect_column_pair_values_to_be_equal", "n_rows"),
    ),
    "overlapping_docs": (_overlap, {("docs", "n_splits")}, ("doc_id 0", "n_splits", "train,test")),
    # position 9 after 2, then 4 after 9: two breaks
    "position_break": (_position, {("parts", "position_breaks")}, ("val/part-00000.zarr", "position_breaks = 2")),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_fault_fails_with_a_named_message(store: SyntheticStore, fault: str):
    damage, expected_failed, needles = FAULTS[fault]
    damage(store)
    report = run(store.root)
    assert not report.success
    assert failed_checks(report) == expected_failed, V.failure_message(report)
    assert_named(report, *needles)
    assert all(needle in V.failure_message(report) for needle in needles[:1])


def test_thresholds_come_from_params(store: SyntheticStore):
    _nan(store)
    assert run(store.root, max_nan=1).success  # one NaN tolerated
    report = run(store.root, max_nan=1, max_abs_value=1.0, min_mean_norm=1e9)
    assert failed_checks(report) == {("layers", "max_abs"), ("layers", "mean_norm")}
    assert_named(report, "max_abs ≤ 1", "train/part-00000.zarr layer 0")


def test_unopenable_store_is_a_failure_not_a_traceback(tmp_path: Path):
    report = run(tmp_path / "nowhere")
    assert not report.success and "store cannot be opened" in report.failures[0].message
    layout = Layout.from_params(_params(tmp_path, tmp_path / "nowhere", "bogus-scheme://nowhere"))
    V.write_report(report, layout)  # still writes a report
    assert json.loads(layout.validation.read_text())["success"] is False
    assert ValidationVerdict.read(layout.validation).store_digest is None


def test_ill_typed_manifest_key_fails_by_name(store: SyntheticStore):
    edit_manifest(store.root, lambda m: m.update(d_model="16"))  # complete, but a string where an int belongs
    report = run(store.root)
    assert failed_checks(report) == {("manifest", "ok")}, V.failure_message(report)
    assert_named(report, "manifest key d_model", "expected int", "'16'")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda text: text.replace('"hook"', '"hooks"'), "unknown key 'hooks'"),
        (lambda text: text[: len(text) // 2], "truncated"),
        (lambda text: text.replace("ato-activation-store/1", "someone-else/7"), "format 'someone-else/7'"),
        (lambda text: json.dumps({**json.loads(text), "splits": ["train"]}), "malformed"),
    ],
    ids=["unknown_key", "truncated", "foreign_format", "wrong_shape"],
)
def test_incomplete_or_foreign_manifest_is_one_clear_error(store: SyntheticStore, edit, needle):
    path = store.root / "manifest.json"
    path.write_text(edit(path.read_text()))
    with pytest.raises(StoreError, match="manifest") as info:
        ActivationStore.open(store.root)
    assert needle in str(info.value) and str(path) in str(info.value)
    report = run(store.root)  # validate reports it (and writes its report) instead of crashing
    assert not report.success and needle in report.failures[0].message


@pytest.mark.parametrize("settled", [True, False], ids=["stat_fast_path", "files_just_written"])
def test_verdict_binds_the_bytes_it_checked(store: SyntheticStore, tmp_path: Path, monkeypatch, settled: bool):
    import ato.store as store_module

    # Files changed within _SETTLE_NS of validation get no stat signature (always re-hashed).
    monkeypatch.setattr(store_module, "_SETTLE_NS", 0 if settled else 10**18)
    layout = Layout.from_params(_params(tmp_path, store.root, "bogus-scheme://nowhere"))
    V.write_report(run(store.root), layout)
    verdict = ValidationVerdict.read(layout.validation)
    opened = ActivationStore.open(store.root)
    parts = {f"{split}/{p.name}" for split in ("train", "val", "test") for p in opened.parts(split)}
    assert verdict.success and set(verdict.part_sha256) == parts and len(verdict.manifest_sha256 or "") == 64
    assert set(verdict.part_stat) == (parts if settled else set())
    hashed: list[Path] = []
    real_digest = store_module.directory_digest
    monkeypatch.setattr(store_module, "directory_digest", lambda path: hashed.append(path) or real_digest(path))
    require_validated(opened, layout.validation)  # unchanged bytes: accepted …
    assert len(hashed) == (0 if settled else len(parts))  # … without reading them when their stat data agree
    _zero_row(store)  # rewritten through zarr after validation: checksums valid, manifest unchanged
    with pytest.raises(StoreError, match=r"test/part-00000\.zarr changed since `ato validate`"):
        require_validated(ActivationStore.open(store.root), layout.validation)


def test_a_copied_store_with_the_same_bytes_is_accepted(base_store: SyntheticStore, tmp_path: Path, monkeypatch):
    import ato.store as store_module

    monkeypatch.setattr(store_module, "_SETTLE_NS", 0)
    verdict_path = tmp_path / "validation.json"
    write_passing_verdict(base_store.root, verdict_path)
    copy = Path(shutil.copytree(base_store.root, tmp_path / "copy"))  # new inodes and times: every part re-hashed
    require_validated(ActivationStore.open(copy), verdict_path)
    shutil.rmtree(copy / "val" / "part-00000.zarr")
    with pytest.raises(StoreError, match=r"val/part-00000\.zarr changed"):
        require_validated(ActivationStore.open(copy), verdict_path)


def test_verdict_refuses_a_manifest_edited_after_validation(store: SyntheticStore, tmp_path: Path):
    verdict_path = tmp_path / "validation.json"
    write_passing_verdict(store.root, verdict_path)
    require_validated(ActivationStore.open(store.root), verdict_path)
    edit_manifest(store.root, lambda m: m["splits"]["train"].update(documents=m["splits"]["train"]["documents"] + 1))
    with pytest.raises(StoreError, match="manifest.json: changed since"):
        require_validated(ActivationStore.open(store.root), verdict_path)


def _params(project: Path, store_root: Path, mlflow_uri: str) -> Params:
    return Params(
        paths=Paths(
            store=str(store_root),
            reports=str(project / "reports"),
            mlflow_uri=mlflow_uri,
            mlflow_artifacts=str(project / "mlruns" / "artifacts"),
        ),
        root=project,
    )


def _read_reports(directory: Path) -> tuple[dict, str, list[dict]]:
    summary = json.loads((directory / "validation.json").read_text())
    md = (directory / "validation.md").read_text()
    with open(directory / "stats.csv") as fh:
        stats = list(csv.DictReader(fh))
    metrics = json.loads((directory / "metrics.json").read_text())
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())
    for name in ("parts.csv", "splits.csv"):
        assert (directory / name).stat().st_size > 0
    return summary, md, stats


@pytest.mark.slow  # creating a fresh MLflow SQLite store runs its migrations (~10 s)
def test_main_passes_writes_report_and_logs_to_mlflow(store: SyntheticStore, tmp_path: Path):
    import mlflow

    params = _params(tmp_path, store.root, "sqlite:///mlruns/mlflow.db")
    report = stage.main(params)
    assert report.success
    summary, md, stats = _read_reports(tmp_path / "reports" / "validation")
    assert summary["success"] is True and summary["n_failed"] == 0 and summary["failures"] == []
    assert len(summary["results"]) == len(report.results) and all(r["success"] for r in summary["results"])
    assert "PASSED" in md and "| layer |" in md
    assert len(stats) == len(report.tables.layers)
    assert {
        "split",
        "part",
        "layer",
        "nan_count",
        "inf_count",
        "mean_norm",
        "max_norm",
        "max_abs",
        "mean",
        "std",
        "zero_row_fraction",
        "n_rows",
        "n_cols",
        "dtype",
        "token_count",
    } <= set(stats[0])
    mlflow.set_tracking_uri(params.mlflow_uri())
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert any(
        r.data.metrics.get("validate_success") == 1.0 and r.data.metrics.get("validate_n_failed") == 0.0 for r in runs
    )


def test_main_failure_writes_report_then_raises_even_if_mlflow_breaks(store: SyntheticStore, tmp_path: Path):
    _nan(store)
    params = _params(tmp_path, store.root, "bogus-scheme://nowhere")
    with pytest.raises(V.ValidationError) as info:
        stage.main(params)
    assert "train/part-00001.zarr layer 1" in str(info.value) and "nan_count" in str(info.value)
    summary, md, stats = _read_reports(tmp_path / "reports" / "validation")
    assert summary["success"] is False and summary["n_failed"] == 1
    assert summary["failures"][0]["row"]["nan_count"] == 1
    assert "FAILED" in md and "train/part-00001.zarr layer 1" in md
    bad = [r for r in stats if r["part"] == "part-00001.zarr" and r["split"] == "train" and r["layer"] == "1"]
    assert int(bad[0]["nan_count"]) == 1


def test_cli_exits_1_and_names_the_fault(store: SyntheticStore, tmp_path: Path, capsys):
    from ato.cli import main as cli_main

    _flip(store)
    raw = {
        "paths": {
            "store": str(store.root),
            "reports": str(tmp_path / "reports"),
            "mlflow_uri": "bogus-scheme://nowhere",
        },
        "pairs": {"L00_k1": {"L": 0, "k": 1}},
        "stats": {"chunk_tokens": CHUNK},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert cli_main(["validate", "--params", str(tmp_path / "params.yaml")]) == 1
    err = capsys.readouterr().err
    assert "val/part-00000.zarr layer 1" in err and "checksum" in err
    assert (tmp_path / "reports" / "validation" / "validation.md").exists()
