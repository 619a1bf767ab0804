"""Streaming statistics of one [n, d] float array (counts of NaN/Inf and zero rows, row norms, the
mean and spread of the values), merged chunk by chunk: one row of the `layers` table."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

ARRAY_STAT_COLUMNS = (  # the keys of `ArrayStats.as_row`, in table order
    "token_count",
    "nan_count",
    "inf_count",
    "mean_norm",
    "max_norm",
    "max_abs",
    "mean",
    "std",
    "zero_row_fraction",
)


@dataclass
class ArrayStats:
    """Streaming statistics of one [n, d] float array, merged chunk by chunk (Chan et al.)."""

    rows: int = 0
    nan: int = 0
    inf: int = 0
    zero_rows: int = 0
    finite_rows: int = 0
    norm_sum: float = 0.0
    norm_max: float = 0.0
    abs_max: float = 0.0
    n_values: int = 0  # finite values seen (rows with a NaN/Inf are left out of the moments)
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim != 2:
            x = x.reshape(len(x), -1)
        self.rows += len(x)
        finite = np.isfinite(x)
        if not finite.all():
            self.nan += int(np.isnan(x).sum())
            self.inf += int(np.isinf(x).sum())
            x = x[finite.all(axis=1)]
        if not len(x):
            return
        x64 = x.astype(np.float64)
        row_sq = np.einsum("ij,ij->i", x64, x64)
        norms = np.sqrt(row_sq)
        self.finite_rows += len(x)
        self.zero_rows += int((row_sq == 0).sum())
        self.norm_sum += float(norms.sum())
        self.norm_max = max(self.norm_max, float(norms.max()))
        self.abs_max = max(self.abs_max, float(np.abs(x64).max()) if x64.size else 0.0)
        n_c = x64.size
        if n_c:
            s = float(x64.sum())
            mean_c = s / n_c
            m2_c = max(0.0, float(row_sq.sum()) - s * mean_c)
            n = self.n_values + n_c
            delta = mean_c - self.mean
            self.mean += delta * n_c / n
            self.m2 += m2_c + delta * delta * self.n_values * n_c / n
            self.n_values = n

    def as_row(self) -> dict[str, Any]:
        return {
            "token_count": self.rows,
            "nan_count": self.nan,
            "inf_count": self.inf,
            "mean_norm": self.norm_sum / self.finite_rows if self.finite_rows else math.nan,
            "max_norm": self.norm_max if self.finite_rows else math.nan,
            "max_abs": self.abs_max if self.finite_rows else math.nan,
            "mean": self.mean if self.n_values else math.nan,
            "std": math.sqrt(self.m2 / self.n_values) if self.n_values else math.nan,
            "zero_row_fraction": self.zero_rows / self.rows if self.rows else math.nan,
        }
