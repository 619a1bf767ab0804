"""Sparse autoencoders: training on sae-lens' training classes (`ato.sae.training`), loading a trained
directory or a pretrained release (`ato.sae.loading`), quality numbers (`ato.sae.quality`) and the
feature scores of `ato select` (`ato.sae.features`).

Importing this package does not import torch or sae-lens; the submodules that compute do.
"""

from .errors import FeatureScoreError, SaeError
from .loading import hook_name, load_pretrained, load_sae, resolve_pretrained

__all__ = ["FeatureScoreError", "SaeError", "hook_name", "load_pretrained", "load_sae", "resolve_pretrained"]
