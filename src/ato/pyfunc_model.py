"""MLflow "model from code" for a registered operator: no pickle is written or read.

`mlflow.pyfunc.load_model("models:/<name>@champion").predict(x)` maps upstream residuals
[n, d_model] to predicted downstream residuals with the operator's safetensors weights.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class OperatorModel(PythonModel):
    def load_context(self, context):
        from pathlib import Path

        from ato.operators import WEIGHTS, load_operator

        root = Path(context.artifacts["operator"])
        directory = root if (root / WEIGHTS).exists() else next(p.parent for p in root.rglob(WEIGHTS))
        self.operator = load_operator(directory)

    def predict(self, context, model_input, params=None):
        x = np.asarray(getattr(model_input, "values", model_input), dtype=np.float32)
        return self.operator.predict_numpy(x)


mlflow.models.set_model(OperatorModel())
