"""Stage `prepare`: a local float32 safetensors copy of the model + tokenizer, with its digest."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from ..models import EMBEDDED_MODEL_NAME, load_source, n_layers, save_local_copy, weights_digest
from ..params import Params, check_depth
from ..store import write_json_atomic


def main(params: Params) -> Path:
    p = params.prepare
    out = params.path("model_dir")
    t0 = time.perf_counter()
    print(f"prepare: loading {p.source!r} …", flush=True)
    model, tokenizer = load_source(p.source, p.gguf_file, p.revision, getattr(torch, p.dtype))
    check_depth(params, n_layers(model))
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_local_copy(model, tokenizer, tmp)
    info = {
        "name": EMBEDDED_MODEL_NAME if p.source == "embedded" else p.source,
        "source": p.source,
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "n_layers": n_layers(model),
        "d_model": int(model.config.hidden_size),
        "vocab_size": int(model.config.vocab_size),
        "dtype": p.dtype,
        "weights_digest": weights_digest(tmp),
        "bos_token_id": tokenizer.bos_token_id,
    }
    write_json_atomic(tmp / "ato_model.json", info)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"prepare: {info['name']} ({info['n_layers']} layers, d={info['d_model']}) → {out} "
          f"in {time.perf_counter() - t0:.0f}s; digest {info['weights_digest'][:12]}")
    return out
