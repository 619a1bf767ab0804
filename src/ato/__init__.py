"""ato: activation transport operators — linear maps from the residual at layer L to layer L+k.

`import ato` is cheap: torch and the rest of the stack load on first use of an attribute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "Operator",
    "export_operator",
    "import_operator",
    "load_operator",
    "load_registered_operator",
    "operator_variant",
    "score_file",
    "score_text",
    "splice",
    "splice_hooked",
    "splice_trace",
]
_LAZY = {  # public name → the submodule that defines it
    "Operator": "operators",
    "load_operator": "operators",
    "load_registered_operator": "operators",
    "operator_variant": "operators",
    "splice": "splicing",  # not `ato.splice`: importing a submodule of that name would shadow the function
    "splice_hooked": "lens",  # TransformerLens HookedTransformer
    "splice_trace": "lens",  # inside an nnsight trace
    "score_text": "score",
    "score_file": "score",
    "export_operator": "export",
    "import_operator": "export",
}
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .export import export_operator, import_operator
    from .lens import splice_hooked, splice_trace
    from .operators import Operator, load_operator, load_registered_operator, operator_variant
    from .score import score_file, score_text
    from .splicing import splice


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ato' has no attribute {name!r}")
