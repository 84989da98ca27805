"""The Switch FFN layer (effml/models/switch.py, issue 19): routing, capacity, losses, precision, upcycling.

A per-token reference (a Python loop over tokens, written from the paper's equations, no capacity)
checks the dispatch paths; hand-built router weights check capacity and drops; the aux loss is
recomputed by hand from eq. 4.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from effml.errors import EffmlError
from effml.models.switch import SwitchFFN, grouped_mm_available, pop_router_loss, switch_layers

PATHS = ["bmm", "grouped", "loop"]


def make(d=16, f=32, e=4, **kw) -> SwitchFFN:
    torch.manual_seed(0)
    kw.setdefault("jitter_eps", 0.0)
    return SwitchFFN(d, f, e, **kw)


def per_token_reference(m: SwitchFFN, x: torch.Tensor) -> torch.Tensor:
    """Σ over the top-k experts of p_i(x) · E_i(x), token by token (no capacity): the paper's eq. 2."""
    x = x.reshape(-1, m.d_model)
    probs = torch.softmax(x.double() @ m.router.weight.double().t(), dim=-1)
    out = torch.zeros_like(x, dtype=torch.float64)
    for t in range(x.shape[0]):
        gates, experts = probs[t].topk(m.top_k)
        for g, i in zip(gates, experts, strict=True):
            h = x[t].double() @ m.w_in[i].double() + (0 if m.b_in is None else m.b_in[i].double())
            if m.gated:
                gate, up = h.chunk(2)
                h = m.act(gate) * up
            else:
                h = m.act(h)
            y = h @ m.w_out[i].double() + (0 if m.b_out is None else m.b_out[i].double())
            out[t] += g * y
    return out


def one_hot_router(e: int, scale: float = 10.0) -> SwitchFFN:
    """d_model = e and router = scale·I: a token e_i goes to expert i with a known probability."""
    m = make(d=e, f=8, e=e, bias=False)
    with torch.no_grad():
        m.router.weight.copy_(scale * torch.eye(e))
    return m


# -- capacity and drops --------------------------------------------------------------------------------
def test_capacity_formula_train_and_eval():
    m = make(e=8, capacity_factor=1.25, eval_capacity_factor=2.0)
    assert m.capacity(100) == math.ceil(100 / 8 * 1.25) == 16
    m.eval()
    assert m.capacity(100) == 25
    m.top_k = 2
    assert m.capacity(100) == 50
    m.eval_capacity_factor = 100.0
    assert m.capacity(3) == 3  # never more slots than tokens


@pytest.mark.parametrize("path", PATHS)
def test_overflow_tokens_are_dropped_in_order_and_output_zero(path):
    e = 4
    m = one_hot_router(e)
    m.dispatch = path
    m.capacity_factor = 1.0
    # 8 tokens: six choose expert 0, one expert 1, one expert 2; capacity ceil(8/4 · 1) = 2
    choices = [0, 0, 1, 0, 0, 2, 0, 0]
    x = torch.eye(e)[choices]
    y = m(x)
    ref = per_token_reference(m, x).float()
    kept = [0, 1, 2, 5]  # the first two of expert 0 (token order), and the lone tokens of experts 1 and 2
    dropped = [3, 4, 6, 7]
    torch.testing.assert_close(y[kept], ref[kept], rtol=1e-5, atol=1e-6)
    assert torch.all(y[dropped] == 0)  # the residual carries them
    s = m.last_stats
    assert s["capacity"] == 2
    assert s["load"].tolist() == [6, 1, 1, 0]
    assert s["kept"].tolist() == [2, 1, 1, 0]
    assert s["dropped_fraction"].item() == pytest.approx(4 / 8)


def test_eval_capacity_factor_drops_fewer():
    m = one_hot_router(4)
    x = torch.eye(4)[[0, 0, 0, 0, 0, 1, 2, 3]]
    m.train()
    m(x)
    assert m.last_stats["capacity"] == 3 and m.last_stats["dropped_fraction"].item() == pytest.approx(2 / 8)
    m.eval()
    m(x)
    assert m.last_stats["capacity"] == 4 and m.last_stats["dropped_fraction"].item() == pytest.approx(1 / 8)


def test_top2_second_choices_yield_to_first_choices():
    """flaxformer's priority: every top-1 choice fills the buffers before any top-2 choice."""
    e = 4
    m = one_hot_router(e)
    m.top_k, m.capacity_factor = 2, 0.5  # capacity ceil(4/4 · 0.5 · 2) = 1
    x = torch.eye(e)[[0, 1, 2, 3]] + 0.5 * torch.eye(e)[[1, 0, 3, 2]]  # 2nd choice: the neighbour
    m(x)
    assert m.last_stats["capacity"] == 1
    assert m.last_stats["kept"].tolist() == [1, 1, 1, 1]  # the four 1st choices; all 2nd choices dropped
    ref = per_token_reference(copy.deepcopy(m).requires_grad_(False), x)
    # with only the 1st choice kept, the output is p_1 · E_1(x): the reference minus the 2nd term
    m2 = copy.deepcopy(m)
    m2.top_k = 1
    m2.capacity_factor = 4.0
    torch.testing.assert_close(m(x).double(), per_token_reference(m2, x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(m(x).double(), ref)


# -- losses --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_and_z_loss_match_a_hand_computation(top_k):
    m = make(e=4, top_k=top_k, z_loss_coef=1e-3)
    torch.manual_seed(3)
    x = torch.randn(5, 7, 16)
    m(x)
    logits = (x.reshape(-1, 16) @ m.router.weight.t()).tolist()
    n_tok, n_exp = len(logits), 4
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    chosen = [sorted(range(n_exp), key=lambda i: -p[i])[:top_k] for p in probs]
    f = [sum(i in c for c in chosen) / n_tok for i in range(n_exp)]
    big_p = [sum(p[i] for p in probs) / n_tok for i in range(n_exp)]
    aux = n_exp * sum(fi * pi for fi, pi in zip(f, big_p, strict=True))  # Switch eq. 4 (without α)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / n_tok  # ST-MoE eq. 5
    assert m.aux_loss.item() == pytest.approx(aux, rel=1e-5)
    assert m.z_loss.item() == pytest.approx(z, rel=1e-5)
    assert m.router_loss.item() == pytest.approx(0.01 * aux + 1e-3 * z, rel=1e-5)


def test_aux_loss_is_one_when_balanced_and_n_when_collapsed():
    m = one_hot_router(4, scale=1e4)  # probabilities one-hot
    m(torch.eye(4).repeat(3, 1))
    assert m.aux_loss.item() == pytest.approx(1.0)
    m(torch.eye(4)[[0] * 12])
    assert m.aux_loss.item() == pytest.approx(4.0)


def test_gradients_reach_the_router_through_the_gate():
    m = make(aux_loss_coef=0.0)
    x = torch.randn(4, 8, 16)
    m(x).square().sum().backward()  # the task loss alone, no aux loss
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
    assert m.w_in.grad.abs().sum() > 0 and m.w_out.grad.abs().sum() > 0


def test_aux_loss_gradient_reaches_the_router_and_pop_takes_it_once():
    model = nn.Sequential(make(), make())
    model(torch.randn(2, 5, 16))
    assert set(switch_layers(model)) == {"0", "1"}
    loss = pop_router_loss(model)
    assert loss is not None and loss.requires_grad
    loss.backward()
    assert model[0].router.weight.grad.abs().sum() > 0
    assert pop_router_loss(model) is None  # taken: a second step cannot add it again


# -- paths against the reference -----------------------------------------------------------------------
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("path", PATHS)
def test_dispatch_equals_per_token_reference(path, top_k, gated):
    m = make(gated=gated, top_k=top_k, dispatch=path, capacity_factor=8.0)  # capacity = tokens: no drop
    x = torch.randn(3, 11, 16)
    y = m(x)
    assert m.last_dispatch == path and m.last_stats["dropped_fraction"].item() == 0
    torch.testing.assert_close(y.double(), per_token_reference(m, x).reshape(3, 11, 16), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_batched_and_grouped_equal_the_loop_over_experts_with_drops(top_k, gated):
    base = make(gated=gated, top_k=top_k, capacity_factor=0.75)
    x = torch.randn(4, 9, 16)
    results = {}
    for path in PATHS:
        m = copy.deepcopy(base)
        m.dispatch = path
        xx = x.clone().requires_grad_()
        y = m(xx)
        (y.square().sum() + m.router_loss).backward()
        results[path] = (y, xx.grad, m.w_in.grad, m.w_out.grad, m.b_in.grad, m.router.weight.grad)
    assert base.capacity(36) < 36 and m.last_stats["dropped_fraction"] > 0
    for path in ("bmm", "grouped"):
        for got, want in zip(results[path], results["loop"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_auto_takes_grouped_mm_where_it_runs():
    m = make()
    m(torch.randn(2, 3, 16))
    assert m.last_dispatch == ("grouped" if grouped_mm_available("cpu", torch.float32) else "bmm")
    odd = make(d=6, f=10)  # 24- and 40-byte rows: not 16-byte aligned for grouped GEMM
    odd(torch.randn(2, 3, 6))
    assert odd.last_dispatch == "bmm"


# -- selective precision ---------------------------------------------------------------------------------
def test_router_is_float32_under_bf16_autocast_and_bf16_when_asked():
    m = make()
    x = torch.randn(2, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs = m.route(x.reshape(-1, 16))
        y = m(x)
    assert logits.dtype == probs.dtype == torch.float32
    torch.testing.assert_close(logits, x.reshape(-1, 16) @ m.router.weight.t())  # no bf16 rounding
    assert y.dtype == torch.bfloat16  # the experts do run in bf16
    m.router_dtype = "bfloat16"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs = m.route(x.reshape(-1, 16))
    assert logits.dtype == probs.dtype == torch.bfloat16


@pytest.mark.parametrize("path", ["bmm", "grouped"])
def test_bf16_autocast_forward_backward(path):
    m = make(gated=True, dispatch=path)
    if path == "grouped" and not grouped_mm_available("cpu", torch.bfloat16):
        pytest.skip("no grouped_mm in bf16 on this CPU build")
    x = torch.randn(2, 8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    (y.float().sum() + m.router_loss).backward()  # sum(): a stride-0 gradient, which grouped_mm refuses raw
    assert torch.isfinite(x.grad).all() and m.w_in.grad.dtype == torch.float32


# -- init and upcycling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_init_is_truncated_normal_scaled_by_fan_in(scale):
    torch.manual_seed(0)
    m = SwitchFFN(64, 256, 8, init_scale=scale)
    for w, fan_in in ((m.w_in, 64), (m.w_out, 256), (m.router.weight, 64)):
        std = math.sqrt(scale / fan_in)
        assert w.abs().max() <= 2 * std + 1e-7
        assert w.std().item() == pytest.approx(std * 0.88, rel=0.1)  # a normal cut at ±2σ has σ·0.88
    assert torch.all(m.b_in == 0) and torch.all(m.b_out == 0)


def _llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2))


def _gpt2_mlp():
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    return GPT2MLP(64, GPT2Config(n_embd=16, resid_pdrop=0.1))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("build", [_llama_mlp, _gpt2_mlp], ids=["llama", "gpt2"])
def test_upcycled_layer_is_the_dense_ffn_times_the_gate(build, top_k):
    """Every expert a copy of the dense FFN: the layer computes (Σ top-k gates) · FFN(x) exactly.

    The Switch layer multiplies the expert output by the router probability (eq. 2), so an upcycled
    top-1 layer is p(x) · FFN(x), not FFN(x): the gate is part of the layer (and what trains the router).
    """
    torch.manual_seed(0)
    dense = build().eval()
    m = SwitchFFN.from_dense(dense, 4, top_k=top_k, eval_capacity_factor=4.0).eval()
    assert m.gated == (build is _llama_mlp) and m.num_experts == 4
    x = torch.randn(3, 10, 16)
    with torch.no_grad():
        _, probs = m.route(x.reshape(-1, 16))
        gate = probs.topk(top_k, dim=-1).values.sum(-1).reshape(3, 10, 1)
        torch.testing.assert_close(m(x), gate * dense(x), rtol=1e-5, atol=1e-6)
    assert m.last_stats["dropped_fraction"].item() == 0
    for i in range(4):  # the dense weights, copied, not shared
        assert m.w_in[i].data_ptr() != m.w_in[0].data_ptr() or i == 0


def test_upcycle_false_draws_the_experts_and_keeps_dense_form():
    dense = _gpt2_mlp()
    m = SwitchFFN.from_dense(dense, 4, upcycle=False)
    assert not torch.equal(m.w_in[0], dense.c_fc.weight)
    assert m.w_in[0].abs().max() <= 2 * math.sqrt(0.1 / 16) + 1e-7
    assert m.dropout.p == 0.1  # GPT-2's MLP ends in resid dropout: kept


def test_from_dense_refuses_what_is_no_ffn():
    with pytest.raises(EffmlError, match="no transformer FFN"):
        SwitchFFN.from_dense(nn.Sequential(nn.Linear(4, 4)), 4)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_experts", 1, "num_experts must be >= 2"),
    ("top_k", 5, "top_k must be in"),
    ("capacity_factor", 0.0, "capacity_factor must be > 0"),
    ("eval_capacity_factor", -1.0, "eval_capacity_factor must be > 0"),
    ("router_dtype", "float16", "router_dtype must be one of"),
    ("dispatch", "fast", "dispatch must be one of"),
    ("expert_dropout", 1.0, "expert_dropout must be in"),
])
def test_bad_options_are_refused_in_one_line(field, value, message):
    kw = {"num_experts": 4, field: value}
    with pytest.raises(EffmlError, match=message):
        SwitchFFN(8, 16, **kw)


# -- noise, dropout, determinism, statistics -------------------------------------------------------------
def test_jitter_only_in_training_and_deterministic_given_a_seed():
    m = make(jitter_eps=0.5)
    x = torch.randn(2, 6, 16)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(m(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.manual_seed(8)
    assert not torch.equal(m(x), outs[0])  # other noise, other gates
    m.eval()
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
    a, b = make(), make()  # same seed, same weights
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_expert_dropout_acts_in_training_only():
    m = make(expert_dropout=0.5)
    x = torch.randn(2, 6, 16)
    torch.manual_seed(0)
    train = m(x)
    m.eval()
    evaluated = m(x)
    m.expert_dropout.p = 0.0
    assert torch.equal(m(x), evaluated) and not torch.equal(train, evaluated)


def test_deepcopy_after_a_training_forward():
    m = make()
    m(torch.randn(2, 3, 16))
    assert m.router_loss.requires_grad
    twin = copy.deepcopy(m)  # what a teacher copy or a measurement does
    assert twin.router_loss is None and m.router_loss is not None
    assert torch.equal(twin.w_in, m.w_in)


def test_running_statistics_per_mode_and_reset():
    m = make(e=4, top_k=2)
    x = torch.randn(3, 5, 16)
    m(x)
    m(x)
    m.eval()
    with torch.inference_mode():
        m(x)
    train, evaluated = m.stats("train"), m.stats("eval")
    assert train["forwards"] == 2 and evaluated["forwards"] == 1
    assert train["tokens"] == 30 and sum(train["load"]) == 2 * 15 * 2  # every token counted top_k times
    assert sum(train["load_fraction"]) == pytest.approx(1.0)
    assert 0 <= train["dropped_fraction"] < 1 and 0 < train["entropy"] <= train["max_entropy"] == pytest.approx(
        math.log(4))
    assert train["aux_loss"] == pytest.approx(m.aux_loss.item(), rel=0.2)
    m.reset_stats()
    assert m.stats("train") is None and m.stats("eval") is None


# -- inside a transformers decoder ---------------------------------------------------------------------------
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def test_in_a_llama_decoder_trains_and_its_state_dict_round_trips():
    """What the compressor will do: swap a block's MLP, add the router loss to the LM loss, train."""
    model = _tiny_llama()
    dense_mlp = model.model.layers[1].mlp
    model.model.layers[1].mlp = SwitchFFN.from_dense(dense_mlp, 4, capacity_factor=1.0)
    layer = model.model.layers[1].mlp
    router_before = layer.router.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        lm_loss = model(input_ids=ids, labels=ids).loss
        (lm_loss + pop_router_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(lm_loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert not torch.equal(layer.router.weight, router_before)
    assert not torch.equal(layer.w_in[0], layer.w_in[1])  # the upcycled copies diverged
    stats = layer.stats("train")
    assert stats["forwards"] == 15 and stats["tokens"] == 15 * 64 and sum(stats["load"]) == 15 * 64

    twin = _tiny_llama()
    twin.model.layers[1].mlp = SwitchFFN.from_dense(twin.model.layers[1].mlp, 4, capacity_factor=1.0)
    twin.load_state_dict(model.state_dict())
    model.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert {k for k in model.state_dict() if ".mlp." in k and k.startswith("model.layers.1.")} == {
        f"model.layers.1.mlp.{n}" for n in ("router.weight", "w_in", "w_out")}  # Llama's MLP has no bias
