"""Stage `atlas`: linear transport between every stored layer pair (L, L + k), k ≤ atlas.k_max.

One streamed float64 pass per split forms the banded joint Gram; every pair's ridge map (α by GCV
or atlas.alpha) and four other operators — identity, scaled orthogonal Procrustes plain and centred,
reduced-rank regression at the held-out subspace size — are scored by exact test R² beside η's
linear reference and the held-out subspace size's null; the model's mean Jacobian of blocks
L+1…L+k is estimated on a few TRAIN sequences and compared with the ridge map; the operators of
atlas.causal_pairs are patched into the model on TEST sequences. See `ato.atlas` and
docs/method.md#atlas.

Outputs: reports/atlas/atlas.json (`AtlasResult`), metrics.json (numbers only), pairs.csv, atlas.md,
figures/{heatmaps, operators, spectra}.png; <paths.atlas>/maps.safetensors (every pair's ridge map).
One MLflow run (`ato.kind = atlas`) under the pipeline's parent run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ato.artifacts import (
    AtlasMapsMeta,
    AtlasResult,
    Layout,
    atomic_group,
    write_atlas_maps,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)
from ato.atlas import (
    apply_jacobian,
    atlas_markdown,
    atlas_metrics,
    atlas_result,
    causal_atlas,
    check_plan,
    fit_atlas,
    joint_grams,
    load_model,
    plan,
    probe_atlas,
    table,
    table_columns,
    torch_threads,
)
from ato.lm_head import set_lm_head_dtype
from ato.models import resolve_device
from ato.params import Params
from ato.plotting.atlas import plot_atlas_heatmaps, plot_operator_bars, plot_spectra
from ato.store import ActivationStore, require_validated

log = logging.getLogger(__name__)


@contextmanager
def _timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - t0


def main(params: Params) -> AtlasResult:
    layout, ap = Layout.from_params(params), params.atlas
    store = ActivationStore.open(layout.store)
    require_validated(store, layout.validation)
    layers = check_plan(ap, plan(store.layers, ap.k_max))  # bad pair or layer names fail before compute
    device = resolve_device(ap.device)
    seconds: dict[str, float] = {}
    with _timed(seconds, "gram"):
        grams = joint_grams(store, ap, params.stats.include_bos, device)
    with _timed(seconds, "fit"):
        fits = fit_atlas(grams, ap)
    model = load_model(layout.model_dir, device) if layers or ap.causal_pairs else None
    with _timed(seconds, "jacobian"), torch_threads(ap.threads):
        if layers:
            apply_jacobian(fits, probe_atlas(model, store, fits, layers, ap), grams)
    with _timed(seconds, "causal"), torch_threads(ap.threads):
        if model is not None and ap.causal_pairs:
            set_lm_head_dtype(model, ap.lm_head_dtype)
        causal = causal_atlas(model, store, fits, grams, ap) if ap.causal_pairs else {}
    result = atlas_result(store, grams, fits, causal, layers, ap, seconds)
    with _timed(seconds, "write"), atomic_group():  # maps, tables, report and figures, or none
        maps = {name: fit.maps["ridge"] for name, fit in fits.items()}
        alphas = {name: fit.alpha for name, fit in fits.items()}
        meta = AtlasMapsMeta(store.digest, grams["train"].n, params.stats.include_bos, alphas)
        write_atlas_maps(layout.atlas_maps, maps, meta)
        paths = write_outputs(layout, result, params.report.dpi)
    result.write(layout.atlas_result)  # again: `seconds` (shared with the result) now has the write time
    _log_mlflow(params, result, paths)
    log.info("atlas: %d pairs in %s", len(result.pairs), ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
    return result


def write_outputs(layout: Layout, result: AtlasResult, dpi: int) -> list[Path]:
    result.write(layout.atlas_result)
    write_json_atomic(layout.atlas_metrics, atlas_metrics(result))
    write_csv_atomic(layout.atlas_table, table_columns(), table(result))
    write_text_atomic(layout.atlas_report, atlas_markdown(result))
    figures = [
        plot_atlas_heatmaps(layout.atlas_figure("heatmaps"), result, dpi),
        plot_operator_bars(layout.atlas_figure("operators"), result, dpi),
        plot_spectra(layout.atlas_figure("spectra"), result, dpi),
    ]
    return [layout.atlas_result, layout.atlas_metrics, layout.atlas_table, layout.atlas_report, *figures]


def _log_mlflow(params: Params, result: AtlasResult, paths: list[Path]) -> None:
    import mlflow

    from ato.tracking import RunContext, child_run, log_flat_metrics

    metrics = atlas_metrics(result)
    flat = {f"{k}.{name}": v for k, row in metrics.items() if isinstance(row, dict) for name, v in row.items()}
    flat.update({k: v for k, v in metrics.items() if not isinstance(v, dict)})
    with child_run(RunContext.from_params(params), "atlas"):
        log_flat_metrics(flat)
        for p in result.pairs:
            log_flat_metrics({f"{p.pair}.r2_{op}": s.r2 for op, s in p.operators.items()})
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path="atlas")
