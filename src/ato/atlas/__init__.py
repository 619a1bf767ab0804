"""The atlas library, the compute behind `ato atlas`: every stored layer pair (L, L + k ≤ L + k_max).

1. **One joint pass.** `accumulate_banded` streams each split once and forms the float64 Gram of
   every stored layer with the next k_max layers; every pair's `PairStats` are blocks of it.
2. **Fits from shared factors.** Each layer's covariance is decomposed once (`LayerFactors`); every
   pair gets its ridge map (α by GCV or fixed), scaled orthogonal Procrustes (plain, centred),
   reduced-rank regression at the held-out subspace size, η beside its linear reference and the
   held-out subspace size beside one shared Wishart null (`ato.math.atlas`).
3. **The model's mean Jacobian.** One traced forward of a few TRAIN sequences; per probed input
   layer L, one vmapped jvp pass through blocks L+1…L+k_max gives E[J] for every k at once, restricted
   to the top right singular subspace of L's ridge maps (`ato.math.jacobian`). Forward-mode AD needs
   the eager attention implementation, which the atlas's model copy is switched to.
4. **Causal Δ** on `atlas.causal_pairs`: residual L+k of held-out TEST sequences replaced by each
   operator's prediction (`ato.causal.run_conditions`, the existing patching API, with one
   `Condition` per operator), Δ log-perplexity with intervals over sequences.

Outputs are assembled into `ato.artifacts.AtlasResult`; `atlas_markdown` renders reports/atlas/atlas.md.

Modules: `fitting` (1–2), `jacobian` (3), `causal` (4), `tables` (records, metrics, tables, atlas.md).
"""

from ato.atlas.causal import causal_atlas
from ato.atlas.fitting import AtlasError, check_plan, fit_atlas, joint_grams, plan
from ato.atlas.jacobian import apply_jacobian, block_stack, load_model, probe_atlas, torch_threads
from ato.atlas.tables import atlas_markdown, atlas_metrics, atlas_result, readme_table, table, table_columns

__all__ = [
    "AtlasError",
    "apply_jacobian",
    "atlas_markdown",
    "atlas_metrics",
    "atlas_result",
    "block_stack",
    "causal_atlas",
    "check_plan",
    "fit_atlas",
    "joint_grams",
    "load_model",
    "plan",
    "probe_atlas",
    "readme_table",
    "table",
    "table_columns",
    "torch_threads",
]
