"""Roofline of a finished pipeline run (issue 23): per stage, its wall time beside its compute floor.

    .venv/bin/python bench/pipeline.py [RUN_DIR] [--tokens 2048] [--repeats 2]

RUN_DIR (default: this directory) is a project after `dvc repro`: its dvc.lock, params.yaml, store and
outputs are read, nothing is written. A stage's wall time is its last output's mtime minus the previous
stage's (DVC runs them one after another; the first stage has no known start). Its floor is the work
its method cannot avoid, at rates measured in this invocation on RUN_DIR's own model:

- forward passes in token-layers (one token through one decoder block) at the bare forward rate of
  `bench/collect.py` (no hooks, no writes), and LM-head tokens at a bare head (one matmul over the
  vocabulary in `causal.lm_head_dtype` where native + log-sum-exp);
- float64 Gram / product FLOPs (2·n·d² per d×d block) at a measured float64 GEMM rate, and float32
  FLOPs (SAE encoders and training) at a measured float32 GEMM rate.

Replays count from the patched layer on (the clean prefix once), clean losses once per stage. Stages
with no such work (prepare, validate, tune, fit, report) have no floor: all of their time is overhead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass(frozen=True)
class Work:
    """What a stage must compute, whatever its implementation."""

    token_layers: float = 0.0  # tokens × decoder blocks forwarded
    head_tokens: float = 0.0  # tokens through the LM head (log-softmax over the vocabulary)
    flops64: float = 0.0  # float64 GEMM FLOPs (Gram matrices, predictions)
    flops32: float = 0.0  # float32 GEMM FLOPs (SAE encoders, SAE training)

    def __add__(self, other: Work) -> Work:
        return Work(
            self.token_layers + other.token_layers,
            self.head_tokens + other.head_tokens,
            self.flops64 + other.flops64,
            self.flops32 + other.flops32,
        )

    def times(self, n: int) -> Work:
        return Work(n * self.token_layers, n * self.head_tokens, n * self.flops64, n * self.flops32)


@dataclass(frozen=True)
class Rates:
    """Throughputs measured in this invocation."""

    token_layers_per_s: float
    head_tokens_per_s: float
    flops64_per_s: float
    flops32_per_s: float

    def scaled(self, factor: float) -> Rates:
        return Rates(*(factor * v for v in vars(self).values()))

    def seconds(self, work: Work) -> float:
        return (
            work.token_layers / self.token_layers_per_s
            + work.head_tokens / self.head_tokens_per_s
            + work.flops64 / self.flops64_per_s
            + work.flops32 / self.flops32_per_s
        )


@dataclass(frozen=True)
class Sizes:
    """The run's model and store sizes (from the store's manifest)."""

    n_layers: int  # decoder blocks of the model
    d_model: int
    stored_layers: list[int]
    tokens: dict[str, int]  # split → stored tokens
    rows: dict[str, int]  # split → tokens minus special (BOS) tokens: the rows every fit and score uses

    @classmethod
    def from_manifest(cls, path: Path) -> Sizes:
        try:
            manifest = json.loads(path.read_text())
            splits = manifest["splits"]
            return cls(
                n_layers=manifest["model"]["n_layers"],
                d_model=manifest["d_model"],
                stored_layers=sorted(manifest["layers"]),
                tokens={s: v["tokens"] for s, v in splits.items()},
                rows={s: v["tokens"] - v["special_tokens"] for s, v in splits.items()},
            )
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"{path}: not a readable store manifest ({e!r})") from e

    def tail(self, layer: int) -> int:
        """Blocks after `layer`: what a patch of layer's output must rerun."""
        return self.n_layers - layer - 1


def gram(rows: float, d: int, blocks: float) -> float:
    """FLOPs of `blocks` d×d products over `rows` rows (a general GEMM: 2·rows·d² each)."""
    return 2.0 * rows * d * d * blocks


def patched_passes(sizes: Sizes, tokens: float, head_tokens: float, layers: list[int], clean: bool) -> Work:
    """One replay per entry of `layers` (a patch of that layer's output: the tail + the LM head), plus,
    with `clean`, the clean forward and its loss once."""
    work = Work(token_layers=tokens * sum(sizes.tail(t) for t in layers), head_tokens=head_tokens * len(layers))
    return work + (Work(tokens * sizes.n_layers, head_tokens) if clean else Work())


def stage_work(stage: str, pair: str | None, p: dict[str, Any], sizes: Sizes) -> Work | None:
    """The floor's work of one stage (per pair for the per-pair stages) from the run's raw params;
    None for a stage with no forward pass or GEMM."""
    from ato.kinds import keys_for, kinds_for

    d, pairs = sizes.d_model, p["pairs"]
    targets = sorted({q["L"] + q["k"] for q in pairs.values()})
    if stage == "collect":
        return Work(token_layers=sum(sizes.tokens.values()) * (max(sizes.stored_layers) + 1))
    if stage == "stats":
        rows = sum(sizes.tokens.values()) if p["stats"]["include_bos"] else sum(sizes.rows.values())
        layers = {q["L"] for q in pairs.values()} | set(targets)
        return Work(flops64=gram(rows, d, len(layers) + len(pairs)))  # each layer's Gram + each pair's cross
    if stage == "sae":
        return _sae_work(p, sizes, targets)
    if stage == "select":
        s, seq = p["select"], p["corpus"]["max_length"]
        span = seq if s["causal_horizon"] is None else s["causal_horizon"] + 1
        runs = s["exact_budget"] * s["exact_sequences"] * span  # tokens from each first activation on
        exact = patched_passes(sizes, runs, runs, targets, clean=False)
        return exact + Work(s["causal_sequences"] * seq * sizes.n_layers, s["causal_sequences"] * (seq - 1))
    if stage == "evaluate":
        n = sizes.rows["test"]
        return Work(flops64=gram(n, d, 2), flops32=2.0 * n * d * p["sae"]["width"])  # ATO, OLS; SAE encode of y
    if stage == "causal_reference":
        c = p["causal"]
        tokens, head = c["n_sequences"] * c["seq_len"], c["n_sequences"] * (c["seq_len"] - 1)
        per_target = sum(k.causal == "target" for k in kinds_for("causal")) * len(c["position_sets"])
        return patched_passes(sizes, tokens, head, targets * per_target, clean=True)
    if stage == "causal" and pair is not None:
        c, q = p["causal"], pairs[pair]
        tokens, head = c["n_sequences"] * c["seq_len"], c["n_sequences"] * (c["seq_len"] - 1)
        per_pair = sum(k.causal == "pair" for k in kinds_for("causal")) * len(c["position_sets"])
        prefix = Work(token_layers=tokens * (q["L"] + q["k"] + 1))  # the clean loss is the reference's
        return prefix + patched_passes(sizes, tokens, head, [q["L"] + q["k"]] * per_pair, clean=False)
    if stage == "languages":
        lp = p["languages"]
        n_fit, n_test = lp["fit_tokens"], lp["test_tokens"]
        tokens, head = (
            lp["causal_sequences"] * lp["causal_seq_len"],
            lp["causal_sequences"] * (lp["causal_seq_len"] - 1),
        )
        conditions = 2 + int(lp["causal_own"])  # operator, mean (+ own)
        one = Work(token_layers=(n_fit + n_test) * (max(targets) + 1), flops64=gram(n_fit + n_test, d, 3 * len(pairs)))
        one += patched_passes(sizes, tokens, head, targets_of(pairs) * conditions, clean=True)
        return one.times(len(lp["sources"]))
    if stage == "atlas":
        return _atlas_work(p, sizes, len(keys_for("atlas")) + len(keys_for("atlas_reference")))
    if stage == "context":
        return _context_work(p, sizes, targets)
    return None


def targets_of(pairs: dict[str, dict[str, int]]) -> list[int]:
    """Each pair's target layer (a layer twice when two pairs share it)."""
    return [q["L"] + q["k"] for q in pairs.values()]


def _sae_work(p: dict[str, Any], sizes: Sizes, targets: list[int]) -> Work:
    """Streamed TRAIN tokens beyond the store (to the deepest target), training (the encoder's forward and
    weight gradient; the top-k decoder's sparse rows are ≤ k/width of that), and the splice evaluation."""
    s, d = p["sae"], sizes.d_model
    if s["source"] != "train":
        return Work()
    streamed = max(0, s["tokens"] - sizes.rows["train"]) * (max(targets) + 1)
    training = len(targets) * s["steps"] * s["batch_tokens"] * 4.0 * d * s["width"]
    e = s["eval_sequences"] * s["eval_seq_len"]
    head = s["eval_sequences"] * (s["eval_seq_len"] - 1)
    splice = patched_passes(sizes, e, head, targets * 2, clean=True) if e else Work()  # SAE, ablation
    return Work(token_layers=streamed, flops32=training) + splice


def _context_work(p: dict[str, Any], sizes: Sizes, targets: list[int]) -> Work:
    """One forward of every split's context tokens to the deepest target; per pair, the union Gram of
    its p = d·(2 + lags + k) stacked inputs and the target (XᵀX's upper triangle, XᵀY, YᵀY: float32
    products, `context.gram_dtype`) and, per fitted kind, the two p³ GEMMs that rotate the validation
    Gram into the train eigenbasis (the eigendecompositions themselves are not GEMMs: left out, so the
    floor is low and the ratio conservative)."""
    from ato.math.context import FITTED_KINDS, context_columns

    c, d = p["context"], sizes.d_model
    rows = sum(c["tokens"][s] or sizes.rows[s] for s in ("train", "val", "test"))
    tokens = sum(c["tokens"][s] or sizes.tokens[s] for s in ("train", "val", "test"))
    work = Work(token_layers=tokens * (max(targets) + 1))
    for q in p["pairs"].values():
        width = d * (2 + c["lags"] + q["k"])
        products = rows * (width * width + 2.0 * width * d + d * d)
        fits = sum(4.0 * len(context_columns(kind, d, c["lags"], q["k"])) ** 3 for kind in FITTED_KINDS)
        work += Work(flops32=products, flops64=fits)
    return work


def _atlas_work(p: dict[str, Any], sizes: Sizes, conditions: int) -> Work:
    """The banded joint Gram (every stored layer with those up to k_max above it), the mean Jacobian's
    directional derivatives (one forward of the pair's blocks per direction) and the patched pairs."""
    a, d, layers = p["atlas"], sizes.d_model, sizes.stored_layers
    rows = sum(a["tokens"][s] or sizes.rows[s] for s in ("train", "test"))
    blocks = sum(min(a["k_max"], len(layers) - 1 - i) + 1 for i in range(len(layers)))
    inputs = layers[:-1] if a["jacobian_layers"] == "all" else a["jacobian_layers"]
    jac_tokens = a["jacobian_sequences"] * a["jacobian_seq_len"] * a["jacobian_directions"]
    jacobian = jac_tokens * sum(min(a["k_max"], sizes.n_layers - 1 - L) for L in inputs)
    c = a["causal_sequences"] * a["causal_seq_len"]
    head = a["causal_sequences"] * (a["causal_seq_len"] - 1)
    patched = targets_of({n: p["pairs"][n] for n in a["causal_pairs"]}) * conditions
    causal = patched_passes(sizes, c, head, patched, clean=bool(patched))
    return Work(token_layers=jacobian, flops64=gram(rows, d, blocks)) + causal


def stage_walls(run: Path, pairs: list[str]) -> dict[str, float | None]:
    """dvc.lock stage name (`causal@L05_k1`) → seconds from the previous stage's last output to its own
    (None for the first: nothing marks its start), in the order the stages finished. Entries of pairs no
    longer in params.yaml (DVC keeps them in the lock) are left out."""
    try:
        stages = yaml.safe_load((run / "dvc.lock").read_text())["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise SystemExit(f"{run / 'dvc.lock'}: not a dvc.lock of a finished run ({e!r})") from e
    current = {name: spec for name, spec in stages.items() if name.partition("@")[2] in ("", *pairs)}
    ends = {name: _last_mtime(run, spec.get("outs", [])) for name, spec in current.items()}
    walls: dict[str, float | None] = {}
    previous = None
    for name, end in sorted(ends.items(), key=lambda item: item[1]):
        walls[name] = None if previous is None else end - previous
        previous = end
    return walls


def _last_mtime(run: Path, outs: list[dict[str, Any]]) -> float:
    paths = [run / out["path"] for out in outs]
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    if not files:
        raise SystemExit(f"{run}: no output of {[str(p) for p in paths]} exists; is the run finished?")
    return max(f.stat().st_mtime for f in files)


def _median_rate(fn: Any, amount: float, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return amount / statistics.median(seconds)


def measure_rates(run: Path, raw: dict[str, Any], tokens: int, repeats: int) -> Rates:
    """Bare forward (bench/collect.py's, on RUN_DIR's model and corpus), bare LM head and GEMM rates."""
    import torch

    from ato.lm_head import native_bfloat16
    from ato.models import load_prepared
    from ato.params import parse_params
    from collect import bare_forward_seconds

    short = {**raw, "corpus": {**raw["corpus"], "tokens": {"train": tokens, "val": 256, "test": 256}}}
    params = parse_params(short, root=run)
    bare_forward_seconds(params)  # warm-up
    runs = [bare_forward_seconds(params) for _ in range(repeats)]
    forward = statistics.median(n / s for s, n in runs)
    model, _tok, info = load_prepared(params.path("model_dir"))
    weight = model.get_output_embeddings().weight.detach()
    dtype = torch.bfloat16 if raw["causal"]["lm_head_dtype"] == "bfloat16" and native_bfloat16(weight.device) else None
    weight = weight.to(dtype or weight.dtype)
    rows = torch.randn(256, info.d_model).to(weight.dtype)
    head = _median_rate(lambda: torch.logsumexp((rows @ weight.T).float(), dim=-1), len(rows), repeats)
    a64, a32 = torch.randn(4096, info.d_model, dtype=torch.float64), torch.randn(4096, info.d_model)
    flops = 2.0 * 4096 * info.d_model**2
    return Rates(
        token_layers_per_s=forward * info.n_layers,
        head_tokens_per_s=head,
        flops64_per_s=_median_rate(lambda: a64.T @ a64, flops, repeats),
        flops32_per_s=_median_rate(lambda: a32.T @ a32, flops, repeats),
    )


@dataclass
class Row:
    stage: str
    count: int
    wall: float | None
    floor: float | None


def roofline(run: Path, rates: Rates, raw: dict[str, Any]) -> list[Row]:
    """One row per stage (its per-pair instances summed), in the order they finished."""
    sizes = Sizes.from_manifest(run / raw["paths"]["store"] / "manifest.json")
    rows: dict[str, Row] = {}
    for name, wall in stage_walls(run, list(raw["pairs"])).items():
        stage, _, pair = name.partition("@")
        work = stage_work(stage, pair or None, raw, sizes)
        row = rows.setdefault(stage, Row(stage, 0, 0.0, None if work is None else 0.0))
        row.count += 1
        row.wall = None if wall is None or row.wall is None else row.wall + wall
        if work is not None and row.floor is not None:
            row.floor += rates.seconds(work)
    return list(rows.values())


def _cell(value: float | None, digits: int = 1) -> str:
    """One decimal for the large; three significant figures below 10, so a tiny run's floor of a few
    milliseconds does not print as 0.0."""
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}" if abs(value) >= 10 else f"{value:.3g}"


def table(rows: list[Row]) -> str:
    """Markdown: stage, wall, floor, wall/floor; the run's line sums the stages with a known wall."""
    lines = ["| stage | wall s | floor s | wall / floor |", "|---|---:|---:|---:|"]
    for r in rows:
        ratio = r.wall / r.floor if r.wall is not None and r.floor else None
        name = r.stage if r.count == 1 else f"{r.stage} ×{r.count}"
        lines.append(f"| {name} | {_cell(r.wall)} | {_cell(r.floor)} | {_cell(ratio)} |")
    wall = sum(r.wall for r in rows if r.wall is not None)
    floor = sum(r.floor or 0.0 for r in rows if r.wall is not None)
    ratio = wall / floor if floor else None
    lines.append(f"| **run** (stages with a known start) | {_cell(wall)} | {_cell(floor)} | {_cell(ratio)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, nargs="?", default=Path("."), help="a project after `dvc repro` (read only)")
    ap.add_argument("--tokens", type=int, default=2048, help="TRAIN tokens of the bare forward measurement")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--run-forward",
        type=float,
        default=None,
        metavar="TOK_PER_S",
        help="the bare forward tok/s measured in the run's own session (bench/collect.py): every rate measured "
        "here is scaled by its ratio to this one's, for a machine busier or idler now than during the run",
    )
    args = ap.parse_args()
    import torch

    run = args.run.resolve()
    raw = yaml.safe_load((run / "params.yaml").read_text())
    rates = measure_rates(run, raw, args.tokens, args.repeats)
    n_layers = Sizes.from_manifest(run / raw["paths"]["store"] / "manifest.json").n_layers
    if args.run_forward:
        print(f"measured bare forward {rates.token_layers_per_s / n_layers:,.0f} tok/s: every rate scaled to the run's")
        rates = rates.scaled(args.run_forward * n_layers / rates.token_layers_per_s)
    print(
        f"\nbench/pipeline.py {args.run}  ({torch.get_num_threads()} threads; bare forward "
        f"{rates.token_layers_per_s:,.0f} token-layers/s, LM head {rates.head_tokens_per_s:,.0f} tok/s, "
        f"GEMM {rates.flops64_per_s / 1e9:,.1f} GFLOP/s float64, {rates.flops32_per_s / 1e9:,.1f} float32; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)\n"
    )
    print(table(roofline(run, rates, raw)))


if __name__ == "__main__":
    main()
