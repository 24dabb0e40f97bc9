"""Pretraining: schedule, data streams, checkpoint format, and real Ray Train runs that resume.

The Ray Train runs use a tiny model (2 layers, d=32) on 8x8 images with a 16-colour palette, so their
time is Ray's start-up, not training.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _infra import latest_registered_step

from igpt_core.checkpoint import (
    CheckpointError,
    publish,
    read_config,
    read_trainer_state,
    write_checkpoint,
)
from igpt_core.checkpointer import check_resumable
from igpt_core.config import FinetuneConfig, ModelConfig, TrainConfig
from igpt_core.data import (
    DataPlan,
    PretrainError,
    TokenStream,
    digest,
    held_out,
    load_tokens,
    plan_data,
    samples_per_rank,
)
from igpt_core.loop import learning_rate
from igpt_core.pretrain import pretrain

R, K = 8, 16
MODEL = ModelConfig(vocab_size=K, resolution=R, n_layer=2, n_head=2, n_embd=32)
TOKENS_PER_IMAGE = R * R


def _images(n: int, seed: int) -> np.ndarray:
    """Smooth random images (a colour ramp plus noise), so the model has something to learn."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, R)[None, :, None, None] * rng.uniform(0.2, 1.0, size=(n, 1, 1, 3))
    noise = rng.normal(0, 20, size=(n, R, R, 3))
    return np.clip(ramp.transpose(0, 2, 1, 3) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def palette_dir(tmp_path_factory):
    from igpt_core.palette import Palette

    centers = np.random.default_rng(0).uniform(-1, 1, size=(K, 3)).astype(np.float32)
    folder = tmp_path_factory.mktemp("palette")
    Palette(centers).save(folder)
    return folder


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory, palette_dir) -> Path:
    """83 train images in three uneven shards (40, 40, 3); no held-out split."""
    from igpt_core.tokens import tokenize

    folder = tmp_path_factory.mktemp("shards")
    tokenize(_images(83, 1), palette_dir, folder, resolution=R, shard_size=40, progress=False)
    return folder


@pytest.fixture(scope="module")
def shards_with_test(ray_local, tmp_path_factory, palette_dir) -> Path:
    """48 train images in two shards and a 16-image test split."""
    from igpt_core.tokens import tokenize

    folder = tmp_path_factory.mktemp("shards-test")
    tokenize(_images(48, 2), palette_dir, folder, resolution=R, shard_size=24, progress=False)
    tokenize(_images(16, 3), palette_dir, folder, resolution=R, split="test", progress=False)
    return folder


def _train(**overrides) -> TrainConfig:
    settings = dict(
        steps=4,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        log_every=1,
        eval_every=2,
        eval_batches=2,
        checkpoint_every=2,
        keep_checkpoints=2,
        workers=1,
        use_gpu=False,
    )
    return TrainConfig(**{**settings, **overrides})


def _expected_offset(shards: Path, train: TrainConfig, steps: int, rank: int = 0) -> tuple[int, int]:
    """The (epoch, offset) a rank's stream reaches after `steps` steps from the start, computed here."""
    plan = plan_data(shards, MODEL, train)
    _, exclude = held_out(str(shards), plan, rank, train.workers)
    stream = TokenStream(
        shards, plan.train_split, rank=rank, world_size=train.workers, seed=train.seed, exclude=exclude
    )
    for _ in range(steps):
        stream.next_batch(train.per_worker_batch_size)
    return stream.epoch, stream.offset


# ------------------------------------------------------------------------------------------ unit


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    train = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(1, train) == pytest.approx(1e-4)
    assert learning_rate(5, train) == pytest.approx(5e-4)
    assert learning_rate(10, train) == pytest.approx(1e-3)
    assert learning_rate(60, train) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way down the cosine
    assert learning_rate(110, train) == pytest.approx(1e-4)
    decay = [learning_rate(s, train) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    no_warmup = TrainConfig(steps=10, lr=1.0, warmup_steps=0, min_lr_ratio=0.0)
    assert learning_rate(0, no_warmup) == pytest.approx(1.0)
    assert learning_rate(10, no_warmup) == pytest.approx(0.0)


def test_a_run_shorter_than_its_warmup_still_decays_below_peak_by_its_last_step():
    """`igpt pretrain --steps 60` with the default 100 warmup steps: warmup is capped at 10% of the run."""
    train = TrainConfig(steps=60, lr=1e-3, warmup_steps=100, min_lr_ratio=0.1)
    assert train.schedule_warmup_steps == 6
    assert learning_rate(6, train) == pytest.approx(1e-3)  # the peak, at the end of the capped warmup
    assert learning_rate(60, train) == pytest.approx(1e-4)  # the floor at the last step
    assert learning_rate(60, train) < train.lr
    tuned = FinetuneConfig(steps=60, warmup_steps=50).train_config()
    assert learning_rate(tuned.steps, tuned) < tuned.lr
    assert TrainConfig(steps=5, warmup_steps=100).schedule_warmup_steps == 1  # at least one step
    assert TrainConfig(steps=60, warmup_steps=0).schedule_warmup_steps == 0


def test_token_stream_continues_exactly_from_a_saved_position(shards):
    reference = TokenStream(shards, "train", rank=0, world_size=1, seed=3)
    batches = [reference.next_batch(8) for _ in range(25)]  # 200 samples: into the third epoch of 83
    assert reference.epoch == 2
    replay = TokenStream(shards, "train", rank=0, world_size=1, seed=3)
    for batch in batches[:7]:
        np.testing.assert_array_equal(replay.next_batch(8), batch)
    resumed = TokenStream(shards, "train", rank=0, world_size=1, seed=3, **replay.position())
    for batch in batches[7:]:
        np.testing.assert_array_equal(resumed.next_batch(8), batch)
    # epochs are reshuffled: the second pass is not the first one again
    first = np.concatenate(batches)[:83]
    second = np.concatenate(batches)[83:166]
    assert not np.array_equal(first, second)
    assert sorted(map(bytes, first)) == sorted(map(bytes, second))


def test_token_stream_state_dict_moves_an_open_stream_to_a_saved_position(shards):
    reference = TokenStream(shards, "train", rank=0, world_size=1, seed=3)
    batches = [reference.next_batch(8) for _ in range(15)]
    saved = TokenStream(shards, "train", rank=0, world_size=1, seed=3)
    for _ in range(11):  # into the second epoch
        saved.next_batch(8)
    assert saved.position() == {"epoch": 1, "offset": 5}
    assert saved.state_dict() == {"epoch": 1, "offset": 5, "version": 2}  # the shard-share layout's state
    stream = TokenStream(shards, "train", rank=0, world_size=1, seed=4)
    stream.next_batch(8)  # an open epoch of another order, dropped by load_state_dict
    stream.seed = 3
    stream.load_state_dict(saved.state_dict())
    tokens, labels = stream.next_labelled_batch(8)
    np.testing.assert_array_equal(tokens, batches[11])
    assert labels is None  # these shards carry no labels
    for batch in batches[12:]:
        np.testing.assert_array_equal(stream.next_batch(8), batch)


def test_ranks_take_disjoint_equal_shares_of_uneven_shards_and_skip_held_out_samples(shards):
    train = _train(workers=2)
    plan = plan_data(shards, MODEL, train)
    assert plan.eval_split is None and plan.holdout == 2 * 2 * 2  # eval_batches * per-rank batch * workers
    held0, exclude = held_out(str(shards), plan, 0, 2)
    held1, exclude1 = held_out(str(shards), plan, 1, 2)
    assert exclude == exclude1 and len(exclude) == plan.holdout
    assert len(held0) == len(held1) == 4
    taken: list[list[bytes]] = []
    for rank in (0, 1):
        stream = TokenStream(shards, "train", rank=rank, world_size=2, seed=0, exclude=exclude)
        first_epoch = []
        while True:
            sample = bytes(stream.next_sample())
            if stream.epoch > 0:
                break
            first_epoch.append(sample)
        taken.append(first_epoch)
    digests = [{digest(np.frombuffer(t, dtype=np.uint16)) for t in rank} for rank in taken]
    assert not digests[0] & digests[1]  # disjoint shares
    assert not (digests[0] | digests[1]) & exclude  # held-out samples never reach training
    # together the ranks cover every sample but the one 83 % 2 leaves over; none is read twice
    everything = {digest(t) for t in load_tokens(shards, "train")[0]}
    assert len(everything - digests[0] - digests[1] - exclude) <= 1
    assert len(taken[0]) == len(digests[0]) and len(taken[1]) == len(digests[1])
    # a share with nothing left to train on is an error, not an endless loop
    with pytest.raises(PretrainError, match="no sample for rank 0 of 2"):
        TokenStream(
            shards, "train", rank=0, world_size=2, seed=0, exclude=frozenset(everything)
        ).next_sample()


def test_plan_data_names_what_does_not_fit(shards, shards_with_test):
    plan = plan_data(shards_with_test, MODEL, _train())
    assert plan == DataPlan(train_split="train", eval_split="test", holdout=4 * 2)  # batch * eval_batches
    tokens, exclude = held_out(str(shards_with_test), plan, 0, 1)
    np.testing.assert_array_equal(tokens, load_tokens(shards_with_test, "test", limit=8)[0])
    assert exclude == frozenset()  # a separate split: nothing to skip in training
    with pytest.raises(PretrainError, match="model.resolution"):
        plan_data(shards, ModelConfig(vocab_size=K, resolution=16, n_layer=1, n_head=1, n_embd=8), _train())
    with pytest.raises(PretrainError, match="model.vocab_size"):
        plan_data(shards, ModelConfig(vocab_size=32, resolution=R, n_layer=1, n_head=1, n_embd=8), _train())
    with pytest.raises(PretrainError, match="eval_split"):
        plan_data(shards, MODEL, _train(eval_split="val"))
    with pytest.raises(PretrainError, match="train_split"):
        plan_data(shards, MODEL, _train(train_split="other"))
    with pytest.raises(PretrainError, match="too few to hold out"):
        plan_data(shards, MODEL, _train(batch_size=80, eval_batches=2))


def test_plan_data_holds_out_at_most_a_quarter_of_a_small_split(shards):
    """A retrain on a few new images still trains: the held-out share shrinks instead of failing."""
    total = samples_per_rank(shards, "train", 1)
    plan = plan_data(shards, MODEL, _train(batch_size=16, eval_batches=8))  # would hold out 128 > total
    assert plan.eval_split is None
    assert plan.holdout == total // 4
    assert total - plan.holdout >= 16


def test_plan_data_evaluates_on_a_separate_held_out_folder(shards, shards_with_test, tmp_path):
    from igpt_core.palette import Palette
    from igpt_core.tokens import tokenize

    # `shards` alone would hold back train samples; with eval_shards nothing is held back from it
    plan = plan_data(shards, MODEL, _train(), eval_shards=shards_with_test)
    assert plan == DataPlan("train", "test", 4 * 2, str(shards_with_test))
    tokens, exclude = held_out(str(shards), plan, 0, 1)
    np.testing.assert_array_equal(tokens, load_tokens(shards_with_test, "test", limit=8)[0])
    assert exclude == frozenset()
    with pytest.raises(PretrainError, match="eval_split: .* has no split 'val'"):
        plan_data(shards, MODEL, _train(eval_split="val"), eval_shards=shards_with_test)
    with pytest.raises(PretrainError, match="eval_shards: .* is not a folder"):
        plan_data(shards, MODEL, _train(), eval_shards=tmp_path / "missing")
    other = tmp_path / "other-palette"
    Palette(np.random.default_rng(9).uniform(-1, 1, size=(K, 3)).astype(np.float32)).save(other)
    tokenize(_images(8, 4), other, tmp_path / "held", resolution=R, split="test", progress=False)
    with pytest.raises(PretrainError, match="eval_shards: .* tokenized with palette"):
        plan_data(shards, MODEL, _train(), eval_shards=tmp_path / "held")


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(False, False, None), (True, False, torch.bfloat16), (False, True, torch.bfloat16)],
)
def test_precision_auto_uses_bf16_only_on_cpus_that_have_it_and_bf16_gives_a_close_loss(
    monkeypatch, avx512_bf16, amx, expected
):
    from igpt_core.loop import autocast_dtype
    from igpt_core.model import ImageGPT
    from igpt_core.pretrain import _loss

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert autocast_dtype("auto", cpu) is expected
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    torch.manual_seed(0)
    model = ImageGPT(MODEL)
    tokens = np.random.default_rng(0).integers(0, K, size=(2, TOKENS_PER_IMAGE), dtype=np.uint16)
    with torch.no_grad():
        full = _loss(model, tokens, MODEL, cpu, None)
        half = _loss(model, tokens, MODEL, cpu, torch.bfloat16)
    assert full.dtype == half.dtype == torch.float32
    assert float(full) == pytest.approx(math.log(K), rel=0.05)  # an untrained model is near uniform
    assert float(half) == pytest.approx(float(full), abs=0.05)


def test_checkpoint_folder_round_trips_without_pickle(tmp_path, palette_dir):
    from igpt_core.model import ImageGPT

    torch.manual_seed(0)
    model = ImageGPT(MODEL)
    optimizer = model.configure_optimizer(0.01, 1e-3, (0.9, 0.95))
    model(torch.zeros(2, TOKENS_PER_IMAGE, dtype=torch.long)).sum().backward()
    optimizer.step()
    palette = np.load(palette_dir / "palette.npy")
    state = {"step": 7, "optimizer": optimizer.state_dict(), "data": [{"epoch": 1, "offset": 5}]}
    folder = write_checkpoint(
        tmp_path / "ckpt",
        model=model,
        trainer_state=state,
        train=_train(),
        palette=palette,
        palette_digest="abc",
        shards="/data/shards",
    )
    loaded = read_trainer_state(folder)  # weights_only=True inside
    assert loaded["step"] == 7 and loaded["data"] == [{"epoch": 1, "offset": 5}]
    fresh = ImageGPT(MODEL).configure_optimizer(0.01, 1e-3, (0.9, 0.95))
    fresh.load_state_dict(loaded["optimizer"])  # the optimizer state is complete
    config = read_config(folder)
    assert config["train"]["steps"] == 4 and config["palette_digest"] == "abc" and config["step"] == 7
    np.testing.assert_array_equal(np.load(folder / "palette.npy"), palette)
    restored = ImageGPT.load(folder)
    idx = torch.randint(0, K, (1, TOKENS_PER_IMAGE))
    torch.testing.assert_close(restored(idx), model.eval()(idx))
    check_resumable(folder, MODEL)
    with pytest.raises(CheckpointError, match="n_embd"):
        check_resumable(folder, ModelConfig(vocab_size=K, resolution=R, n_layer=2, n_head=2, n_embd=64))
    published = publish(folder, tmp_path / "out")
    assert sorted(p.name for p in published.iterdir()) == sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------- Ray Train runs
# One run is started in a subprocess with two workers on the uneven shards, killed once it has a
# checkpoint, and resumed here; the tests below read that run, and the last one extends it.


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Polls `condition` until it returns a truthy value (bounded); fails early if `proc` exits."""
    deadline = time.monotonic() + 300.0
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{tail}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def resumed_run(shards, palette_dir, tmp_path_factory, ray_local):
    """Kills a two-worker run (its driver, by pid) after a checkpoint, then reruns it to two more steps."""
    from ray.util import placement_group_table

    out = tmp_path_factory.mktemp("killed") / "run"
    address = ray_local.get_runtime_context().gcs_address
    long = _train(workers=2, steps=10_000, keep_checkpoints=100, eval_every=1000)
    script = textwrap.dedent(
        f"""
        from igpt_core.config import ModelConfig, TrainConfig
        from igpt_core.pretrain import pretrain
        pretrain({str(shards)!r}, {str(out)!r}, model=ModelConfig(**{MODEL.__dict__!r}),
                 train=TrainConfig(**{long.__dict__!r}), palette_dir={str(palette_dir)!r},
                 ray_address={address!r})
        """
    )
    with pytest.MonkeyPatch.context() as env:
        # The controller polls its workers every 2 s by default; a tiny run is mostly that wait.
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        groups_before = set(placement_group_table())
        log = out.parent / "killed-run.log"  # a file, not a pipe: a full pipe would stall the run
        with log.open("w") as sink:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [sys.executable, "-c", script], stdout=sink, stderr=subprocess.STDOUT, env=dict(os.environ)
            )
        run_dir = out / "ray" / "pretrain"
        try:
            _wait_for(lambda: (latest_registered_step(run_dir) or 0) >= 2, "a checkpoint", proc=proc, log=log)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)

        # The killed driver's job takes its Ray Train workers with it; wait until their placement group
        # is gone so no stale worker writes a checkpoint after the one read here.
        def workers_gone() -> bool:
            return all(
                group["state"] == "REMOVED"
                for group_id, group in placement_group_table().items()
                if group_id not in groups_before
            )

        _wait_for(workers_gone, "the killed run's workers to stop")
        killed_at = latest_registered_step(run_dir)
        assert killed_at is not None and killed_at >= 2 and killed_at % 2 == 0

        train = _train(workers=2, steps=killed_at + 2, keep_checkpoints=100)
        seen: list[dict] = []
        result = pretrain(
            shards, out, model=MODEL, train=train, palette_dir=palette_dir, on_report=seen.append
        )
        state = read_trainer_state(out)
        yield SimpleNamespace(
            out=out, killed_at=killed_at, train=train, result=result, seen=seen, state=state
        )


def test_killed_run_resumes_at_the_next_step_with_the_same_schedule_and_data_position(resumed_run, shards):
    run = resumed_run
    result, c = run.result, run.killed_at
    assert [h["step"] for h in result.history] == [c + 1, c + 2] and run.seen == result.history
    assert result.step == c + 2 and result.checkpoint_dir == run.out
    assert all(h["resumed_from"] == c for h in result.history)
    for record in result.history:
        assert record["lr"] == pytest.approx(learning_rate(record["step"], run.train))
        assert record["tokens_per_s"] > 0 and math.isfinite(record["loss"])
    assert result.history[0]["tokens_seen"] == (c + 1) * run.train.batch_size * TOKENS_PER_IMAGE
    # every rank's stream is where c + 2 steps from the start put it, not 2 steps from a fresh start
    for rank in (0, 1):
        position = run.state["data"][rank]
        assert (position["epoch"], position["offset"]) == _expected_offset(shards, run.train, c + 2, rank)
    final = result.metrics
    assert final["eval_bits_per_token"] == pytest.approx(final["eval_loss"] / math.log(2))
    assert final["checkpoint"].endswith(f"checkpoint-{c + 2:08d}")


def test_two_workers_on_uneven_shards_take_equal_steps_and_leave_a_plain_checkpoint(
    resumed_run, shards, palette_dir
):
    from igpt_core.model import ImageGPT
    from igpt_core.shards import read_meta

    sizes = [shard["samples"] for shard in read_meta(shards)["splits"]["train"]["shards"]]
    assert sizes == [40, 40, 3]
    assert resumed_run.result.metrics["rank_steps"] == [2, 2]
    out = resumed_run.out
    assert resumed_run.state["step"] == resumed_run.killed_at + 2 and resumed_run.state["world_size"] == 2
    config = read_config(out)
    assert config["palette_digest"] == read_meta(shards)["palette_digest"] and config["train"]["workers"] == 2
    np.testing.assert_array_equal(np.load(out / "palette.npy"), np.load(palette_dir / "palette.npy"))
    ImageGPT.load(out)


def test_a_finished_run_rerun_with_more_steps_continues_and_keeps_only_the_latest(
    resumed_run, palette_dir, shards
):
    run = resumed_run
    n = run.killed_at + 2
    longer = _train(workers=2, steps=n + 2, keep_checkpoints=1)
    more = pretrain(shards, run.out, model=MODEL, train=longer, palette_dir=palette_dir)
    assert [h["step"] for h in more.history] == [n + 1, n + 2] and more.step == n + 2
    assert more.metrics["resumed_from"] == n and more.metrics["rank_steps"] == [2, 2]
    for record in more.history:
        assert record["lr"] == pytest.approx(learning_rate(record["step"], longer))
    kept = sorted(p.name for p in (run.out / "ray" / "pretrain").glob("checkpoint-*"))
    assert kept == [f"checkpoint-{n + 2:08d}"]  # keep_checkpoints=1 now: Ray Train dropped the older ones
    assert read_trainer_state(run.out)["step"] == n + 2

    # a rerun with another architecture is refused before any worker starts
    wider = ModelConfig(vocab_size=K, resolution=R, n_layer=2, n_head=2, n_embd=64)
    with pytest.raises(CheckpointError, match="n_embd: checkpoint 32, now 64"):
        pretrain(shards, run.out, model=wider, train=longer, palette_dir=palette_dir)


# ------------------------------------------------------------------------------------------ warm start


def _eval_loss(folder: Path, tokens: np.ndarray) -> float:
    """Mean next-token loss (nats) of the checkpoint in `folder` on `tokens`, computed here."""
    import torch.nn.functional as F

    from igpt_core.model import ImageGPT, inputs_from_tokens

    model = ImageGPT.load(folder)
    inputs, targets = inputs_from_tokens(torch.from_numpy(tokens.astype(np.int64)), MODEL.start_token)
    with torch.no_grad():
        logits = model(inputs)
    return float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)))


@pytest.fixture(scope="module")
def source_run(shards, palette_dir, tmp_path_factory, ray_local):
    """A finished 8-step run to warm-start from."""
    out = tmp_path_factory.mktemp("source") / "run"
    train = _train(steps=8, eval_every=4, checkpoint_every=4)
    return pretrain(shards, out, model=MODEL, train=train, palette_dir=palette_dir)


def test_init_from_starts_from_the_source_weights_and_evaluates_on_eval_shards(
    source_run, shards, shards_with_test, palette_dir, tmp_path
):
    from igpt_core.data import read_shards

    src = source_run.checkpoint_dir
    assert source_run.step == 8
    # a near-zero learning rate: the one step taken leaves the weights where the source left them
    train = _train(steps=9, lr=1e-9, eval_every=1, checkpoint_every=1)
    warm = pretrain(
        shards,
        tmp_path / "warm",
        model=MODEL,
        train=train,
        palette_dir=palette_dir,
        init_from=src,
        eval_shards=shards_with_test,
    )
    assert [h["step"] for h in warm.history] == [9] and warm.step == 9
    assert warm.metrics["resumed_from"] == 8 and warm.metrics["rank_steps"] == [1]
    assert warm.metrics["lr"] == pytest.approx(learning_rate(9, train))
    state = read_trainer_state(warm.checkpoint_dir)
    assert state["data"][0] == {"epoch": 0, "offset": train.batch_size, "version": 2}  # a fresh data stream
    assert read_config(warm.checkpoint_dir)["init_from"] == {"path": str(src), "step": 8}

    source_weights = load_file_cpu(src)
    for name, tensor in load_file_cpu(warm.checkpoint_dir).items():
        torch.testing.assert_close(tensor, source_weights[name], atol=1e-6, rtol=0)
    # evaluated on the first held-out samples of eval_shards' test split, not on held-back train samples
    held = np.stack([t for t, _ in read_shards(shards_with_test, split="test")][: 2 * train.batch_size])
    assert warm.metrics["eval_loss"] == pytest.approx(_eval_loss(warm.checkpoint_dir, held), rel=1e-4)
    fresh = tmp_path / "fresh"
    torch.manual_seed(train.seed)
    from igpt_core.model import ImageGPT

    ImageGPT(MODEL).save(fresh)
    assert _eval_loss(fresh, held) - warm.metrics["eval_loss"] > 0.3  # far below a fresh init


def load_file_cpu(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"), device="cpu")


def test_init_from_is_refused_for_another_architecture_or_too_few_steps(source_run, shards, tmp_path):
    wider = ModelConfig(vocab_size=K, resolution=R, n_layer=2, n_head=2, n_embd=64)
    src = source_run.checkpoint_dir
    with pytest.raises(CheckpointError, match=f"init_from: {src} .*n_embd: checkpoint 32, now 64"):
        pretrain(shards, tmp_path / "a", model=wider, train=_train(steps=12), init_from=src)
    with pytest.raises(PretrainError, match="train.steps: 8 is not beyond init_from's step 8"):
        pretrain(shards, tmp_path / "b", model=MODEL, train=_train(steps=8), init_from=src)
    with pytest.raises(CheckpointError, match="init_from: .* has no config.json"):
        pretrain(shards, tmp_path / "c", model=MODEL, train=_train(steps=12), init_from=tmp_path)
    assert not (tmp_path / "a" / "ray").exists()  # refused on the driver, before any run storage


def test_a_rerun_with_its_own_checkpoint_resumes_it_and_ignores_init_from(
    source_run, shards, palette_dir, tmp_path
):
    from igpt_core.model import ImageGPT

    src = source_run.checkpoint_dir
    out = tmp_path / "warm"
    first = pretrain(shards, out, model=MODEL, train=_train(steps=10), palette_dir=palette_dir, init_from=src)
    assert first.history[0]["resumed_from"] == 8 and first.step == 10
    # another source (a fresh init at step 0) given to the rerun: the run's own step-10 checkpoint wins
    other = tmp_path / "other"
    torch.manual_seed(123)
    ImageGPT(MODEL).save(other, extra={"step": 0})
    again = pretrain(
        shards, out, model=MODEL, train=_train(steps=12), palette_dir=palette_dir, init_from=other
    )
    assert [h["step"] for h in again.history] == [11, 12]
    assert all(h["resumed_from"] == 10 for h in again.history)
    assert read_config(out)["init_from"] == {"path": str(src), "step": 8}  # lineage of the run's start
    from igpt_core.data import read_shards

    sample = np.stack([t for t, _ in read_shards(shards, split="train")][:16])
    assert _eval_loss(other, sample) - again.history[0]["loss"] > 0.3  # trained weights, not `other`'s


def test_compiled_training_matches_the_eager_run_and_saves_plain_weights(shards, palette_dir, tmp_path):
    """compile=True trains the same model (to float tolerance) and its checkpoint loads like any other."""
    from safetensors.torch import load_file

    from igpt_core.model import ImageGPT

    runs = {}
    for compiled in (False, True):
        train = _train(steps=3, eval_every=3, checkpoint_every=3, precision="fp32", compile=compiled)
        out = tmp_path / f"compile-{compiled}"
        runs[compiled] = pretrain(shards, out, model=MODEL, train=train, palette_dir=palette_dir)
        assert read_config(out)["train"]["compile"] is compiled
    eager, compiled = runs[False], runs[True]
    assert [h["step"] for h in compiled.history] == [1, 2, 3]
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert compiled.metrics["eval_loss"] == pytest.approx(eager.metrics["eval_loss"], abs=1e-4)
    weights = {k: load_file(str(r.checkpoint_dir / "model.safetensors")) for k, r in runs.items()}
    assert weights[True].keys() == weights[False].keys()  # no "_orig_mod." prefixes from the compiled wrapper
    for name, tensor in weights[False].items():
        torch.testing.assert_close(weights[True][name], tensor, atol=1e-4, rtol=1e-3)
    ImageGPT.load(compiled.checkpoint_dir)


@pytest.mark.parametrize(("bf16_ranks", "expected"), [((True, True), "bfloat16"), ((True, False), "None")])
def test_auto_precision_is_the_same_on_every_rank_of_a_mixed_cluster(bf16_ranks, expected):
    """Two gloo ranks whose CPUs differ (one without native bf16) both train in fp32; alike, both in bf16."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = textwrap.dedent(
        """
        import os, sys, torch, torch.distributed as dist
        from igpt_core import loop
        rank = int(os.environ["RANK"])
        loop._cpu_has_native_bf16 = lambda: sys.argv[1 + rank] == "True"  # this rank's CPU
        dist.init_process_group("gloo", rank=rank, world_size=2)
        runtime = loop.ProcessGroupRuntime(rank, 2, torch.device("cpu"))
        print("dtype:", loop._agreed_autocast_dtype("auto", runtime))
        print("explicit:", loop._agreed_autocast_dtype("bf16", runtime))
        dist.destroy_process_group()
        """
    )
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *map(str, bf16_ranks)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output
        dtype = "None" if expected == "None" else f"torch.{expected}"
        assert f"dtype: {dtype}" in output, output
        assert "explicit: torch.bfloat16" in output, output  # an explicit choice is left alone
    if expected == "None":
        assert "1 of 2 workers have native bf16" in outputs[0]  # the rank that had it says why it does not
