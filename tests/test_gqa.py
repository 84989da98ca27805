"""The gqa compressor: mean pooling of K/V heads (by hand), the conversion (exact at groups = heads,
the same model as LlamaConfig's own GQA otherwise), the KV cache shrinking by heads/groups, export and
reload, uptraining from a finished multi-head run (its length), and bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import TINY, metrics_of, one_line_error, smoke_args
from effml.compressors.base import RunContext
from effml.compressors.gqa import (
    GQAConfig,
    GroupedQueryAttention,
    convert,
    kv_cache_bytes,
    pool_heads,
    pool_state,
)
from effml.data import DataInfo
from effml.errors import EffmlError
from effml.models.causal_lm import CausalLM, CausalLMConfig, load_exported
from effml.paths import RunDir
from effml.teachers import TrainedWeightsConfig

INFO = DataInfo(num_classes=300, modality="text", task="lm")
EIGHT = CausalLMConfig(hidden=32, layers=2, heads=8, ffn=64)  # heads of 4
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def model(seed: int = 0, cfg: CausalLMConfig = EIGHT) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM.from_config(cfg, INFO).eval()


def test_mean_pooling_by_hand():
    """4 heads of 2 rows into 2 groups: group 0 averages heads 0 and 1, group 1 heads 2 and 3."""
    weight = torch.arange(4 * 2 * 3, dtype=torch.float).reshape(8, 3)  # head h: rows 2h, 2h+1
    bias = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7])
    pooled, pooled_bias = pool_heads(weight, bias, groups=2, head_dim=2)
    expected = torch.stack([(weight[0] + weight[2]) / 2, (weight[1] + weight[3]) / 2,
                            (weight[4] + weight[6]) / 2, (weight[5] + weight[7]) / 2])
    assert torch.equal(pooled, expected)
    assert torch.equal(pooled_bias, torch.tensor([1.0, 2, 5, 6]))
    mqa, _ = pool_heads(weight, None, groups=1, head_dim=2)
    assert torch.equal(mqa, torch.stack([weight[0::2].mean(0), weight[1::2].mean(0)]))


def test_groups_equal_to_heads_is_the_original_model_exactly():
    original, converted = model(), model()
    assert convert(converted, 8) == 8
    with torch.no_grad():
        assert torch.equal(original(IDS), converted(IDS))


def test_pooled_model_is_llamas_own_gqa_with_the_pooled_weights():
    """The converted model computes what LlamaConfig(num_key_value_heads=2) computes with the pooled
    state dict: the conversion is HF's GQA, with query head i reading K/V head i // 4."""
    mha = model()
    state = mha.state_dict()
    convert(mha, 2)
    native = model(1, CausalLMConfig(hidden=32, layers=2, heads=8, ffn=64, kv_heads=2))
    native.load_state_dict(pool_state(state, 2, head_dim=4))
    with torch.no_grad():
        assert torch.allclose(mha(IDS), native(IDS), atol=1e-6)
    assert mha.lm.config.num_key_value_heads == 2 and mha.blocks()[0].self_attn.k_proj.weight.shape == (8, 32)


def test_decode_kv_cache_shrinks_by_heads_over_groups():
    mha = kv_cache_bytes(model(), batch=2, tokens=16)
    assert mha == 2 * 2 * 16 * 8 * 4 * 2 * 4  # layers x (K, V) x tokens x heads x head_dim x batch x fp32
    for groups in (4, 2, 1):
        converted = model()
        convert(converted, groups)
        assert kv_cache_bytes(converted, batch=2, tokens=16) * 8 // groups == mha


def test_export_writes_the_kv_heads_and_reloads_the_same_model(tmp_path):
    converted = model()
    convert(converted, 2)
    converted.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_key_value_heads"] == 2
    reloaded = CausalLM(load_exported(str(tmp_path), 300)).eval()
    with torch.no_grad():
        assert torch.equal(converted(IDS), reloaded(IDS))


def test_groups_that_do_not_divide_the_heads_or_a_model_without_attention_are_one_line():
    with pytest.raises(EffmlError, match=r"compressor.groups \(3\) must divide the model's attention heads \(8\)"):
        convert(model(), 3)
    already = model(0, CausalLMConfig(hidden=32, layers=2, heads=8, ffn=64, kv_heads=2))
    with pytest.raises(EffmlError, match="cannot split them"):
        convert(already, 4)
    with pytest.raises(EffmlError, match="gqa needs a language model with multi-head attention"):
        convert(nn.Linear(3, 3), 1)
    for bad, match in (("groups", 0), ("uptrain_fraction", 0.0), ("uptrain_fraction", 1.5), ("lr_scale", 0)):
        with pytest.raises(EffmlError, match=f"compressor.{bad}"):
            GQAConfig(**{bad: match})


def context(tmp_path: Path, cfg=EIGHT, max_epochs=4, limit=None) -> RunContext:
    trainer = SimpleNamespace(max_epochs=max_epochs, limit_train_batches=limit)
    return RunContext(name="t", seed=0, run_dir=RunDir(tmp_path / "run"), output_root=tmp_path, hardware=None,
                      model=cfg, data=None, trainer=trainer, measure=None, sections={})


class Data:
    info = INFO

    def train_dataloader(self):
        return range(50)  # 50 batches an epoch


def test_uptraining_starts_from_the_pooled_multi_head_run_for_its_fraction_of_the_steps(tmp_path):
    mha = model(3)
    torch.save(mha.state_dict(), tmp_path / "mha.pt")
    compressor = GroupedQueryAttention(GQAConfig(groups=1, init_from=TrainedWeightsConfig(source="checkpoint", path=str(tmp_path / "mha.pt"))))
    student = compressor.attach(model(4))
    compressor.prepare(context(tmp_path), Data())
    convert(mha, 1)  # what uptraining starts from: the trained heads, pooled
    assert all(torch.equal(a, b) for a, b in zip(mha.state_dict().values(), student.state_dict().values(), strict=True))
    # 5% of 4 epochs x 50 batches = 10 steps: one epoch of 10 batches
    assert (compressor.base_steps, compressor.uptrain_epochs, compressor.uptrain_batches) == (200, 1, 10)
    [stage] = compressor.stages()
    assert (stage.key, stage.role, stage.max_epochs) == ("uptrain", "train", 1)
    report = compressor.report()
    assert report["uptrain_steps"] == 10 and report["kv_heads"] == 1 and report["kv_heads_before"] == 8
    assert report["kv_cache_bytes"] * 8 == report["kv_cache_bytes_before"]
    # more steps than an epoch has: whole epochs, as even as they come
    long = GroupedQueryAttention(GQAConfig(groups=2, uptrain_fraction=0.3))
    long.plan_uptraining(context(tmp_path, max_epochs=10, limit=0.5), Data())  # 25 batches an epoch, 75 steps
    assert (long.uptrain_epochs, long.uptrain_batches) == (3, 25)


def test_a_multi_head_run_of_another_shape_is_one_line(tmp_path):
    """A run with 4 K/V heads where the model has 8 (e.g. an already grouped run): pooling 8 heads
    from it would read rows that are not heads."""
    torch.save(model(0, CausalLMConfig(hidden=32, layers=2, heads=8, ffn=64, kv_heads=4)).state_dict(), tmp_path / "four.pt")
    compressor = GroupedQueryAttention(GQAConfig(groups=2, init_from=TrainedWeightsConfig(source="checkpoint", path=str(tmp_path / "four.pt"))))
    compressor.attach(model())
    with pytest.raises(EffmlError, match="K projection rows"):
        compressor.prepare(context(tmp_path), Data())


def test_from_scratch_draws_fresh_kv_and_trains_the_full_run(tmp_path):
    compressor = GroupedQueryAttention(GQAConfig(groups=2))
    student = compressor.attach(model())
    compressor.prepare(context(tmp_path), Data())
    assert [(s.key, s.role) for s in compressor.stages()] == [("train", "plain")]
    std = student.blocks()[0].self_attn.k_proj.weight.std().item()
    assert 0.015 < std < 0.025  # the model's init std (0.02), not the pooled one (0.02 / 2)


def test_cli_bad_groups_is_one_line_and_writes_nothing(effml, tmp_path):
    code, _, err = effml("train", *TINY, *smoke_args("lm", ["gqa"]), "compressor.groups=3")
    one_line_error(code, err, "compressor.groups (3) must divide the model's attention heads (2)")
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.json"))


def test_cli_refuses_a_classifier(effml):
    code, _, err = effml("train", *TINY, *smoke_args("bert", ["gqa"]))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "gqa" in err, err


@pytest.mark.e2e
def test_uptraining_a_finished_multi_head_run_from_the_command_line(effml, tmp_path):
    lm = [*TINY, *smoke_args("lm", ["none"])]
    code, _, err = effml("train", *lm)
    assert code == 0, err
    base_metrics = metrics_of(tmp_path / "outputs")
    base, base_steps = tmp_path / base_metrics["run_dir"], sum(s["steps"] for s in base_metrics["stages"])
    code, _, err = effml("train", *TINY, *smoke_args("lm", ["gqa"]), "compressor.init_from.source=run",
                         f"compressor.init_from.path={base}", "compressor.uptrain_fraction=0.25", "output_root=up")
    assert code == 0, err
    metrics = metrics_of(tmp_path / "up")
    report = metrics["compressors"]["gqa"]
    steps = round(0.25 * base_steps)  # 25% of the base run's 2 epochs x 4 batches
    assert report["uptrained_from"] == str(base) and (report["base_steps"], report["uptrain_steps"]) == (base_steps, steps) == (8, 2)
    record = json.loads(next((tmp_path / "up").rglob("stages/00_uptrain/record.json")).read_text())
    assert record["steps"] == 2 and record["gqa_steps"] == 2
    exported = next((tmp_path / "up").rglob("model/config.json"))
    assert json.loads(exported.read_text())["num_key_value_heads"] == 1


def resume_run(base: Path) -> list[str]:
    """Uptraining a 4-head run to 2 K/V heads for half its 3 x 20 steps: 2 epochs of 15 batches."""
    return ["train", "recipe=gqa_lm", "model.hidden=32", "model.layers=2", "model.heads=4", "model.ffn=64",
            "data.tokenizer=bytes", "data.seq_len=32", "data.train_subset=320", "data.batch_size=16",
            "trainer.max_epochs=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
            "trainer.progress_bar=off", "measure.enabled=false", "compressor.uptrain_fraction=0.5",
            "compressor.init_from.source=checkpoint", f"compressor.init_from.path={base}"]


@pytest.mark.slow
def test_kill_mid_uptraining_then_rerun_matches_uninterrupted(tmp_path):
    """The stage's batch limit holds after a resume from the epoch-1 checkpoint: same steps, same weights."""
    from test_resume import final_state, kill_when, start

    torch.manual_seed(0)
    base = tmp_path / "mha.pt"
    torch.save(CausalLM.from_config(CausalLMConfig(hidden=32, layers=2, heads=4, ffn=64),
                                    DataInfo(num_classes=257, modality="text", task="lm")).state_dict(), base)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    run = resume_run(base)
    out, _ = (process := start(straight, [], run=run)).communicate(timeout=900)
    assert process.returncode == 0, out
    kill_when(start(killed, [], run=run), "outputs/*/*/*/stages/00_uptrain/checkpoints/last.ckpt", killed)
    assert not list(killed.rglob("metrics.json"))
    out, _ = (again := start(killed, [], run=run)).communicate(timeout=900)
    assert again.returncode == 0, out
    model_a, metrics_a = final_state(straight)
    model_b, metrics_b = final_state(killed)
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert [s["steps"] for s in metrics_a["stages"]] == [s["steps"] for s in metrics_b["stages"]] == [30]
    assert metrics_a["test_ppl"] == metrics_b["test_ppl"]
