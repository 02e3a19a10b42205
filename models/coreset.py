"""Greedy k-center coreset selection (PatchCore, Sec. 3.2), made cheap enough for a 2-core CPU.

The exact greedy loop costs O(N * k * d): for the ~330k patches of the screw set and a 10% coreset
that is ~33k passes over the whole bank, minutes on a CPU. Distances are therefore computed on a
fixed, seeded random projection (Johnson-Lindenstrauss keeps them close), and the bank is reduced
chunk by chunk: each chunk of ``chunk_size`` patches gets its own greedy coreset of the same ratio,
and the union of those is the memory bank. The cost drops to O(N * ratio * chunk_size * d), each
chunk fits in the CPU cache, and features can stream through without ever being held all at once,
so fit memory grows with the memory bank rather than with the training set. Greedy k-center
solutions compose: each chunk's picks cover that chunk within the greedy guarantee, so the union
covers the bank almost as well as one global greedy pass (tests/test_coreset.py measures it).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def random_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor | None:
    """A fixed Gaussian projection to ``out_dim`` dimensions, or None when no reduction is needed."""
    if in_dim <= out_dim:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=generator) / math.sqrt(out_dim)


def greedy_coreset(points: torch.Tensor, n_select: int, seed: int) -> torch.Tensor:
    """Indices of ``n_select`` points picked by exact greedy k-center (farthest point first).

    Memory is O(N): one running vector of each point's distance to its nearest pick.
    """
    n_points = points.shape[0]
    n_select = min(n_select, n_points)
    squared_norms = (points * points).sum(dim=1)
    nearest = torch.full((n_points,), float("inf"), device=points.device)
    picks = torch.empty(n_select, dtype=torch.long, device=points.device)
    generator = torch.Generator().manual_seed(seed)
    current = torch.randint(n_points, (1,), generator=generator).to(points.device)
    for step in range(n_select):
        picks[step] = current
        centre = points[current]  # (1, d); kept as a tensor so a GPU never waits on the host
        distances = squared_norms - 2 * (points @ centre.T).squeeze(1) + squared_norms[current]
        torch.minimum(nearest, distances, out=nearest)
        current = torch.argmax(nearest).view(1)
    return picks


class StreamingCoreset:
    """Accumulates patch features batch by batch and keeps only a coreset of them.

    Features are buffered until ``chunk_size`` patches have arrived; each full chunk is reduced to
    ``ratio`` of its size. ``result()`` reduces the last partial chunk and returns the memory bank.
    A ``chunk_size`` at least the bank's size gives the exact (single-pass) greedy coreset.
    """

    def __init__(
        self, ratio: float, projection_dim: int, chunk_size: int, seed: int, device: torch.device | str = "cpu"
    ) -> None:
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.chunk_size = chunk_size
        self.seed = seed
        self.device = torch.device(device)
        self.kept_indices: list[int] = []  # positions, in the order added, of the patches kept
        self._projection: torch.Tensor | None = None
        self._pending: list[torch.Tensor] = []
        self._pending_count = 0
        self._seen = 0
        self._kept: list[np.ndarray] = []

    def add(self, features: torch.Tensor) -> None:
        """Take (n, d) features; reduce whenever a full chunk is buffered."""
        if self._seen == 0 and not self._pending:
            projection = random_projection(features.shape[1], self.projection_dim, self.seed)
            self._projection = None if projection is None else projection.to(self.device)
        self._pending.append(features.to(self.device, torch.float32))
        self._pending_count += features.shape[0]
        while self._pending_count >= self.chunk_size:
            buffered = torch.cat(self._pending)
            self._reduce(buffered[: self.chunk_size])
            rest = buffered[self.chunk_size :]
            self._pending = [rest] if rest.shape[0] else []
            self._pending_count = rest.shape[0]

    def result(self) -> np.ndarray:
        """The memory bank: (k, d) float32 features of every kept patch."""
        if self._pending_count:
            self._reduce(torch.cat(self._pending))
            self._pending, self._pending_count = [], 0
        if not self._kept:
            raise ValueError("no features were added to the coreset")
        return np.concatenate(self._kept)

    def _reduce(self, chunk: torch.Tensor) -> None:
        projected = chunk @ self._projection if self._projection is not None else chunk
        n_select = max(1, round(self.ratio * chunk.shape[0]))
        picks = greedy_coreset(projected, n_select, seed=self.seed + self._seen)
        self._kept.append(chunk[picks].cpu().numpy())
        self.kept_indices.extend((picks + self._seen).tolist())
        self._seen += chunk.shape[0]
