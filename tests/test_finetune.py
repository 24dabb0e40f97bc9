"""Fine-tuning end to end on Ray Train: `finetune()`, its checkpoint, finetune.json, resume and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt_core.checkpoint import load_classifier, read_config, save_model
from igpt_core.classifier import evaluate_classifier
from igpt_core.config import ModelConfig
from igpt_core.finetune import FinetuneConfig, FinetuneError, finetune, format_finetune_table
from igpt_core.labelled import LabelledStream, load_split
from igpt_core.model import ImageGPT
from igpt_core.palette import Palette
from igpt_core.sources import open_source

R, K, C = 8, 16, 3
MODEL = ModelConfig(vocab_size=K, resolution=R, n_layer=2, n_head=2, n_embd=32)
NAMES = ["red", "green", "blue"]


def _images(labels: np.ndarray, seed: int) -> np.ndarray:
    """Images whose dominant channel is their class (learnable in a few steps), with noise."""
    rng = np.random.default_rng(seed)
    images = rng.normal(60, 25, size=(len(labels), R, R, 3))
    images[np.arange(len(labels)), :, :, labels] += 150
    return np.clip(images, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def palette_dir(tmp_path_factory) -> Path:
    centers = np.random.default_rng(0).uniform(-1, 1, size=(K, 3)).astype(np.float32)
    folder = tmp_path_factory.mktemp("palette")
    Palette(centers).save(folder)
    return folder


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory, palette_dir) -> Path:
    """96 train images in class order (32 per class, a class-sorted source) and 30 test images."""
    from igpt_core.tokens import tokenize

    folder = tmp_path_factory.mktemp("shards")
    train_labels = np.repeat(np.arange(C), 32)
    test_labels = np.tile(np.arange(C), 10)
    tokenize(open_source(_images(train_labels, 1), labels=train_labels), palette_dir, folder, resolution=R,
             shard_size=40, progress=False)  # fmt: skip
    tokenize(open_source(_images(test_labels, 2), labels=test_labels), palette_dir, folder, resolution=R,
             split="test", progress=False)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, palette_dir, shards) -> Path:
    """A checkpoint folder of the architecture with the shards' palette (its weights: a seeded init)."""
    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    palette = Palette.load(palette_dir)
    save_model(ImageGPT(MODEL), folder, extra={"palette_digest": palette.digest(), "step": 7})
    palette.save(folder)
    return folder


def _config(**overrides) -> FinetuneConfig:
    settings = dict(steps=8, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=4, log_every=2, seed=0)
    return FinetuneConfig(**{**settings, **overrides})


def test_finetune_survives_killed_workers_keeps_the_best_validation_checkpoint_and_tests_it_once(
    ray_local, shards, pretrained, tmp_path
):
    """Two DDP workers, SIGKILLed after the first checkpoint: Ray Train restarts them from it and the run
    ends; the best validation checkpoint is the result; a rerun asking for more steps continues the run."""
    killed: list[int] = []

    def kill_once(report: dict) -> None:
        if "checkpoint" in report and not killed:
            killed.extend(_ray_train_workers())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    out = tmp_path / "clf"
    tune = _config(workers=2, max_train=60, max_failures=1)
    result = finetune(pretrained, shards, shards, out, config=tune, on_report=kill_once)
    assert len(killed) == 2
    resumed = {r["resumed_from"] for r in result.history}
    assert resumed == {0, 4}  # restarted from the step-4 checkpoint, not from scratch
    report = json.loads((out / "finetune.json").read_text())
    assert report == result.report
    evaluated = [r for r in result.history if "val_accuracy" in r]
    assert [r["step"] for r in evaluated] == [4, 8]
    best = max(evaluated, key=lambda r: r["val_accuracy"])
    assert report["val_accuracy"] == best["val_accuracy"]
    assert report["val_accuracy"] == max(r["val_accuracy"] for r in evaluated)
    assert read_config(out)["step"] == report["best_step"]
    assert {"loss", "loss_clf", "loss_gen", "lr"} <= set(result.history[-1])
    assert result.history[-1]["rank_steps"] == [4, 4]  # both DDP ranks took every step after the restart

    # the subsets: max_train stratified over the class-sorted split, then 10 % carved out for validation
    splits = report["splits"]
    assert splits["train"]["n"] + splits["val"]["n"] == 60
    assert splits["train"]["class_counts"] == {"0": 18, "1": 18, "2": 18}
    assert splits["val"]["class_counts"] == {"0": 2, "1": 2, "2": 2}
    assert splits["test"]["class_counts"] == {"0": 10, "1": 10, "2": 10}
    assert report["absent_test_classes"] == [] and report["test_in_train"] == 0
    assert report["init_from"] == {"path": str(pretrained), "step": 7}

    # the folder is a classifier checkpoint; test accuracy is that of its weights on the test split
    classifier, palette, config = load_classifier(out)
    assert classifier.n_classes == C and config["classifier"]["n_classes"] == C
    assert palette is not None and palette.digest() == read_config(pretrained)["palette_digest"]
    test = load_split(shards, "--test")
    correct, _, count = evaluate_classifier(classifier, test.tokens, test.labels, 16, "cpu")
    assert report["test_accuracy"] == pytest.approx(correct / count)
    # and its transformer loads as a plain model, for sampling and probing
    backbone = ImageGPT.load(out)
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, classifier.model.state_dict()[name])
    assert "| joint | pretrained | 8 |" in format_finetune_table(report)
    assert (out / "finetune.md").read_text().strip() == format_finetune_table(report)

    more = finetune(pretrained, shards, shards, out, config=dataclasses.replace(tune, steps=12))
    assert {r["resumed_from"] for r in more.history} == {8}
    assert more.report["steps"] == 12 and more.report["best_step"] in (4, 8, 12)


def test_igpt_finetune_clf_from_scratch_trains_the_architecture_from_random_weights(
    ray_local, shards, pretrained, tmp_path
):
    from typer.testing import CliRunner

    from igpt_core.cli import app

    out = tmp_path / "scratch"
    args = ["finetune", "--checkpoint", str(pretrained), "--train", str(shards), "--test", str(shards)]
    args += [
        "--objective",
        "clf",
        "--from-scratch",
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--eval-every",
        "2",
        "--json",
    ]
    args += ["--out", str(out)]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    report = json.loads((out / "finetune.json").read_text())
    assert report["from_scratch"] and report["init_from"] is None and report["objective"] == "clf"
    assert f"test accuracy {report['test_accuracy']:.4f}" in run.output
    assert "| clf | random | 4 |" in run.output
    reports = [json.loads(line) for line in run.output.splitlines() if line.startswith("{")]
    assert reports and all("loss_gen" not in r for r in reports) and "loss_clf" in reports[-1]
    tuned, _, _ = load_classifier(out)
    source = ImageGPT.load(pretrained)
    # from scratch: nothing of the pretrained weights; clf: the next-pixel head was frozen at its init
    assert not torch.equal(tuned.model.transformer.wte.weight, source.transformer.wte.weight)
    torch.manual_seed(0)
    assert torch.equal(tuned.model.lm_head.weight, ImageGPT(MODEL).lm_head.weight)


def _ray_train_workers() -> list[int]:
    """Pids of the Ray Train worker processes under this test process (the Ray it started)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - mine
        mine |= frontier
    found = []
    for pid in mine:
        try:
            if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def test_the_stream_is_exact_to_resume_and_flips_the_same_images():
    tokens = np.arange(10 * 4, dtype=np.uint16).reshape(10, 4)
    labels = np.arange(10) % 2
    stream = LabelledStream(tokens, labels, rank=1, world_size=2, seed=3, flip_resolution=2)
    first = [stream.next_labelled_batch(3) for _ in range(2)]
    state = stream.state_dict()
    after = [stream.next_labelled_batch(3) for _ in range(3)]
    again = LabelledStream(tokens, labels, rank=1, world_size=2, seed=3, flip_resolution=2)
    again.load_state_dict(state)
    for (a, la), (b, lb) in zip(after, [again.next_labelled_batch(3) for _ in range(3)], strict=True):
        assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert sum(len(t) for t, _ in first) == 6 and state == {"epoch": 1, "offset": 1}  # 5 a rank an epoch
    # an epoch splits the samples between the ranks (a flip keeps a row's tokens, so min() names the row)
    rows = [
        {
            int(row.min()) // 4
            for row in LabelledStream(tokens, labels, rank=r, world_size=2, seed=3).next_labelled_batch(5)[0]
        }
        for r in (0, 1)
    ]
    assert not rows[0] & rows[1] and len(rows[0] | rows[1]) == 10


def test_bad_input_is_refused_naming_the_option_and_nothing_is_written(
    ray_local, shards, pretrained, palette_dir, tmp_path
):
    from igpt_core.tokens import tokenize

    out = tmp_path / "never"
    unlabelled = tmp_path / "unlabelled"
    tokenize(
        _images(np.zeros(12, np.int64), 3),
        palette_dir,
        unlabelled,
        resolution=R,
        split="test",
        progress=False,
    )
    with pytest.raises(FinetuneError, match=r"^--test: .*unlabelled"):
        finetune(pretrained, shards, unlabelled, out, config=_config())
    with pytest.raises(FinetuneError, match=r"^--train: .*unlabelled"):
        finetune(pretrained, unlabelled, shards, out, config=_config())

    wide = tmp_path / "wide"
    labels = np.arange(12) % 5
    tokenize(open_source(_images(labels % 3, 4), labels=labels), palette_dir, wide, resolution=R, split="test",
             progress=False)  # fmt: skip
    with pytest.raises(FinetuneError, match=r"^--test: .* has label 4, outside \[0, 3\)"):
        finetune(pretrained, shards, wide, out, config=_config())

    other = tmp_path / "other-palette"
    Palette(np.random.default_rng(9).uniform(-1, 1, size=(K, 3)).astype(np.float32)).save(other / "palette")
    tokenize(open_source(_images(labels % 3, 4), labels=labels % 3), other / "palette", other / "shards",
             resolution=R, split="test", progress=False)  # fmt: skip
    with pytest.raises(FinetuneError, match=r"^--checkpoint: .* palette .* --test"):
        finetune(pretrained, shards, other / "shards", out, config=_config())

    copied = _train_as_test(palette_dir, tmp_path)
    with pytest.raises(FinetuneError, match=r"^--test: 96 of the 96 test images .* also occur in --train"):
        finetune(pretrained, shards, copied, out, config=_config())
    with pytest.raises(FinetuneError, match=r"^--checkpoint: .* not a checkpoint folder"):
        finetune(tmp_path, shards, shards, out, config=_config())
    assert not out.exists()


def _train_as_test(palette_dir: Path, tmp_path: Path) -> Path:
    """The train images again, tokenized as a test split."""
    from igpt_core.tokens import tokenize

    folder = tmp_path / "copied"
    labels = np.repeat(np.arange(C), 32)
    tokenize(open_source(_images(labels, 1), labels=labels), palette_dir, folder, resolution=R, split="test",
             progress=False)  # fmt: skip
    return folder
