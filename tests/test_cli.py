"""The `igpt` command as a user runs it: help everywhere, one-line errors, and the stages chained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from igpt_core.cli import app

COMMANDS = ["palette", "tokenize", "pretrain", "sample", "probe", "export-hf", "import-hf", "run", "lineage"]


def igpt(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IGPT_HOME": str(cwd / "home"), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    done = subprocess.run(
        [sys.executable, "-m", "igpt_core.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"igpt {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return done


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert "--help" in result.output


def test_pretrain_help_comes_from_config_docstrings() -> None:
    from typer.testing import CliRunner

    raw = CliRunner().invoke(app, ["pretrain", "--help"]).output
    output = " ".join(raw.replace("│", " ").split())  # rich wraps help text inside a box
    assert "Linear warmup steps before cosine decay" in output
    assert "Ray Train workers" in output


def test_bad_option_is_one_line_naming_the_field(tmp_path: Path) -> None:
    done = igpt("palette", "--source", "builtin:digits", "--clusters", "1", cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert "clusters" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == "igpt: error: --clusters: must be in [2, 65535], got 1"


def test_missing_source_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    done = igpt("palette", "--source", str(missing), cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert str(missing) in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_stages_chain_on_builtin_digits(tmp_path: Path) -> None:
    """palette → tokenize (train, test) → pretrain → sample → complete → probe → export-hf, as a user types them."""
    igpt(
        "palette",
        "--source",
        "builtin:digits",
        "--clusters",
        "16",
        "--resolution",
        "8",
        "--out",
        "pal",
        cwd=tmp_path,
    )
    assert (tmp_path / "pal" / "palette.npy").exists()
    for split in ("train", "test"):
        igpt(
            "tokenize", "--source", "builtin:digits", "--palette", "pal", "--resolution", "8",
            "--split", split, "--out", f"shards-{split}", cwd=tmp_path,
        )  # fmt: skip
    meta = json.loads((tmp_path / "shards-train" / "meta.json").read_text())
    assert meta["counts"]["written"] == 1797

    trained = igpt(
        "pretrain", "--shards", "shards-train", "--preset", "tiny", "--n-layer", "2", "--n-embd", "32",
        "--steps", "6", "--batch-size", "8", "--warmup-steps", "2", "--eval-every", "3",
        "--checkpoint-every", "3", "--palette", "pal", "--out", "run", cwd=tmp_path,
    )  # fmt: skip
    checkpoint = tmp_path / "run"
    assert (checkpoint / "model.safetensors").exists()
    # what a user sees by default: igpt's own progress lines, none of Ray's worker output
    output = trained.stdout + trained.stderr
    assert "pretrain: step 6/6 (100%)" in trained.stderr
    assert "held-out" in trained.stderr and "bits/token" in trained.stderr
    assert "RayTrainWorker" not in output and "TrainController" not in output
    assert "pid=" not in output
    assert not any(line.startswith("{") for line in trained.stdout.splitlines())  # no JSON without --json

    # A resume to step 8 with Ray's own output shown: the State API warning would be printed here if
    # the PlacementGroupCleaner could not reach this Ray's API server (it asks every second).
    resumed = igpt(
        "pretrain", "--shards", "shards-train", "--preset", "tiny", "--n-layer", "2", "--n-embd", "32",
        "--steps", "8", "--batch-size", "8", "--warmup-steps", "2", "--eval-every", "3",
        "--checkpoint-every", "3", "--palette", "pal", "--out", "run", "--ray-logs", "--json", cwd=tmp_path,
    )  # fmt: skip
    output = resumed.stdout + resumed.stderr
    assert "RayTrainWorker" in output  # --ray-logs shows the workers' output
    assert "Failed to query Ray Train Controller actor state" not in output
    reports = [json.loads(line) for line in resumed.stdout.splitlines() if line.startswith("{")]
    assert reports and reports[-1]["step"] == 8 and reports[0]["resumed_from"] == 6

    igpt("sample", "--checkpoint", "run", "--n", "4", "--top-k", "8", "--out", "samples.png", cwd=tmp_path)
    igpt(
        "sample", "--checkpoint", "run", "--n", "2", "--complete", "builtin:digits", "--out", "completions.png",
        cwd=tmp_path,
    )  # fmt: skip
    from PIL import Image

    assert Image.open(tmp_path / "samples.png").size[0] > 8
    assert Image.open(tmp_path / "completions.png").size[0] > 8

    done = igpt(
        "probe", "--checkpoint", "run", "--train", "shards-train", "--test", "shards-test",
        "--max-train", "400", "--max-test", "200", "--out", "probe", cwd=tmp_path,
    )  # fmt: skip
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert 0.0 <= result["accuracy"]["test"] <= 1.0
    assert "test" in done.stdout

    igpt("export-hf", "--checkpoint", "run", "--out", "hf", cwd=tmp_path)
    igpt("import-hf", "--hf", "hf", "--palette", "pal", "--out", "back", cwd=tmp_path)
    assert np.array_equal(
        np.load(tmp_path / "back" / "palette.npy"), np.load(tmp_path / "pal" / "palette.npy")
    )


def _reports(steps: int, eval_every: int) -> list[dict[str, float]]:
    return [
        {"step": step, "loss": 3.0 - step / steps, "tokens_per_s": 1000.0}
        | ({"eval_bits_per_token": 4.0 - step / steps} if step % eval_every == 0 else {})
        for step in range(1, steps + 1)
    ]


def test_progress_without_a_terminal_prints_at_most_one_line_per_tenth_of_the_run() -> None:
    import io

    from igpt_core.progress import TrainProgress

    stream = io.StringIO()
    with TrainProgress("pretrain", 200, stream=stream, terminal=False) as progress:
        for report in _reports(200, eval_every=50):
            progress(report)
    lines = stream.getvalue().splitlines()
    assert 2 <= len(lines) <= 11
    assert "\r" not in stream.getvalue()
    assert lines[0].startswith("pretrain: step 1/200 (0%) loss 2.9950, 1,000 tokens/s")
    assert lines[-1].startswith("pretrain: step 200/200 (100%) loss 2.0000, held-out 3.000 bits/token")
    assert lines[-1].endswith("ETA 0:00")


def test_progress_in_a_terminal_is_one_bar_with_loss_bits_and_tokens_per_second() -> None:
    import io

    from igpt_core.progress import TrainProgress

    stream = io.StringIO()
    with TrainProgress("finetune", 20, stream=stream, terminal=True) as progress:
        for report in _reports(20, eval_every=10):
            progress(report | ({"val_accuracy": 0.5} if report["step"] == 20 else {}))
    text = stream.getvalue()
    assert "\n" not in text.rstrip("\n")  # one bar redrawn in place, not a line per report
    final = text.split("\r")[-1]
    assert "finetune: 100%" in final and "20/20" in final
    assert "loss 2.0000" in final and "1,000 tokens/s" in final and "held-out 3.000 bits/token" in final


def test_progress_as_json_prints_every_report_as_one_line() -> None:
    import io

    from igpt_core.progress import TrainProgress

    stream = io.StringIO()
    reports = _reports(5, eval_every=5)
    with TrainProgress("pretrain", 5, json_lines=True, stream=stream) as progress:
        for report in reports:
            progress(report)
    assert [json.loads(line) for line in stream.getvalue().splitlines()] == reports
