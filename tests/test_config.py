"""Composition: every recipe and preset composes and validates; typos fail early; run ids are stable."""

from __future__ import annotations

import dataclasses

import pytest

from effml import identity, runner
from effml.cli.compose import compose_config, presets
from effml.config import register_schemas, to_typed

register_schemas()


@pytest.mark.parametrize("recipe", sorted(presets("recipe")))
def test_every_recipe_composes_and_plans(recipe):
    cfg = compose_config([f"recipe={recipe}"])
    plan = runner.plan(cfg)
    assert cfg.name == recipe
    assert plan.run_dir.parts[-3] == recipe and plan.run_dir.name == "seed_0"


@pytest.mark.parametrize("group", ["model", "data", "compressor", "hardware", "trainer", "logger"])
def test_every_preset_composes(group):
    for option in presets(group):
        if group == "hardware" and option in ("a100", "h100", "h200"):
            cfg = compose_config([f"{group}={option}"])  # composes; planning needs the GPU
            assert to_typed(cfg)["hardware"].accelerator == "gpu"
            continue
        runner.plan(compose_config([f"{group}={option}"]))


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
    for override in ["compressor.scope=global", "trainer.lr=0.01", "data.batch_size=32", "model.hidden=[100]"]:
        assert identity.config_hash(to_typed(compose_config(["recipe=magnitude_lenet", override]))) != base


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


def test_slurm_and_joblib_launchers_compose():
    slurm = compose_config(["hydra/launcher=slurm"])
    assert "submitit" in slurm.hydra.launcher._target_ and slurm.hydra.launcher.gpus_per_node == 1
    local = compose_config(["hydra/launcher=local"])
    assert "joblib" in local.hydra.launcher._target_ and local.hydra.launcher.n_jobs == 2
