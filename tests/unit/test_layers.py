"""Layers against references: nn.MultiheadAttention, nn.LSTMCell unrolls, formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dapeng.layers import (
    ConvNormAct,
    FeedForward,
    GlobalPool,
    KVCache,
    MultiHeadAttention,
    RecurrentEncoder,
    ResidualBlock,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPositions,
    SwiGLU,
    apply_rotary,
    capture_attention,
    causal_mask,
    padding_mask,
    pool_sequence,
)

torch.set_num_threads(1)
D, H = 16, 4


def _pair(kv_dim: int | None = None) -> tuple[MultiHeadAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    ours = MultiHeadAttention(D, H, kv_dim=kv_dim).eval()
    ref = nn.MultiheadAttention(D, H, batch_first=True, kdim=kv_dim, vdim=kv_dim).eval()
    with torch.no_grad():
        if kv_dim is None:
            ref.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.k.weight, ours.v.weight]))
        else:
            ref.q_proj_weight.copy_(ours.q.weight)
            ref.k_proj_weight.copy_(ours.k.weight)
            ref.v_proj_weight.copy_(ours.v.weight)
        ref.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.k.bias, ours.v.bias]))
        ref.out_proj.weight.copy_(ours.o.weight)
        ref.out_proj.bias.copy_(ours.o.bias)
    return ours, ref


def test_attention_equals_torch_multihead_attention_without_mask():
    ours, ref = _pair()
    x = torch.randn(3, 7, D)
    expected, _ = ref(x, x, x, need_weights=False)
    assert (ours(x) - expected).abs().max() <= 1e-5


def test_attention_equals_torch_with_padding_mask():
    ours, ref = _pair()
    x = torch.randn(3, 7, D)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[1, 4:] = False
    keep[2, 2:] = False
    expected, _ = ref(x, x, x, key_padding_mask=~keep, need_weights=False)
    assert (ours(x, mask=padding_mask(keep)) - expected).abs().max() <= 1e-5


def test_attention_equals_torch_with_causal_and_padding_mask():
    ours, ref = _pair()
    x = torch.randn(2, 6, D)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    future = ~causal_mask(6)
    expected, _ = ref(x, x, x, key_padding_mask=~keep, attn_mask=future, need_weights=False)
    got = ours(x, mask=padding_mask(keep), causal=True)
    assert (got - expected).abs().max() <= 1e-5
    expected_causal, _ = ref(x, x, x, attn_mask=future, need_weights=False)
    assert (ours(x, causal=True) - expected_causal).abs().max() <= 1e-5


def test_cross_attention_equals_torch():
    ours, ref = _pair(kv_dim=10)
    x, ctx = torch.randn(2, 5, D), torch.randn(2, 9, 10)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 6:] = False
    expected, weights = ref(x, ctx, ctx, key_padding_mask=~keep, average_attn_weights=False)
    with capture_attention(ours) as maps:
        got = ours(x, context=ctx, mask=padding_mask(keep))
    assert (got - expected).abs().max() <= 1e-5
    assert (maps[0] - weights).abs().max() <= 1e-5


def test_grouped_query_attention_matches_explicit_repeat_and_captures_rows_summing_to_one():
    torch.manual_seed(0)
    attn = MultiHeadAttention(D, 4, num_kv_heads=2, bias=False).eval()
    x = torch.randn(2, 5, D)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    fast = attn(x, mask=padding_mask(keep), causal=True)
    with capture_attention(attn) as maps:
        slow = attn(x, mask=padding_mask(keep), causal=True)
    assert (fast - slow).abs().max() <= 1e-5
    (w,) = maps
    assert w.shape == (2, 4, 5, 5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5))
    assert w[1, :, :, 3:].abs().max() == 0  # padded keys get no weight
    assert torch.triu(w[0, 0], diagonal=1).abs().max() == 0  # no weight on the future
    assert attn.record is None  # capture ended
    # a decoding step: one query per row over cached keys, padded ones masked per row
    cache = KVCache(2, 2, 8, D // 4)
    attn(x, mask=padding_mask(keep), causal=True, cache=cache, pos=0)
    step, mask = torch.randn(2, 1, D), torch.cat([keep, torch.ones(2, 1, dtype=torch.bool)], 1)[:, None, None]
    grouped = attn(step, mask=mask, cache=cache, pos=5)  # the query heads of a key/value head attend together
    with capture_attention(attn):
        explicit = attn(step, mask=mask, cache=cache, pos=5)
    torch.testing.assert_close(grouped, explicit, atol=1e-5, rtol=1e-5)


def test_kv_cache_steps_equal_full_causal_attention():
    torch.manual_seed(0)
    attn = MultiHeadAttention(D, 4, num_kv_heads=2, bias=False).eval()
    rope = RotaryEmbedding(D // 4, 32)
    x = torch.randn(2, 6, D)
    full = attn(x, causal=True, rope=rope(torch.arange(6)))
    cache = KVCache(2, 2, 8, D // 4)
    first = attn(x[:, :4], causal=True, rope=rope(torch.arange(4)), cache=cache, pos=0)
    steps = [attn(x[:, t : t + 1], rope=rope(torch.arange(t, t + 1)), cache=cache, pos=t) for t in (4, 5)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache holds 8"):
        cache.update(torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 4), pos=6)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, 64, theta=100000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rotary(q, *rope(torch.tensor([m])))
        kn = apply_rotary(k, *rope(torch.tensor([n])))
        return (qm * kn).sum()

    for shift in (1, 7, 40):
        torch.testing.assert_close(score(3, 1), score(3 + shift, 1 + shift), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(score(2, 9), score(2 + shift, 9 + shift), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2))
    # a rotation keeps the vector's length
    torch.testing.assert_close(apply_rotary(q, *rope(torch.tensor([11]))).norm(), q.norm())


def test_sinusoidal_positions_formula():
    table = SinusoidalPositions(6, 10).table
    assert table[0].tolist() == pytest.approx([0, 1, 0, 1, 0, 1])
    assert table[3, 2].item() == pytest.approx(math.sin(3 / 10000 ** (2 / 6)), abs=1e-6)
    assert table[3, 3].item() == pytest.approx(math.cos(3 / 10000 ** (2 / 6)), abs=1e-6)


def test_rmsnorm_matches_formula_and_eps():
    norm = RMSNorm(8, eps=1e-2)
    with torch.no_grad():
        norm.weight.uniform_()
    x = torch.randn(3, 8) * 0.1
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-2) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_feedforward_gelu_is_exact_erf_and_swiglu_formula():
    torch.manual_seed(0)
    ff = FeedForward(8, 16)
    x = torch.randn(2, 8)
    h = ff.up(x)
    expected = ff.down(0.5 * h * (1 + torch.erf(h / math.sqrt(2))))
    torch.testing.assert_close(ff(x), expected)
    glu = SwiGLU(8, 12)
    torch.testing.assert_close(glu(x), glu.down(F.silu(glu.gate(x)) * glu.up(x)))


def test_pool_sequence_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [-5.0], [4.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert pool_sequence(x, mask, "mean").squeeze(-1).tolist() == [2.0, pytest.approx(1 / 3)]
    assert pool_sequence(x, mask, "max").squeeze(-1).tolist() == [3.0, 4.0]
    assert pool_sequence(x, mask, "last").squeeze(-1).tolist() == [3.0, 4.0]
    assert pool_sequence(x, mask, "cls").squeeze(-1).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_sequence(x, mask, "median")


def test_conv_blocks_shapes_and_global_pool():
    x = torch.randn(2, 3, 8, 8)
    assert ConvNormAct(3, 5, 3, stride=2)(x).shape == (2, 5, 4, 4)
    block = ResidualBlock(3, 6, stride=2)
    assert block(x).shape == (2, 6, 4, 4)
    assert isinstance(ResidualBlock(6, 6).shortcut, nn.Identity)
    assert GlobalPool("max")(x).tolist() == x.amax(dim=(2, 3)).tolist()
    assert GlobalPool("avg")(x.to(memory_format=torch.channels_last)).shape == (2, 3)


def _lstm_cell_unroll(lstm: nn.LSTM, x: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step nn.LSTMCell reference for one sequence (1, T, D) of `length` real steps."""
    inputs = x[0, :length]
    directions = 2 if lstm.bidirectional else 1
    finals = []
    for layer in range(lstm.num_layers):
        outs = []
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            cell = nn.LSTMCell(inputs.shape[-1], lstm.hidden_size)
            cell.weight_ih.data = getattr(lstm, "weight_ih" + sfx).data
            cell.weight_hh.data = getattr(lstm, "weight_hh" + sfx).data
            cell.bias_ih.data = getattr(lstm, "bias_ih" + sfx).data
            cell.bias_hh.data = getattr(lstm, "bias_hh" + sfx).data
            h = c = torch.zeros(1, lstm.hidden_size)
            order = range(length - 1, -1, -1) if d else range(length)
            seq = [None] * length
            for t in order:
                h, c = cell(inputs[t : t + 1], (h, c))
                seq[t] = h[0]
            outs.append(torch.stack(seq))
            if layer == lstm.num_layers - 1:
                finals.append(h[0])
        inputs = torch.cat(outs, dim=-1)
    return inputs, torch.cat(finals)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_wrapper_equals_lstmcell_unroll_and_ignores_padding(bidirectional):
    torch.manual_seed(0)
    enc = RecurrentEncoder("lstm", 5, 6, layers=2, bidirectional=bidirectional).eval()
    x = torch.randn(3, 7, 5)
    lengths = [7, 4, 1]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    x = x.masked_fill(~mask[..., None], 1e3)  # garbage in the padding must not leak
    outputs, final = enc(x, mask)
    with torch.no_grad():
        for i, n in enumerate(lengths):
            ref_out, ref_final = _lstm_cell_unroll(enc.rnn, x[i : i + 1], n)
            torch.testing.assert_close(outputs[i, :n], ref_out, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(final[i], ref_final, atol=1e-5, rtol=1e-5)
            if n < 7:
                assert outputs[i, n:].abs().max() == 0


@pytest.mark.parametrize("kind", ["rnn", "gru"])
def test_recurrent_kinds_ignore_padding(kind):
    torch.manual_seed(0)
    enc = RecurrentEncoder(kind, 4, 3, bidirectional=True).eval()
    x = torch.randn(1, 5, 4)
    out_short, final_short = enc(x, torch.ones(1, 5, dtype=torch.bool))
    padded = torch.cat([x, torch.randn(1, 3, 4)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    out_long, final_long = enc(padded, mask)
    torch.testing.assert_close(out_long[:, :5], out_short)
    torch.testing.assert_close(final_long, final_short)


def test_fused_projections_equal_separate_layers_in_value_and_gradient():
    from dapeng.layers.fused import MIN_ROWS, project_together

    torch.manual_seed(0)
    layers = [nn.Linear(8, n) for n in (8, 4, 4)]
    x = torch.randn(2, MIN_ROWS, 8, requires_grad=True)
    fused = project_together(x, layers)
    sum(o.square().sum() for o in fused).backward()
    grads = [lin.weight.grad.clone() for lin in layers] + [x.grad.clone()]
    for lin in layers:
        lin.weight.grad = None
    x.grad = None
    separate = [lin(x) for lin in layers]
    sum(o.square().sum() for o in separate).backward()
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b)
    for a, b in zip(grads, [lin.weight.grad for lin in layers] + [x.grad]):
        torch.testing.assert_close(a, b)


def test_attention_equals_torch_on_long_inputs_with_fused_qkv():
    ours, ref = _pair()
    x = torch.randn(2, 80, D)  # 160 rows: q/k/v run as one GEMM
    keep = torch.ones(2, 80, dtype=torch.bool)
    keep[1, 50:] = False
    expected, _ = ref(x, x, x, key_padding_mask=~keep, need_weights=False)
    assert (ours(x, mask=padding_mask(keep)) - expected).abs().max() <= 1e-5
    glu = SwiGLU(D, 24)
    torch.testing.assert_close(glu(x), glu.down(F.silu(glu.gate(x)) * glu.up(x)))


def test_rmsnorm_training_backward_equals_autograd_of_the_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8, requires_grad=True)
    grad = torch.randn(3, 5, 8)
    norm(x).backward(grad)  # the hand-written backward
    ours = x.grad.clone(), norm.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight).backward(grad)
    torch.testing.assert_close(ours[0], x.grad)
    torch.testing.assert_close(ours[1], norm.weight.grad)


def test_swiglu_training_path_equals_separate_projections_in_value_and_gradient():
    from dapeng.layers.fused import MIN_ROWS

    torch.manual_seed(0)
    glu = SwiGLU(8, 12)
    x = torch.randn(2, MIN_ROWS, 8, requires_grad=True)  # enough rows for the fused gate|up path
    out = glu(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in (glu.gate.weight, glu.up.weight, glu.down.weight)] + [x.grad.clone()]
    glu.zero_grad(set_to_none=True)
    x.grad = None
    expected = glu.down(F.silu(glu.gate(x)) * glu.up(x))
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for a, b in zip(grads, [p.grad for p in (glu.gate.weight, glu.up.weight, glu.down.weight)] + [x.grad]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kernel", ["1", "0"])
@pytest.mark.parametrize("rows", [1, 8])
def test_linear_with_fp32_inputs_over_bf16_weights(rows, kernel, cpu_kernel):
    from dapeng.layers import cpu_matmul
    from dapeng.layers.fused import linear

    cpu_kernel(kernel)
    torch.manual_seed(0)
    layer = nn.Linear(16, 12).to(torch.bfloat16)
    x = torch.randn(rows, 16)
    with torch.no_grad():  # decoding: with gradients wanted the kernel steps aside for autograd
        out = linear(x, layer)
    assert out.dtype == torch.float32
    expected = F.linear(x, layer.weight.float(), layer.bias.float())
    if cpu_matmul.available():  # the kernel: the fp32 product with the bf16 weights, its own summation order
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    elif rows >= 8:  # the weight is upcast: exactly the fp32 product with the bf16 weights
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    else:  # one row reads the bf16 weights with a bf16 input
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bias", [False, True])
def test_rotary_attention_fast_path_equals_the_plain_path_in_value_and_gradient(monkeypatch, bias):
    import dapeng.layers.attention as attention
    import dapeng.layers.fused as fused

    torch.manual_seed(0)
    attn = MultiHeadAttention(D, H, num_kv_heads=2, bias=bias)
    rope = RotaryEmbedding(D // H, 128, theta=100.0)
    x = torch.randn(2, 80, D, requires_grad=True)  # 160 rows: the fused, complex-rotation path
    keep = torch.ones(2, 80, dtype=torch.bool)
    keep[1, 60:] = False
    tables = rope((keep.long().cumsum(1) - 1).clamp_min(0), x.dtype)  # (B, 1, T, Dh) per-row positions

    def run() -> list[torch.Tensor]:
        x.grad = None
        attn.zero_grad(set_to_none=True)
        out = attn(x, mask=padding_mask(keep) & causal_mask(80), rope=tables)
        out.square().sum().backward()
        return [out, x.grad] + [p.grad for p in attn.parameters()]

    fast = run()
    monkeypatch.setattr(attention, "MIN_ROWS", 10**9)
    monkeypatch.setattr(fused, "MIN_ROWS", 10**9)
    plain = run()
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
