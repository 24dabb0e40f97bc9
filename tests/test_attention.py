"""The CPU bf16 attention kernel (igpt_core/attention.py): values and gradients as accurate as PyTorch's
bf16 attention against an fp32 reference, taken by the model under CPU bf16 autocast once `select`
installs it, and left alone (SDPA) where it does not apply or cannot be built."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from igpt_core import attention, native
from igpt_core.config import ModelConfig
from igpt_core.model import ImageGPT, inputs_from_tokens

kernel = pytest.mark.skipif(
    not native.enabled() or native.attention_extension() is None,
    reason="needs a CPU with AVX512-BF16 and the built kernel (IGPT_NATIVE not 0)",
)


def _split(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    B, T, C3 = qkv.shape
    return qkv.view(B, T, 3, heads, C3 // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) x3


def _sdpa(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """PyTorch's causal attention on the same fused layout, (B, T, C)."""
    q, k, v = _split(qkv, heads)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).flatten(2)


def _value_and_grad(
    fn, qkv: torch.Tensor, heads: int, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x = qkv.detach().clone().requires_grad_()
    y = fn(x, heads)
    y.backward(grad.to(y.dtype))
    assert x.grad is not None
    return y.detach().float(), x.grad.float()


@kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("batch", "positions", "heads", "head_dim"),
    [
        (2, 1, 2, 32),
        (2, 5, 2, 16),
        (1, 17, 2, 32),
        (1, 63, 1, 32),
        (1, 64, 1, 32),
        (2, 65, 3, 32),
        (1, 127, 2, 32),
        (1, 130, 2, 48),
        (2, 200, 2, 64),
        (1, 129, 1, 128),
        (1, 70, 1, 256),
    ],
)
def test_values_and_gradients_are_as_close_to_fp32_as_pytorch_bf16(
    threads, batch, positions, heads, head_dim
):
    # block edges: fewer positions than one vector, exactly one block, one past it, several blocks
    torch.manual_seed(positions * head_dim)
    qkv = (torch.randn(batch, positions, 3 * heads * head_dim) * 1.5).bfloat16()
    grad = torch.randn(batch, positions, heads * head_dim).bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = _value_and_grad(attention.causal_attention, qkv, heads, grad)
        theirs = _value_and_grad(_sdpa, qkv, heads, grad)
    finally:
        torch.set_num_threads(before)
    exact = _value_and_grad(_sdpa, qkv.float(), heads, grad)
    parts = {"output": (ours[0], theirs[0], exact[0])}  # and d q, d k, d v each on its own
    for index, name in enumerate(("d q", "d k", "d v")):
        part = slice(index * heads * head_dim, (index + 1) * heads * head_dim)
        parts[name] = (ours[1][..., part], theirs[1][..., part], exact[1][..., part])
    for name, (a, b, ref) in parts.items():
        error, baseline = (a - ref).abs().max().item(), (b - ref).abs().max().item()
        # bf16 keeps 8 bits: errors of ~1e-2 on values of ~5 are what rounding the inputs already gives
        assert error <= 1.5 * baseline + 1e-3, (
            f"{name}: kernel error {error:.4f} vs PyTorch bf16 {baseline:.4f}"
        )


@kernel
def test_log_sum_exp_is_each_query_s_softmax_denominator():
    torch.manual_seed(0)
    heads, head_dim, positions = 2, 32, 100
    qkv = torch.randn(2, positions, 3 * heads * head_dim).bfloat16()
    _, lse = native.attention_extension().forward(qkv, heads, 1 / math.sqrt(head_dim))
    q, k, _ = (t.float() for t in _split(qkv, heads))
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)  # (B, H, T, T)
    causal = torch.ones(positions, positions, dtype=torch.bool).tril()
    expected = scores.masked_fill(~causal, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, expected, atol=1e-4, rtol=1e-5)


@kernel
@pytest.mark.parametrize("part", [0, 1, 2])  # a NaN in q, k or v of position 5
def test_a_nan_input_is_never_hidden(part):
    heads, head_dim, positions = 1, 16, 40
    qkv = torch.randn(1, positions, 3 * heads * head_dim).bfloat16()
    qkv[0, 5, part * head_dim] = float("nan")
    out, grad = _value_and_grad(attention.causal_attention, qkv, heads, torch.ones(1, positions, head_dim))
    rows_hit = (~out[0].isfinite()).any(-1)  # (T,)
    depends = torch.zeros(positions, dtype=torch.bool)
    depends[5] = True  # a query's NaN reaches its own row; a key's or value's, every row from 5 on
    if part > 0:
        depends[5:] = True
    assert rows_hit[depends].all()
    assert not grad.isfinite().all()


@kernel
def test_compiled_attention_is_one_graph_with_the_op_in_it():
    graphs: list[torch.fx.GraphModule] = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    model = ImageGPT(ModelConfig(vocab_size=16, resolution=4, n_layer=2, n_head=2, n_embd=64))
    assert attention.select(model, device="cpu", dtype=torch.bfloat16) == "kernel"
    inputs, _ = inputs_from_tokens(torch.randint(0, 16, (2, 16)), model.config.start_token)

    def logits(idx: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(idx)

    compiled = torch.compile(logits, backend=backend, fullgraph=True)  # a graph break raises here
    assert torch.equal(compiled(inputs), logits(inputs))
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes]
    assert sum("causal_attention" in target for target in targets) == 2  # one per block
    assert not any("scaled_dot_product" in target for target in targets)


@kernel
def test_future_positions_do_not_change_the_past():
    torch.manual_seed(0)
    qkv = torch.randn(1, 100, 3 * 64).bfloat16()
    changed = qkv.clone()
    changed[:, 70:] = torch.randn(1, 30, 3 * 64).bfloat16()
    a, b = attention.causal_attention(qkv, 2), attention.causal_attention(changed, 2)
    assert torch.equal(a[:, :70], b[:, :70])
    assert not torch.equal(a[:, 70:], b[:, 70:])


@kernel
def test_the_op_passes_torch_library_checks():
    # fake (meta) shapes, autograd registration and schema, as torch.compile and autograd rely on them
    qkv = torch.randn(2, 70, 3 * 32).bfloat16().requires_grad_()
    torch.library.opcheck(torch.ops.igpt.causal_attention.default, (qkv, 2, 0.25))


@kernel
def test_bf16_training_step_takes_the_kernel_and_matches_the_sdpa_step(monkeypatch):
    calls = []
    real = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention", lambda qkv, heads: calls.append(1) or real(qkv, heads))
    config = ModelConfig(vocab_size=32, resolution=8, n_layer=2, n_head=2, n_embd=64)
    tokens = torch.randint(0, 32, (4, 64), generator=torch.Generator().manual_seed(0))
    inputs, targets = inputs_from_tokens(tokens, config.start_token)

    def step() -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(1)
        model = ImageGPT(config)
        attention.select(model, device="cpu", dtype=torch.bfloat16)  # the kernel, or SDPA with IGPT_NATIVE=0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, grads = step()
    assert len(calls) == config.n_layer  # one call per block, none through SDPA
    monkeypatch.setenv(native.ENV, "0")
    loss_sdpa, grads_sdpa = step()
    assert len(calls) == config.n_layer  # IGPT_NATIVE=0: SDPA only
    assert loss == pytest.approx(loss_sdpa, abs=2e-3)
    assert len(grads) == len(grads_sdpa)
    for g, ref in zip(grads, grads_sdpa, strict=True):
        scale = ref.abs().max().item()
        assert (g - ref).abs().max().item() <= 0.05 * scale + 1e-6


def test_what_the_kernel_does_not_take_goes_to_sdpa():
    qkv = torch.randn(1, 8, 3 * 48)
    assert not attention.usable(qkv, 2)  # fp32
    assert not attention.usable(qkv.bfloat16(), 2)  # head size 24, not a multiple of 16
    assert not attention.usable(qkv.bfloat16(), 7)  # 144 is not 3 * 7 * D
    model = ImageGPT(ModelConfig(vocab_size=16, resolution=4, n_layer=1, n_head=2, n_embd=48))
    assert attention.select(model, device="cpu", dtype=torch.bfloat16) == "sdpa"
    tokens = torch.randint(0, 16, (2, 16))
    inputs, _ = inputs_from_tokens(tokens, model.config.start_token)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(inputs)).all()  # head size 24 under bf16 autocast: SDPA, as before


def test_training_falls_back_to_sdpa_with_one_warning_when_the_build_fails(monkeypatch, caplog):
    def broken_build(kind: str):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_build", broken_build)
    monkeypatch.setattr(native, "cpu_has_avx512_bf16", lambda: True)
    model = ImageGPT(ModelConfig(vocab_size=16, resolution=4, n_layer=2, n_head=2, n_embd=64))
    inputs, targets = inputs_from_tokens(torch.randint(0, 16, (2, 16)), model.config.start_token)
    with caplog.at_level(logging.WARNING, logger="igpt_core.native"):
        for _ in range(2):
            assert attention.select(model, device="cpu", dtype=torch.bfloat16) == "sdpa"
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten())
            loss.backward()
    warnings = [r.getMessage() for r in caplog.records if "native attention unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert math.isfinite(loss.item())


@kernel
def test_backward_names_a_mismatched_input():
    module = native.attention_extension()
    qkv = torch.randn(1, 10, 3 * 32).bfloat16()
    out, lse = module.forward(qkv, 2, 0.25)
    with pytest.raises(RuntimeError, match="lse: expected"):
        module.backward(out, qkv, out, lse[:, :1], 2, 0.25)
    with pytest.raises(RuntimeError, match="out: expected"):
        module.backward(out, qkv, out.float(), lse, 2, 0.25)
    with pytest.raises(RuntimeError, match="qkv: expected bfloat16"):
        module.forward(qkv.float(), 2, 0.25)


def _no_build() -> None:
    raise AssertionError("the attention kernel was asked for")


def _fused_attentions(model: ImageGPT) -> list:
    return [block.attn.fused_attention for block in model.blocks()]


@pytest.mark.parametrize(
    ("device", "dtype", "n_embd"),
    [
        ("cpu", None, 64),
        ("cpu", torch.float32, 64),
        ("cuda", torch.bfloat16, 64),
        ("cpu", torch.bfloat16, 48),
    ],
)
def test_select_keeps_sdpa_where_the_kernel_cannot_apply_without_asking_for_it(
    monkeypatch, device, dtype, n_embd
):
    # fp32, no autocast, a GPU, a head size of 24: decided from the arguments alone, nothing built or probed
    monkeypatch.setattr(native, "attention_extension", _no_build)
    model = ImageGPT(ModelConfig(vocab_size=16, resolution=4, n_layer=2, n_head=2, n_embd=n_embd))
    assert attention.select(model, device=device, dtype=dtype) == "sdpa"
    assert _fused_attentions(model) == [None, None]


def test_select_installs_the_kernel_in_every_block_and_use_sdpa_undoes_it(monkeypatch):
    monkeypatch.setattr(native, "attention_extension", lambda: object())  # as if built
    model = ImageGPT(ModelConfig(vocab_size=16, resolution=4, n_layer=3, n_head=2, n_embd=64))
    wrapped = torch.nn.Sequential(model)  # found inside a wrapper too (DDP holds the model the same way)
    assert attention.select(wrapped, device=torch.device("cpu"), dtype=torch.bfloat16) == "kernel"
    assert _fused_attentions(model) == [attention.fused_causal_attention] * 3
    attention.use_sdpa(model)
    assert _fused_attentions(model) == [None] * 3


@pytest.mark.parametrize(("amx", "expected"), [(True, "sdpa"), (False, "kernel")])
def test_select_for_inference_prefers_sdpa_on_a_cpu_with_amx(monkeypatch, amx, expected):
    # forward passes only: torch's CPU flash kernel runs on AMX tiles and beats the kernel there; training
    # (inference False) keeps the kernel whatever the CPU has
    monkeypatch.setattr(native, "attention_extension", lambda: object())  # as if built
    monkeypatch.setattr(attention, "cpu_has_amx", lambda: amx)
    model = ImageGPT(ModelConfig(vocab_size=16, resolution=4, n_layer=2, n_head=2, n_embd=64))
    assert attention.select(model, device="cpu", dtype=torch.bfloat16, inference=True) == expected
    assert attention.select(model, device="cpu", dtype=torch.bfloat16) == "kernel"


def test_a_model_set_up_for_the_kernel_runs_what_it_does_not_take_through_sdpa(monkeypatch):
    # fp32 activations (a bf16-trained model called outside autocast) are not the kernel's: the same SDPA
    # arithmetic as a model that was never set up, to the bit
    monkeypatch.setattr(native, "attention_extension", lambda: object())
    monkeypatch.setattr(attention, "causal_attention", lambda qkv, heads: _no_build())
    config = ModelConfig(vocab_size=16, resolution=4, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    plain = ImageGPT(config)
    selected = ImageGPT(config)
    selected.load_state_dict(plain.state_dict())
    assert attention.select(selected, device="cpu", dtype=torch.bfloat16) == "kernel"
    inputs, targets = inputs_from_tokens(torch.randint(0, 16, (2, 16)), config.start_token)
    grads = []
    for model in (plain, selected):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert torch.equal(plain(inputs), selected(inputs))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
