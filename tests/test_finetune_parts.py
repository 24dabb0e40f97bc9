"""The parts of fine-tuning that stand without the loop: config, classifier head, objectives, flips."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from igpt_core.classifier import ImageGPTClassifier, clf_loss, flip_tokens, joint_loss, random_flip
from igpt_core.config import ConfigError, ModelConfig
from igpt_core.finetune import FinetuneConfig, finetune_loss
from igpt_core.model import ImageGPT, inputs_from_tokens
from igpt_core.palette import Palette

CONFIG = ModelConfig(vocab_size=16, resolution=4, n_layer=3, n_head=2, n_embd=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def classifier(head_layer: int | None = None, n_classes: int = 5, seed: int = 0) -> ImageGPTClassifier:
    torch.manual_seed(seed)
    return ImageGPTClassifier(ImageGPT(CONFIG), n_classes, head_layer=head_layer).eval()


def batch(n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CONFIG.vocab_size, (n, CONFIG.block_size), generator=g)
    return tokens, torch.randint(0, 5, (n,), generator=g)


def test_config_errors_name_the_field():
    assert FinetuneConfig().objective == "joint" and FinetuneConfig().gen_weight == 1.0
    for field, value in [
        ("objective", "gen"),
        ("gen_weight", -1.0),
        ("head_layer", -1),
        ("steps", 0),
        ("lr", 0.0),
        ("warmup_steps", -1),
        ("val_fraction", 1.0),
        ("max_train", 0),
        ("batch_size", 0),
    ]:
        with pytest.raises(ConfigError, match=f"^{field}: "):
            FinetuneConfig(**{field: value})
    with pytest.raises(ConfigError, match="^batch_size: 2 is smaller than workers=4"):
        FinetuneConfig(batch_size=2, workers=4)
    assert dataclasses.is_dataclass(FinetuneConfig) and FinetuneConfig.__dataclass_params__.frozen


def test_head_reads_the_mean_of_ln_f_output_of_the_last_block():
    clf = classifier()
    tokens, _ = batch()
    inputs, _ = inputs_from_tokens(tokens, CONFIG.start_token)
    with torch.no_grad():
        class_logits, lm_logits = clf(inputs, need_lm=True)
        # the last hidden state is what the model's own next-pixel head reads
        assert torch.allclose(lm_logits, clf.model(inputs), atol=1e-6)
        hidden = clf.model.transformer.ln_f(_residual(clf.model, inputs, CONFIG.n_layer - 1))
        torch.testing.assert_close(class_logits, clf.score(hidden.mean(dim=1)))
        alone, none = clf(inputs)
    assert class_logits.shape == (3, 5) and lm_logits.shape == (3, CONFIG.block_size, CONFIG.vocab_size)
    assert none is None and torch.equal(alone, class_logits)
    assert clf.score.bias is None and clf.head_is_last


def _residual(model: ImageGPT, inputs: torch.Tensor, layer: int) -> torch.Tensor:
    x = model.transformer.wte(inputs) + model.transformer.wpe(torch.arange(inputs.size(1)))
    for block in list(model.transformer.h)[: layer + 1]:
        x = block(x)
    return x


def test_an_earlier_head_layer_reads_that_block_through_ln_f():
    clf = classifier(head_layer=0)
    tokens, _ = batch()
    inputs, _ = inputs_from_tokens(tokens, CONFIG.start_token)
    with torch.no_grad():
        class_logits, lm_logits = clf(inputs, need_lm=True)
        expected = clf.score(clf.model.transformer.ln_f(_residual(clf.model, inputs, 0)).mean(dim=1))
        torch.testing.assert_close(class_logits, expected)
        torch.testing.assert_close(clf(inputs)[0], expected)  # the short pass agrees
        assert torch.allclose(lm_logits, clf.model(inputs), atol=1e-6)
    assert not clf.head_is_last
    with pytest.raises(ValueError, match="head_layer: must be in \\[0, 2\\]"):
        ImageGPTClassifier(ImageGPT(CONFIG), 5, head_layer=3)
    with pytest.raises(ValueError, match="n_classes"):
        ImageGPTClassifier(ImageGPT(CONFIG), 1)
    with pytest.raises(ValueError, match="class_names: 2 names for n_classes=5"):
        ImageGPTClassifier(ImageGPT(CONFIG), 5, class_names=["a", "b"])


def test_joint_loss_is_the_sum_of_both_cross_entropies():
    g = torch.Generator().manual_seed(0)
    class_logits, labels = torch.randn(4, 3, generator=g), torch.tensor([0, 2, 1, 2])
    lm_logits, targets = torch.randn(4, 6, 8, generator=g), torch.randint(0, 8, (4, 6), generator=g)
    loss, terms = joint_loss(class_logits, labels, lm_logits, targets, gen_weight=0.5)
    expected_clf = F.cross_entropy(class_logits, labels)
    expected_gen = F.cross_entropy(lm_logits.reshape(24, 8), targets.reshape(24))
    torch.testing.assert_close(terms["loss_clf"], expected_clf)
    torch.testing.assert_close(terms["loss_gen"], expected_gen)
    torch.testing.assert_close(loss, expected_clf + 0.5 * expected_gen)
    alone, only = clf_loss(class_logits, labels)
    assert set(only) == {"loss_clf"} and torch.equal(alone, terms["loss_clf"])


def test_objectives_train_the_parts_they_read():
    tokens, labels = batch(n=4)
    joint = classifier().train()
    loss, terms = finetune_loss(joint, tokens, labels, FinetuneConfig(objective="joint"))
    loss.backward()
    assert set(terms) == {"loss_clf", "loss_gen"}
    assert joint.model.lm_head.weight.grad is not None and joint.score.weight.grad is not None
    # clf with an early head: neither the next-pixel head nor the blocks past the head are used
    early = classifier(head_layer=0).train()
    loss, terms = finetune_loss(early, tokens, labels, FinetuneConfig(objective="clf", head_layer=0))
    loss.backward()
    assert set(terms) == {"loss_clf"} and early.model.lm_head.weight.grad is None
    assert early.model.transformer.h[1].mlp.c_fc.weight.grad is None
    assert early.model.transformer.h[0].mlp.c_fc.weight.grad is not None
    with pytest.raises(ValueError, match="labels: must be in \\[0, 5\\)"):
        finetune_loss(joint, tokens, torch.tensor([0, 1, 2, 5]), FinetuneConfig())


def test_joint_fine_tuning_lowers_both_terms_on_a_tiny_problem():
    # labels are a function of the image (its first token's parity), so the head can learn them
    tokens, _ = batch(n=16, seed=7)
    labels = tokens[:, 0] % 2
    clf = classifier(n_classes=2).train()
    optimizer = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    config = FinetuneConfig()
    first = finetune_loss(clf, tokens, labels, config)[1]
    for _ in range(40):
        optimizer.zero_grad()
        finetune_loss(clf, tokens, labels, config)[0].backward()
        optimizer.step()
    last = finetune_loss(clf, tokens, labels, config)[1]
    assert last["loss_clf"] < 0.5 * first["loss_clf"] and last["loss_gen"] < first["loss_gen"]


def test_flip_on_tokens_equals_quantizing_the_flipped_image():
    rng = np.random.default_rng(0)
    palette = Palette(rng.uniform(-1, 1, size=(32, 3)).astype(np.float32))
    for side in (1, 4, 7):
        images = rng.integers(0, 256, size=(5, side, side, 3), dtype=np.uint8)
        tokens = palette.quantize(images)  # uint16 (5, side*side)
        flipped = flip_tokens(tokens, side)
        assert flipped.dtype == np.uint16 and flipped.shape == tokens.shape
        assert np.array_equal(flipped, palette.quantize(images[:, :, ::-1].copy()))
        assert np.array_equal(flip_tokens(flipped, side), tokens)
        for dtype in (np.uint16, np.int64):  # shards' dtype and the model's
            as_tensor = flip_tokens(torch.from_numpy(tokens.astype(dtype)), side)
            assert np.array_equal(as_tensor.numpy(), flipped)
    assert flip_tokens(np.arange(4)[None], 2).tolist() == [[1, 0, 3, 2]]
    with pytest.raises(ValueError, match="tokens: expected shape \\(B, 16\\)"):
        flip_tokens(np.zeros((2, 15), np.uint16), 4)


def test_random_flip_is_seeded_per_sample():
    tokens = np.arange(64 * 4, dtype=np.uint16).reshape(64, 4)
    out, mask = random_flip(tokens, 2, seed=(0, 17, 1))
    assert 10 < mask.sum() < 54  # about half
    assert np.array_equal(out[mask], flip_tokens(tokens[mask], 2))
    assert np.array_equal(out[~mask], tokens[~mask])
    again, same = random_flip(torch.from_numpy(tokens), 2, seed=(0, 17, 1))
    assert np.array_equal(same, mask) and np.array_equal(again.numpy(), out)
    assert again.dtype == torch.uint16
    assert not np.array_equal(random_flip(tokens, 2, seed=(0, 18, 1))[1], mask)
    assert not random_flip(tokens, 2, seed=0, p=0.0)[1].any()
