"""Palette fitting (histogram and mini-batch k-means), quantization, save/load, and the Ray helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igpt_core.config import PaletteConfig
from igpt_core.distributed import ensure_ray, map_parts
from igpt_core.palette import Palette, _assign, codes_to_rgb, colour_codes, normalise
from igpt_core.palette_fit import fit_palette

# Eight well-separated colours; pixels scattered around them make a problem with a known answer.
TRUE_COLOURS = np.array(
    [[20, 20, 20], [230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 40], [40, 230, 230],
     [230, 40, 230], [235, 235, 235]],
    dtype=np.int64,
)  # fmt: skip


def clustered_images(n: int = 60, side: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(TRUE_COLOURS), (n, side, side))
    noise = rng.integers(-6, 7, (n, side, side, 3))
    return (TRUE_COLOURS[which] + noise).clip(0, 255).astype(np.uint8)


def brute_force_tokens(images: np.ndarray, centers: np.ndarray) -> np.ndarray:
    x = normalise(images.reshape(-1, 3)).astype(np.float64)
    d = ((x[:, None, :] - centers.astype(np.float64)[None]) ** 2).sum(-1)
    return d.argmin(1).reshape(len(images), -1)


# -- colour codes and quantization -------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 1000])
def test_colour_codes_round_trip(n: int) -> None:
    pixels = np.random.default_rng(n).integers(0, 256, (n, 3), dtype=np.uint8)
    codes = colour_codes(pixels)
    assert codes.dtype == np.uint32 and codes.shape == (n,)
    np.testing.assert_array_equal(codes_to_rgb(codes), pixels)
    np.testing.assert_array_equal(codes, pixels[:, 0] | pixels[:, 1].astype(np.uint32) << 8 | pixels[:, 2].astype(np.uint32) << 16)  # fmt: skip


def test_quantize_is_nearest_colour_and_dequantize_inverts_it() -> None:
    rng = np.random.default_rng(0)
    centers = normalise(rng.integers(0, 256, (64, 3)))
    palette = Palette(centers)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    tokens = palette.quantize(images)
    assert tokens.dtype == np.uint16 and tokens.shape == (5, 64)
    np.testing.assert_array_equal(tokens, brute_force_tokens(images, palette.centers))
    np.testing.assert_array_equal(palette.quantize(images[0]), tokens[:1])  # one (R, R, 3) image
    restored = palette.dequantize(tokens)
    assert restored.dtype == np.uint8 and restored.shape == (5, 8, 8, 3)
    # Centres sit on exact colours, so dequantized images quantize back to the same tokens.
    np.testing.assert_array_equal(palette.quantize(restored), tokens)
    np.testing.assert_array_equal(palette.dequantize(tokens[0]), restored[:1])


def test_bad_inputs_are_named() -> None:
    palette = Palette(np.zeros((4, 3), np.float32) + np.linspace(-1, 1, 4)[:, None])
    with pytest.raises(TypeError, match="images: expected uint8"):
        palette.quantize(np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="images: expected shape"):
        palette.quantize(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="tokens: values must be in"):
        palette.dequantize(np.array([[0, 4, 1, 2]]))
    with pytest.raises(ValueError, match="not resolution"):
        palette.dequantize(np.zeros((1, 5), np.int64))
    with pytest.raises(ValueError, match="centers: expected shape"):
        Palette(np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"centers: values must lie in \[-1, 1\]"):
        Palette(np.full((4, 3), 2.0))
    with pytest.raises(ValueError, match="centers: contains NaN"):
        Palette(np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match="images must be uint8"):
        fit_palette(np.zeros((2, 4, 4, 3), np.float32), clusters=2, resolution=4, progress=False)


# -- save / load -------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    palette = fit_palette(clustered_images(), clusters=8, resolution=8, progress=False)
    out = palette.save(tmp_path / "pal", {"run": "abc"})
    centers = np.load(out / "palette.npy", allow_pickle=False)
    assert centers.dtype == np.float32 and centers.shape == (8, 3)
    record = json.loads((out / "palette.json").read_text())
    assert record["run"] == "abc" and record["clusters"] == 8 and record["digest"] == palette.digest()
    for key in ("seed", "method", "pixels", "unique_colours", "inertia", "source_digest"):
        assert key in record
    assert Image.open(out / "palette.png").size == (8 * 16, 16)
    loaded = Palette.load(out)
    assert loaded.digest() == palette.digest() and loaded.info["run"] == "abc"


def test_load_openai_kmeans_centers_file(tmp_path: Path) -> None:
    centers = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
    np.save(tmp_path / "kmeans_centers.npy", centers)
    palette = Palette.load(tmp_path / "kmeans_centers.npy")
    assert palette.clusters == 512
    np.testing.assert_array_equal(palette.centers, centers)
    with pytest.raises(FileNotFoundError, match="no palette.npy"):
        Palette.load(tmp_path / "missing")
    np.save(tmp_path / "bad.npy", np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="bad.npy: centers: expected shape"):
        Palette.load(tmp_path / "bad.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain .npy array"):
        Palette.load(tmp_path / "objects.npy")


# -- fitting -----------------------------------------------------------------------------------


def test_histogram_fit_recovers_known_colours_and_is_deterministic() -> None:
    images = clustered_images()
    palette = fit_palette(images, clusters=8, resolution=8, progress=False)
    again = fit_palette(images, clusters=8, resolution=8, progress=False)
    assert palette.centers.tobytes() == again.centers.tobytes()
    found = np.rint((palette.centers + 1) * 127.5)
    # Every true colour has a centre within 2 levels (the noise is symmetric around it).
    err = np.abs(found[:, None, :] - TRUE_COLOURS[None]).max(-1).min(0)
    assert err.max() <= 2, err
    info = palette.info
    assert info["pixels"] == images.size // 3 and info["images"] == len(images)
    assert info["unique_colours"] == len(np.unique(colour_codes(images)))
    # Reported inertia is the exact squared error of the palette's own tokens.
    x = normalise(images.reshape(-1, 3)).astype(np.float64)
    tokens = palette.quantize(images).reshape(-1)
    exact = float(((x - palette.centers.astype(np.float64)[tokens]) ** 2).sum())
    assert info["inertia"] == pytest.approx(exact, rel=1e-6)
    # Canonical order: token 0 is the most used colour.
    usage = np.bincount(tokens, minlength=8)
    assert np.all(np.diff(usage) <= 0)


def test_histogram_fit_matches_scikit_learn_kmeans_on_real_pixels(cifar_dir: Path) -> None:
    from sklearn.cluster import KMeans
    from test_quantize_parity import load_test_images
    from threadpoolctl import threadpool_limits

    images = load_test_images(cifar_dir, 20)
    ours = fit_palette(images, clusters=16, resolution=32, progress=False)
    x = normalise(images.reshape(-1, 3))
    with threadpool_limits(1):  # OpenMP threads spin badly on a shared 2-core machine
        theirs = KMeans(16, n_init=1, random_state=0).fit(x)
    # Lloyd's algorithm on the same pixels: our inertia is no worse than scikit-learn's (1% slack).
    assert ours.info["inertia"] <= theirs.inertia_ * 1.01


def test_histogram_fit_of_a_folder_on_ray_equals_the_fit_of_its_pixels(ray_local, tmp_path: Path) -> None:
    from igpt_core.sources import open_source

    images = clustered_images(n=24, side=8, seed=5)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"img{i:02d}.png")
    from_folder = fit_palette(str(tmp_path), clusters=8, resolution=8, progress=False)  # Ray tasks per part
    from_array = fit_palette(images, clusters=8, resolution=8, progress=False)  # counted in process
    assert from_folder.centers.tobytes() == from_array.centers.tobytes()
    for key in ("pixels", "unique_colours", "images", "inertia"):
        assert from_folder.info[key] == from_array.info[key]
    assert from_folder.info["source_digest"] == open_source(str(tmp_path)).digest()


def test_fewer_colours_than_clusters_gives_zero_inertia() -> None:
    images = clustered_images(n=4, side=4)
    distinct = np.unique(colour_codes(images))
    palette = fit_palette(images, clusters=len(distinct) + 5, resolution=4, progress=False)
    assert palette.info["inertia"] == pytest.approx(0.0, abs=1e-9)  # float32 centres of exact colours
    np.testing.assert_array_equal(palette.dequantize(palette.quantize(images)), images)


def test_weighted_lloyd_reseeds_empty_clusters_and_assign_is_exact() -> None:
    rng = np.random.default_rng(1)
    x = normalise(rng.integers(0, 256, (20000, 3)))
    centers = np.vstack([np.full((1, 3), 5.0), rng.uniform(-1, 1, (31, 3))])  # centre 0 far away
    assign, best, lower = _assign(x, centers, second=True)
    d = ((x[:, None, :].astype(np.float64) - centers[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(assign, d.argmin(1))
    np.testing.assert_allclose(best, d.min(1), atol=1e-6)
    d[np.arange(len(x)), assign] = np.inf
    assert np.all(lower <= d.min(1) + 1e-6)


def test_config_supplies_settings_and_rejects_unknown_method() -> None:
    images = clustered_images()
    palette = fit_palette(images, config=PaletteConfig(clusters=4, resolution=8, seed=3), progress=False)
    assert palette.clusters == 4 and palette.info["seed"] == 3
    with pytest.raises(ValueError, match="method: unknown method"):
        fit_palette(images, clusters=4, resolution=8, method="lloyd", progress=False)


def test_minibatch_fit_on_ray_is_deterministic_and_close_to_histogram(ray_local) -> None:
    images = clustered_images(n=200)
    config = PaletteConfig(clusters=8, resolution=8, method="minibatch", batch_size=2048, max_iter=40)
    first = fit_palette(images, config=config, progress=False)
    second = fit_palette(images, config=config, progress=False)
    assert first.centers.tobytes() == second.centers.tobytes()
    assert first.info["method"] == "minibatch" and first.info["pixels"] == images.size // 3
    exact = fit_palette(images, clusters=8, resolution=8, progress=False)
    assert first.info["inertia"] <= exact.info["inertia"] * 1.05


# -- Ray helpers -------------------------------------------------------------------------------


# Ray workers cannot import this test module, so the task functions are closures (pickled by value).
def make_square():
    def square(value: int) -> int:
        return value * value

    return square


def make_fail_on_three():
    def fail_on_three(value: int) -> int:
        if value == 3:
            raise KeyError("three is not allowed")
        return value

    return fail_on_three


def make_die_once(marker: str):
    def die_once(value: int) -> int:
        import os
        from pathlib import Path

        if value == 1 and not os.path.exists(marker):
            Path(marker).write_text("died")
            os._exit(1)  # the worker process dies; Ray must retry the task elsewhere
        return value * 10

    return die_once


def test_map_parts_keeps_order_and_reuses_the_connection(ray_local) -> None:
    ensure_ray()  # an existing connection is reused, not replaced
    square = make_square()
    assert map_parts(square, list(range(12)), desc="squares", progress=False) == [i * i for i in range(12)]
    assert map_parts(square, [], desc="nothing") == []


def test_workers_of_a_local_ray_get_the_train_poll_interval_and_the_api_server(ray_local) -> None:
    """ensure_ray's job environment reaches Ray's worker processes, where Ray Train's controller reads it."""
    import ray

    from igpt_core import distributed

    @ray.remote(num_cpus=0)
    def environment(names: list[str]) -> dict[str, str | None]:
        return {name: os.environ.get(name) for name in names}

    seen = ray.get(environment.remote([distributed.TRAIN_POLL_ENV, "RAY_API_SERVER_ADDRESS"]))
    assert seen[distributed.TRAIN_POLL_ENV] == os.environ.get(distributed.TRAIN_POLL_ENV, "0.25")
    assert (seen["RAY_API_SERVER_ADDRESS"] or "").startswith("http://127.0.0.1:")


def test_map_parts_retries_a_dead_worker_and_reraises_errors(ray_local, tmp_path: Path) -> None:
    marker = str(tmp_path / "died-once")
    assert map_parts(make_die_once(marker), [0, 1, 2], desc="retry", progress=False) == [0, 10, 20]
    assert Path(marker).exists()  # the first attempt really died
    with pytest.raises(KeyError, match="three is not allowed"):
        map_parts(make_fail_on_three(), list(range(5)), desc="fails", progress=False)
    with pytest.raises(ValueError, match="unknown resource option"):
        map_parts(make_square(), [1], desc="bad", num_gpu=1)


def test_coarse_to_fine_fit_ends_at_a_lloyd_fixed_point_of_the_exact_colours() -> None:
    from igpt_core.kmeans import fit_weighted

    rng = np.random.default_rng(7)
    hubs = rng.integers(0, 256, (12, 3))
    rgb = np.clip(hubs[rng.integers(0, 12, 40000)] + rng.normal(0, 18, (40000, 3)), 0, 255).astype(np.uint8)
    codes, counts = np.unique(colour_codes(rgb), return_counts=True)
    colours, w = codes_to_rgb(codes), counts.astype(np.float64)
    centers, assign, _, converged = fit_weighted(colours, w, 16, 3, max_iter=500, tol=0.0)
    again, _, _, _ = fit_weighted(colours, w, 16, 3, max_iter=500, tol=0.0)
    assert converged and centers.tobytes() == again.tobytes()
    # Fixed point: every centre is the weighted mean of the exact colours nearest to it.
    x = normalise(colours).astype(np.float64)
    d = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
    nearest = d.argmin(1)
    np.testing.assert_array_equal(assign, nearest)
    for c in range(16):
        mine = nearest == c
        np.testing.assert_allclose(centers[c], w[mine] @ x[mine] / w[mine].sum(), atol=1e-9)


@pytest.mark.parametrize("k", [2, 3, 40])
def test_lloyd_assignment_is_the_exact_nearest_centre_for_any_k(k: int) -> None:
    from igpt_core.kmeans import lloyd

    rng = np.random.default_rng(k)
    x = normalise(rng.integers(0, 256, (6000, 3))).astype(np.float64)
    w = rng.integers(1, 5, len(x)).astype(np.float64)
    start = x[rng.choice(len(x), k, replace=False)]
    centers, assign, iterations, _ = lloyd(x, w, start, max_iter=8, tol=0.0)
    assert iterations == 8  # stopped by max_iter: the bounds were exercised over several moves
    d = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(assign, d.argmin(1))


def _lloyd_problem(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colours from a few blobs (so centres crowd and the bounds are exercised), weights, start."""
    rng = np.random.default_rng(seed)
    hubs = rng.integers(0, 256, (6, 3))
    rgb = np.clip(hubs[rng.integers(0, 6, n)] + rng.normal(0, 25, (n, 3)), 0, 255)
    x = normalise(rgb.astype(np.uint8)).astype(np.float64)
    w = rng.integers(1, 9, n).astype(np.float64)
    return x, w, x[rng.choice(n, k, replace=False)]


def test_lloyd_state_bounds_every_untracked_centre() -> None:
    from igpt_core.kmeans import run_lloyd

    x, w, start = _lloyd_problem(5000, 48, 3)
    for iterations in (1, 4, 9):
        result = run_lloyd(x, w, start, iterations, tol=0.0)
        d = np.sqrt(((x[:, None, :] - result.centers[None]) ** 2).sum(-1))
        rows = np.arange(len(x))
        tracked = np.zeros(d.shape, bool)
        tracked[rows[:, None], result.state.near] = True
        assert tracked[rows, result.assign].all()  # the assigned centre is one of the tracked
        np.testing.assert_array_equal(result.assign, d.argmin(1))
        untracked = np.where(tracked, np.inf, d).min(1)
        assert np.all(result.state.rest <= untracked), iterations


def test_lloyd_started_from_groups_equals_lloyd_started_by_search() -> None:
    from igpt_core.kmeans import Groups, run_lloyd

    x, w, start = _lloyd_problem(20000, 40, 5)
    cells = np.floor((x + 1) * 8).astype(np.int64) @ np.array([256, 16, 1])  # a coarse colour grid
    _, group = np.unique(cells, return_inverse=True)
    gw = np.bincount(group, weights=w)
    gx = np.stack([np.bincount(group, weights=w * x[:, j]) for j in range(3)], 1) / gw[:, None]
    coarse = run_lloyd(gx, gw, start, 3, tol=0.0)
    groups = Groups(group, coarse.state.x, coarse.state.near, coarse.state.rest)
    for iterations in (1, 6):
        grouped = run_lloyd(x, w, coarse.centers, iterations, tol=0.0, groups=groups)
        searched = run_lloyd(x, w, coarse.centers, iterations, tol=0.0)
        np.testing.assert_array_equal(grouped.assign, searched.assign)
        assert grouped.centers.tobytes() == searched.centers.tobytes()


def test_lloyd_result_does_not_depend_on_the_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from igpt_core import kmeans

    x, w, start = _lloyd_problem(3 * kmeans._CHUNK + 123, 64, 9)  # four chunks
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(kmeans, "process_cpus", lambda threads=threads: threads)
        results.append(kmeans.run_lloyd(x, w, start, 5, tol=0.0))
    assert results[0].centers.tobytes() == results[1].centers.tobytes()
    np.testing.assert_array_equal(results[0].assign, results[1].assign)


def test_fast_nearest_tokens_equal_the_reference_arithmetic_even_at_near_ties() -> None:
    from igpt_core.palette import _nearest_tokens, _reference_nearest

    rng = np.random.default_rng(11)
    base = rng.uniform(-1, 1, (256, 3)).astype(np.float32)
    # Half the centres are copies of the others moved by ~1e-7: colours between such pairs are
    # near-ties that only the reference's own float32 arithmetic decides, plus exact duplicates.
    twins = base + rng.normal(0, 1e-7, base.shape).astype(np.float32)
    twins[:8] = base[:8]
    centers = np.clip(np.concatenate([base, twins]), -1, 1)
    codes = rng.choice(1 << 24, 200_000, replace=False).astype(np.uint32)
    fast = _nearest_tokens(codes, centers)
    np.testing.assert_array_equal(fast, _reference_nearest(codes, centers))
    assert fast.dtype == np.uint16


# -- the full colour table ---------------------------------------------------------------------


def test_full_table_equals_the_reference_arithmetic() -> None:
    from igpt_core.palette import _reference_nearest

    rng = np.random.default_rng(12)
    base = rng.uniform(-1, 1, (24, 3)).astype(np.float32)
    centers = np.concatenate([base, np.clip(base[:2] + 1e-7, -1, 1), base[2:3]])  # near and exact ties
    palette = Palette(centers)
    table = palette.build_table()
    codes = np.concatenate([rng.choice(1 << 24, 300_000, replace=False), np.arange(4096)]).astype(np.uint32)
    np.testing.assert_array_equal(table[codes], _reference_nearest(codes, palette.centers))
    assert not table.flags.writeable and palette.has_table


def test_table_is_saved_beside_the_palette_memory_mapped_on_load_and_by_pickled_copies(
    tmp_path: Path,
) -> None:
    import pickle

    palette = Palette(normalise(np.random.default_rng(5).integers(0, 256, (16, 3))))
    out = palette.save(tmp_path / "pal")
    assert not (out / "palette.lut").exists()  # no table built, none written
    palette.save(out, table=True)
    assert (out / "palette.lut").stat().st_size == 256 + 2 * (1 << 24)
    loaded = Palette.load(out)
    assert loaded.has_table and isinstance(loaded._lut, np.ndarray)
    images = np.random.default_rng(6).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    expected = Palette(palette.centers).quantize(images)  # the per-colour path
    np.testing.assert_array_equal(loaded.quantize(images), expected)
    copy = pickle.loads(pickle.dumps(loaded))  # what a Ray task gets: the path, not 32 MiB
    assert len(pickle.dumps(loaded)) < 10_000 and copy._lut is None
    np.testing.assert_array_equal(copy.quantize(images), expected)
    assert copy._full  # mapped from the file, not filled colour by colour


def test_table_of_another_palette_is_refused_naming_the_file(tmp_path: Path) -> None:
    from igpt_core.palette_table import TableError

    a = Palette(normalise(np.random.default_rng(7).integers(0, 256, (8, 3))))
    b = Palette(normalise(np.random.default_rng(8).integers(0, 256, (8, 3))))
    a.save(tmp_path / "pal", table=True)
    np.save(tmp_path / "pal" / "palette.npy", b.centers)  # palette.npy replaced by hand
    with pytest.raises(TableError, match=r"palette\.lut: built for palette .* not this palette"):
        Palette.load(tmp_path / "pal")
    b.save(tmp_path / "pal")  # saving another palette drops the stale table
    assert not (tmp_path / "pal" / "palette.lut").exists() and not Palette.load(tmp_path / "pal").has_table
    (tmp_path / "pal" / "palette.lut").write_bytes(b"not a table")
    with pytest.raises(TableError, match="not an igpt colour table"):
        Palette.load(tmp_path / "pal")


def test_a_call_with_more_new_colours_than_build_at_builds_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from igpt_core import palette as palette_module

    monkeypatch.setattr(palette_module, "BUILD_AT", 1000)
    palette = Palette(normalise(np.random.default_rng(9).integers(0, 256, (8, 3))))
    small = np.random.default_rng(10).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    palette.quantize(small)
    assert not palette.has_table  # 64 colours: the per-colour cache
    big = np.random.default_rng(11).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    tokens = palette.quantize(big)
    assert palette.has_table
    np.testing.assert_array_equal(tokens, Palette(palette.centers).quantize(big))


@pytest.mark.parametrize("threads", ["1", "3"])
def test_a_full_table_is_read_in_chunks_that_give_the_tokens_of_one_gather(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: str
) -> None:
    from igpt_core import palette as palette_module

    monkeypatch.setenv("OMP_NUM_THREADS", threads)  # the chunks on one thread, or on a pool of three
    # 1,000 pixels a chunk: chunks end inside images and the last one is short
    monkeypatch.setattr(palette_module, "LOOKUP_CHUNK", 1000)
    palette = Palette(normalise(np.random.default_rng(12).integers(0, 256, (32, 3))))
    palette.save(tmp_path / "pal", table=True)
    loaded = Palette.load(tmp_path / "pal")
    images = np.random.default_rng(13).integers(0, 256, (37, 16, 16, 3), dtype=np.uint8)
    tokens = loaded.quantize(images)
    assert tokens.shape == (37, 256) and tokens.dtype == np.uint16
    np.testing.assert_array_equal(tokens, Palette(palette.centers).quantize(images))  # per-colour path
    np.testing.assert_array_equal(
        loaded.quantize(images[::2, ::-1]), tokens[::2].reshape(-1, 16, 16)[:, ::-1].reshape(-1, 256)
    )
