"""Parity with transformers' ImageGPTForImageClassification: import, export, class logits, class names.

Reference classifiers are random-initialised from a local ImageGPTConfig (no network) and then
perturbed, so norms, biases and the head are not at their trivial init and a mis-mapped tensor shows.
"""

from __future__ import annotations

import json

import pytest
import torch

from igpt_core import hf
from igpt_core.classifier import ImageGPTClassifier
from igpt_core.finetune import FinetuneConfig, finetune_loss
from igpt_core.hf_classifier import load_hf_classifier, save_hf_classifier
from igpt_core.model import ImageGPT, inputs_from_tokens

transformers = pytest.importorskip("transformers")

SHAPES = {
    # K, R, layers, d, heads, n_inner (None: transformers' default 4 d), eps, classes
    "small": dict(
        clusters=16, resolution=4, n_layer=2, n_embd=32, n_head=4, n_inner=None, eps=1e-5, classes=3
    ),
    "odd": dict(clusters=24, resolution=5, n_layer=3, n_embd=48, n_head=3, n_inner=72, eps=1e-6, classes=7),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_classifier(shape: str, seed: int = 0, names: bool = True):
    spec = SHAPES[shape]
    labels = {"id2label": {i: f"class-{i}" for i in range(spec["classes"])}} if names else {}
    config = transformers.ImageGPTConfig(
        vocab_size=spec["clusters"] + 1,
        n_positions=spec["resolution"] ** 2,
        n_embd=spec["n_embd"],
        n_layer=spec["n_layer"],
        n_head=spec["n_head"],
        n_inner=spec["n_inner"],
        layer_norm_epsilon=spec["eps"],
        num_labels=spec["classes"],
        **labels,
    )
    torch.manual_seed(seed)
    model = transformers.ImageGPTForImageClassification(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln_" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param))
    return model


def sequences(hf_config, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    clusters = hf_config.vocab_size - 1
    tokens = torch.randint(0, clusters, (batch, hf_config.n_positions), generator=g)
    return inputs_from_tokens(tokens, clusters)[0]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_import_matches_transformers(shape, tmp_path):
    reference = reference_classifier(shape)
    reference.save_pretrained(tmp_path)
    ours = load_hf_classifier(tmp_path)
    spec = SHAPES[shape]
    assert ours.n_classes == spec["classes"] and ours.head_is_last and not ours.training
    assert ours.class_names == [f"class-{i}" for i in range(spec["classes"])]
    assert ours.model.config.n_inner == (spec["n_inner"] or 4 * spec["n_embd"])

    inputs = sequences(reference.config)
    with torch.no_grad():
        theirs = reference(input_ids=inputs).logits
        mine, _ = ours(inputs)
    assert mine.shape == theirs.shape == (3, spec["classes"])
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_export_loads_in_transformers(shape, tmp_path):
    reference = reference_classifier(shape, seed=3)
    reference.save_pretrained(tmp_path / "hf")
    ours = load_hf_classifier(tmp_path / "hf")
    save_hf_classifier(ours, tmp_path / "exported")
    reloaded, info = transformers.ImageGPTForImageClassification.from_pretrained(
        tmp_path / "exported", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.num_labels == SHAPES[shape]["classes"]
    assert reloaded.config.id2label == reference.config.id2label
    inputs = sequences(reference.config, seed=4)
    with torch.no_grad():
        theirs = reloaded.eval()(input_ids=inputs).logits
        torch.testing.assert_close(theirs, ours(inputs)[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(theirs, reference(input_ids=inputs).logits)
    # and back again: the transformer and the head survive bit for bit, the names too
    again = load_hf_classifier(tmp_path / "exported")
    mine = {k: v for k, v in ours.state_dict().items() if k != "model.lm_head.weight"}
    for name, tensor in mine.items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert again.class_names == ours.class_names


def test_an_igpt_classifier_exports_and_its_names_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ImageGPT(hf.config_from_hf(reference_classifier("small").config.to_dict()))
    ours = ImageGPTClassifier(model, 3, class_names=["airplane", "bird", "cat"]).eval()
    save_hf_classifier(ours, tmp_path / "named")
    reloaded = transformers.ImageGPTForImageClassification.from_pretrained(tmp_path / "named").eval()
    assert reloaded.config.id2label == {0: "airplane", 1: "bird", 2: "cat"}
    assert reloaded.config.label2id == {"airplane": 0, "bird": 1, "cat": 2}
    inputs = sequences(reloaded.config)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=inputs).logits, ours(inputs)[0], rtol=0, atol=1e-4)
    assert load_hf_classifier(tmp_path / "named").class_names == ["airplane", "bird", "cat"]

    # no names: transformers' placeholders on the way out, no names on the way back
    save_hf_classifier(ImageGPTClassifier(model, 3).eval(), tmp_path / "unnamed")
    written = json.loads((tmp_path / "unnamed" / "config.json").read_text())
    assert written["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert load_hf_classifier(tmp_path / "unnamed").class_names is None
    reference_classifier("small", names=False).save_pretrained(tmp_path / "placeholders")
    assert load_hf_classifier(tmp_path / "placeholders").class_names is None


def test_an_imported_classifier_fine_tunes_jointly(tmp_path):
    reference_classifier("small").save_pretrained(tmp_path)
    first, second = load_hf_classifier(tmp_path), load_hf_classifier(tmp_path)
    # transformers' classifier has no next-pixel head: the fresh one is the same on every import
    assert torch.equal(first.model.lm_head.weight, second.model.lm_head.weight)
    assert first.model.lm_head.weight.std() > 0
    tokens = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, terms = finetune_loss(first.train(), tokens, torch.tensor([0, 2]), FinetuneConfig())
    loss.backward()
    assert set(terms) == {"loss_clf", "loss_gen"} and torch.isfinite(loss)


def test_bad_folders_and_heads_are_refused(tmp_path):
    causal = transformers.ImageGPTForCausalImageModeling(reference_classifier("small").config)
    causal.save_pretrained(tmp_path / "causal")
    with pytest.raises(hf.HFFormatError, match="no score.weight"):
        load_hf_classifier(tmp_path / "causal")

    reference_classifier("small").save_pretrained(tmp_path / "clf")
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    (tmp_path / "clf" / "config.json").write_text(json.dumps({**config, "id2label": {"0": "a", "1": "b"}}))
    with pytest.raises(hf.HFFormatError, match="declares 2 labels but score.weight has 3 rows"):
        load_hf_classifier(tmp_path / "clf")
    (tmp_path / "clf" / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(hf.HFFormatError, match="score.weight has shape"):
        load_hf_classifier(tmp_path / "clf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_classifier(tmp_path / "absent")

    torch.manual_seed(0)
    model = ImageGPT(hf.config_from_hf(config))
    with pytest.raises(hf.HFFormatError, match="head_layer: 0 is not the last block"):
        save_hf_classifier(ImageGPTClassifier(model, 3, head_layer=0), tmp_path / "early")


def test_cli_moves_a_classifier_checkpoint_to_transformers_and_back(tmp_path):
    from typer.testing import CliRunner

    from igpt_core.checkpoint import PALETTE_FILE, load_classifier, read_config, save_model
    from igpt_core.cli import app
    from igpt_core.palette import Palette

    torch.manual_seed(0)
    config = hf.config_from_hf(reference_classifier("small").config.to_dict())
    ours = ImageGPTClassifier(ImageGPT(config), 3, class_names=["airplane", "bird", "cat"]).eval()
    palette = Palette(centers=torch.rand(config.vocab_size, 3).numpy() * 2 - 1)
    palette.save(tmp_path / "palette")
    save_model(ours, tmp_path / "ckpt", extra={"palette_digest": palette.digest()})
    run = CliRunner().invoke
    exported = run(app, ["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    assert exported.exit_code == 0, exported.output
    assert "ImageGPTForImageClassification" in exported.output
    theirs = transformers.ImageGPTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    inputs = sequences(theirs.config)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=inputs).logits, ours(inputs)[0], rtol=0, atol=1e-4)

    args = ["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]
    imported = run(app, [*args, "--palette", str(tmp_path / "palette")])
    assert imported.exit_code == 0, imported.output
    assert "classifier" in imported.output
    again, again_palette, saved = load_classifier(tmp_path / "back")
    assert again.class_names == ["airplane", "bird", "cat"] and saved["palette_digest"] == palette.digest()
    assert again_palette is not None and again_palette.digest() == palette.digest()
    with torch.no_grad():
        torch.testing.assert_close(again(inputs)[0], ours(inputs)[0], rtol=0, atol=1e-5)

    # a palette of another size is refused before anything is written
    Palette(centers=torch.rand(5, 3).numpy() * 2 - 1).save(tmp_path / "small-palette")
    refused = run(
        app,
        [
            "import-hf",
            "--hf",
            str(tmp_path / "hf"),
            "--out",
            str(tmp_path / "no"),
            "--palette",
            str(tmp_path / "small-palette"),
        ],
    )
    assert refused.exit_code == 2 and "--palette: 5 colours" in refused.stderr
    assert not (tmp_path / "no").exists()

    # the causal model still goes both ways, and the kind is read from the folder
    ImageGPT(config).save(tmp_path / "pretrained")
    causal = run(
        app, ["export-hf", "--checkpoint", str(tmp_path / "pretrained"), "--out", str(tmp_path / "c")]
    )
    assert causal.exit_code == 0 and "ImageGPTForCausalImageModeling" in causal.output
    back = run(app, ["import-hf", "--hf", str(tmp_path / "c"), "--out", str(tmp_path / "c-back")])
    assert back.exit_code == 0 and "causal model" in back.output
    assert "classifier" not in read_config(tmp_path / "c-back")
    assert not (tmp_path / "c-back" / PALETTE_FILE).exists()

    # a head transformers cannot hold is refused naming the checkpoint
    save_model(ImageGPTClassifier(ImageGPT(config), 3, head_layer=0), tmp_path / "early")
    early = run(app, ["export-hf", "--checkpoint", str(tmp_path / "early"), "--out", str(tmp_path / "e")])
    assert early.exit_code == 2 and early.stderr.startswith("igpt: error: --checkpoint: head_layer: 0")


def test_the_folder_says_which_head_it_holds(tmp_path):
    from igpt_core.hf_classifier import is_classifier_folder

    reference_classifier("small").save_pretrained(tmp_path / "clf")
    transformers.ImageGPTForCausalImageModeling(reference_classifier("small").config).save_pretrained(
        tmp_path / "causal"
    )
    assert is_classifier_folder(tmp_path / "clf") and not is_classifier_folder(tmp_path / "causal")
    for name in ("clf", "causal"):  # without `architectures`, the weights tell
        config = json.loads((tmp_path / name / "config.json").read_text())
        del config["architectures"]
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert is_classifier_folder(tmp_path / "clf") and not is_classifier_folder(tmp_path / "causal")
