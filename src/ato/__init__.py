"""ato: activation transport operators — linear maps from the residual at layer L to layer L+k."""

from .operators import Operator, load_operator, load_registered_operator

__all__ = ["Operator", "load_operator", "load_registered_operator"]
__version__ = "0.1.0"
