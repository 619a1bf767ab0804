"""Damage a part of a really collected tiny store; `ato validate` must fail naming it, and no later
stage may compute on it.

Protections exercised:
- crc32c per zarr chunk + validate's per-part streaming (a truncated or byte-flipped shard, a deleted
  array, a deleted part, NaN or all-zero rows are failed rows naming split/part/layer);
- `store.require_validated` in `stats.main` and `sae.main` (outside DVC, they refuse a store whose
  validation report failed, asserted via the refusal message, which a mere read error would not give,
  and a store whose parts changed after a passing validation: the verdict holds per-part sha256);
- the DVC DAG: stats and sae depend on `reports/validation/validation.json`, so `dvc repro` never
  runs them before (or after a failed) validation.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from ato.cli import main as cli_main
from ato.params import load_params
from ato.stages import stats
from ato.store import StoreError, layer_key
from dvc_truth import expand
from store_factory import flip_byte, set_values, shard_file, truncate_file

from .conftest import write_validation

ROOT = Path(__file__).resolve().parents[2]


def _part(project: Path, split: str, index: int) -> Path:
    return project / "data" / "activations" / split / f"part-{index:05d}.zarr"


def _truncate(project):
    truncate_file(shard_file(_part(project, "train", 2), layer_key(1)), keep_fraction=0.6)
    return "train/part-00002.zarr", "layer 1"


def _delete_array(project):
    shutil.rmtree(_part(project, "val", 1) / layer_key(2))
    return "val/part-00001.zarr", "layer 2"


def _flip(project):
    flip_byte(shard_file(_part(project, "train", 1), layer_key(3)))
    return "train/part-00001.zarr", "layer 3"


def _flip_token_ids(project):
    flip_byte(shard_file(_part(project, "test", 0), "token_id"), offset=5)
    return "test/part-00000.zarr", "token arrays"  # (the message does not say which token array)


def _delete_part(project):
    shutil.rmtree(_part(project, "train", 3))
    return "train/part-00003.zarr", "missing"


def _nan(project):  # checksums stay valid: only the value checks can see it
    set_values(_part(project, "train", 0), layer_key(0), (5, 3), np.nan)
    return "train/part-00000.zarr", "layer 0"


def _zero_rows(project):  # a dropped batch: finite, checksummed, silently biasing every mean
    set_values(_part(project, "val", 0), layer_key(2), slice(4, 12), 0.0)
    return "val/part-00000.zarr", "layer 2"


FAULTS = {
    "truncate_shard": _truncate,
    "delete_array": _delete_array,
    "flip_layer_byte": _flip,
    "flip_token_id_byte": _flip_token_ids,
    "delete_part": _delete_part,
    "nan_value": _nan,
    "zero_rows": _zero_rows,
}


def _no_mlflow(project: Path) -> None:
    """Validate logs to MLflow best-effort; an unreachable URI keeps the test fast."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw.setdefault("paths", {})["mlflow_uri"] = "bogus-scheme://nowhere"
    (project / "params.yaml").write_text(yaml.safe_dump(raw))


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_damaged_part_fails_validation_by_name_and_later_stages_refuse(project, fault, capsys):
    _no_mlflow(project)
    where, what = FAULTS[fault](project)
    params_file = str(project / "params.yaml")
    assert cli_main(["validate", "--params", params_file]) == 1
    err = capsys.readouterr().err
    assert "failed validation" in err and where in err and what in err, err

    # stats (and sae) refuse on the failed report — not merely because a read happens to fail.
    assert cli_main(["stats", "--params", params_file]) == 1
    err = capsys.readouterr().err
    assert "failed validation" in err and "validation.md" in err, err
    assert not (project / "data" / "stats").exists()
    assert cli_main(["sae", "--params", params_file]) == 1
    assert "failed validation" in capsys.readouterr().err


def test_stats_refuses_without_a_report_or_with_a_stale_one(project):
    params = load_params(project / "params.yaml")
    report = params.path("reports") / "validation" / "validation.json"
    stale = report.read_text()
    report.unlink()
    with pytest.raises(StoreError, match="no validation report"):
        stats.main(params)
    report.write_text(stale.replace(stale.split('"store_digest": "')[1][:64], "0" * 64))
    with pytest.raises(StoreError, match="different store state"):
        stats.main(params)


def test_store_damaged_after_validation_is_refused(project):
    """The verdict records the sha256 of every part it checked; `require_validated` recomputes them,
    so damage after a passing validation is refused by name outside DVC too."""
    params = load_params(project / "params.yaml")
    assert write_validation(params)["success"]
    _zero_rows(project)  # finite, checksum-valid damage after the report was written
    with pytest.raises(StoreError, match=r"val/part-00000\.zarr changed since `ato validate`"):
        stats.main(params)
    assert not (project / "data" / "stats").exists()


def test_dvc_runs_nothing_on_unvalidated_data():
    """dvc.yaml: every stage that reads the store for fitting depends on the validation report."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    report = "reports/validation/validation.json"
    validate_outs = [expand(next(iter(o)) if isinstance(o, dict) else o, params) for o in dvc["validate"]["outs"]]
    assert report in validate_outs
    for stage in ("stats", "sae"):
        deps = [expand(d, params) for d in dvc[stage]["deps"]]
        assert report in deps, f"dvc stage {stage} does not wait for validation"
