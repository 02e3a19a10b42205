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


def test_the_ivf_cells_are_few_enough_for_faiss_to_train_them_without_a_warning(bank_and_queries, capfd):
    """4·√N cells would leave under 39 bank patches per cell on a small bank, and FAISS then prints a
    clustering warning on the console of every fit: the cell count is capped to avoid it."""
    bank, _ = bank_and_queries
    index = build_index(bank, Config(knn_index="ivf", device="cpu"))
    assert index.nlist * 39 <= len(bank)
    assert "WARNING" not in capfd.readouterr().err


def test_more_probes_find_more_true_neighbours_and_all_cells_find_them_all(bank_and_queries):
    bank, queries = bank_and_queries
    truth = exact_ids(bank, queries)
    recall = {}
    for nprobe in (1, 8, 10_000):
        index = build_index(bank, Config(knn_index="ivf", ivf_nprobe=nprobe, device="cpu"))
        recall[nprobe] = float(np.mean(index.search(queries, 1)[1][:, 0] == truth))
    assert recall[10_000] == 1.0  # every cell searched: the exact answer
    assert recall[1] < 0.5 < recall[8], recall


def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(30, dim))
    return (centres[rng.integers(0, 30, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def stream(points: np.ndarray, ratio: float, chunk_size: int, oversampling: float = 1.0, batch: int = 500):
    from models.coreset import StreamingCoreset

    coreset = StreamingCoreset(ratio, 64, chunk_size, 0, oversampling=oversampling)
    for start in range(0, len(points), batch):
        coreset.add(points[start : start + batch])
    return coreset.result(), coreset


def test_a_bank_streamed_in_many_chunks_keeps_its_share_and_knows_where_each_patch_came_from():
    points = clustered(4037)
    kept, coreset = stream(points, 0.1, 1000)  # 100 picks a chunk: chunked, not one exact pass
    assert len(kept) == round(0.1 * 4037) == 404
    assert np.array_equal(points[coreset.kept_indices], kept)
    assert max(coreset.kept_indices) >= 3000  # the last chunk's patches are named by their place in the stream


def test_batches_that_straddle_chunk_borders_lose_no_patch():
    """A photo's patches that overflow a chunk start the next one: every patch is offered to greedy once."""
    points = clustered(4037)
    kept, coreset = stream(points, 0.1, 1000, batch=300)  # 300-patch batches: a chunk ends mid-batch
    aligned, _ = stream(points, 0.1, 1000, batch=1000)
    assert len(kept) == 404 and np.array_equal(points[coreset.kept_indices], kept)
    assert np.array_equal(kept, aligned)  # the same bank however the patches were batched


def test_oversampling_changes_which_patches_are_kept_and_covers_about_as_well():
    """Where chunks get 64-128 picks, oversampling keeps more candidates per chunk and a global pass
    picks the bank from them: another bank, of the same size, covering the patches about as well."""
    points = clustered(20030)
    plain, _ = stream(points, 0.02, 4096)
    oversampled, _ = stream(points, 0.02, 4096, oversampling=8)
    assert len(plain) == len(oversampled) == round(0.02 * 20030) == 401
    assert not np.array_equal(plain, oversampled)
    flat = faiss.IndexFlatL2(points.shape[1])

    def radius(bank: np.ndarray) -> float:
        flat.reset()
        flat.add(bank)
        return float(np.sqrt(flat.search(points, 1)[0].max()))

    assert radius(oversampled) <= 1.3 * radius(plain)
