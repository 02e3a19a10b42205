from __future__ import annotations

import numpy as np
import torch

from models.coreset import StreamingCoreset, greedy_coreset


def covering_radius(points: np.ndarray, chosen: np.ndarray) -> float:
    """Largest distance from any point to its nearest chosen point (what k-center minimises)."""
    distances = np.linalg.norm(points[:, None, :] - chosen[None, :, :], axis=2)
    return float(distances.min(axis=1).max())


def clustered_points(n: int = 4000, dim: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(30, dim))
    return (centres[rng.integers(0, 30, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def bank(points: np.ndarray, ratio: float, chunk_size: int, projection_dim: int = 128, seed: int = 0) -> np.ndarray:
    coreset = StreamingCoreset(ratio, projection_dim, chunk_size, seed)
    for start in range(0, len(points), 500):  # arrives in batches, like image features
        coreset.add(torch.from_numpy(points[start : start + 500]))
    return coreset.result()


def test_exact_greedy_picks_farthest_points_first():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [5.0, 0.0], [4.0, 0.0]])
    picks = greedy_coreset(points, 5, seed=0).tolist()
    assert picks[1] == int((points - points[picks[0]]).norm(dim=1).argmax())
    assert sorted(picks) == [0, 1, 2, 3, 4]


def test_chunked_coreset_covers_as_well_as_exact_greedy():
    points = clustered_points()
    exact = bank(points, 0.05, chunk_size=len(points), projection_dim=64)
    chunked = bank(points, 0.05, chunk_size=1000, projection_dim=64)
    assert len(chunked) == len(exact) == 200
    assert covering_radius(points, chunked) <= 1.5 * covering_radius(points, exact)


def test_projection_keeps_coverage_close():
    points = clustered_points(dim=256)
    full = bank(points, 0.05, chunk_size=len(points), projection_dim=256)
    projected = bank(points, 0.05, chunk_size=len(points), projection_dim=32)
    assert covering_radius(points, projected) <= 1.5 * covering_radius(points, full)


def test_coreset_beats_random_subset():
    points = clustered_points()
    chosen = bank(points, 0.05, chunk_size=1000)
    random_subset = points[np.random.default_rng(1).choice(len(points), len(chosen), replace=False)]
    assert covering_radius(points, chosen) < covering_radius(points, random_subset)


def test_same_seed_same_bank_and_other_seed_differs():
    points = clustered_points()
    assert np.array_equal(bank(points, 0.05, 1000, seed=3), bank(points, 0.05, 1000, seed=3))
    assert not np.array_equal(bank(points, 0.05, 1000, seed=3), bank(points, 0.05, 1000, seed=4))


def test_kept_indices_point_at_the_kept_rows():
    points = clustered_points(n=1200)
    coreset = StreamingCoreset(0.1, 128, 500, seed=0)
    coreset.add(torch.from_numpy(points))
    kept = coreset.result()
    assert np.array_equal(points[coreset.kept_indices], kept)
