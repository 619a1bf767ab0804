"""SIGKILL `ato collect` at random points; a rerun must finish the same store, byte for byte.

Protections exercised (removing any one fails these tests):
- `store.write_part` writes a part under `.tmp-…` and renames it only when complete, so a killed
  process never leaves a half part under a real name (checked right after the kill);
- `collect._prepare_root` keeps the complete parts of a run with the same fingerprint and deletes
  temporaries (checked: kept parts are not rewritten, the final store has no `.tmp-*`);
- parts are fixed by the token sequences alone (`collect.plan_parts`), so resumed and uninterrupted
  runs cut the same parts, and the manifest is written last (no manifest → the store is refused).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from ato.params import load_params
from ato.stages import collect
from ato.store import ActivationStore, StoreError

from .conftest import assert_same_store, ato_command, leftovers, subprocess_env

SEEDS = (0, 1, 2)


def _complete_parts(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/part-*.zarr") if p.is_dir())


def _start_and_kill(project: Path, seed: int, n_parts: int) -> dict:
    """Run `ato collect` in a subprocess and SIGKILL it at a seeded random point mid-run."""
    root = load_params(project / "params.yaml").path("store")
    rng = random.Random(seed)
    target = rng.randint(0, n_parts - 3)  # kill once this many parts are complete …
    delay = rng.uniform(0.0, 0.15)  # … plus a random slice of the next part's forward pass / write
    log_path = project / "collect.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ato_command("collect", "--params", str(project / "params.yaml")),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
        )
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and time.monotonic() < deadline:
                if (root / "_progress.json").exists() and len(_complete_parts(root)) >= target:
                    break
                time.sleep(0.005)
            time.sleep(delay)
            alive = proc.poll() is None
            if alive:
                os.kill(proc.pid, signal.SIGKILL)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"seed": seed, "alive_at_kill": alive, "rc": rc, "target": target, "log": log_path.read_text()[-2000:]}


@pytest.mark.slow
def test_sigkill_collect_at_random_points_then_rerun_equals_uninterrupted(fresh_project, reference, tmp_path):
    ref_manifest, ref_arrays = reference[0], reference[1]
    n_parts = sum(len(s.parts) for s in ref_manifest.splits.values())
    projects = {seed: Path(shutil.copytree(fresh_project, tmp_path / f"seed{seed}")) for seed in SEEDS}
    # The three killed runs go concurrently (interpreter start-up dominates; kills are triggered by
    # part counts on disk, not by wall time, so contention does not change what is tested).
    with ThreadPoolExecutor(len(SEEDS)) as pool:
        runs = list(pool.map(lambda s: _start_and_kill(projects[s], s, n_parts), SEEDS))

    import zarr

    for run in runs:
        seed, project = run["seed"], projects[run["seed"]]
        assert run["alive_at_kill"], f"seed {seed}: collect finished (rc {run['rc']}) before the kill: {run['log']}"
        assert run["rc"] == -signal.SIGKILL, run
        params = load_params(project / "params.yaml")
        root = params.path("store")
        # Right after the kill: no manifest, so nothing downstream can open the half-built store …
        assert not (root / "manifest.json").exists()
        with pytest.raises(StoreError, match="manifest"):
            ActivationStore.open(root)
        # … and every part under a real name is complete and equal to the reference's part.
        kept = _complete_parts(root)
        assert len(kept) >= run["target"]
        for part in kept:
            group = zarr.open_group(str(part), mode="r", zarr_format=3)
            prefix = f"{part.parent.name}/{part.name}/"
            keys = {k for k in ref_arrays if k.startswith(prefix)}
            assert keys, f"{part} is not a part of the reference store"
            for key in keys:
                np.testing.assert_array_equal(
                    np.asarray(group[key[len(prefix) :]][...]), ref_arrays[key], err_msg=f"seed {seed}: {key}"
                )
        stamps = {p: (p / "zarr.json").stat().st_mtime_ns for p in kept}
        print(
            f"seed {seed}: killed with {len(kept)}/{n_parts} parts complete, "
            f"{len(list(root.rglob('.tmp-*')))} temporaries on disk"
        )

        # Rerun: resumes (kept parts are not rewritten) and ends with exactly the uninterrupted store.
        collect.main(params)
        assert {p: (p / "zarr.json").stat().st_mtime_ns for p in kept} == stamps, "complete parts rewritten"
        assert leftovers(root) == []
        assert_same_store(root, reference)


def test_kill_between_part_rename_and_progress_write(fresh_project, reference, monkeypatch):
    """The narrowest kill window, made deterministic: the process dies right after a part was renamed
    into place, before `_progress.json` records its digest. A rerun must still finish the same store
    (protection needed: on resume, take a complete part's digest from its `sha256` attribute, or
    redo parts that progress does not list)."""
    params = load_params(fresh_project / "params.yaml")
    root = params.path("store")
    real = collect.write_json_atomic
    calls = {"progress": 0}

    def die_after_third_part(path, data):
        if Path(path).name == collect.PROGRESS:
            calls["progress"] += 1
            if calls["progress"] == 4:  # 1: _prepare_root, 2–4: after parts 0–2; part 2 is on disk already
                raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this line runs
        return real(path, data)

    monkeypatch.setattr(collect, "write_json_atomic", die_after_third_part)
    with pytest.raises(KeyboardInterrupt):
        collect.main(params)
    assert len(_complete_parts(root)) == 3
    monkeypatch.setattr(collect, "write_json_atomic", real)
    collect.main(params)
    assert leftovers(root) == []
    assert_same_store(root, reference)
