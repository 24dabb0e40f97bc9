"""ImageGPT: shapes, causality, the iGPT layer norm, KV-cache generation, features, save/load, training,
and a model file that imports, builds and loads nothing beyond torch."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from igpt_core import generation, native
from igpt_core.config import ModelConfig, preset, to_dict
from igpt_core.generation import generate
from igpt_core.model import ImageGPT, LayerNorm, inputs_from_tokens

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=16, resolution=4, n_layer=2, n_head=2, n_embd=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(config: ModelConfig = CFG, seed: int = 0, scale: float = 0.0) -> ImageGPT:
    """A model in eval mode; `scale` > 0 perturbs every weight so that logits are far from uniform."""
    torch.manual_seed(seed)
    model = ImageGPT(config).eval()
    if scale:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
    return model


def image_tokens(batch: int, config: ModelConfig = CFG, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, config.block_size), generator=g)


def greedy_without_cache(model: ImageGPT, prefix: torch.Tensor, n: int) -> torch.Tensor:
    """Reference decoding: a full forward pass over the whole sequence for every new token."""
    seq = prefix
    for _ in range(n):
        logits = model(seq[:, -model.config.block_size :])[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


def test_forward_shape_and_parameter_count():
    model = make_model()
    inputs, _ = inputs_from_tokens(image_tokens(3), CFG.start_token)
    assert model(inputs).shape == (3, CFG.block_size, CFG.vocab_size)
    assert sum(p.numel() for p in model.parameters()) == CFG.num_params()
    assert model.transformer.wte.weight.shape == (CFG.vocab_size + 1, CFG.n_embd)


def test_attention_is_causal():
    model = make_model(scale=0.1)
    inputs, _ = inputs_from_tokens(image_tokens(2), CFG.start_token)
    changed = inputs.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % CFG.vocab_size
    with torch.no_grad():
        a, b = model(inputs), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_layer_norm_has_no_mean_subtraction_or_bias():
    norm = LayerNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 5, 8) + 4.0  # a large mean: a mean-subtracting norm would differ a lot
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]


def test_mlp_moves_quick_gelus_scale_into_the_weights_with_unchanged_values_and_gradients():
    from igpt_core.model import MLP

    torch.manual_seed(0)
    mlp = MLP(CFG)
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 5, CFG.n_embd, requires_grad=True)

    def quick_gelu_reference(x: torch.Tensor) -> torch.Tensor:
        h = mlp.c_fc(x)
        return mlp.c_proj(h * torch.sigmoid(1.702 * h))

    params = [x, *mlp.parameters()]
    got = mlp(x)
    grads = torch.autograd.grad(got.square().sum(), params)
    want = quick_gelu_reference(x)
    expected = torch.autograd.grad(want.square().sum(), params)
    # the same function up to float32 rounding (outputs here are O(1) to O(10)); a scale put in the wrong
    # place would be off by tens of percent
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_init_scales_residual_projections_with_depth():
    config = ModelConfig(vocab_size=16, resolution=4, n_layer=8, n_head=4, n_embd=128)
    model = ImageGPT(config)
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.blocks()])
    fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.blocks()])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert fc.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(torch.all(b.attn.c_attn.bias == 0) for b in model.transformer.blocks())


def test_inputs_from_tokens_shifts_and_prepends_start():
    tokens = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]], dtype=torch.uint16)
    inputs, targets = inputs_from_tokens(tokens, start_token=10)
    assert inputs.tolist() == [[10, 3, 1, 4], [10, 5, 9, 2]]
    assert targets.tolist() == tokens.long().tolist()
    assert inputs.dtype == targets.dtype == torch.long
    with pytest.raises(ValueError, match="tokens: ids must be in"):
        inputs_from_tokens(torch.tensor([[3, 10]]), start_token=10)
    with pytest.raises(ValueError, match="tokens: expected shape"):
        inputs_from_tokens(torch.tensor([3, 1]), start_token=10)


def test_kv_cache_greedy_equals_full_recompute():
    model = make_model(scale=0.2)
    prefix = torch.full((3, 1), CFG.start_token)
    prefix = torch.cat([prefix, image_tokens(3)[:, :4]], dim=1)  # a completion: start + 4 known pixels
    n = CFG.block_size + 1 - prefix.size(1)  # up to the full image
    fast = generate(model, prefix, n, temperature=0.0)
    assert fast.shape == (3, CFG.block_size + 1)
    assert torch.equal(fast[:, :5], prefix)
    assert torch.equal(fast, greedy_without_cache(model, prefix, n))


def test_prefill_chunk_after_cache_matches_full_forward():
    from igpt_core.model import KVCache

    model = make_model(scale=0.2)
    inputs, _ = inputs_from_tokens(image_tokens(2), CFG.start_token)
    cache = KVCache(CFG, 2, CFG.block_size, "cpu", torch.float32)
    with torch.no_grad():
        head = model.hidden(inputs[:, :6], cache)
        tail = model.hidden(inputs[:, 6:], cache)  # a multi-token chunk on top of a cache
        reference = model(inputs)
    torch.testing.assert_close(model.lm_head(torch.cat([head, tail], dim=1)), reference)


def test_one_position_steps_match_full_forward():
    # decode steps are their own code path (module-free, one query over the cache, no SDPA, quick-gelu's
    # scale folded once): their logits must match the full forward at every position
    from igpt_core.model import KVCache

    model = make_model(scale=0.2)
    inputs, _ = inputs_from_tokens(image_tokens(2), CFG.start_token)
    cache = KVCache(CFG, 2, CFG.block_size, "cpu", torch.float32)
    with torch.inference_mode():
        weights = generation.decode_weights(model)
        steps = [generation.decode_step(model, inputs[:, t], cache, weights) for t in range(CFG.block_size)]
        reference = model(inputs)
        assert cache.length == CFG.block_size
        torch.testing.assert_close(torch.stack(steps, dim=1), reference, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="cache: all 16 positions"):
            generation.decode_step(model, inputs[:, 0], cache, weights)
        # one-position chunks through the module path (a cache, then T=1) agree too
        cache = KVCache(CFG, 2, CFG.block_size, "cpu", torch.float32)
        chunks = [model.hidden(inputs[:, t : t + 1], cache) for t in range(CFG.block_size)]
        torch.testing.assert_close(model.lm_head(torch.cat(chunks, dim=1)), reference, rtol=0, atol=1e-5)


def test_sampling_controls():
    model = make_model(scale=0.2)
    prefix = torch.full((4, 1), CFG.start_token)
    greedy = generate(model, prefix, 10, temperature=0)
    assert torch.equal(generate(model, prefix, 10, top_k=1), greedy)
    assert torch.equal(generate(model, prefix, 10, top_p=1e-6), greedy)
    a = generate(model, prefix, 10, top_k=5, generator=torch.Generator().manual_seed(7))
    b = generate(model, prefix, 10, top_k=5, generator=torch.Generator().manual_seed(7))
    c = generate(model, prefix, 10, top_k=5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a[:, 1:].max()) < CFG.vocab_size  # the start token is never sampled


def test_top_k_keeps_only_the_k_best_tokens():
    from igpt_core.generation import sample_next

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]).repeat(2000, 1)
    drawn = sample_next(logits, 1.0, 2, None, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 3}
    drawn = sample_next(logits, 1.0, None, 0.5, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1}  # p(token 1) = 0.64 >= 0.5 on its own


def test_generate_rejects_bad_arguments():
    model = make_model()
    prefix = torch.full((2, 1), CFG.start_token)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prefix, CFG.block_size + 1)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prefix, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prefix, 2, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prefix, 2, top_p=1.5)
    with pytest.raises(ValueError, match="prefix"):
        generate(model, prefix + 1, 2)
    assert generate(model, prefix, 0).tolist() == prefix.tolist()


def test_generate_restores_training_mode():
    model = make_model().train()
    generate(model, torch.full((1, 1), CFG.start_token), 3)
    assert model.training


def test_features_are_pooled_attention_inputs():
    model = make_model(scale=0.1)
    inputs, _ = inputs_from_tokens(image_tokens(3), CFG.start_token)
    captured = {}
    hooks = [
        block.ln_1.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, out))
        for i, block in enumerate(model.transformer.blocks())
    ]
    with torch.no_grad():
        model(inputs)
        feats = model.features(inputs, [1, 0])
    for hook in hooks:
        hook.remove()
    assert sorted(feats) == [0, 1]
    for layer in (0, 1):
        assert feats[layer].shape == (3, CFG.n_embd)
        torch.testing.assert_close(feats[layer], captured[layer].mean(dim=1))
    with pytest.raises(ValueError, match="layers"):
        model.features(inputs, [2])


def test_save_load_roundtrip_ignores_unknown_config_keys(tmp_path):
    model = make_model(scale=0.1)
    model.save(tmp_path, extra={"train": {"steps": 3}, "palette_digest": "abc"})
    saved = json.loads((tmp_path / "config.json").read_text())
    # a reader without igpt's code finds every architectural field in config.json
    assert {k: saved[k] for k in to_dict(CFG)} == to_dict(CFG)
    assert saved["palette_digest"] == "abc"
    loaded = ImageGPT.load(tmp_path)
    assert loaded.config == CFG and not loaded.training
    inputs, _ = inputs_from_tokens(image_tokens(2), CFG.start_token)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), model(inputs), rtol=0, atol=0)


def test_load_reports_missing_and_mismatched_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ImageGPT.load(tmp_path)
    make_model().save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(ValueError, match="does not fit its config"):
        ImageGPT.load(tmp_path)


def test_optimizer_decays_only_matrices():
    model = make_model()
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert "lm_head.weight" in decayed and "transformer.h.0.attn.c_attn.weight" in decayed
    assert not any(n.startswith(("transformer.wte", "transformer.wpe")) for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_training_steps_fit_a_small_batch():
    model = make_model().train()
    opt = model.configure_optimizer(weight_decay=0.0, lr=3e-3)
    inputs, targets = inputs_from_tokens(image_tokens(4), CFG.start_token)
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(CFG.vocab_size), rel=0.1)
    assert losses[-1] < 0.5 * losses[0]


def test_gpu_mfu_script_runs_on_cpu(capsys):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_mfu
    finally:
        sys.path.remove(str(REPO / "bench"))
    args = ["--device", "cpu", "--presets", "tiny", "--resolution", "4", "--batch", "2", "--steps", "2"]
    rows = gpu_mfu.main([*args, "--warmup", "1"])
    assert len(rows) == 1 and rows[0]["preset"] == "tiny" and rows[0]["tokens_per_s"] > 0
    expected_tflops = rows[0]["tokens_per_s"] * preset("tiny", resolution=4).flops_per_token() / 1e12
    assert rows[0]["model_tflops"] == pytest.approx(expected_tflops)
    assert "MFU" in capsys.readouterr().out


def test_importing_the_model_loads_no_backend_decoder_or_interop_module():
    code = "import sys, igpt_core.model; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split()
    assert "igpt_core.model" in loaded
    others = {"igpt_core.attention", "igpt_core.native", "igpt_core.generation", "igpt_core.hf"}
    assert others.isdisjoint(loaded)
    assert {name for name in loaded if name.startswith("igpt_core.")} <= {
        "igpt_core.model",
        "igpt_core.config",
    }


def test_model_generation_hf_attention_and_native_import_each_other_in_one_direction():
    # every import, wherever it is (functions, TYPE_CHECKING), counts: the model depends on none of them
    names = ("model", "generation", "hf", "attention", "native")
    edges: dict[str, set[str]] = {}
    for name in names:
        tree = ast.parse((REPO / "igpt_core" / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "igpt_core":
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("igpt_core."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("igpt_core."))
        edges[name] = found & set(names)
    assert edges["model"] == set()

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges[start])

    assert [name for name in names if reaches(name, name)] == []


def test_forward_never_builds_or_loads_an_extension(monkeypatch):
    def refuse(*args: object) -> None:
        raise AssertionError("the model asked for a native extension")

    for name in ("attention_extension", "decode_extension", "_build"):
        monkeypatch.setattr(native, name, refuse)
    model = make_model().train()  # never set up through igpt_core.attention.select: SDPA
    inputs, targets = inputs_from_tokens(image_tokens(2), CFG.start_token)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # where the CPU kernel would apply
        logits = model(inputs)
        model.features(inputs, [0, 1])
    F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
    with torch.no_grad():
        assert torch.isfinite(model.eval()(inputs)).all()
