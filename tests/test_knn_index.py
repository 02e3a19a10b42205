"""The memory bank's exact search: the same nearest patches as comparing with every one, by a bound that holds."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from config import Config
from models.knn_index import MIN_PATCHES_FOR_CELLS, CellIndex, build_index


def clustered(n: int, dim: int = 48, seed: int = 0, n_clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(n_clusters, dim))
    return (centres[rng.integers(0, n_clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def flat_search(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    return index.search(queries, k)


@pytest.fixture(scope="module", params=["clusters", "one blob"])
def bank_and_queries(request) -> tuple[np.ndarray, np.ndarray]:
    if request.param == "one blob":  # cells cut one cloud: nearest patches often lie across a cell border
        rng = np.random.default_rng(3)
        return rng.normal(size=(6000, 8)).astype(np.float32), rng.normal(size=(2000, 8)).astype(np.float32)
    bank = clustered(6000)
    near = clustered(1500, seed=1)  # healthy-like: inside the bank's clusters
    far = 3 * clustered(500, seed=2)  # anomaly-like: away from everything
    return bank, np.concatenate([near, far])


@pytest.mark.parametrize("k", [1, 9])
def test_the_cell_search_finds_exactly_the_patches_a_flat_search_finds(bank_and_queries, k):
    bank, queries = bank_and_queries
    index = CellIndex(bank, seed=0)
    assert len(index._cells) > 1  # the bank really is split
    distances, ids = index.search(queries, k)
    truth_distances, truth_ids = flat_search(bank, queries, k)
    assert np.array_equal(ids, truth_ids)
    np.testing.assert_allclose(distances, truth_distances, rtol=1e-4, atol=1e-3)
    assert np.all(np.diff(distances, axis=1) >= 0)  # ascending, like FAISS


def test_each_cells_bound_is_never_more_than_the_distance_to_its_nearest_patch(bank_and_queries):
    """The bound that lets a query skip a cell: if it were ever too high, a true neighbour could be skipped."""
    bank, queries = bank_and_queries
    index = CellIndex(bank, seed=0)
    cells, bounds = index._cells_by_bound(queries)
    for cell, (members, _) in enumerate(index._cells):
        position = np.argmax(cells == cell, axis=1)
        bound = bounds[np.arange(len(queries)), position]
        nearest_member = np.sqrt(flat_search(bank[members], queries, 1)[0][:, 0])
        assert np.all(bound <= nearest_member * (1 + 1e-5) + 1e-4)
    # in ascending order: the search stops at the first cell left whose bound exceeds the k-th distance
    assert np.all(np.diff(bounds, axis=1) >= 0)
    # and the bounds are useful: most queries could skip most cells
    assert np.median(np.sum(bounds > 0, axis=1)) > 0.5 * len(index._cells)


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_the_cell_search_is_exact_whatever_the_scale_of_the_features(scale):
    """Features a hundredth or a hundred times as large: the bound scales with them, so no cell
    holding a nearest patch is skipped and every score is the flat search's."""
    bank, queries = scale * clustered(3000), scale * clustered(500, seed=1)
    distances, ids = CellIndex(bank, seed=0).search(queries, 1)
    truth_distances, truth_ids = flat_search(bank, queries, 1)
    assert np.array_equal(ids, truth_ids)
    np.testing.assert_allclose(distances, truth_distances, rtol=1e-4)


def test_a_patch_just_across_a_cell_border_is_still_found(monkeypatch):
    """The stopping rule errs towards searching: a query whose best distance so far is only a hair
    (0.04 %) above a cell's bound still searches that cell, and finds the nearer patch just inside it.

    Worked out on paper, with the cells' centroids fixed at o = (0, 0) and c = (2, 0): the query at o
    is 1 from their bisector x = 1 (the bound of c's cell); its own cell's nearest patches are
    1.0004 away, and c's cell holds a patch 1.0002 away, just across the border."""

    class FixedCentroids:
        centroids = np.array([[0, 0], [2, 0]], np.float32)

        def __init__(self, *_args, **_kwargs) -> None: ...

        def train(self, _bank: np.ndarray) -> None: ...

    monkeypatch.setattr("models.knn_index.faiss.Kmeans", FixedCentroids)
    monkeypatch.setattr("models.knn_index.MIN_PATCHES_FOR_CELLS", 1)
    monkeypatch.setattr("models.knn_index.CELL_ROUNDS", (1,))  # the own cell first, then a stop or the rest
    own = [[0, 1.0004], [0, -1.0004]] + [[-5, 0]] * 20
    across = [[1.0002, 0]] + [[7, 0]] * 20
    bank = np.array(own + across, np.float32)
    index = CellIndex(bank, seed=0)
    assert len(index._cells) == 2 and len(index._cells[0][0]) == len(own)
    distances, ids = index.search(np.zeros((1, 2), np.float32), 1)
    assert ids[0, 0] == len(own)  # the patch across the border
    assert np.sqrt(distances[0, 0]) == pytest.approx(1.0002, abs=1e-6)


def test_a_small_bank_is_one_cell_searched_flat():
    bank = clustered(MIN_PATCHES_FOR_CELLS - 1)
    queries = clustered(200, seed=5)
    index = CellIndex(bank, seed=0)
    assert len(index._cells) == 1
    assert np.array_equal(index.search(queries, 3)[1], flat_search(bank, queries, 3)[1])


def test_k_beyond_the_bank_gives_the_whole_bank():
    bank = clustered(5)
    distances, ids = CellIndex(bank, seed=0).search(bank[:2], 10)
    assert ids.shape == (2, 5) and np.array_equal(np.sort(ids, axis=1), np.tile(np.arange(5), (2, 1)))
    assert np.all(distances[:, 0] <= 1e-4)  # each bank patch is its own nearest


def test_the_config_picks_the_index():
    bank = clustered(3000)
    assert isinstance(build_index(bank, Config(knn_index="flat", device="cpu")), CellIndex)
    ivf = build_index(bank, Config(knn_index="ivf", device="cpu"))
    assert isinstance(ivf, faiss.IndexIVFFlat) and ivf.ntotal == len(bank)


def test_with_device_cpu_the_search_stays_on_the_cpu_where_faiss_sees_a_gpu(monkeypatch):
    """``device: cpu`` keeps the bank off the GPU too, e.g. where the GPU is busy with other work."""
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    moved = lambda *_args: pytest.fail("the bank was moved to the GPU")  # noqa: E731
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", moved, raising=False)
    bank = clustered(3000)
    assert isinstance(build_index(bank, Config(knn_index="flat", device="cpu")), CellIndex)
    assert build_index(bank, Config(knn_index="ivf", device="cpu")).ntotal == len(bank)
