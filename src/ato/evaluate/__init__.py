"""The evaluate library: one transport operator scored on the held-out test split (`ato evaluate`).

Per pair (L, k), with T = L + k:

* residual-space scores, streamed over the test split (R² uniform and variance-weighted,
  per-dimension quantiles, MSE, token cosine) for the ATO and the baselines identity (ŷ = x),
  train mean (ŷ = ȳ_train) and OLS (ridge with α = 0 on the train statistics);
* feature-space scores for every kept feature of layer T's SAE along its unit decoder direction,
  over the test tokens where that SAE's own encoder (TopK / JumpReLU, never a plain ReLU) says the
  feature is active on the TRUE y, and the ATO's for every live feature; each feature's R² gets an
  interval by resampling test documents, and the feature is transported or synthesised when the
  interval lies wholly on one side of the threshold, undetermined when it straddles it, or gets no
  verdict (too few active tokens);
* the CCA ceiling on the train statistics (a true in-sample bound), η(r) for SVD truncation and
  reduced-rank regression on train and test over a log-spaced rank sweep (one decomposition per pair,
  see `ato.math.cca`), and on test also without the train→test mean shift;
* each headline number beside its reference (`ato.math.heldout`): η(test) beside the η an exactly
  linear map reaches at this n, d and ρ; the participation ratio and the 90 % subspace size from
  canonical correlations measured on TEST (directions from train), each beside the same statistic for
  independent x and y at the same n and d (a Wishart null), as descriptions; the number of those
  directions that carry transport (step-down test at the effective n, document-bootstrap interval).

Formulas: docs/method.md#r2, #features, #cca, #efficiency; docs/statistics.md#heldout.

Modules: `features` (layer T's SAE and its kept features), `streaming` (the one pass over the test
split), `references` (ceiling, η, subspace size beside their references), `scores` (`PairMetrics`,
feature rows, verdicts). `ato score` on a user's own documents is `ato.score`.
"""

from ato.evaluate.errors import EvaluateError
from ato.evaluate.features import SaeFeatures, load_sae_features, sae_active
from ato.evaluate.references import Transport, shared_null, transport, transport_metrics
from ato.evaluate.scores import (
    FEATURE_COLUMNS,
    Evaluation,
    evaluate,
    feature_rows,
    predictor_scores,
    transport_verdicts,
)
from ato.evaluate.streaming import Predictors, TestAccumulators, predictor_keys, score_test_split

__all__ = [
    "FEATURE_COLUMNS",
    "EvaluateError",
    "Evaluation",
    "Predictors",
    "predictor_keys",
    "SaeFeatures",
    "TestAccumulators",
    "Transport",
    "evaluate",
    "feature_rows",
    "load_sae_features",
    "predictor_scores",
    "sae_active",
    "score_test_split",
    "shared_null",
    "transport",
    "transport_metrics",
    "transport_verdicts",
]
