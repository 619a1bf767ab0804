"""MLflow "model from code" for a registered operator: no pickle is written or read.

`mlflow.pyfunc.load_model("models:/<name>@champion").predict(x)` maps upstream residuals
[n, d_model] (any real dtype, cast to float32) to predicted downstream residuals (float32) with the
operator's safetensors weights. `predict` is typed (numpy in, numpy out) and checks the input's shape
itself, naming shapes, never printing the array; `ato.tracking.register_operator` logs the model with
its output signature (`ato.tracking.operator_signature`) and an input example.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel, PythonModelContext


class OperatorModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        from pathlib import Path

        from ato.operators import WEIGHTS, load_operator

        root = Path(context.artifacts["operator"])
        # the shallowest copy of the weights: the operator itself, never one of its variants
        found = sorted((p.parent for p in root.rglob(WEIGHTS)), key=lambda p: (len(p.parts), str(p)))
        self.operator = load_operator(root if (root / WEIGHTS).exists() else found[0])

    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        x = np.asarray(getattr(model_input, "values", model_input))
        d = self.operator.config.d_model
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"expected upstream residuals of shape [n, {d}]; got an array of shape {x.shape}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"expected real numbers; got an array of dtype {x.dtype}")
        return self.operator.predict_numpy(x.astype(np.float32))


mlflow.models.set_model(OperatorModel())
