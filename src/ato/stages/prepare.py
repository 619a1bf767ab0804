"""Stage `prepare`: a local float32 safetensors copy of the model + tokenizer, with its digest; the saved
tokenizer begins every text with the sequence-start token `prepare.sequence_start` chooses
(docs/conventions.md#bos)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ato.artifacts import Layout, ModelInfo, atomic_path
from ato.artifacts.model import model_label
from ato.models import load_source, n_layers, save_local_copy, set_sequence_start, weights_digest
from ato.params import Params

log = logging.getLogger(__name__)


def main(params: Params) -> Path:
    p, layout = params.prepare, Layout.from_params(params)
    t0 = time.perf_counter()
    log.info("prepare: loading %r …", p.source)
    model, tokenizer = load_source(p.source, p.gguf_file, p.revision, getattr(torch, p.dtype))
    declared_bos = tokenizer.bos_token
    start, rule = set_sequence_start(tokenizer, p.sequence_start)
    if rule in {"separator", "eos"}:
        log.warning(
            "prepare: the tokenizer adds no sequence-start token (it declares BOS %r but does not add it); "
            "every sequence will begin with %r, its %s (set prepare.sequence_start to choose another)",
            declared_bos,
            start,
            "document separator" if rule == "separator" else "eos token",
        )
    with atomic_path(layout.model_dir) as tmp:  # the directory appears complete or not at all
        save_local_copy(model, tokenizer, tmp)
        info = ModelInfo(
            name=model_label(p),
            source=p.source,
            model_type=model.config.model_type,
            architecture=type(model).__name__,
            n_layers=n_layers(model),
            d_model=int(model.config.hidden_size),
            vocab_size=int(model.config.vocab_size),
            dtype=p.dtype,
            weights_digest=weights_digest(tmp),
            bos_token_id=tokenizer.bos_token_id,
            sequence_start=start,
            sequence_start_rule=rule,
        )
        info.write(tmp / layout.model_info.name)
    log.info(
        "prepare: %s (%d layers, d=%d; sequences begin with %r) → %s in %.0fs; digest %s",
        info.name,
        info.n_layers,
        info.d_model,
        start,
        layout.model_dir,
        time.perf_counter() - t0,
        info.weights_digest[:12],
    )
    return layout.model_dir
