"""Champion and challenger: the promotion rule and the replay selection as plain functions, then the flow
in process (Prefect's test server, the session's local Ray, MLflow on SQLite) on real images.

One workspace for the flow tests, run in order: a full run registers igpt v1 (`champion`); a retrain on
more digits is promoted; a retrain on colour-inverted digits with replay off forgets the original digits
and is kept out; the same batch with replay on is measured beside it. Sizes are small (8x8 digits, 8
colours, tens of steps), enough for the inverted batch to move held-out loss by far more than the
tolerance.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from igpt_core.retrain import (
    first_champion,
    promotion_decision,
    replay_count,
    reservoir_sample,
    write_replay_mix,
)
from igpt_core.split import write_npz

# --------------------------------------------------------------------------------- pure decisions


def test_promotion_is_not_worse_within_tolerance_and_the_edge_counts_as_not_worse():
    # lower is better (bits/token); binary fractions so the edge is exact
    edge = promotion_decision(2.25, 2.0, tolerance=0.25, metric="bits")
    assert edge.decision == "promoted" and edge.promote and "not worse" in edge.reason
    assert promotion_decision(1.5, 2.0, tolerance=0.0, metric="bits").promote
    assert promotion_decision(2.0, 2.0, tolerance=0.0, metric="bits").promote  # a tie is not worse
    worse = promotion_decision(2.25 + 1e-9, 2.0, tolerance=0.25, metric="bits")
    assert worse.decision == "kept" and not worse.promote
    assert "2.2500 vs champion 2.0000" in worse.reason and "worse" in worse.reason
    assert (worse.challenger, worse.champion, worse.tolerance) == (2.25 + 1e-9, 2.0, 0.25)
    # higher is better (accuracy)
    assert promotion_decision(0.25, 0.5, tolerance=0.25, metric="acc", higher_is_better=True).promote
    assert not promotion_decision(0.2, 0.5, tolerance=0.25, metric="acc", higher_is_better=True).promote
    assert promotion_decision(0.9, 0.5, tolerance=0.0, metric="acc", higher_is_better=True).promote


def test_an_unscored_challenger_is_kept_out_and_an_unscored_champion_or_bad_tolerance_is_refused():
    assert promotion_decision(math.nan, 2.0, tolerance=0.1, metric="bits").decision == "kept"
    assert promotion_decision(math.inf, 2.0, tolerance=0.1, metric="bits").decision == "kept"
    with pytest.raises(ValueError, match="champion bits"):
        promotion_decision(2.0, math.nan, tolerance=0.1, metric="bits")
    with pytest.raises(ValueError, match="tolerance"):
        promotion_decision(2.0, 2.0, tolerance=-0.1, metric="bits")
    first = first_champion("bits", 3.5)
    assert first.decision == "first" and first.promote and math.isnan(first.champion)


def test_replay_count_is_the_share_of_the_new_samples():
    assert replay_count(80, 0.5) == 40
    assert replay_count(81, 0.5) == 40  # rounds half to even
    assert replay_count(80, 0.0) == 0
    assert replay_count(10, 2.0) == 20
    with pytest.raises(ValueError, match="replay_share"):
        replay_count(10, -0.5)


def test_reservoir_sample_is_seeded_uniform_and_in_stream_order():
    picked = reservoir_sample(range(1000), 50, seed=0)
    assert len(picked) == 50 and len(set(picked)) == 50 and picked == sorted(picked)
    assert reservoir_sample(range(1000), 50, seed=0) == picked  # the same seed, the same sample
    assert reservoir_sample(range(1000), 50, seed=1) != picked
    assert reservoir_sample(range(5), 50, seed=0) == [0, 1, 2, 3, 4]  # fewer than asked: all
    # uniform: over many seeds, every item is picked about k/n of the time
    counts = np.zeros(20)
    for seed in range(2000):
        counts[reservoir_sample(range(20), 5, seed)] += 1
    assert np.all(np.abs(counts / 2000 - 0.25) < 0.05)


def test_replay_mix_is_the_new_images_then_a_share_of_the_champions_reproducibly(tmp_path):
    rng = np.random.default_rng(0)
    new = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    old = rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    new_spec = write_npz(tmp_path / "new.npz", new, np.arange(6) % 3)
    old_spec = write_npz(tmp_path / "old.npz", old, np.arange(30) % 10)
    out = tmp_path / "mix.npz"
    counts = write_replay_mix(str(new_spec), str(old_spec), out, share=0.5, seed=0, resolution=4)
    assert counts == {"new": 6, "replay": 3, "replay_available": 30}
    with np.load(out) as mix:
        x, y = mix["x"], mix["y"]
    assert x.shape == (9, 4, 4, 3) and np.array_equal(x[:6], new)
    replayed = [int(np.flatnonzero((old == image).all(axis=(1, 2, 3)))[0]) for image in x[6:]]
    assert replayed == sorted(replayed) and np.array_equal(y[6:], np.array(replayed) % 10)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    write_replay_mix(str(new_spec), str(old_spec), out, share=0.5, seed=0, resolution=4)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest  # byte-for-byte reproducible
    alone = write_replay_mix(str(new_spec), str(old_spec), out, share=0.0, seed=0, resolution=4)
    assert alone == {"new": 6, "replay": 0, "replay_available": 0}
    assert not list(tmp_path.glob(".*partial"))


# --------------------------------------------------------------------------------- the flow

TOLERANCE = 0.01


@pytest.fixture(scope="module")
def harness(ray_local):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """scikit-learn's digits as .npz sources: train, the fixed held-out set, more digits (the improving
    batch) and colour-inverted digits (255 - x: white background, dark strokes), another distribution."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * 255 / 16).astype(np.uint8)
    labels = data.target.astype(np.int64)
    folder = tmp_path_factory.mktemp("digits")
    parts = {"train": slice(0, 400), "heldout": slice(400, 560), "more": slice(560, 1000)}
    out = {
        name: write_npz(folder / f"{name}.npz", images[part], labels[part]) for name, part in parts.items()
    }
    inverted = 255 - images[1000:1400]
    out["inverted"] = write_npz(folder / "inverted.npz", inverted, labels[1000:1400])
    return out


def params(workspace: Path, digits: dict[str, Path], **overrides):
    from flows.pipeline import PipelineParams

    base = dict(
        source=str(digits["train"]),
        heldout=str(digits["heldout"]),
        workspace=str(workspace),
        clusters=8,
        resolution=8,
        steps=20,
        batch_size=16,
        lr=3e-3,
        samples=0,
        probe=False,
        finetune=False,  # the classifier's decision is covered by tests/test_flow.py
        retrain_steps=30,
        compare_limit=None,
        promote_tolerance=TOLERANCE,
        drift_threshold=100.0,  # keep the palette: a refit would make the figures incomparable
        # fp32 on every CPU: the figures below are a few dozen steps of training, and where bf16 is native
        # (AVX512-BF16) the bf16 run's trajectory leaves the fp32 one at the step where attention starts
        # to pay, later or sooner from one machine to another
        precision="fp32",
    )
    return PipelineParams(**{**base, **overrides})


@pytest.fixture(scope="module")
def first(harness, digits, tmp_path_factory):
    from flows.pipeline import run_pipeline

    workspace = tmp_path_factory.mktemp("igpt-home")
    return workspace, run_pipeline(params(workspace, digits))


def client_of(workspace: Path):
    from igpt_core import tracking

    return tracking.client(tracking.default_tracking_uri(workspace))


@pytest.mark.slow
def test_the_first_registered_version_is_champion_judged_on_its_own_heldout_shards(first, digits):
    workspace, summary = first
    client = client_of(workspace)
    version = client.get_model_version_by_alias("igpt", "champion")
    assert str(version.version) == "1" and summary.champion["decision"] == "first"
    tags = version.tags
    assert tags["igpt.champion.decision"] == "first"
    assert tags["igpt.eval_shards"] == summary.stages["tokenize-heldout"]["dir"]
    assert tags["igpt.eval_shards_digest"] == summary.stages["tokenize-heldout"]["manifest_digest"]
    assert 0 < float(tags["igpt.champion.challenger_score"]) < 3.0  # bits/token, 8 colours
    assert tags["igpt.train_source"] == str(digits["train"])  # what a retrain replays
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags["igpt.champion.decision"] == "first"
    assert "igpt@champion is v1" in str(summary)


@pytest.mark.slow
def test_a_retrain_on_more_digits_starts_from_champion_with_replay_and_moves_the_alias(first, digits):
    from typer.testing import CliRunner

    from flows.pipeline import run_pipeline
    from flows.retrain import add_data
    from igpt_core import tracking
    from igpt_core.cli import app

    workspace, summary = first
    add_data([digits["more"]], workspace / "incoming")
    better = run_pipeline(params(workspace, digits, mode="retrain"))
    client = client_of(workspace)
    version = client.get_model_version("igpt", better.model_version)
    decision = better.champion
    print(f"\nimproving batch: {decision['reason']}")
    assert version.tags["igpt.parent_model"] == "igpt/1"  # from champion
    assert decision["decision"] == "promoted" and decision["champion"] == better.model_version == "2"
    assert decision["challenger_score"] < decision["champion_score"]  # more digits: better on held-out digits
    assert str(client.get_model_version_by_alias("igpt", "champion").version) == "2"
    # judged on v1's fixed held-out shards, which v2 keeps for the next challenger
    assert version.tags["igpt.eval_shards"] == summary.stages["tokenize-heldout"]["dir"]
    # replay: half as many of v1's training images as new training images, recorded on the runs
    replay = better.stages["replay"]["counts"]
    assert (
        replay["replay"] == round(0.5 * replay["new"])
        and replay["new"] == better.stages["split"]["counts"]["train"]
    )
    assert (
        version.tags["igpt.replay_share"] == "0.5"
        and int(version.tags["igpt.replay_samples"]) == replay["replay"]
    )
    parent = client.get_run(better.parent_run_id)
    assert parent.data.params["replay_share"] == "0.5"
    assert parent.data.metrics["train_replay_samples"] == replay["replay"]
    assert parent.data.tags["igpt.champion.decision"] == "promoted"
    # lineage by alias, in the library and on the command line
    for ref in ("igpt@champion", "models:/igpt@champion"):
        records = tracking.lineage(ref, tracking_uri=summary.tracking_uri)
        assert [r["version"] for r in records if r["kind"] == "model"] == ["2", "1"]
    env = {"MLFLOW_TRACKING_URI": summary.tracking_uri}
    shown = CliRunner().invoke(app, ["lineage", "igpt@champion"], env=env)
    assert shown.exit_code == 0, shown.output
    assert shown.output.startswith("model igpt v2")
    with pytest.raises(tracking.TrackingError, match="igpt@nobody: model 'igpt' has no version with alias"):
        tracking.lineage("igpt@nobody", tracking_uri=summary.tracking_uri)


@pytest.fixture(scope="module")
def forgetting(first, digits):
    """The inverted batch, retrained from champion v2 with replay off: a challenger that forgot."""
    from flows.pipeline import run_pipeline
    from flows.retrain import add_data

    workspace, _ = first
    add_data([digits["inverted"]], workspace / "incoming")
    return run_pipeline(params(workspace, digits, mode="retrain", replay_share=0.0))


@pytest.mark.slow
def test_a_retrain_on_another_distribution_without_replay_is_worse_and_not_promoted(first, forgetting):
    from igpt_core import tracking
    from igpt_core.checkpoint import WEIGHTS_FILE

    workspace, summary = first
    client = client_of(workspace)
    decision = forgetting.champion
    print(f"\ninverted batch, replay off: {decision['reason']}")
    assert "replay" not in forgetting.stages
    assert decision["challenger_score"] > decision["champion_score"] + TOLERANCE  # it forgot the digits
    assert decision["decision"] == "kept" and decision["against"] == "igpt/2"
    version = client.get_model_version("igpt", forgetting.model_version)
    assert version.tags["igpt.parent_model"] == "igpt/2"
    assert version.tags["igpt.champion.decision"] == "kept"
    assert "worse" in version.tags["igpt.champion.reason"]
    assert float(version.tags["igpt.champion.challenger_score"]) == pytest.approx(
        decision["challenger_score"]
    )
    assert float(version.tags["igpt.champion.champion_score"]) == pytest.approx(decision["champion_score"])
    assert client.get_run(forgetting.parent_run_id).data.tags["igpt.champion.decision"] == "kept"
    # champion still resolves to v2, and loads v2's weights
    champion = client.get_model_version_by_alias("igpt", "champion")
    assert str(champion.version) == "2"
    loaded = tracking.load_registered("igpt", champion.version, tracking_uri=summary.tracking_uri)
    weights = {
        version: (
            Path(client.download_artifacts(client.get_model_version("igpt", version).run_id, "checkpoint"))
            / WEIGHTS_FILE
        ).read_bytes()
        for version in ("2", "3")
    }
    assert (loaded / WEIGHTS_FILE).read_bytes() == weights["2"] != weights["3"]
    assert forgetting.model_version == "3" and "kept" in str(forgetting)


@pytest.mark.slow
def test_the_same_batch_with_replay_is_measured_beside_the_one_without(first, digits, forgetting):
    from flows.pipeline import run_pipeline

    workspace, _ = first
    replayed = run_pipeline(params(workspace, digits, mode="retrain", replay_share=1.0, retry_rejected=True))
    client = client_of(workspace)
    with_replay, without = replayed.champion, forgetting.champion
    print(f"\ninverted batch, replay 1.0: {with_replay['reason']}")
    version = client.get_model_version("igpt", replayed.model_version)
    assert version.tags["igpt.parent_model"] == "igpt/2"  # the same champion, the same batch
    assert replayed.stages["split"]["digest"] == forgetting.stages["split"]["digest"]
    counts = replayed.stages["replay"]["counts"]
    assert counts["replay"] == counts["new"] > 0
    assert with_replay["champion_score"] == pytest.approx(without["champion_score"])  # the same fixed data
    assert with_replay["challenger_score"] < without["challenger_score"]  # replay forgets less
    expected = replayed.model_version if with_replay["decision"] == "promoted" else "2"
    assert str(client.get_model_version_by_alias("igpt", "champion").version) == expected
