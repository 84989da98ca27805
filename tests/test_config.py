"""Composition: every recipe and preset composes and validates; typos fail early; run ids are stable."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from effml import identity, runner
from effml.cli.compose import compose_config, presets
from effml.config import GeneratedPreset, Optimizer, TrainerConfig, conf_dir, register_schemas, to_typed
from effml.errors import EffmlError
from effml.registry import COMPRESSORS, DATASETS

register_schemas()


@pytest.mark.parametrize("recipe", sorted(presets("recipe")))
def test_every_recipe_composes_and_plans(recipe):
    cfg = compose_config([f"recipe={recipe}"])
    plan = runner.plan(cfg)
    assert cfg.name == recipe
    assert plan.run_dir.recipe == recipe and plan.run_dir.path.name == "seed_0"


LM_PAIR = ["model=lm_tiny", "data=embedded_english"]


@pytest.mark.parametrize("group", ["model", "data", "compressor", "hardware", "trainer", "logger"])
def test_every_preset_composes(group):
    for option in presets(group):
        if group == "hardware" and option in ("a100", "h100", "h200"):
            cfg = compose_config([f"{group}={option}"])  # composes; planning needs the GPU
            assert to_typed(cfg)["hardware"].accelerator == "gpu"
            continue
        lm = (option.startswith("lm_") or option == "embedded_english"  # a language model needs LM data
              or (group == "compressor" and "classification" not in COMPRESSORS.get(option).target.tasks))
        other = [a for a in LM_PAIR if not a.startswith(f"{group}=")] if lm else []
        plan = runner.plan(compose_config([f"{group}={option}", *other]))
        if isinstance(preset := presets(group)[option], GeneratedPreset):
            assert plan.typed[group] == preset.node()  # the preset is its dataclass's defaults


def test_registered_compressors_and_datasets_are_presets_without_files():
    """A new compressor is one file (plus a recipe): its preset comes from the registry."""
    assert set(presets("compressor")) == set(COMPRESSORS.names())
    assert set(presets("data")) == set(DATASETS.names())
    assert not (conf_dir() / "compressor").exists() and not (conf_dir() / "data").exists()
    text = presets("compressor")["kd"].read_text()  # what `effml list compressors` reads
    assert text.startswith("# Knowledge distillation (Hinton et al. 2015): soft targets at T=4, α=0.9")
    assert "- /schema/compressor/kd@_here_" in text
    cfg = compose_config(["recipe=magnitude_lenet", "+compressor@compose.kd=kd"])
    assert cfg.compose.kd.name == "kd" and cfg.compose.kd.temperature == 4.0


def test_recipe_values_override_defaults():
    cfg = compose_config(["recipe=magnitude_lenet", "compressor.sparsity=0.8"])
    typed = to_typed(cfg)
    assert typed["compressor"].sparsity == 0.8
    assert typed["compressor"].end_fraction == 0.7  # from the recipe
    assert typed["trainer"].max_epochs == 10


# Pinned run ids: if one of these changes, every existing outputs/ directory is orphaned.
PINNED = {
    ("dense_lenet",): "4a048ba0a7",
    ("magnitude_lenet",): "155dac7799",
    ("magnitude_lenet", "compressor.sparsity=0.8"): "33c84cf074",
    # choice fields off their defaults (computed while they were still `str` fields, before Choice enums)
    ("magnitude_lenet", "compressor.scope=global", "compressor.schedule=oneshot", "trainer.optimizer=sgd",
     "trainer.lr_schedule=cosine", "hardware.precision=bf16-mixed", "hardware.matmul_precision=high"): "00a272ad36",
}


@pytest.mark.parametrize("overrides", list(PINNED))
def test_pinned_hashes(overrides):
    recipe, *rest = overrides
    typed = to_typed(compose_config([f"recipe={recipe}", *rest]))
    assert identity.config_hash(typed) == PINNED[overrides]


def test_hash_ignores_paths_loggers_workers_and_seed():
    base = identity.config_hash(runner.plan(compose_config(["recipe=magnitude_lenet"])).typed)
    for override in ["logger=wandb", "data.num_workers=2", "output_root=/tmp/x", "seed=3",
                     "trainer.progress_bar=off", "measure.iters=5", "hardware=auto"]:
        typed = runner.plan(compose_config(["recipe=magnitude_lenet", override])).typed
        assert identity.config_hash(typed) == base, override


def test_hash_changes_with_results_relevant_values():
    base = identity.config_hash(to_typed(compose_config(["recipe=magnitude_lenet"])))
    for override in ["compressor.scope=global", "trainer.lr=0.01", "data.batch_size=32", "model.hidden=[100]",
                     "trainer.fused_optimizer=true", "hardware.compile_mode=reduce-overhead"]:
        assert identity.config_hash(to_typed(compose_config(["recipe=magnitude_lenet", override]))) != base


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_fused_optimizer_takes_the_plain_ones_step(optimizer):
    """``trainer.fused_optimizer`` (issue 25: fewer launches per step) is torch's ``fused=True``: the
    same update up to the last bits, so hashed, not a different optimizer."""
    from torch import nn

    from effml.task import ClassificationTask

    torch.manual_seed(0)
    start, x, y = nn.Linear(16, 4), torch.randn(32, 16), torch.randint(0, 4, (32,))
    weights = []
    for fused in (False, True):
        model = nn.Linear(16, 4)
        model.load_state_dict(start.state_dict())
        opt = ClassificationTask(model, TrainerConfig(optimizer=optimizer, lr=0.01, weight_decay=0.01,
                                                      fused_optimizer=fused)).configure_optimizers()
        assert bool(opt.defaults["fused"]) is fused
        for _ in range(3):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        weights.append(model.weight.detach())
    assert not torch.equal(weights[0], start.weight) and torch.allclose(weights[0], weights[1], atol=1e-6)


def test_new_field_with_default_renames_nothing():
    typed = to_typed(compose_config(["recipe=magnitude_lenet"]))
    cls = type(typed["compressor"])
    extended = dataclasses.make_dataclass("Extended", [("new_knob", int, dataclasses.field(default=7))], bases=(cls,))
    typed_ext = {**typed, "compressor": extended(**dataclasses.asdict(typed["compressor"]))}
    assert identity.config_hash(typed_ext) == identity.config_hash(typed)


@pytest.mark.parametrize(
    "override, message",
    [
        ("compressor.sparsty=0.5", "sparsty"),
        ("trainer.max_epochs=abc", "trainer.max_epochs"),
        ("model.hidden=abc", "model.hidden"),
        ("recipe=no_such_recipe", "unknown recipe 'no_such_recipe'"),
        ("model=no_such_model", "unknown model 'no_such_model'"),
    ],
)
def test_typos_fail_at_composition_with_the_field_named(override, message):
    from effml.errors import EffmlError

    with pytest.raises(EffmlError, match=message) as info:
        compose_config(["recipe=magnitude_lenet", override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.optimizer=adamx"], "trainer.optimizer must be one of adam, adamw, sgd; got 'adamx'"),
        (["hardware.kernels=[int8_dynamic,int3]"], "hardware.kernels must be one of fp8_rowwise, fp8_dynamic, "
         "int8_dynamic, int8_weight_only, int4_weight_only, sparse_2to4, sparse_2to4_cutlass; got 'int3'"),
        (["compressor.scope=both"], "compressor.scope must be one of layerwise, global; got 'both'"),
        (["hardware.compile_mode=fast"], "hardware.compile_mode must be one of default, reduce-overhead, "
         "max-autotune, max-autotune-no-cudagraphs; got 'fast'"),
        (["+compressor@compose.q=ptq", "compose.q.kernel=int2"],
         "compose.q.kernel must be one of int8_dynamic, int8_weight_only, int4_weight_only, fp8_rowwise, "
         "fp8_dynamic, none; got 'int2'"),
    ],
)
def test_a_choice_outside_its_set_fails_at_composition(overrides, message):
    with pytest.raises(EffmlError) as info:
        compose_config(["recipe=magnitude_lenet", *overrides])  # composition alone, before any __post_init__
    assert str(info.value) == message


def test_choices_are_plain_strings_in_the_typed_config(tmp_path):
    """A checkpoint may hold a config value: it must load with weights_only=True, as plain data."""
    typed = to_typed(compose_config(["recipe=magnitude_lenet", "trainer.optimizer=sgd", "hardware.precision=32"]))
    values = [typed["trainer"].optimizer, typed["compressor"].scope, typed["hardware"].precision,
              *typed["hardware"].sdpa_backends, *typed["hardware"].kernels]
    assert values[:3] == ["sgd", "layerwise", "32"] and all(type(v) is str for v in values)  # 32: typed as a number
    torch.save(values, tmp_path / "values.pt")
    assert torch.load(tmp_path / "values.pt", weights_only=True) == values
    assert type(TrainerConfig(optimizer=Optimizer.sgd).optimizer) is str
    with pytest.raises(EffmlError, match="^trainer.lr_schedule must be one of constant, cosine, linear; got 'step'$"):
        TrainerConfig(lr_schedule="step")  # built in code: the same check
    code = "compose.x.scope must be one of layerwise, global; got 'both'"
    with pytest.raises(EffmlError, match=f"^{code}$"):  # a compose entry given as a plain mapping
        to_typed(compose_config(["recipe=magnitude_lenet", "+compose.x={name: magnitude, scope: both}"]))


def test_config_and_hardware_presets_read_without_hydra_or_omegaconf():
    """Benchmarks on bare GPU nodes read effml's presets through effml.kernels.hardware.preset."""
    code = ("import sys\n"
            "for name in ('hydra', 'omegaconf'):\n"
            "    sys.modules[name] = None\n"
            "from effml.kernels.hardware import preset\n"
            "h = preset('h100')\n"
            "print(h.channel_multiple, h.precision, ','.join(h.sdpa_backends))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["64", "bf16-mixed", "cudnn,flash,efficient,math"]


def test_slurm_and_joblib_launchers_compose():
    slurm = compose_config(["hydra/launcher=slurm"])
    assert "submitit" in slurm.hydra.launcher._target_ and slurm.hydra.launcher.gpus_per_node == 1
    local = compose_config(["hydra/launcher=local"])
    assert "joblib" in local.hydra.launcher._target_ and local.hydra.launcher.n_jobs == 2
