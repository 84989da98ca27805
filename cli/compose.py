"""Compose and validate configs before Hydra runs anything.

Hydra reports a bad override as a multi-line message and exit code 1, and only once a job
starts. effml composes every job of the command first (each point of a ``-m`` grid too) and
turns the first problem into one line and exit code 2, before any output is written.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from effml import choice
from effml.config import (
    GeneratedPreset,
    conf_dir,
    generated_presets,
    recipe_files,
    recipe_problem,
    register_schemas,
)
from effml.errors import EffmlError, one_line

GROUPS = ("model", "data", "compressor", "hardware", "trainer", "logger")


def presets(group: str) -> dict[str, Path | GeneratedPreset]:
    """Option name → its file in conf/<group>/, or the preset made from a registered config
    (``effml.config.generated_presets``, whose ``read_text()`` is the file it stands for); recipes come
    from recipes/ and ``$EFFML_RECIPES``."""
    if group == "recipe":
        return recipe_files()
    files = {p.stem: p for p in (conf_dir() / group).glob("*.yaml")}
    return dict(sorted((generated_presets(group) | files).items()))


def check_choices(overrides: list[str]) -> None:
    """Unknown group options get effml's own message, listing the valid ones."""
    for override in OverridesParser.create().parse_overrides(overrides):
        group = override.key_or_group.lstrip("+~")
        if group not in (*GROUPS, "recipe") or override.is_sweep_override() or override.is_delete():
            continue
        value = override.value()
        options = presets(group)
        if value is not None and value not in options:
            raise EffmlError(f"unknown {group} '{value}'; choose from: {', '.join(options)}")
        if group == "recipe" and value is not None and (problem := recipe_problem(options[value])):
            raise EffmlError(f"recipe {value}: {problem}")


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed config of one job, as Hydra would build it (with the hydra node)."""
    register_schemas()
    check_choices(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="train"):
            return compose("config", overrides=overrides, return_hydra_config=True)
    except EffmlError:
        raise
    except Exception as e:  # Hydra/OmegaConf composition errors: one line, field named
        raise EffmlError(choice.explain(e) or one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()


def expand_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job a command will run (the grid of a -m sweep)."""
    if not multirun:
        return [overrides]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        raise EffmlError(one_line(e)) from None
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]

