"""The approximate index searches as many cells as the config asks, and greedy k-center continued
from earlier picks is the same farthest-point-first rule as one pass that made those picks itself."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from config import Config
from models.coreset import greedy_coreset
from models.knn_index import build_index


def farthest_first(points: np.ndarray, earlier: np.ndarray, n_select: int) -> list[int]:
    """Brute force: each pick is the point farthest from every centre so far, earlier ones included."""
    nearest = np.min(np.linalg.norm(points[:, None] - earlier[None], axis=2), axis=1)
    picks = []
    for _ in range(n_select):
        pick = int(np.argmax(nearest))
        picks.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(points - points[pick], axis=1))
    return picks


def test_greedy_continues_from_the_earlier_picks_distances_as_if_it_had_made_them():
    rng = np.random.default_rng(0)
    earlier = rng.normal(size=(40, 8)).astype(np.float32)
    points = np.concatenate([rng.normal(size=(150, 8)), rng.normal(loc=3.0, size=(50, 8))]).astype(np.float32)
    covered = (np.linalg.norm(points[:, None] - earlier[None], axis=2).min(axis=1) ** 2).astype(np.float32)
    picks = greedy_coreset(points, 12, seed=0, covered=covered)  # squared distances, as FAISS gives them
    assert picks.tolist() == farthest_first(points, earlier, 12)


@pytest.fixture(scope="module")
def bank_and_queries() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(4000, 16)).astype(np.float32)
    queries = rng.normal(size=(400, 16)).astype(np.float32)
    return bank, queries


def exact_ids(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    flat = faiss.IndexFlatL2(bank.shape[1])
    flat.add(bank)
    return flat.search(queries, 1)[1][:, 0]


@pytest.mark.parametrize("nprobe", [1, 3, 40])
def test_the_ivf_index_probes_the_cells_the_config_asks_for(bank_and_queries, nprobe):
    bank, queries = bank_and_queries
    index = build_index(bank, Config(knn_index="ivf", ivf_nprobe=nprobe, device="cpu"))
    assert index.nprobe == nprobe


def test_more_probes_find_more_true_neighbours_and_all_cells_find_them_all(bank_and_queries):
    bank, queries = bank_and_queries
    truth = exact_ids(bank, queries)
    recall = {}
    for nprobe in (1, 8, 10_000):
        index = build_index(bank, Config(knn_index="ivf", ivf_nprobe=nprobe, device="cpu"))
        recall[nprobe] = float(np.mean(index.search(queries, 1)[1][:, 0] == truth))
    assert recall[10_000] == 1.0  # every cell searched: the exact answer
    assert recall[1] < 0.8 < recall[8], recall
