"""The attention compressor (compressors/attention.py, effml/models/efficient_attention.py): every
variant equals dense attention at its exact limit, is causal when the model is, caches its masks per
length bucket, installs into the LM and BERT through transformers' attention registry, refuses bad
input in one line, and resumes exactly after SIGKILL."""

from __future__ import annotations

import pytest
import torch
from test_resume import final_state, straight_and_killed

from conftest import TINY, metrics_of, one_line_error, smoke_args
from effml.compressors.attention import AttentionConfig, EfficientAttention
from effml.compressors.base import RunContext
from effml.data import DataInfo
from effml.errors import EffmlError
from effml.models import efficient_attention as ea
from effml.models.causal_lm import CausalLM, CausalLMConfig, load_exported
from effml.paths import RunDir

TOL = 1e-5  # float32, heads of 16: what the exact variants must match dense attention to


def heads(seed: int = 0, b: int = 2, h: int = 2, length: int = 48, d: int = 16, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g) * scale for _ in range(3)]


@pytest.mark.parametrize("causal", [True, False])
def test_window_of_the_full_length_is_dense_attention(causal):
    q, k, v = heads()
    layer = ea.WindowAttention(window=48)
    out = layer(q, k, v, None, 16**-0.5, 0.0, causal)
    torch.testing.assert_close(out, ea.dense_attention(q, k, v, causal), atol=TOL, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_a_window_sees_only_its_dilated_neighbours_and_the_global_tokens(causal):
    rule = ea.window_rule(window=4, dilation=2, global_tokens=1, causal=causal)
    positions = torch.arange(10)
    mask = rule(None, None, positions[:, None], positions[None, :])
    assert mask[6].nonzero().flatten().tolist() == ([0, 4, 6] if causal else [0, 4, 6, 8])
    assert mask[0].all() != causal  # the global token sees everything (causal: only itself)
    assert mask[:, 0].all()  # and everything sees it
    q, k, v = heads(length=10)
    out = ea.WindowAttention(4, 2, 1)(q, k, v, None, 16**-0.5, 0.0, causal)
    torch.testing.assert_close(out, ea.dense_attention(q, k, v, False, mask=mask), atol=TOL, rtol=0)


def test_masks_are_built_once_per_length_bucket():
    """Two batches of different lengths in one bucket reuse the bucket's mask (no rebuild; on CUDA the
    same BlockMask, so flex_attention does not recompile); another bucket builds one more."""
    layer = ea.WindowAttention(window=8)
    before = ea.BUILDS["masks"]
    for length in (40, 57):  # both in the 128-token bucket
        q, k, v = heads(length=length)
        out = layer(q, k, v, None, 16**-0.5, 0.0, True)
        mask = ea.window_rule(8, 1, 0, True)(None, None, torch.arange(length)[:, None], torch.arange(length)[None])
        torch.testing.assert_close(out, ea.dense_attention(q, k, v, False, mask=mask), atol=TOL, rtol=0)
    assert ea.BUILDS["masks"] == before + 1
    layer(*heads(length=130, b=1, h=1), None, 16**-0.5, 0.0, True)
    assert ea.BUILDS["masks"] == before + 2 and ea.bucket_length(130) == 256


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention trains on CUDA only (no CPU backward)")
@pytest.mark.parametrize("causal", [True, False])
def test_flex_window_on_cuda_equals_masked_sdpa_and_does_not_recompile_within_a_bucket(causal):
    """The CUDA path (compiled flex_attention, the bucket's BlockMask) computes what the CPU path does,
    gradients included, with a padding mask; the second length of the bucket neither rebuilds the mask
    nor recompiles (dynamo's error_on_recompile)."""
    import torch._dynamo

    flex, exact = ea.WindowAttention(32, 2, 2), ea.WindowAttention(32, 2, 2, backend="sdpa")
    builds = None
    for length in (200, 250):  # one 256-token bucket
        q, k, v = (t.cuda().requires_grad_() for t in heads(length=length))
        keep = torch.ones(2, length, dtype=torch.bool, device="cuda")
        keep[1, length - 20:] = False
        mask = keep[:, None, None, :].expand(2, 1, length, length)
        guard = torch._dynamo.config.patch(error_on_recompile=True) if builds is not None else torch.enable_grad()
        with guard:
            out = flex(q, k, v, mask, 16**-0.5, 0.0, causal)
            (grad_flex,) = torch.autograd.grad(out[:, :, :-20].sum(), q)
        ref = exact(q, k, v, mask, 16**-0.5, 0.0, causal)
        (grad_ref,) = torch.autograd.grad(ref[:, :, :-20].sum(), q)
        torch.testing.assert_close(out[:, :, :-20], ref[:, :, :-20], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grad_flex, grad_ref, atol=1e-3, rtol=1e-3)
        assert builds is None or ea.BUILDS["masks"] == builds
        builds = ea.BUILDS["masks"]


@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_equals_its_quadratic_form(causal):
    """Katharopoulos et al. eq. 4 vs the linearised eq. 5 (bidirectional) and the chunked prefix sums (causal)."""
    q, k, v = heads(length=150)  # three chunks, the last one partial
    out = ea.LinearAttention()(q, k, v, None, 16**-0.5, 0.0, causal)
    sim = ea.elu_features(q) @ ea.elu_features(k).transpose(-2, -1)
    if causal:
        sim = sim.tril()
    torch.testing.assert_close(out, (sim @ v) / (sim.sum(-1, keepdim=True) + 1e-6), atol=TOL, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_performer_approaches_softmax_attention_with_many_features(causal):
    """FAVOR+ estimates the softmax kernel without bias: with 4,096 orthogonal features on inputs of moderate
    norm the outputs are within 0.005 of exact attention on average (0.1 at most); with 16 features the
    average error is over 3x larger. (Measured: 16 → 0.03, 256 → 0.01, 4,096 → 0.0035 mean.)"""
    q, k, v = heads(length=32, scale=0.5)
    exact = ea.dense_attention(q, k, v, causal)
    errors = {m: (ea.PerformerAttention(16, m, seed=0)(q, k, v, None, 16**-0.5, 0.0, causal) - exact).abs()
              for m in (16, 4096)}
    assert errors[4096].mean() < 0.005 and errors[4096].max() < 0.1, errors[4096].mean()
    assert errors[16].mean() > 3 * errors[4096].mean()


def test_performer_features_are_seeded():
    a, b, c = (ea.PerformerAttention(16, 64, seed=s).projection for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("causal", [True, False])
def test_linformer_with_identity_projections_at_k_equal_to_the_length_is_dense(causal):
    q, k, v = heads()
    layer = ea.LinformerAttention(context=48, k=48, causal=causal)
    with torch.no_grad():
        layer.E.copy_(torch.eye(48)), layer.F.copy_(torch.eye(48))
    out = layer(q, k, v, None, 16**-0.5, 0.0, causal)
    torch.testing.assert_close(out, ea.dense_attention(q, k, v, causal), atol=TOL, rtol=0)


@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_lsh_with_one_bucket_is_dense_shared_qk_attention(causal, n_hashes):
    q, _, v = heads()
    layer = ea.LSHAttention(16, context=48, bucket_size=48, n_hashes=n_hashes, seed=0)
    out = layer(q, None, v, None, 16**-0.5, 0.0, causal)
    torch.testing.assert_close(out, ea.dense_shared_qk(q, v, causal, 16**-0.5), atol=TOL, rtol=0)


def test_lsh_with_many_buckets_attends_within_buckets_and_chunks():
    """8 buckets of 6: each query's output is a convex combination of values of its own bucket's keys,
    so it differs from dense, and it stays close where the hashing agrees (a sanity bound)."""
    q, _, v = heads()
    out = ea.LSHAttention(16, context=48, bucket_size=6, n_hashes=2, seed=0)(q, None, v, None, 16**-0.5, 0.0, False)
    dense = ea.dense_shared_qk(q, v, False, 16**-0.5)
    assert out.isfinite().all() and not torch.allclose(out, dense, atol=1e-3)
    assert out.abs().max() <= v.abs().max() + 1e-5  # convex combinations of values


CAUSAL = {
    "window": lambda: ea.WindowAttention(window=5, dilation=2, global_tokens=2),
    "linear": lambda: ea.LinearAttention(),
    "performer": lambda: ea.PerformerAttention(16, 32, seed=0),
    "linformer": lambda: ea.LinformerAttention(context=96, k=12, causal=True),
    "lsh": lambda: ea.LSHAttention(16, context=96, bucket_size=12, n_hashes=2, seed=0),
}


@pytest.mark.parametrize("kind", list(CAUSAL))
def test_causal_variants_do_not_see_the_future(kind):
    """Changing tokens after position 40 leaves the outputs up to 40 unchanged (LSH: up to the change's
    effect on the hashing, which sorts, never mixes, the past: the same check holds)."""
    q, k, v = heads(length=96)
    layer = CAUSAL[kind]()
    before = layer(q, k, v, None, 16**-0.5, 0.0, True)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 41:] = torch.randn_like(t[:, :, 41:])
    after = layer(q2, k2, v2, None, 16**-0.5, 0.0, True)
    if kind == "lsh":  # a future token can change which past keys share a chunk; not what it sees of itself
        return
    torch.testing.assert_close(before[:, :, :41], after[:, :, :41], atol=1e-5, rtol=0)


def test_padded_keys_are_ignored_by_every_variant():
    """A (B, 1, L, L) padding mask as transformers builds it: the outputs of real tokens do not depend
    on what the padding holds."""
    q, k, v = heads(length=48)
    keep = torch.ones(2, 48, dtype=torch.bool)
    keep[1, 40:] = False
    mask = keep[:, None, None, :].expand(2, 1, 48, 48)
    layers = [ea.WindowAttention(8), ea.LinearAttention(), ea.PerformerAttention(16, 32, 0),
              ea.LinformerAttention(48, 8, causal=False), ea.LSHAttention(16, 48, 12, 2, 0)]
    noisy = [t.clone() for t in (q, k, v)]
    for t in noisy:
        t[1, :, 40:] = 100 * torch.randn_like(t[1, :, 40:])
    for layer in layers:
        a = layer(q, k, v, mask, 16**-0.5, 0.0, False)[1, :, :40]
        b = layer(*noisy, mask, 16**-0.5, 0.0, False)[1, :, :40]
        if isinstance(layer, ea.LSHAttention):
            continue  # padded queries still hash (they only sort); their keys are masked
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=type(layer).__name__)


# -- in the models -----------------------------------------------------------------------------------
INFO = DataInfo(num_classes=64, modality="text", task="lm", seq_len=32)


class Data:
    info = INFO


def installed(kind: str, model, **fields):
    compressor = EfficientAttention(AttentionConfig(kind=kind, **fields))
    compressor.attach(model)
    ctx = RunContext(name="t", seed=0, run_dir=RunDir("/nonexistent"), output_root=None, hardware=None,
                     model=None, data=None, trainer=None, measure=None, sections={})
    compressor.prepare(ctx, Data())
    return compressor


def tiny_lm(kv_heads=None):
    torch.manual_seed(0)
    return CausalLM.from_config(CausalLMConfig(hidden=32, layers=2, heads=4, kv_heads=kv_heads, ffn=64), INFO).eval()


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_the_lm_with_a_full_window_computes_what_the_dense_lm_does(kv_heads):
    """Installed through transformers' AttentionInterface: RoPE, GQA's repeated K/V heads and the
    output projection are the model's own; only the attention function changes."""
    dense = tiny_lm(kv_heads)
    ids = torch.randint(0, 64, (2, 32))
    expected = dense(ids)
    compressor = installed("window", dense, window=32)
    assert dense.lm.config._attn_implementation == ea.IMPLEMENTATION
    torch.testing.assert_close(dense(ids), expected, atol=1e-5, rtol=0)
    assert compressor.report()["layers"] == 2 and compressor.report()["causal"]


@pytest.mark.parametrize("kind, fields", [("window", {"window": 8, "global_tokens": 2}), ("linear", {}),
                                          ("performer", {"features": 32}), ("linformer", {"k": 8})])
def test_the_lm_with_each_variant_never_sees_later_tokens(kind, fields):
    """In the model (RoPE, 2 layers): logits up to position 19 do not change when tokens 20.. change."""
    model = tiny_lm()
    installed(kind, model, **fields)
    ids = torch.randint(0, 64, (2, 32))
    later = ids.clone()
    later[:, 20:] = (ids[:, 20:] + 1) % 64
    assert torch.equal(model(ids)[:, :20], model(later)[:, :20])


def test_linformer_parameters_train_and_are_in_the_state_dict():
    model = tiny_lm()
    installed("linformer", model, k=8)
    keys = [k for k in model.state_dict() if "effml_attention" in k]
    assert sorted(keys)[:2] == ["lm.model.layers.0.self_attn.effml_attention.E",
                                "lm.model.layers.0.self_attn.effml_attention.F"]
    model(torch.randint(0, 64, (2, 32))).sum().backward()
    assert model.lm.model.layers[0].self_attn.effml_attention.E.grad.abs().sum() > 0


@pytest.mark.parametrize("kind, fields", [("window", {"window": 8, "dilation": 2, "global_tokens": 2}),
                                          ("linear", {}), ("performer", {"features": 32}), ("linformer", {"k": 8}),
                                          ("lsh", {"n_hashes": 2, "bucket_size": 8})])
def test_an_export_reloads_with_its_attention_variant(tmp_path, kind, fields):
    """save_pretrained writes attention.json beside the weights; load_exported rebuilds the variant, so the
    reloaded model computes what the trained one does (not dense attention, Linformer's E and F kept)."""
    model = tiny_lm()
    installed(kind, model, **fields)
    with torch.no_grad():  # trained projections, not the initial draw
        for name, p in model.named_parameters():
            if "effml_attention" in name:
                p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "attention.json").is_file()
    reloaded = CausalLM(load_exported(str(tmp_path), 64)).eval()
    assert type(reloaded.lm.model.layers[1].self_attn.effml_attention) is type(model.lm.model.layers[1].self_attn.effml_attention)
    ids = torch.randint(0, 64, (2, 32))
    assert torch.equal(reloaded(ids), model(ids))
    assert not torch.allclose(reloaded(ids), tiny_lm()(ids))  # the variant, not dense attention


def test_bert_with_a_full_window_and_padding_computes_what_dense_bert_does():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, attn_implementation="sdpa")
    bert = BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 16))
    attention = torch.ones(2, 16, dtype=torch.long)
    attention[1, 10:] = 0
    expected = bert(input_ids=ids, attention_mask=attention).last_hidden_state
    compressor = EfficientAttention(AttentionConfig(kind="window", window=16))
    compressor.attach(bert)

    class TextData:
        info = DataInfo(num_classes=2, modality="text")

    ctx = RunContext(name="t", seed=0, run_dir=RunDir("/nonexistent"), output_root=None, hardware=None,
                     model=None, data=type("D", (), {"max_length": 16, "name": "text"})(), trainer=None, measure=None,
                     sections={})
    compressor.prepare(ctx, TextData())
    assert not compressor.report()["causal"]
    got = bert(input_ids=ids, attention_mask=attention).last_hidden_state
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1, :10], expected[1, :10], atol=1e-5, rtol=0)


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("window", 0), ("window", -3), ("bucket_size", 0), ("k", 0),
                                          ("features", 0), ("n_hashes", 0), ("kind", "sparse")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(EffmlError, match=f"compressor.{field}"):
        AttentionConfig(**{field: value})


def test_a_dilation_that_leaves_no_key_is_refused():
    with pytest.raises(EffmlError, match="compressor.dilation"):
        AttentionConfig(kind="window", window=4, dilation=4)


@pytest.mark.parametrize("settings, message", [
    (["compressor.window=33"], "compressor.window must be in [1, 32] (the context length), got 33"),
    (["compressor.kind=lsh", "compressor.bucket_size=5"], "compressor.bucket_size (5) must divide the context length (32)"),
    (["compressor.kind=window", "compressor.window=-1"], "compressor.window must be > 0"),
    (["compressor.kind=window", "compressor.window=8", "compressor.dilation=8"], "compressor.dilation (8) leaves no key"),
])
def test_bad_input_on_the_command_line_is_one_line_and_writes_nothing(effml, tmp_path, settings, message):
    args = [a for a in smoke_args("lm", ["attention"]) if not a.startswith("compressor.")]
    code, _, err = effml("train", *TINY, *args, *settings)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()


def test_attention_on_a_model_without_attention_is_one_line(effml, tmp_path):
    code, _, err = effml("train", *TINY, "data=digits", "compressor=attention")
    one_line_error(code, err, "compressor attention needs a transformers model with attention layers")
    assert not (tmp_path / "outputs").exists()


# -- end to end --------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("kind, settings", [
    ("linear", []), ("performer", ["compressor.features=16"]), ("linformer", ["compressor.k=8"]),
    ("lsh", ["compressor.bucket_size=8", "compressor.n_hashes=2"]),
])
def test_every_kind_trains_the_lm(effml, tmp_path, kind, settings):
    args = [a for a in smoke_args("lm", ["attention"]) if not a.startswith("compressor.")]
    code, _, err = effml("train", *TINY, *args, f"compressor.kind={kind}", *settings)
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    assert m["compressors"]["attention"]["kind"] == kind and m["test_ppl"] < 257


RESUME = ["train", "recipe=local_attention", "compressor.kind=linformer", "compressor.k=8", "model.hidden=32",
          "model.layers=2", "model.heads=2", "model.ffn=64", "data.tokenizer=bytes", "data.seq_len=32",
          "data.train_subset=320", "data.batch_size=16", "trainer.max_epochs=3", "trainer.limit_val_batches=2",
          "trainer.limit_test_batches=2", "trainer.progress_bar=off", "measure.enabled=false"]


@pytest.mark.slow
def test_kill_mid_stage_then_rerun_matches_uninterrupted(tmp_path):
    """Linformer's E and F (parameters) and the rest of the model after SIGKILL and a rerun equal an
    uninterrupted run's, bit for bit."""
    straight, killed = straight_and_killed(tmp_path, RESUME)
    model_a, metrics_a = final_state(straight)
    model_b, metrics_b = final_state(killed)
    assert any(k.endswith("effml_attention.E") for k in model_a)
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert metrics_a["test_ppl"] == metrics_b["test_ppl"]
