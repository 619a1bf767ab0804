"""The evaluate library's one error (`ato score` raises it too)."""

from __future__ import annotations

from ato.errors import AtoError


class EvaluateError(AtoError):
    """Evaluation inputs that do not fit together; the message names the file or pair."""
