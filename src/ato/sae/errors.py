"""The errors of `ato.sae`: each message names the file, layer or key at fault and what to do."""

from __future__ import annotations

from ato.errors import AtoError


class SaeError(AtoError):
    """An SAE is missing, unreadable or cannot be obtained; the message says which and what to do."""


class FeatureScoreError(AtoError):
    """SAE features cannot be scored or selected; the message names the layer, file or key at fault."""
