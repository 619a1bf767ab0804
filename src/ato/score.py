"""`ato score` / `ato.score_text` / `ato.score_file`: an operator scored on a user's own documents.

The same pieces as the pipeline: the residual accumulators, the public splice (`ato.splicing`), the LM-head
loss and the causal stage's intervals over units (`ato.math.intervals`), streaming one window at a time.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ato.evaluate.errors import EvaluateError


@dataclass
class UnitSums:
    """Per-unit sums for intervals over documents, in bounded memory: once `cap` units exist, adjacent
    units are merged pairwise (a unit then holds 2, 4, … consecutive documents), so a file of any
    length keeps at most `cap` units of a few floats and a few `d`-vectors each."""

    d: int
    cap: int = 4096
    size: int = 1  # documents per unit
    fill: int = 0  # documents in the last unit
    scalars: dict[str, list[float]] = field(default_factory=dict)
    vectors: dict[str, list[np.ndarray]] = field(default_factory=dict)  # [d] sums per unit

    @property
    def n_units(self) -> int:
        return len(next(iter(self.scalars.values()), []))

    def add(self, values: dict[str, float], vectors: dict[str, np.ndarray]) -> None:
        if not self.n_units or self.fill == self.size:
            if self.n_units >= self.cap:
                self._halve()
            for key in values:
                self.scalars.setdefault(key, []).append(0.0)
            for key in vectors:
                self.vectors.setdefault(key, []).append(np.zeros(self.d))
            self.fill = 0
        for key, value in values.items():
            self.scalars[key][-1] += value
        for key, vector in vectors.items():
            self.vectors[key][-1] += vector
        self.fill += 1

    def _halve(self) -> None:
        self.scalars = {k: [sum(v[i : i + 2]) for i in range(0, len(v), 2)] for k, v in self.scalars.items()}
        self.vectors = {
            k: [sum(v[i : i + 2], np.zeros(self.d)) for i in range(0, len(v), 2)] for k, v in self.vectors.items()
        }
        self.size *= 2

    def array(self, key: str) -> np.ndarray:
        return np.asarray(self.scalars.get(key, []), dtype=np.float64)

    def matrix(self, key: str) -> np.ndarray:
        """[units, d] of a vector sum."""
        return np.asarray(self.vectors.get(key, []), dtype=np.float64).reshape(-1, self.d)


MIN_RELIABLE_DOCUMENTS = 10  # below this, intervals over documents lose their coverage (docs/statistics.md)


R2_INTERVAL = (
    "R² = 1 − Σ SSE / Σ SST (weighted) or 1 − mean over dimensions of SSE_d / SST_d (uniform): the same "
    "hull of t and bootstrap-t, on log(SSE/SST) and mapped back, so no bound exceeds 1; the pooled mean ȳ "
    "is held fixed (its variability is O(1/n))"
)


@dataclass
class TextScore:
    """An operator scored on a user's documents: residual R² at the spliced positions and Δ log-perplexity
    of the spliced model vs the clean one, each beside the identity map (ŷ = x: blocks L+1..T skipped),
    with intervals over documents (`ato.math.intervals`, docs/statistics.md#intervals)."""

    operator: str  # where the operator came from (directory, registry URI, variant)
    layer_in: int
    layer_out: int
    mode: str  # splice mode ("replace" / "add-delta")
    n_documents: int
    n_sequences: int  # windows of at most max_length tokens, each BOS-led
    n_units: int  # resampling units (documents, merged pairwise beyond the unit cap)
    n_residual_rows: int  # tokens scored for R² (= positions spliced: not BOS, not special)
    n_predictions: int  # next-token predictions scored for log-perplexity
    r2: dict[str, float]  # uniform average over dimensions (the pipeline's headline residual R²) with its interval
    r2_weighted: dict[str, float]  # variance-weighted R² with its interval
    identity_r2: dict[str, float]
    identity_r2_weighted: dict[str, float]
    logppl_clean: float  # mean NLL (nats/token) of the unpatched model
    logppl_spliced: float
    delta_logppl: dict[str, float]  # spliced − clean, with its interval
    identity_delta_logppl: dict[str, float]  # identity splice (replace) − clean, with its interval
    interval: dict[str, Any]  # method, level, resamples, what the unit is
    warnings: list[str] = field(default_factory=list)  # what the reader must know before trusting the numbers

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)

    def table(self) -> str:
        """A plain-text summary: each number beside the identity map's, warnings first."""

        def iv(d: dict[str, float]) -> str:
            return f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"

        lvl = f"{100 * self.interval['level']:.0f} %"
        return "\n".join(
            [
                *self.warnings,
                f"operator {self.operator}: layer {self.layer_in} → {self.layer_out}, splice mode {self.mode}",
                f"{self.n_documents} documents, {self.n_sequences} sequences, {self.n_residual_rows} spliced "
                f"positions, {self.n_predictions} predictions; {lvl} intervals over {self.n_units} units "
                f"({self.interval['method']})",
                f"{'':24s} {'operator':>34s} {'identity (ŷ = x)':>34s}",
                f"{'residual R² (uniform)':24s} {iv(self.r2):>34s} {iv(self.identity_r2):>34s}",
                f"{'residual R² (weighted)':24s} {iv(self.r2_weighted):>34s} {iv(self.identity_r2_weighted):>34s}",
                f"{'Δ log-ppl vs clean':24s} {iv(self.delta_logppl):>34s} {iv(self.identity_delta_logppl):>34s}",
                f"clean log-ppl {self.logppl_clean:.4f} nats/token; spliced {self.logppl_spliced:.4f}",
            ]
        )


def iter_documents(path: str | Path, text_field: str = "text") -> Generator[str]:
    """Documents of a file, streamed: `.jsonl` one JSON object per line (`text_field`), anything else
    plain text with documents separated by blank lines (the corpus's .txt format)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"{path}: no such file")
    with open(path, encoding="utf-8") as fh:
        if path.suffix == ".jsonl":
            for line_no, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield str(json.loads(line)[text_field])
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise EvaluateError(f"{path}:{line_no}: not a JSON object with {text_field!r}: {exc}") from None
            return
        block: list[str] = []
        for line in fh:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
        if block:
            yield "\n".join(block)


def _windows(tokenizer: Any, text: str, max_length: int) -> list[list[int]]:
    """BOS-led windows of at most `max_length` tokens covering the document (each later window gets a BOS too)."""
    from ato.corpus import tokenize_document

    ids = tokenize_document(tokenizer, text, None)
    bos = tokenizer.bos_token_id
    head, body = ([bos], ids[1:]) if bos is not None and ids and ids[0] == bos else ([], ids)
    step = max(1, max_length - len(head))
    return [head + body[i : i + step] for i in range(0, len(body), step) if len(head) + len(body[i : i + step]) >= 2]


def score_text(
    model: Any,
    tokenizer: Any,
    op: Any,
    texts: Iterable[str],
    *,
    max_length: int = 256,
    mode: str = "replace",
    model_digest: str | None = "auto",
    chunk_rows: int = 256,
    level: float = 0.95,
    method: str = "studentized_hull",
    n_resamples: int = 2000,
    seed: int = 0,
    max_units: int = 4096,
    source: str = "",
    progress: bool = True,
) -> TextScore:
    """Score operator `op` (an `ato.Operator`) spliced into `model` on `texts`, streamed one window at a
    time: nothing grows with the input but the (capped) per-unit sums. Every non-BOS, non-special
    position is spliced; a document is the resampling unit."""
    import torch
    from tqdm.auto import tqdm

    from ato.splicing import check_model

    check_model(model, op.config, model_digest)
    d = int(op.config.d_model)
    units = UnitSums(d, max_units)
    special_ids = torch.as_tensor(sorted(set(tokenizer.all_special_ids)))
    counts = {"documents": 0, "sequences": 0}
    shift: list[np.ndarray] = []
    with torch.inference_mode():
        for text in tqdm(texts, desc="score", unit="doc", disable=not progress):
            doc: dict[str, float] = {}
            doc_vectors = {key: np.zeros(d) for key in ("y", "yy", "sse_op", "sse_identity")}
            for window in _windows(tokenizer, text, max_length):
                sums, rows = _score_window(model, op, window, special_ids, chunk_rows, mode)
                if len(rows["y"]):
                    shift = shift or [rows["y"].mean(0)]
                    yc = rows["y"] - shift[0]  # about a fixed centre: sums of squares without cancellation
                    doc_vectors["y"] += yc.sum(0)
                    doc_vectors["yy"] += (yc * yc).sum(0)
                    for name in ("op", "identity"):
                        doc_vectors[f"sse_{name}"] += ((rows["y"] - rows[name]) ** 2).sum(0)
                for k, v in sums.items():
                    doc[k] = doc.get(k, 0.0) + v
                counts["sequences"] += 1
            if doc:
                units.add(doc, doc_vectors)
                counts["documents"] += 1
    if counts["documents"] == 0:
        raise EvaluateError("no document of at least two tokens to score")
    return _text_score(op, units, counts, mode, source, level, method, n_resamples, seed)


def _score_window(
    model: Any,
    op: Any,
    window: list[int],
    special_ids: Any,
    chunk_rows: int,
    mode: str,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """One BOS-led window: the clean forward (residuals x_L, y_T and the NLL), the operator's and the
    identity's spliced forwards; returns its sums and, at the spliced positions, the true y rows and
    the operator's and the identity's predictions."""
    import torch

    from ato.causal.forward import token_nll
    from ato.models import capture_residuals, final_hidden
    from ato.splicing import spliced

    device = next(model.parameters()).device
    ids = torch.tensor([window], device=device)
    mask = ~torch.isin(ids, special_ids.to(device))
    mask[:, 0] = False
    L, T = op.layer_in, op.layer_out
    with capture_residuals(model, [L, T], stop_early=False) as cap:
        hidden = final_hidden(model, ids)
    clean = token_nll(model, ids, chunk_rows, hidden=hidden)
    rows = mask.nonzero(as_tuple=True)
    x, y = cap[L][rows].double().cpu().numpy(), cap[T][rows].double().cpu().numpy()
    param = next(model.parameters())
    W, b = op.W.to(param.device, param.dtype), op.b.to(param.device, param.dtype)
    y_hat = torch.nn.functional.linear(cap[L][rows], W, b).double().cpu().numpy()
    sums = {  # the same keys for every window (UnitSums adds them up per unit)
        "predictions": float(clean.numel()),
        "rows": float(len(y)),
        "nll_clean": float(clean.double().sum()),
    }
    for name, value, how in (
        ("op", lambda v: torch.nn.functional.linear(v, W, b), mode),
        ("identity", lambda v: v, "replace"),
    ):
        with spliced(model, T, value, rows, L, how):
            sums[f"nll_{name}"] = float(token_nll(model, ids, chunk_rows).double().sum())
    return sums, {"y": y, "op": y_hat, "identity": x}


def _text_score(
    op: Any,
    units: UnitSums,
    counts: dict[str, int],
    mode: str,
    source: str,
    level: float,
    method: str,
    n_resamples: int,
    seed: int,
) -> TextScore:
    from ato.math.intervals import delta_interval, mean_ratio_interval, ratio_interval

    kw: dict[str, Any] = {"level": level, "method": method, "n_resamples": n_resamples, "seed": seed}
    n_rows = units.array("rows")
    m = units.matrix("y")  # [units, d] Σ (y − shift)
    mean = m.sum(0) / n_rows.sum() if n_rows.sum() > 0 else np.zeros(units.d)
    # SST_jd about the pooled mean: Σ(y − ȳ)² = Σ(y − c)² − 2 (ȳ − c) Σ(y − c) + n (ȳ − c)², with c = shift
    sst = np.clip(units.matrix("yy") - 2 * m * mean + n_rows[:, None] * mean**2, 0.0, None)
    preds = units.array("predictions")

    def r2(name: str, weighted: bool) -> dict[str, float]:
        sse = units.matrix(f"sse_{name}")
        if sst.sum() <= 0:
            return _interval_dict(math.nan, math.nan, math.nan)
        if weighted:  # Σ SSE / Σ SST, R² = 1 − that
            iv = ratio_interval(sse.sum(1), sst.sum(1), log_scale=True, **kw)
        else:
            iv = mean_ratio_interval(sse, sst, level=level, n_resamples=n_resamples, seed=seed)
        return _interval_dict(1 - iv.estimate, 1 - iv.high, 1 - iv.low)

    def delta(name: str) -> dict[str, float]:
        iv = delta_interval(units.array(f"nll_{name}"), units.array("nll_clean"), preds, **kw)
        return _interval_dict(iv.estimate, iv.low, iv.high)

    return TextScore(
        operator=source,
        layer_in=op.layer_in,
        layer_out=op.layer_out,
        mode=mode,
        n_documents=counts["documents"],
        n_sequences=counts["sequences"],
        n_units=len(preds),
        n_residual_rows=int(n_rows.sum()),
        n_predictions=int(preds.sum()),
        r2=r2("op", weighted=False),
        r2_weighted=r2("op", weighted=True),
        identity_r2=r2("identity", weighted=False),
        identity_r2_weighted=r2("identity", weighted=True),
        logppl_clean=float(units.array("nll_clean").sum() / preds.sum()),
        logppl_spliced=float(units.array("nll_op").sum() / preds.sum()),
        delta_logppl=delta("op"),
        identity_delta_logppl=delta("identity"),
        interval={
            "method": method,
            "level": level,
            "resamples": n_resamples,
            "unit": f"document (merged in runs of {units.size})" if units.size > 1 else "document",
            "r2_method": R2_INTERVAL,
        },
        warnings=[_few_documents_warning(counts["documents"])] if counts["documents"] < MIN_RELIABLE_DOCUMENTS else [],
    )


def _few_documents_warning(n_documents: int) -> str:
    return (
        f"WARNING: only {n_documents} document(s): intervals over documents are unreliable below "
        f"{MIN_RELIABLE_DOCUMENTS} (too few units to estimate their spread); score more documents"
    )


def _interval_dict(estimate: float, low: float, high: float) -> dict[str, float]:
    return {"estimate": float(estimate), "low": float(low), "high": float(high), "half_width": float((high - low) / 2)}


def score_file(
    text: str | Path,
    operator: str | Path,
    model_dir: str | Path = "models/base",
    *,
    variant: str | None = None,
    device: str = "cpu",
    text_field: str = "text",
    tracking_uri: str | None = None,
    **kwargs: Any,
) -> TextScore:
    """`ato score`: check the text file, load the operator (directory or `models:/…`; `tracking_uri`:
    `ato.operators.registry_tracking_uri`) and the model (a prepared directory, else any HF causal LM
    directory or id), then `score_text` over the file's documents, streamed."""
    from ato.artifacts import model_info_path
    from ato.models import load_prepared, load_source, resolve_device
    from ato.operators import identity_warning, load_operator, variant_dir

    documents = iter_documents(text, text_field)  # before the slow part: a bad file fails now
    first = next(documents, None)
    documents.close()
    if first is None:
        raise EvaluateError(f"{text}: no documents (the file is empty or holds only blank lines)")
    op = load_operator(operator, variant=variant, tracking_uri=tracking_uri)
    if model_info_path(model_dir).exists():
        model, tokenizer, _info = load_prepared(model_dir, device=str(resolve_device(device)))
    else:
        model, tokenizer = load_source(str(model_dir))
        model.to(resolve_device(device))
    where = f"{operator}" + (f" (variant {variant})" if variant else "")
    try:
        result = score_text(model, tokenizer, op, iter_documents(text, text_field), source=where, **kwargs)
    except EvaluateError as exc:
        raise EvaluateError(f"{text}: {exc}") from None
    local = None if str(operator).startswith("models:/") else Path(operator)
    below = identity_warning(op.config, variant_dir(local, variant) if local and variant else local)
    result.warnings += [below] if below else []
    return result


def score_command(args: Any) -> int:
    """`ato score` (arguments: `ato.cli`): the table on stdout, the JSON to a file too (`--json FILE`),
    or the JSON alone on stdout and the table on stderr (`--json`); warnings head the table."""
    import json
    import sys

    from ato.artifacts import json_clean, write_json_atomic

    result = score_file(
        args.text,
        args.operator,
        args.model,
        variant=args.variant,
        device=args.device,
        text_field=args.text_field,
        tracking_uri=args.tracking_uri,
        max_length=args.max_length,
        mode=args.mode,
    )
    to_stdout = args.json == "-"
    (sys.stderr if to_stdout else sys.stdout).write(result.table() + "\n")
    if to_stdout:
        sys.stdout.write(json.dumps(json_clean(result.to_dict()), indent=2, sort_keys=True, allow_nan=False) + "\n")
    elif args.json:
        write_json_atomic(args.json, result.to_dict())
    return 0
