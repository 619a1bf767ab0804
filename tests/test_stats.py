"""`ato stats` writes the statistics of every split or none: a failure on the last split (test) must not
leave train and val statistics that tune and fit would accept, whether or not an earlier run left any."""

from __future__ import annotations

import pytest

from ato.artifacts import ArtifactError, Layout, read_pair_stats
from ato.params import SPLITS
from ato.stages import fit, stats, tune
from ato.store import StoreError
from conftest import load_tiny_params


@pytest.fixture
def validated(validated_copy):
    return load_tiny_params(validated_copy)


def fail_on_test_split(monkeypatch) -> list[str]:
    """Make the statistics of the test split fail (after train and val were computed); returns the
    splits the stage asked for, in order."""
    asked: list[str] = []
    real = stats.accumulate_local

    def accumulate(store, split, *args, **kwargs):
        asked.append(split)
        if split == "test":
            raise StoreError(f"{store.root}: injected read failure on the {split} split")
        return real(store, split, *args, **kwargs)

    monkeypatch.setattr(stats, "accumulate_local", accumulate)
    return asked


def accepted(params) -> list[tuple[str, str]]:
    """(split, pair) of every statistics file the readers of tune, fit, evaluate and causal accept."""
    layout = Layout.from_params(params)
    found = []
    for split in SPLITS:
        for pair in params.pairs:
            try:
                read_pair_stats(layout.pair_stats(split, pair))
            except ArtifactError:
                continue
            found.append((split, pair))
    return found


def assert_nothing_usable(params) -> None:
    assert accepted(params) == []
    assert not params.path("stats").exists()
    assert not [p.name for p in params.path("stats").parent.iterdir() if p.name.startswith(".tmp-")]
    for pair in params.pairs:  # the stages themselves refuse to run
        with pytest.raises(ArtifactError, match="run `ato stats`"):
            tune.build_objective(params, pair)
        with pytest.raises(ArtifactError, match="run `ato stats`"):
            fit.fit_pair(params, pair)


def test_failure_on_the_test_split_leaves_no_statistics(validated, monkeypatch):
    asked = fail_on_test_split(monkeypatch)
    with pytest.raises(StoreError, match="injected"):
        stats.main(validated)
    assert asked == ["train", "val", "test"]  # train and val were computed before the failure
    assert_nothing_usable(validated)


def test_failed_rerun_leaves_no_statistics_of_the_earlier_run(validated, monkeypatch):
    stats.main(validated)
    assert len(accepted(validated)) == len(SPLITS) * len(validated.pairs)
    stale = Layout.from_params(validated).pair_stats("train", "L09_k9")  # a pair no longer in params
    stale.write_bytes(Layout.from_params(validated).pair_stats("train", "L00_k1").read_bytes())
    stats.main(validated)  # a complete rerun publishes exactly this run's files
    assert not stale.exists() and len(accepted(validated)) == len(SPLITS) * len(validated.pairs)

    fail_on_test_split(monkeypatch)
    with pytest.raises(StoreError, match="injected"):
        stats.main(validated)
    assert_nothing_usable(validated)
