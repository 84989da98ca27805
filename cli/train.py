"""``effml train``: validate every job first (cli.compose), then hand the command line to Hydra,
so ``-m`` sweeps, launchers, ``--cfg job`` and ``--help`` behave as Hydra users expect. A sweep runs
every job and ends with a table of them and its exit code (cli.sweep)."""

from __future__ import annotations

import sys
from pathlib import Path

from effml.cli import sweep
from effml.errors import EffmlError

HYDRA_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--version",
                    "--shell-completion", "-sc", "--resolve", "--package", "-p"}
MULTIRUN_FLAGS = {"-m", "--multirun"}


def train(args: list[str]) -> int:
    from effml.config import register_schemas

    register_schemas()
    if not HYDRA_INFO_FLAGS.intersection(args):
        validate(args)
    sys.argv = ["effml train", *args]
    sweep.start()
    hydra_app()
    return sweep.finish()  # 0 for a single run, which exits from its job when it fails


def validate(args: list[str]) -> None:
    """Compose and type-check every job of the command; raise EffmlError on the first problem."""
    from effml import runner
    from effml.cli.compose import compose_config, expand_jobs

    overrides = [a for a in args if a not in MULTIRUN_FLAGS]
    jobs = expand_jobs(overrides, multirun=bool(MULTIRUN_FLAGS.intersection(args)))
    for job in jobs:
        runner.plan(compose_config(job))


def hydra_app() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from effml.config import conf_dir

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def job(cfg) -> None:
        from effml import runner

        hydra_cfg = HydraConfig.get()
        try:
            if hydra_cfg.mode == RunMode.MULTIRUN:  # every job runs; only Ctrl-C gets out of it
                sweep.run_job(cfg, group=f"{cfg.name}-{Path(hydra_cfg.sweep.dir).name}")
            else:
                runner.run(cfg)
        except EffmlError as e:  # a single run's error, or Ctrl-C in a sweep: one line, and stop
            print(f"{e.prefix}{e}", file=sys.stderr)
            raise SystemExit(e.exit_code) from None

    job()
