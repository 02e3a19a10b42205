"""Greedy k-center coreset selection (PatchCore, Sec. 3.2) in one streaming pass over the patches.

Exact greedy costs O(N * k * d): for the ~300k patches of the screw set and a 10% coreset that is
~30k passes over the whole bank, over ten minutes on 2 cores (measured: 687 s), and it needs every
patch in memory. Instead, as features stream in:

- distances are computed on a fixed, seeded random projection to at most 128 dimensions
  (Johnson-Lindenstrauss keeps them close);
- each chunk of ``chunk_size`` patches is reduced to *candidates* by greedy k-center that starts
  from every patch's distance to the candidates kept so far, so a pattern earlier chunks cover is
  not picked again: a chunk that repeats an earlier one adds no copy of a kept patch;
- at small ratios, where a chunk's share of the bank would be under ``MIN_PICKS_PER_CHUNK``
  patches, its greedy cannot place them well without seeing the rest (screw at ratio 0.005, three
  seeds: image AUROC 0.879 chunked against 0.905 exact). There the chunk grows to
  ``EXACT_PASS_PATCHES``: one exact greedy pass over every patch of a set up to that size. Few picks
  make it affordable (cost patches x picks); memory is then O(patches), at most ~0.6 GB;
- optionally (``oversampling`` > 1), where a chunk's share of the bank is above the exact pass's
  limit but under half of ``ENOUGH_PICKS_PER_CHUNK``, a chunk keeps ``oversampling`` times its share
  as candidates and one global greedy pass over all candidates picks the bank at the end. It fixes
  streams whose variety arrives late (tests), but on screw it did not close the gap to exact
  greedy at small ratios and costs 3-5x the coreset time (README, Performance), so it is off by
  default. From ``ENOUGH_PICKS_PER_CHUNK`` picks per chunk on, the candidates are the bank either way;
- the "kept so far" search is one FAISS search per chunk in an inverted file whose lists hold ~16
  candidates each, so that a very long fit barely slows down as its bank grows (README, Scale).

Memory is O(candidates), at most ``oversampling`` times the bank, except for the exact pass above.
README (Performance) has the ratio curve against exact greedy; tests/test_coreset.py checks the
covering radius.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

ENOUGH_PICKS_PER_CHUNK = 256  # ratio 0.1 gives 410 per 4096-patch chunk and matches exact greedy
EXACT_UP_TO = 0  # kept candidates searched exactly before the inverted file takes over (CandidateIndex)
LIST_SIZE = 16  # candidates per list of the kept-so-far inverted file when it is built
PROBES = 6  # lists a kept-so-far query scans: 97.5% of answers exact on clustered points, 91% with 4
REBUILD_GROWTH = 1.5  # the inverted file is built anew each time it grows by this factor
HNSW_LINKS, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 16, 40, 16  # the graph that finds a query's nearest centroids
MIN_PICKS_PER_CHUNK = 64  # fewer picks per chunk: one exact pass instead (effective_chunk_size)
EXACT_PASS_PATCHES = 500_000  # the exact pass holds this many patches at most (raw + projected: ~0.6 GB)
LANDMARKS = 64  # the kept-so-far search orders its queries by the nearest of this many
RADIUS_SAMPLE = 2048  # training patches, sampled uniformly, on which the covering radius is measured


def random_projection(in_dim: int, out_dim: int, seed: int) -> np.ndarray | None:
    """A fixed Gaussian projection to ``out_dim`` dimensions, or None when no reduction is needed.

    Drawn by torch's seeded generator, so a fit's bank stays the one every earlier version of this
    module picked. Only a fit draws it: a model file keeps the projection its bank was picked in,
    and an update continues in that one (``StreamingCoreset``'s ``projection``), so learning on the
    line needs no torch.
    """
    if in_dim <= out_dim:
        return None
    import torch  # imported by fits alone (see above)

    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(in_dim, out_dim, generator=generator) / math.sqrt(out_dim)).numpy()


def first_pick(n_points: int, seed: int) -> int:
    """Where greedy starts when nothing is covered yet (a fit's first chunk): a seeded draw by
    torch's generator, as every earlier version drew it. An update always starts from its bank."""
    import torch  # imported by fits alone

    return int(torch.randint(n_points, (1,), generator=torch.Generator().manual_seed(seed)))


def greedy_coreset(
    points: np.ndarray, n_select: int, seed: int, covered: np.ndarray | None = None
) -> np.ndarray:
    """Indices of ``n_select`` points picked by exact greedy k-center (farthest point first).

    ``covered`` optionally gives each point's squared distance to centres picked earlier (in other
    chunks): greedy then continues from them instead of starting afresh. Memory is O(N): one running
    vector of each point's distance to its nearest pick. NumPy, not torch: each of the hundreds of
    steps is one small matrix-vector product, where torch's per-call overhead made it 2.4x slower.
    """
    n_points = points.shape[0]
    n_select = min(n_select, n_points)
    # Half squared distances, |a|²/2 - a·b + |b|²/2: the same order (halving is exact in floating
    # point), one multiplication fewer per step, and every step writes into buffers made once.
    half_norms = 0.5 * np.einsum("ij,ij->i", points, points)
    picks = np.empty(n_select, dtype=np.int64)
    if covered is None:
        nearest = np.full(n_points, np.inf, dtype=np.float32)
        current = first_pick(n_points, seed)
    else:
        nearest = 0.5 * covered.astype(np.float32)
        current = int(np.argmax(nearest))
    distances = np.empty(n_points, dtype=np.float32)
    for step in range(n_select):
        picks[step] = current
        np.dot(points, points[current], out=distances)
        np.subtract(half_norms, distances, out=distances)
        distances += half_norms[current]
        np.minimum(nearest, distances, out=nearest)
        current = int(np.argmax(nearest))
    return picks


def effective_chunk_size(ratio: float, chunk_size: int) -> int:
    """``chunk_size``, or ``EXACT_PASS_PATCHES`` where chunks would each give under ``MIN_PICKS_PER_CHUNK`` picks."""
    return chunk_size if ratio * chunk_size >= MIN_PICKS_PER_CHUNK else max(chunk_size, EXACT_PASS_PATCHES)


def candidate_share(ratio: float, oversampling: float, chunk_size: int) -> float:
    """Share of each chunk kept as candidates: ``oversampling`` x ``ratio`` where chunks get few picks.

    Capped at ``ENOUGH_PICKS_PER_CHUNK`` per chunk (the global pass costs candidates x bank), and
    left at ``ratio`` (no global pass) when oversampling would not at least double the candidates.
    """
    oversampled = min(oversampling * ratio, ENOUGH_PICKS_PER_CHUNK / chunk_size)
    return oversampled if oversampled >= 2 * ratio else ratio


class CandidateIndex:
    """Squared distance from new patches to the nearest candidate kept so far.

    An exact (FAISS flat) search costs every chunk a pass over a bank that grows with the photos
    seen: a long fit slows down photo by photo, and even at the screw defaults (11k kept) it was
    half of the coreset's time. An HNSW graph over every candidate grew more slowly, but still grew:
    its inserts (a depth-40 search each) and its walks through a graph larger than the CPU's cache
    cost a 3,000-photo fit ~7 ms more per photo at the end than at the start.

    So the candidates sit in an inverted file (FAISS IVF): each one is filed in the list of its
    nearest *centroid*, and a query scans the ``PROBES`` lists whose centroids are nearest to it.
    The centroids are every ``LIST_SIZE``-th candidate (greedy's picks are already spread, so no
    k-means is needed) and are found through a small HNSW graph. Adding a candidate is one search in
    that graph; the file is rebuilt each time it grows by ``REBUILD_GROWTH``, which keeps the lists
    short. Its distances are approximate: slightly too large where the nearest candidate sits in a
    list not scanned (measured recall in tests/test_coreset.py), which at worst lets greedy keep a
    patch that a kept one already covers. ``EXACT_UP_TO`` > 0 keeps the first ones exact (for
    comparisons). The file is built on one thread, so the bank is the same on every run.

    Queries that scan the same lists run one after another: every patch belongs to the *cell* of
    its nearest landmark (the first ``LANDMARKS`` candidates, spread by greedy), and a chunk's
    queries are searched cell by cell. That changes the order of the work, not what it finds.
    """

    def __init__(self, dim: int) -> None:
        self._points: list[np.ndarray] = []
        self._index: faiss.Index = faiss.IndexFlatL2(dim)
        self._landmarks = faiss.IndexFlatL2(dim)
        self._built_at = 0  # candidates in the file when it was last built

    def __len__(self) -> int:
        return self._index.ntotal

    @property
    def approximate(self) -> bool:
        return isinstance(self._index, faiss.IndexIVFFlat)

    def add(self, points: np.ndarray) -> None:
        self._points.append(points)
        if self._landmarks.ntotal < LANDMARKS:
            self._landmarks.add(points[: LANDMARKS - self._landmarks.ntotal])
        total = len(self) + len(points)
        if total > EXACT_UP_TO and (not self.approximate or total >= REBUILD_GROWTH * self._built_at):
            self._build()
        else:
            self._index.add(points)

    def nearest(self, points: np.ndarray) -> np.ndarray:
        order = np.argsort(self._cells(points), kind="stable")
        distances = np.empty(len(points), dtype=np.float32)
        distances[order] = self._index.search(np.ascontiguousarray(points[order]), 1)[0][:, 0]
        return distances

    def points(self) -> np.ndarray:
        """Every candidate, in the order added."""
        return np.concatenate(self._points)

    def _build(self) -> None:
        """File every candidate anew under every ``LIST_SIZE``-th one as centroids."""
        candidates = self.points()
        dim = candidates.shape[1]
        centroids = faiss.IndexHNSWFlat(dim, HNSW_LINKS)
        centroids.hnsw.efConstruction, centroids.hnsw.efSearch = HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # HNSW inserts in parallel in no fixed order; one thread keeps it reproducible
        try:
            centroids.add(np.ascontiguousarray(candidates[::LIST_SIZE]))
        finally:
            faiss.omp_set_num_threads(threads)
        # trained, since it holds its centroids; FAISS's wrapper keeps the graph alive with the file
        inverted_file = faiss.IndexIVFFlat(centroids, dim, centroids.ntotal)
        inverted_file.nprobe = PROBES
        inverted_file.add(candidates)
        self._index, self._built_at = inverted_file, len(candidates)

    def _cells(self, points: np.ndarray) -> np.ndarray:
        """Each point's cell: the number of its nearest landmark."""
        return self._landmarks.search(points, 1)[1][:, 0]


class StreamingCoreset:
    """Accumulates patch features batch by batch and keeps only a coreset of them.

    Features are buffered until ``chunk_size`` patches have arrived; each full chunk is reduced to
    candidates. ``result()`` reduces the last partial chunk, picks the bank from the candidates
    and measures its covering radius. A ``chunk_size`` at least the number of patches gives the
    exact (single-pass) greedy coreset.
    """

    def __init__(
        self,
        ratio: float,
        projection_dim: int,
        chunk_size: int,
        seed: int,
        oversampling: float = 1.0,
        known: np.ndarray | None = None,
        projection: np.ndarray | None = None,
    ) -> None:
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.chunk_size = effective_chunk_size(ratio, chunk_size)
        self.seed = seed
        self.share = candidate_share(ratio, oversampling, self.chunk_size)
        self.kept_indices: list[int] = []  # positions, in the order added, of the patches kept
        self.covering_radius = math.nan  # largest distance from a sampled patch to its nearest kept one
        # The space greedy measures distances in: given (a saved bank's, for an update), or the
        # seeded random projection drawn at the first features (``random_projection``).
        self.projection = None if projection is None else np.asarray(projection, dtype=np.float32)
        self._projection_given = projection is not None
        self._pending: list[np.ndarray] = []
        self._pending_count = 0
        self._seen = 0
        self._candidates: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self._index: CandidateIndex | None = None
        self._sample_rng = np.random.default_rng(seed)
        self._sample = np.empty((0, 0), dtype=np.float32)
        self._sample_keys = np.empty(0)
        # Patches of a bank fitted earlier (add_good): they count as kept, so greedy picks only what
        # they do not cover, but they are not part of ``result()``'s picks.
        self._known = np.empty((0, 0), dtype=np.float32) if known is None else np.asarray(known, np.float32)

    def add(self, features: np.ndarray) -> None:
        """Take (n, d) features; reduce whenever a full chunk is buffered."""
        features = np.asarray(features, dtype=np.float32)
        if self._seen == 0 and not self._pending:
            if not self._projection_given:
                self.projection = random_projection(features.shape[1], self.projection_dim, self.seed)
            elif self.projection.shape[0] != features.shape[1]:
                raise ValueError(
                    f"the projection takes {self.projection.shape[0]} features per patch, got {features.shape[1]}"
                )
            if len(self._known):
                known = self._project(self._known)
                self._index = CandidateIndex(known.shape[1])
                self._index.add(known)
        self._pending.append(features)
        self._pending_count += features.shape[0]
        if self._pending_count < self.chunk_size:
            return  # nothing to reduce yet; setting the thread limit alone costs ~2 ms
        # While photos stream in, the cores are shared with the backbone and the photo workers.
        # NumPy's OpenBLAS split each greedy step (one matrix-vector product) over both cores, and
        # its threads spun between steps: a 4,096-patch chunk cost twice its wall time in CPU.
        with threadpool_limits(limits=1, user_api="blas"):
            while self._pending_count >= self.chunk_size:
                buffered = np.concatenate(self._pending)
                self._reduce(buffered[: self.chunk_size])
                rest = buffered[self.chunk_size :]
                self._pending = [rest] if rest.shape[0] else []
                self._pending_count = rest.shape[0]

    def result(self) -> np.ndarray:
        """The memory bank: (k, d) float32 features of every kept patch."""
        if self._pending_count:
            self._reduce(np.concatenate(self._pending))
            self._pending, self._pending_count = [], 0
        if not self._candidates:
            raise ValueError("no features were added to the coreset")
        candidates = np.concatenate(self._candidates)
        positions = np.concatenate(self._positions)
        target = max(1, round(self.ratio * self._seen))
        if self.share > self.ratio and len(candidates) > target:  # the global pass over the candidates
            projected = self._index.points()
            covered = None
            if len(self._known):  # continue from the known bank, as every chunk did
                known = faiss.IndexFlatL2(projected.shape[1])
                known.add(projected[: len(self._known)])
                projected = np.ascontiguousarray(projected[len(self._known) :])
                covered = known.search(projected, 1)[0][:, 0]
            picks = greedy_coreset(projected, target, seed=self.seed, covered=covered)
            candidates, positions = candidates[picks], positions[picks]
        self.kept_indices = positions.tolist()
        whole_bank = np.concatenate([self._known, candidates]) if len(self._known) else candidates
        self.covering_radius = self._radius_on_sample(whole_bank)
        return candidates

    def _project(self, features: np.ndarray) -> np.ndarray:
        """Features in the projected space greedy measures distances in, as a contiguous array."""
        return np.ascontiguousarray(features @ self.projection if self.projection is not None else features)

    def _reduce(self, chunk: np.ndarray) -> None:
        projected = self._project(chunk)
        if self._index is None:
            self._index = CandidateIndex(projected.shape[1])
        # patches like the candidates so far are not picked again
        covered = self._index.nearest(projected) if len(self._index) else None
        n_select = max(1, round(self.share * chunk.shape[0]))
        picks = greedy_coreset(projected, n_select, seed=self.seed + self._seen, covered=covered)
        self._sample_patches(chunk)
        self._index.add(projected[picks])
        self._candidates.append(chunk[picks])
        self._positions.append(picks + self._seen)
        self._seen += chunk.shape[0]

    def _sample_patches(self, chunk: np.ndarray) -> None:
        """Keep a uniform sample of every patch seen (the ``RADIUS_SAMPLE`` smallest random keys)."""
        keys = np.concatenate([self._sample_keys, self._sample_rng.random(len(chunk))])
        pool = chunk if not self._sample.size else np.concatenate([self._sample, chunk])
        keep = np.argsort(keys, kind="stable")[:RADIUS_SAMPLE]
        self._sample, self._sample_keys = pool[keep], keys[keep]

    def _radius_on_sample(self, bank: np.ndarray) -> float:
        """Largest distance from a sampled training patch to its nearest bank patch (full features)."""
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(np.ascontiguousarray(bank))
        distances = index.search(np.ascontiguousarray(self._sample), 1)[0]
        return float(np.sqrt(max(float(distances.max()), 0.0)))
