"""Fixtures for the fault suite: one tiny project collected once per session (the uninterrupted
reference), cheap per-test copies of it, and helpers that compare whole stores array by array."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TINY_PARAMS, make_corpus, make_prepared_model

# Small budgets and small parts: many parts (many kill / fault points), each quick to write.
FAULT_OVERRIDES = {
    "corpus": {"tokens": {"train": 320, "val": 96, "test": 96}},
    "collect": {"part_tokens": 48, "chunk_tokens": 16},
    "stats": {"chunk_tokens": 64},
    "tune": {"n_trials": 4, "curve_points": 4},
}


def fault_params_raw() -> dict:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_PARAMS.items()}
    for section, values in FAULT_OVERRIDES.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def make_project(directory: Path, raw: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    make_prepared_model(directory / "models" / "base")
    make_corpus(directory / "corpus.jsonl")
    (directory / "params.yaml").write_text(yaml.safe_dump(raw or fault_params_raw()))
    return directory


def write_validation(params) -> dict:
    """What `ato validate` writes, without its MLflow logging (a fresh MLflow DB costs ~10 s)."""
    from ato.artifacts import Layout
    from ato.validation import validate_store, write_report

    layout = Layout.from_params(params)
    report = validate_store(layout.store, params.validate, chunk_tokens=params.stats.chunk_tokens, progress=False)
    write_report(report, layout)
    return {"success": report.success, "report": report}


def snapshot(root: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, dict]]:
    """(manifest, every array of every part, every part's attrs), read through zarr."""
    import zarr

    from ato.store import ActivationStore

    store = ActivationStore.open(root)
    arrays, attrs = {}, {}
    for split in ("train", "val", "test"):
        for path in store.parts(split):
            group = zarr.open_group(str(path), mode="r", zarr_format=3)
            attrs[f"{split}/{path.name}"] = dict(group.attrs)
            for key, member in group.members(max_depth=None):
                if isinstance(member, zarr.Array):
                    arrays[f"{split}/{path.name}/{key}"] = np.asarray(member[...])
    return store.manifest, arrays, attrs


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def assert_same_store(root: Path, reference: tuple) -> None:
    """Same manifest, same part attrs, every array equal (dtype and values), and the same file bytes."""
    manifest, arrays, attrs = snapshot(root)
    ref_manifest, ref_arrays, ref_attrs, ref_bytes = reference
    assert manifest == ref_manifest
    assert attrs == ref_attrs
    assert arrays.keys() == ref_arrays.keys()
    for key, value in ref_arrays.items():
        assert arrays[key].dtype == value.dtype, key
        np.testing.assert_array_equal(arrays[key], value, err_msg=key)
    got = file_bytes(root)
    assert sorted(got) == sorted(ref_bytes), "the store holds other files than the reference"
    assert [k for k in ref_bytes if got[k] != ref_bytes[k]] == [], "files differ byte-wise from the reference"


def leftovers(root: Path) -> list[Path]:
    """Temporaries or progress files a finished or failed run left under the store root."""
    return [p for p in Path(root).rglob("*") if p.name.startswith(".tmp-") or p.name == "_progress.json"]


def ato_command(*args: str) -> list[str]:
    """The installed console script (what users and dvc.yaml call)."""
    script = Path(sys.executable).with_name("ato")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "ato.cli", *args]


def subprocess_env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@pytest.fixture(scope="session")
def reference_project(tmp_path_factory) -> Path:
    """A tiny project collected once, uninterrupted, and validated: the reference for every fault."""
    from ato.params import load_params
    from ato.stages import collect

    project = make_project(tmp_path_factory.mktemp("reference") / "proj")
    params = load_params(project / "params.yaml")
    collect.main(params)
    assert write_validation(params)["success"]
    return project


@pytest.fixture(scope="session")
def reference(reference_project) -> tuple:
    from ato.params import load_params

    root = load_params(reference_project / "params.yaml").path("store")
    return (*snapshot(root), file_bytes(root))


@pytest.fixture
def project(reference_project, tmp_path) -> Path:
    """A private copy of the collected, validated reference project."""
    return Path(shutil.copytree(reference_project, tmp_path / "proj"))


@pytest.fixture
def fresh_project(reference_project, tmp_path) -> Path:
    """A private copy of the reference project with nothing collected yet."""
    return Path(
        shutil.copytree(
            reference_project,
            tmp_path / "proj",
            ignore=lambda d, names: [
                n
                for n in names
                if Path(d, n)
                in {reference_project / "data", reference_project / "reports", reference_project / "mlruns"}
            ],
        )
    )
