"""Stage `prepare`: a local float32 safetensors copy of the model + tokenizer, with its digest."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ato.artifacts import Layout, ModelInfo, atomic_path
from ato.models import EMBEDDED_MODEL_NAME, load_source, n_layers, save_local_copy, weights_digest
from ato.params import Params

log = logging.getLogger(__name__)


def main(params: Params) -> Path:
    p, layout = params.prepare, Layout.from_params(params)
    t0 = time.perf_counter()
    log.info("prepare: loading %r …", p.source)
    model, tokenizer = load_source(p.source, p.gguf_file, p.revision, getattr(torch, p.dtype))
    with atomic_path(layout.model_dir) as tmp:  # the directory appears complete or not at all
        save_local_copy(model, tokenizer, tmp)
        info = ModelInfo(
            name=EMBEDDED_MODEL_NAME if p.source == "embedded" else p.source,
            source=p.source,
            model_type=model.config.model_type,
            architecture=type(model).__name__,
            n_layers=n_layers(model),
            d_model=int(model.config.hidden_size),
            vocab_size=int(model.config.vocab_size),
            dtype=p.dtype,
            weights_digest=weights_digest(tmp),
            bos_token_id=tokenizer.bos_token_id,
        )
        info.write(tmp / layout.model_info.name)
    log.info(
        "prepare: %s (%d layers, d=%d) → %s in %.0fs; digest %s",
        info.name,
        info.n_layers,
        info.d_model,
        layout.model_dir,
        time.perf_counter() - t0,
        info.weights_digest[:12],
    )
    return layout.model_dir
