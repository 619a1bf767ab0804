"""Sufficient statistics of a pair (X upstream, Y downstream): n, Σx, Σy, XᵀX, XᵀY, YᵀY.

Accumulated in float64 chunk by chunk and mergeable, so no stage ever holds all tokens. Everything
the ridge fit, every R² and the CCA ceiling need follows from these (docs/method.md#ridge, #r2, #cca;
on disk: docs/contracts.md#stats).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FIELDS = ("n", "sum_x", "sum_y", "xtx", "xty", "yty")


@dataclass
class PairStats:
    n: float
    sum_x: np.ndarray  # [d_in]
    sum_y: np.ndarray  # [d_out]
    xtx: np.ndarray  # [d_in, d_in]   Σ x xᵀ (uncentred)
    xty: np.ndarray  # [d_in, d_out]  Σ x yᵀ
    yty: np.ndarray  # [d_out, d_out] Σ y yᵀ

    @classmethod
    def zeros(cls, d_in: int, d_out: int) -> PairStats:
        z = np.zeros
        return cls(0.0, z(d_in), z(d_out), z((d_in, d_in)), z((d_in, d_out)), z((d_out, d_out)))

    @classmethod
    def from_data(cls, x: np.ndarray, y: np.ndarray) -> PairStats:
        s = cls.zeros(x.shape[1], y.shape[1])
        s.update(x, y)
        return s

    def update(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> None:
        """Add a chunk of rows. Products are formed in float64 (residual norms reach ~4e4)."""
        x64 = torch.as_tensor(x).to(torch.float64)
        y64 = torch.as_tensor(y).to(torch.float64)
        if x64.shape[0] != y64.shape[0]:
            raise ValueError(f"x has {x64.shape[0]} rows, y has {y64.shape[0]}")
        self.n += float(x64.shape[0])
        self.sum_x += x64.sum(0).numpy()
        self.sum_y += y64.sum(0).numpy()
        self.xtx += (x64.T @ x64).numpy()
        self.xty += (x64.T @ y64).numpy()
        self.yty += (y64.T @ y64).numpy()

    def merge(self, other: PairStats) -> PairStats:
        return PairStats(*(getattr(self, f) + getattr(other, f) for f in FIELDS))

    @property
    def mean_x(self) -> np.ndarray:
        return self.sum_x / self.n

    @property
    def mean_y(self) -> np.ndarray:
        return self.sum_y / self.n

    def centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(XcᵀXc, XcᵀYc, YcᵀYc): scatter matrices about the means."""
        mx, my, n = self.mean_x, self.mean_y, self.n
        return (self.xtx - n * np.outer(mx, mx), self.xty - n * np.outer(mx, my), self.yty - n * np.outer(my, my))

    def check_finite(self, where: str) -> None:
        for f in FIELDS:
            if not np.all(np.isfinite(getattr(self, f))):
                raise ValueError(f"{where}: statistic {f} has non-finite values")

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f: torch.as_tensor(np.asarray(getattr(self, f), dtype=np.float64)) for f in FIELDS}
        out["n"] = torch.tensor([self.n], dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> PairStats:
        return cls(float(t["n"][0]), *(t[f].numpy() for f in FIELDS[1:]))


def sse_from_stats(s: PairStats, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-output-dimension Σ (y − x Wᵀ − b)² over the statistics' rows, exactly.

    Expands Σ(y − Wx − b)² = Σyy − 2 W Σxy − 2 b Σy + W Σxx Wᵀ + 2 W Σx bᵀ + n b² per output.
    """
    W = np.asarray(W, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    yy = np.diag(s.yty)
    wxy = np.einsum("oi,io->o", W, s.xty)
    wxxw = np.einsum("oj,oj->o", W @ s.xtx, W)  # one BLAS product, not a triple loop
    wx = W @ s.sum_x
    return yy - 2 * wxy - 2 * b * s.sum_y + wxxw + 2 * b * wx + s.n * b * b


def sst_from_stats(s: PairStats) -> np.ndarray:
    """Per-dimension Σ (y − ȳ)² about the statistics' own mean."""
    return np.diag(s.yty) - s.sum_y**2 / s.n
