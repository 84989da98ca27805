"""The switch_moe compressor: which FFNs it swaps, upcycling a dense run, its report and export, bad
input in one line, and an exact resume after SIGKILL. The layer itself: tests/test_switch_layer.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_resume import straight_and_killed
from torch import nn

from conftest import TINY, metrics_of, one_line_error, smoke_args
from effml.compressors.base import RunContext
from effml.compressors.switch_moe import SwitchMoE, SwitchMoEConfig, expert_blocks, swap_in_experts
from effml.data import DataInfo
from effml.errors import EffmlError
from effml.models.causal_lm import CausalLM, CausalLMConfig
from effml.models.switch import SwitchFFN
from effml.paths import RunDir
from effml.teachers import TrainedWeightsConfig

INFO = DataInfo(num_classes=300, modality="text", task="lm")
SMALL = CausalLMConfig(hidden=32, layers=4, heads=2, ffn=64)


def test_every_other_ffn_becomes_a_switch_layer_as_in_the_paper():
    assert expert_blocks(12, 2) == [1, 3, 5, 7, 9, 11]
    assert expert_blocks(4, 1) == [0, 1, 2, 3] and expert_blocks(4, 4) == [3]
    model = CausalLM.from_config(SMALL, INFO)
    assert swap_in_experts(model, SwitchMoEConfig(num_experts=4), upcycle=False) == [1, 3]
    kinds = [type(block.mlp).__name__ for block in model.blocks()]
    assert kinds == ["LlamaMLP", "SwitchFFN", "LlamaMLP", "SwitchFFN"]


def test_a_model_without_ffn_blocks_is_one_line():
    with pytest.raises(EffmlError, match="switch_moe needs a transformer with FFN blocks"):
        swap_in_experts(nn.Linear(3, 3), SwitchMoEConfig(), upcycle=False)
    with pytest.raises(EffmlError, match=r"expert_interval must be in \[1, 4\]"):
        swap_in_experts(CausalLM.from_config(SMALL, INFO), SwitchMoEConfig(expert_interval=5), upcycle=False)


def test_upcycling_copies_each_trained_ffn_into_every_expert_and_keeps_the_rest(tmp_path):
    """Sparse upcycling (Komatsuzaki et al. 2023): the dense run's weights everywhere, its FFN in every
    expert of the block that now has experts; the router is new."""
    torch.manual_seed(1)
    dense = CausalLM.from_config(SMALL, INFO)
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    torch.manual_seed(2)
    model = CausalLM.from_config(SMALL, INFO)
    compressor = SwitchMoE(SwitchMoEConfig(num_experts=3, init_from=TrainedWeightsConfig(source="checkpoint", path=str(tmp_path / "dense.pt"))))
    compressor.attach(model)
    from effml.config import HardwareConfig

    hardware = HardwareConfig(selection="off")  # the dispatch stays auto: no measurement here
    ctx = RunContext(name="t", seed=0, run_dir=RunDir(tmp_path / "run"), output_root=tmp_path, hardware=hardware,
                     model=SMALL, data=None, trainer=None, measure=None, sections={})

    class Data:
        info = INFO

    compressor.prepare(ctx, Data())
    layer = model.blocks()[1].mlp
    mlp = dense.blocks()[1].mlp
    gate_up = torch.cat([mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()], dim=1)
    for e in range(3):
        assert torch.equal(layer.w_in[e], gate_up) and torch.equal(layer.w_out[e], mlp.down_proj.weight.t())
    assert torch.equal(model.blocks()[0].mlp.up_proj.weight, dense.blocks()[0].mlp.up_proj.weight)
    assert torch.equal(model.lm.model.embed_tokens.weight, dense.lm.model.embed_tokens.weight)
    assert compressor.report()["upcycled_from"] == str(tmp_path / "dense.pt")


@pytest.mark.e2e
def test_a_switch_run_reports_routing_plots_the_load_and_exports_its_experts(effml, tmp_path):
    code, out, err = effml("train", *TINY, *smoke_args("lm", ["switch_moe"]))
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    report = m["compressors"]["switch_moe"]
    assert report["moe_layers"] == 1 and report["num_experts"] == 4  # 2 blocks: block 1
    assert 0 <= report["dropped_fraction_train"] <= 1 and 0 <= report["dropped_fraction_eval"] <= 1
    assert report["aux_loss"] >= 1.0 - 1e-6  # N · Σ f_i P_i is 1 at perfect balance, more otherwise
    assert 0 < report["router_entropy"] <= report["router_entropy_max"] == pytest.approx(1.3863, rel=1e-3)
    decision = report["dispatch_decision"]  # dispatch=auto: measured, and the layers trained with it
    assert decision["kernel"] == report["dispatch"] == min(decision["timings_ms"], key=decision["timings_ms"].get)
    load = report["layers"]["lm.model.layers.1.mlp"]["train"]["load_fraction"]
    assert len(load) == 4 and sum(load) == pytest.approx(1.0)
    run_dir = tmp_path / m["run_dir"]
    assert (run_dir / "moe_load.png").stat().st_size > 1000
    exported = CausalLM.from_config(CausalLMConfig(pretrained=str(run_dir / "model")), DataInfo(257, "text", task="lm"))
    assert isinstance(exported.blocks()[1].mlp, SwitchFFN)
    trained = CausalLM.from_config(CausalLMConfig(hidden=32, layers=2, heads=2, ffn=64), DataInfo(257, "text", task="lm"))
    swap_in_experts(trained, SwitchMoEConfig(num_experts=4, dispatch=report["dispatch"]), upcycle=False)
    trained.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    ids = torch.randint(257, (2, 16))
    assert torch.equal(exported.eval()(ids), trained.eval()(ids))


@pytest.mark.parametrize("override, message", [
    ("compressor.num_experts=1", "compressor.num_experts must be >= 2"),
    ("compressor.top_k=5", "compressor.top_k must be in [1, num_experts=4]"),
    ("compressor.capacity_factor=0", "compressor.capacity_factor must be > 0"),
    ("compressor.eval_capacity_factor=-1", "compressor.eval_capacity_factor must be > 0"),
    ("compressor.expert_interval=3", "compressor.expert_interval must be in [1, 2]"),
    ("compressor.router_dtype=float16", "compressor.router_dtype must be one of float32, bfloat16"),
])
def test_bad_settings_are_one_line_and_write_nothing(effml, tmp_path, override, message):
    code, _, err = effml("train", *TINY, *smoke_args("lm", ["switch_moe"]), override)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()


def test_switch_moe_on_a_classification_run_is_one_line(effml, tmp_path):
    code, _, err = effml("train", *TINY, "data=digits", "compressor=switch_moe")
    one_line_error(code, err, "compressor switch_moe works on language-modelling runs, not on classification")
    assert not (tmp_path / "outputs").exists()


RESUME = ["train", "recipe=switch_lm", "model.hidden=32", "model.layers=2", "model.heads=2", "model.ffn=64",
          "data.tokenizer=bytes", "data.seq_len=32", "data.train_subset=320", "data.batch_size=16",
          "trainer.max_epochs=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
          "trainer.progress_bar=off", "measure.enabled=false", "compressor.num_experts=4",
          "compressor.expert_interval=1"]


@pytest.mark.slow
def test_kill_mid_stage_then_rerun_matches_uninterrupted(tmp_path):
    """Weights, router statistics and the report after SIGKILL and a rerun equal an uninterrupted run's."""
    from test_resume import final_state

    straight, killed = straight_and_killed(tmp_path, RESUME)
    model_a, metrics_a = final_state(straight)
    model_b, metrics_b = final_state(killed)
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert metrics_a["compressors"]["switch_moe"] == metrics_b["compressors"]["switch_moe"]
    assert metrics_a["test_ppl"] == metrics_b["test_ppl"]
    assert Path(next(killed.rglob("moe_load.png"))).exists()


@pytest.mark.slow  # two runs; the upcycling itself is checked in seconds above
def test_upcycling_a_finished_dense_run_from_the_command_line(effml, tmp_path):
    """init_from names the dense run as teachers are named; the Switch run starts from its weights."""
    code, _, err = effml("train", *TINY, *smoke_args("lm", ["none"]))
    assert code == 0, err
    dense_dir = tmp_path / metrics_of(tmp_path / "outputs")["run_dir"]
    code, _, err = effml("train", *TINY, *smoke_args("lm", ["switch_moe"]), "compressor.init_from.source=run",
                         f"compressor.init_from.path={dense_dir}", "output_root=upcycled")
    assert code == 0, err
    report = metrics_of(tmp_path / "upcycled")["compressors"]["switch_moe"]
    assert report["upcycled_from"] == str(dense_dir)


def test_the_dispatch_is_the_faster_one_measured_where_the_device_offers_two(tmp_path, monkeypatch):
    from effml.config import HardwareConfig
    from effml.kernels.select import measured_switch_dispatch

    monkeypatch.delenv("EFFML_KERNEL_CACHE", raising=False)  # this test's own cache file
    hardware = HardwareConfig(kernel_cache=str(tmp_path / "kernels.json"), precision="32-true")
    aligned = measured_switch_dispatch(SwitchFFN(32, 64, 4), 256, hardware)
    assert set(aligned.timings_ms) == {"grouped", "bmm"} and all(ms > 0 for ms in aligned.timings_ms.values())
    assert aligned.kernel == min(aligned.timings_ms, key=aligned.timings_ms.get)
    again = measured_switch_dispatch(SwitchFFN(32, 64, 4), 256, hardware)  # the cache: measured once
    assert again.timings_ms == aligned.timings_ms
    unaligned = measured_switch_dispatch(SwitchFFN(32, 6, 4), 256, hardware)  # 6 fp32 = 24 bytes: no grouped GEMM
    assert unaligned.kernel == "bmm" and unaligned.timings_ms == {}
