"""Disk full (ENOSPC) while `collect` writes: a clear error, earlier parts intact, no half-written
part visible, and after space is freed a rerun completes to the uninterrupted store.

The disk is filled by patching zarr's local-store file writer (`zarr.storage._local._put`): the
shard of one layer in one part gets half its bytes written, then ENOSPC — what a full filesystem does.

Protections exercised:
- `store.write_part` writes under `.tmp-…` and removes the temporary on any error (no half part);
- `collect` resumes from complete parts (earlier parts are kept, not rewritten);
- the manifest is written last, so the unfinished store cannot be opened.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from ato.params import load_params
from ato.stages import collect
from ato.store import ActivationStore, StoreError, layer_key

from .conftest import assert_same_store, leftovers

FULL_AT = "train/.tmp-part-00003.zarr"  # the 4th training part …
FULL_ARRAY = f"/{layer_key(2)}/c/"  # … while its layer-2 shard is written (earlier arrays already on disk)


def _enospc(path: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@pytest.fixture
def full_disk(monkeypatch):
    """Make the chosen shard write fail with ENOSPC after writing half its bytes; returns the state."""
    import zarr.storage._local as zlocal

    real_put = zlocal._put
    state = {"fired": 0, "free": False}

    def put(path: Path, value, exclusive: bool = False):
        text = str(path)
        if not state["free"] and FULL_AT in text and FULL_ARRAY in text:
            state["fired"] += 1
            data = value.as_buffer_like()
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:  # a partial file, as a filling disk leaves it
                fh.write(bytes(data)[: len(data) // 2])
            raise _enospc(text)
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(zlocal, "_put", put)
    return state


def _errno_chain(exc: BaseException) -> set[int]:
    seen = set()
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno:
            seen.add(exc.errno)
        exc = exc.__cause__ or exc.__context__
    return seen


def test_enospc_on_a_part_then_rerun_after_freeing_space(fresh_project, reference, full_disk):
    params = load_params(fresh_project / "params.yaml")
    root = params.path("store")
    with pytest.raises(Exception) as info:
        collect.main(params)
    assert full_disk["fired"] == 1
    # A clear error: ENOSPC, naming the part being written.
    assert errno.ENOSPC in _errno_chain(info.value), repr(info.value)
    assert "No space left on device" in str(info.value) and "part-00003" in str(info.value)
    # Nothing half-written is visible, the earlier parts are complete and exact, and without a
    # manifest nothing downstream opens the store.
    assert list(root.rglob(".tmp-*")) == [], "a temporary part was left behind"
    kept = sorted((root / "train").glob("part-*.zarr"))
    assert [p.name for p in kept] == [f"part-{i:05d}.zarr" for i in range(3)]
    import zarr

    ref_arrays = reference[1]
    for part in kept:
        group = zarr.open_group(str(part), mode="r", zarr_format=3)
        for key in [k for k in ref_arrays if k.startswith(f"train/{part.name}/")]:
            np.testing.assert_array_equal(np.asarray(group[key.split("/", 2)[2]][...]), ref_arrays[key])
    with pytest.raises(StoreError, match="manifest"):
        ActivationStore.open(root)
    stamps = {p: (p / "zarr.json").stat().st_mtime_ns for p in kept}

    full_disk["free"] = True  # space freed
    collect.main(params)
    assert {p: (p / "zarr.json").stat().st_mtime_ns for p in kept} == stamps, "complete parts were rewritten"
    assert leftovers(root) == []
    assert_same_store(root, reference)


def test_enospc_writing_the_manifest_then_rerun(fresh_project, reference, monkeypatch):
    """The last write of a run fails: the store stays unopenable; a rerun redoes only the manifest."""
    real_fsync = os.fsync
    state = {"fired": 0, "free": False}

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not state["free"] and "manifest.json" in target:
            state["fired"] += 1
            raise _enospc(target)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)  # ato.artifacts.write_text_atomic fsyncs before the rename
    params = load_params(fresh_project / "params.yaml")
    root = params.path("store")
    with pytest.raises(OSError) as info:
        collect.main(params)
    assert info.value.errno == errno.ENOSPC and state["fired"] == 1
    assert not (root / "manifest.json").exists()
    with pytest.raises(StoreError, match="manifest"):
        ActivationStore.open(root)
    # ato.artifacts.atomic_path removes its temporary file on failure: nothing half-written is left.
    assert [p.name for p in root.rglob(".tmp-*")] == []
    stamps = {p: (p / "zarr.json").stat().st_mtime_ns for p in root.glob("*/part-*.zarr")}
    state["free"] = True
    collect.main(params)
    assert {p: (p / "zarr.json").stat().st_mtime_ns for p in root.glob("*/part-*.zarr")} == stamps
    assert leftovers(root) == []
    assert_same_store(root, reference)


def test_cli_reports_a_full_disk_as_a_user_error(fresh_project, full_disk, capsys):
    from ato.cli import main as cli_main

    assert cli_main(["collect", "--params", str(fresh_project / "params.yaml")]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "part-00003" in err
