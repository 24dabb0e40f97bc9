"""`igpt classify`: every input of a source is a prediction or a reject, and the predictions are the
classifier's own on the palette's tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from igpt_core.checkpoint import PALETTE_FILE, load_classifier, save_model
from igpt_core.classifier import ImageGPTClassifier
from igpt_core.classify import ClassifyError, classify, rejects_path
from igpt_core.cli import app
from igpt_core.config import ModelConfig
from igpt_core.hf import save_hf
from igpt_core.model import ImageGPT, inputs_from_tokens
from igpt_core.palette import Palette
from igpt_core.sources import Sample, iter_source, open_source

R = 8
CLASSES = ["cat", "dog", "owl"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _palette() -> Palette:
    centers = np.random.default_rng(0).uniform(-1, 1, size=(16, 3)).astype(np.float32)
    return Palette(centers=centers)


def _checkpoint(folder: Path, *, names: list[str] | None = CLASSES, palette: bool = True) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=16, resolution=R, n_layer=2, n_head=2, n_embd=32)
    classifier = ImageGPTClassifier(ImageGPT(config), len(CLASSES), class_names=names)
    with torch.no_grad():  # a head at its init gives nearly uniform probabilities: spread them out
        classifier.score.weight.mul_(50.0)
    save_model(classifier, folder, extra={"palette_digest": _palette().digest()})
    if palette:
        np.save(folder / PALETTE_FILE, _palette().centers)
    return folder


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """cat/dog/owl sub-folders of small images of odd sizes, one corrupt file and one unlabelled image."""
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(3 + c):
            pixels = rng.integers(0, 256, size=(R + i, R + 2 * c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes((root / "dog" / "0.png").read_bytes()[:50])
    Image.fromarray(rng.integers(0, 256, size=(R, R, 3), dtype=np.uint8)).save(root / "loose.png")
    return root


def test_every_input_is_a_prediction_or_a_reject_and_matches_the_classifier(tmp_path, images):
    checkpoint = _checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out" / "predictions.parquet"
    # fp32: compared below with the classifier run directly (auto is bf16 on a CPU with AVX512-BF16/AMX)
    result = classify(checkpoint, str(images), out, batch_size=4, progress=False, precision="fp32")

    read = list(iter_source(open_source(str(images)), R))
    samples = [r for r in read if isinstance(r, Sample)]
    assert result.counts == {"images": len(read), "classified": len(samples), "rejected": 1}
    assert result.counts["images"] == result.counts["classified"] + result.counts["rejected"] == 14
    assert [key for key, _ in result.rejects] == ["dog/broken"]
    rejects = pq.read_table(rejects_path(out)).to_pylist()
    assert rejects_path(out) == out.parent / "predictions.rejects.parquet"
    assert [r["key"] for r in rejects] == ["dog/broken"] and rejects[0]["reason"]

    rows = pq.read_table(out).to_pylist()
    assert [row["key"] for row in rows] == [s.key for s in samples]
    assert {row["key"] for row in rows} | {r["key"] for r in rejects} == {r.key for r in read}
    assert [row["label"] for row in rows] == [s.label for s in samples]  # null for loose.png
    assert rows[0]["key"] == "cat/0" and {row["key"]: row["label"] for row in rows}["loose"] is None
    for row in rows:
        assert row["name"] == CLASSES[row["class"]]
        assert row["top5"][0] == row["class"] and len(row["top5"]) == len(CLASSES)  # min(5, C)
        assert row["probability"] == row["top5_probability"][0]
        assert sum(row["top5_probability"]) == pytest.approx(1.0, abs=1e-5)  # all C classes
        assert row["top5_probability"] == sorted(row["top5_probability"], reverse=True)

    # the same predictions as the classifier run directly on the palette's tokens
    classifier, palette, _ = load_classifier(checkpoint)
    tokens = palette.quantize(np.stack([s.image for s in samples]))
    with torch.inference_mode():
        logits, _ = classifier(inputs_from_tokens(torch.from_numpy(tokens.astype(np.int64)), 16)[0])
    probabilities = torch.softmax(logits, dim=-1).numpy()
    np.testing.assert_array_equal([row["class"] for row in rows], probabilities.argmax(axis=1))
    np.testing.assert_allclose([row["probability"] for row in rows], probabilities.max(axis=1), atol=1e-6)
    assert len(set(probabilities.argmax(axis=1))) > 1  # not one class for everything
    labelled = [(row["class"], row["label"]) for row in rows if row["label"] is not None]
    assert result.accuracy == pytest.approx(np.mean([c == label for c, label in labelled]))
    assert result.labelled == len(labelled) == 12

    # batching changes nothing but float rounding
    again = classify(
        checkpoint, str(images), tmp_path / "again.parquet", batch_size=64, progress=False, precision="fp32"
    )
    other = pq.read_table(again.out).to_pylist()
    assert [(r["key"], r["top5"]) for r in other] == [(r["key"], r["top5"]) for r in rows]
    np.testing.assert_allclose(
        [r["top5_probability"] for r in other], [r["top5_probability"] for r in rows], atol=1e-5
    )


def test_a_checkpoint_without_names_gives_null_names(tmp_path, images):
    result = classify(
        _checkpoint(tmp_path / "ckpt", names=None), str(images), tmp_path / "p.parquet", progress=False
    )
    rows = pq.read_table(result.out).to_pylist()
    assert result.class_names is None and {row["name"] for row in rows} == {None}
    assert result.accuracy is not None  # the source's labels are the checkpoint's indices


def test_bad_checkpoints_and_sources_are_refused_and_write_nothing(tmp_path, images):
    out = tmp_path / "out" / "predictions.parquet"
    pretrained = tmp_path / "pretrained"
    ImageGPT(ModelConfig(vocab_size=16, resolution=R, n_layer=1, n_head=2, n_embd=16)).save(pretrained)
    with pytest.raises(ClassifyError, match="checkpoint: .*pretrained is a pretraining checkpoint"):
        classify(pretrained, str(images), out, progress=False)
    with pytest.raises(ClassifyError, match=r"checkpoint: .*no palette\.npy"):
        classify(_checkpoint(tmp_path / "bare", palette=False), str(images), out, progress=False)
    with pytest.raises(ClassifyError, match="checkpoint: .*nowhere is not a checkpoint folder"):
        classify(tmp_path / "nowhere", str(images), out, progress=False)
    save_hf(ImageGPT.load(pretrained), tmp_path / "hf")
    with pytest.raises(ClassifyError, match="checkpoint: .*hf is a transformers folder; import it first"):
        classify(tmp_path / "hf", str(images), out, progress=False)
    checkpoint = _checkpoint(tmp_path / "ckpt")
    foreign = tmp_path / "foreign"
    _checkpoint(foreign)
    np.save(foreign / PALETTE_FILE, np.random.default_rng(5).uniform(-1, 1, (16, 3)).astype(np.float32))
    with pytest.raises(ClassifyError, match="trained on tokens of palette"):
        classify(foreign, str(images), out, progress=False)
    with pytest.raises(ClassifyError, match="batch_size: must be positive"):
        classify(checkpoint, str(images), out, batch_size=0, progress=False)
    only_bad = tmp_path / "only-bad"
    only_bad.mkdir()
    (only_bad / "garbage.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ClassifyError, match=r"source: .*only-bad: no image could be classified \(1 rejected"):
        classify(checkpoint, str(only_bad), out, progress=False)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_cli_classify_prints_counts_and_where_the_rejects_are(tmp_path, images):
    checkpoint = _checkpoint(tmp_path / "ckpt")
    out = tmp_path / "predictions.parquet"
    args = ["classify", "--checkpoint", str(checkpoint), "--source", str(images), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    # how many images it will read is said before it reads them, then what became of them
    planned = result.stdout.index(f"classify: 14 images from {images} at {R}x{R}, batches of 5, ")
    assert planned < result.stdout.index("classify: 14 images = 13 classified + 1 rejected")
    assert f"rejects (key, reason) → {tmp_path / 'predictions.rejects.parquet'}" in result.output
    assert "dog/broken: " in result.output and "accuracy on the 12 labelled images" in result.output
    assert pq.read_table(out).num_rows == 13

    pretrained = tmp_path / "pretrained"
    ImageGPT(ModelConfig(vocab_size=16, resolution=R, n_layer=1, n_head=2, n_embd=16)).save(pretrained)
    refused = CliRunner().invoke(app, ["classify", "--checkpoint", str(pretrained), "--source", str(images)])
    assert refused.exit_code == 2
    assert refused.stderr.startswith(f"igpt: error: --checkpoint: {pretrained} is a pretraining checkpoint")
    missing = CliRunner().invoke(app, [*args[:3], "--source", str(tmp_path / "absent")])
    assert missing.exit_code == 2 and "--source: " in missing.stderr and "absent" in missing.stderr
    assert "--checkpoint" in CliRunner().invoke(app, ["classify", "--help"]).output
