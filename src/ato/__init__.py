"""ato: activation transport operators — linear maps from the residual at layer L to layer L+k.

`import ato` is cheap: torch and the rest of the stack load on first use of an attribute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Operator", "load_operator", "load_registered_operator"]
_LAZY = {name: "operators" for name in __all__}  # public name → the submodule that defines it
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .operators import Operator, load_operator, load_registered_operator


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ato' has no attribute {name!r}")
