from __future__ import annotations

import pickle

import faiss
import numpy as np
import pytest

import models.coreset as coreset
from models.coreset import CandidateIndex, StreamingCoreset, greedy_coreset


def covering_radius(points: np.ndarray, chosen: np.ndarray) -> float:
    """Largest distance from any point to its nearest chosen point (what k-center minimises)."""
    index = faiss.IndexFlatL2(points.shape[1])
    index.add(np.ascontiguousarray(chosen))
    return float(np.sqrt(index.search(np.ascontiguousarray(points), 1)[0].max()))


def clustered_points(n: int = 4000, dim: int = 64, seed: int = 0, n_clusters: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(n_clusters, dim))
    return (centres[rng.integers(0, n_clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def drifting_points(n: int = 20000, dim: int = 32, seed: int = 0, varied_first: bool = True) -> np.ndarray:
    """A varied tenth and one tight blob: where the bank's picks belong depends on the whole stream."""
    varied = clustered_points(n // 10, dim, seed, n_clusters=200)
    blob = (0.3 * np.random.default_rng(seed).normal(size=(n - n // 10, dim))).astype(np.float32)
    return np.concatenate([varied, blob] if varied_first else [blob, varied])


def streamed(points: np.ndarray, ratio: float, chunk_size: int, projection_dim: int = 128, seed: int = 0, **options):
    coreset = StreamingCoreset(ratio, projection_dim, chunk_size, seed, **options)
    for start in range(0, len(points), 500):  # arrives in batches, like image features
        coreset.add(points[start : start + 500])
    return coreset.result(), coreset


def bank(points: np.ndarray, ratio: float, chunk_size: int, projection_dim: int = 128, seed: int = 0, **options):
    return streamed(points, ratio, chunk_size, projection_dim, seed, **options)[0]


def test_exact_greedy_picks_farthest_points_first():
    points = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [5.0, 0.0], [4.0, 0.0]], dtype=np.float32)
    picks = greedy_coreset(points, 5, seed=0).tolist()
    assert picks[1] == int(np.linalg.norm(points - points[picks[0]], axis=1).argmax())
    assert sorted(picks) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "name, points, ratio",
    [
        ("clusters, small ratio (5 picks a chunk)", clustered_points(20000), 0.005),
        ("clusters, ratio 0.1", clustered_points(20000), 0.1),
        ("variety first, then one blob", drifting_points(), 0.02),
        ("one blob, then variety", drifting_points(varied_first=False), 0.02),
    ],
)
def test_oversampled_coreset_covers_within_1_3x_of_exact_greedy(name, points, ratio):
    exact = bank(points, ratio, chunk_size=len(points), projection_dim=64)
    chunked = bank(points, ratio, 1000, 64, oversampling=8)
    assert len(chunked) == len(exact) == round(ratio * len(points))
    assert covering_radius(points, chunked) <= 1.3 * covering_radius(points, exact), name


def test_chunk_that_repeats_an_earlier_one_adds_no_copy_of_a_kept_patch():
    first, second = clustered_points(1000, seed=1), clustered_points(1000, seed=2)
    coreset = StreamingCoreset(0.1, 64, 1000, 0, oversampling=1)
    for chunk in (first, second, second + 1e-4):  # the repeat's picks must go where the second chunk is thin
        coreset.add(chunk)
    kept = coreset.result()
    index = faiss.IndexFlatL2(kept.shape[1])
    index.add(kept)
    distance_to_other_kept = np.sqrt(index.search(kept, 2)[0][:, 1])
    assert len(kept) == 300 and distance_to_other_kept.min() > 0.1


def test_projection_keeps_coverage_close():
    points = clustered_points(dim=256)
    full = bank(points, 0.05, chunk_size=len(points), projection_dim=256)
    projected = bank(points, 0.05, chunk_size=len(points), projection_dim=32)
    assert covering_radius(points, projected) <= 1.5 * covering_radius(points, full)


def test_a_fit_draws_the_projection_and_first_pick_every_earlier_version_drew():
    """An older model file keeps no projection: its update draws it again, and must get the one its fit
    measured distances in. Features no wider than the projection are used as they are."""
    projection = coreset.random_projection(152, 128, seed=0)
    assert projection.shape == (152, 128) and projection.dtype == np.float32
    np.testing.assert_allclose(projection[0, :3], [-0.09951112, -0.10185522, -0.02214823], rtol=1e-6)
    assert float(projection.sum()) == pytest.approx(-18.2978096, rel=1e-5)
    assert [coreset.first_pick(n, seed) for n, seed in [(1000, 0), (4096, 0), (4096, 7)]] == [44, 2732, 175]
    assert coreset.random_projection(128, 128, seed=0) is None and coreset.random_projection(100, 128, seed=0) is None


def test_coreset_beats_random_subset():
    points = clustered_points()
    chosen = bank(points, 0.05, chunk_size=1000)
    random_subset = points[np.random.default_rng(1).choice(len(points), len(chosen), replace=False)]
    assert covering_radius(points, chosen) < covering_radius(points, random_subset)


def test_same_seed_same_bank_and_other_seed_differs():
    points = clustered_points(8000)
    same = [bank(points, 0.01, 1000, seed=3, oversampling=8) for _ in range(2)]
    assert np.array_equal(same[0], same[1])
    assert not np.array_equal(same[0], bank(points, 0.01, 1000, seed=4, oversampling=8))


def test_a_refit_with_the_same_seed_reports_the_same_covering_radius():
    """The radius kept in the model file is measured on a sample of the patches: a seeded one, so the
    same photos and seed give the same number, not one that moves from fit to fit."""
    points = clustered_points(8000)  # past RADIUS_SAMPLE: a sample is measured, not every patch
    radii = [streamed(points, 0.01, 1000, seed=3)[1].covering_radius for _ in range(2)]
    assert radii[0] == radii[1]


def test_the_limits_on_picks_per_chunk_and_on_oversampling_are_inclusive():
    """Exactly ``MIN_PICKS_PER_CHUNK`` picks a chunk is not "under" it: the chunks stay, not one exact
    pass. Oversampling 2 does double the candidates: the global pass runs and picks another bank."""
    points = clustered_points(3000)
    ratio = coreset.MIN_PICKS_PER_CHUNK / 1000  # 64 picks in each 1,000-patch chunk
    chunked = bank(points, ratio, 1000)
    assert not np.array_equal(chunked, bank(points, ratio, chunk_size=len(points)))
    oversampled = bank(points, ratio, 1000, oversampling=2)
    assert len(oversampled) == len(chunked) and not np.array_equal(oversampled, chunked)


@pytest.mark.parametrize("ratio", [0.1, 0.01])  # candidates are the bank / a global pass picks the bank
def test_kept_indices_point_at_the_kept_rows(ratio):
    points = clustered_points(n=3000)
    coreset = StreamingCoreset(ratio, 128, 500, seed=0, oversampling=8)
    coreset.add(points)
    kept = coreset.result()
    assert len(kept) == round(ratio * len(points))
    assert np.array_equal(points[coreset.kept_indices], kept)


def test_covering_radius_is_measured_on_the_training_patches():
    points = clustered_points(n=1500)  # fewer than the radius sample: every patch is measured
    kept, coreset = streamed(points, 0.02, 500)
    assert coreset.covering_radius == pytest.approx(covering_radius(points, kept), rel=1e-4)
    larger, bigger = streamed(points, 0.2, 500)
    assert bigger.covering_radius < coreset.covering_radius


def test_the_covering_radius_sample_is_drawn_from_the_whole_stream_not_its_start():
    """Past ``RADIUS_SAMPLE`` patches the radius is measured on a sample: one of every chunk, so a
    stream whose first chunks repeat a few patches (all kept: radius 0 there) still reports how far
    its varied later patches lie from the bank."""
    same = np.repeat(clustered_points(n=4, seed=2), 1000, axis=0)
    varied = clustered_points(n=4000, seed=3)
    points = np.concatenate([same, varied])
    kept, coreset = streamed(points, 0.05, 2000)
    assert 0.8 * covering_radius(points, kept) < coreset.covering_radius <= covering_radius(points, kept) + 1e-4


def test_model_file_keeps_the_covering_radius_and_older_files_still_load(fitted_model, tmp_path):
    from models.patchcore import PatchCore

    assert 0 < fitted_model.coverage_radius < np.inf
    path = tmp_path / "model.pkl"
    fitted_model.save(path)
    assert PatchCore.load(path).coverage_radius == fitted_model.coverage_radius
    state = pickle.loads(path.read_bytes())  # written by this test: plain data
    del state["coverage_radius"]  # a model file without the covering radius
    path.write_bytes(pickle.dumps(state))
    assert np.isnan(PatchCore.load(path).coverage_radius)


def test_past_the_exact_limit_the_kept_so_far_search_finds_the_nearest_candidate(monkeypatch):
    monkeypatch.setattr("models.coreset.EXACT_UP_TO", 2000)
    points = clustered_points(4000, seed=1)  # new patches of the same part as the kept ones
    kept, queries = points[:3000], points[3000:]
    exact = faiss.IndexFlatL2(kept.shape[1])
    exact.add(kept)
    truth = exact.search(queries, 1)[0][:, 0]
    index = CandidateIndex(kept.shape[1])
    index.add(kept[:1000])
    assert not index.approximate  # exact below the limit
    index.add(kept[1000:])
    assert index.approximate and len(index) == len(kept)
    found = index.nearest(queries)
    assert np.mean(np.isclose(found, truth, rtol=1e-4)) >= 0.95  # the nearest candidate itself, nearly always
    assert np.all(found >= truth * (1 - 1e-4))  # never nearer than the truth: at worst a patch looks less covered


def test_the_kept_so_far_lists_stay_short_however_many_candidates_arrive():
    """A query scans a fixed number of lists: were they to grow with the bank, a long fit would slow down."""
    index = CandidateIndex(64)
    for part in np.array_split(clustered_points(20000, seed=4), 40):  # 20x the first chunk's candidates
        index.add(part)
        average_list = len(index) / faiss.extract_index_ivf(index._index).nlist
        assert average_list <= coreset.REBUILD_GROWTH * coreset.LIST_SIZE
    assert index.points().shape == (20000, 64)


def test_searching_cell_by_cell_gives_each_patch_its_own_answer():
    """Ordering the queries by landmark is for the CPU's cache only: each patch gets its own distance back."""
    points = clustered_points(6000, seed=2)
    kept, queries = points[:5000], points[5000:]
    index = CandidateIndex(kept.shape[1])
    for start in range(0, len(kept), 250):
        index.add(kept[start : start + 250])
    cells = index._cells(queries)
    assert not np.all(np.diff(cells) >= 0)  # the queries do arrive out of cell order
    assert np.array_equal(index.nearest(queries), index._index.search(queries, 1)[0][:, 0])


def test_a_coreset_past_the_exact_limit_is_reproducible_and_still_covers(monkeypatch):
    monkeypatch.setattr("models.coreset.EXACT_UP_TO", 200)
    points = clustered_points(8000)
    same = [streamed(points, 0.1, 1000, 64, seed=3) for _ in range(2)]
    assert same[0][1]._index.approximate
    assert np.array_equal(same[0][0], same[1][0])
    monkeypatch.setattr("models.coreset.EXACT_UP_TO", 10**9)
    exact_search = bank(points, 0.1, 1000, 64, seed=3)
    assert covering_radius(points, same[0][0]) <= 1.1 * covering_radius(points, exact_search)


def test_at_a_small_ratio_the_bank_is_exact_greedys_not_the_chunked_one():
    """Chunks of 1,000 at ratio 0.005 would pick 5 patches each, blind to the rest: one exact pass instead."""
    points = clustered_points(20000)
    exact = bank(points, 0.005, chunk_size=len(points))
    assert np.array_equal(bank(points, 0.005, chunk_size=1000), exact)
    many_picks = bank(points, 0.1, chunk_size=1000)  # 100 picks a chunk: the streamed chunks stay
    assert not np.array_equal(many_picks, bank(points, 0.1, chunk_size=len(points)))


def test_while_photos_stream_in_the_greedy_steps_use_one_blas_thread(monkeypatch):
    """Each step is one small matrix-vector product; OpenBLAS threads for it cost a core's worth of spinning."""
    from threadpoolctl import threadpool_info

    seen_threads = []
    real_greedy = coreset.greedy_coreset

    def recording_greedy(*args, **kwargs):
        seen_threads.extend(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")
        return real_greedy(*args, **kwargs)

    monkeypatch.setattr(coreset, "greedy_coreset", recording_greedy)
    streaming = StreamingCoreset(0.1, 32, 1000, seed=0)
    for part in np.array_split(clustered_points(3000), 6):
        streaming.add(part)
    assert seen_threads and set(seen_threads) == {1}
