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
    plans = []
    if not HYDRA_INFO_FLAGS.intersection(args):
        plans = validate(args)
        start_processes(args, plans)
    sys.argv = ["effml train", *args]
    sweep.start(sorted({str(p.cfg.output_root) for p in plans}))
    try:
        hydra_app()
    except SystemExit as e:  # a launcher's failed job fails the sweep in Hydra: still list every job
        if not sweep.launched_jobs():
            raise
        return max(sweep.finish(), e.code if isinstance(e.code, int) else 1)
    return sweep.finish()  # 0 for a single run, which exits from its job when it fails


def validate(args: list[str]) -> list:
    """Compose and type-check every job of the command; raise EffmlError on the first problem."""
    from effml import runner
    from effml.cli.compose import compose_config, expand_jobs

    overrides = [a for a in args if a not in MULTIRUN_FLAGS]
    jobs = expand_jobs(overrides, multirun=bool(MULTIRUN_FLAGS.intersection(args)))
    return [runner.plan(compose_config(job)) for job in jobs]


def start_processes(args: list[str], plans: list) -> None:
    """A run of several processes on this node: Lightning's launcher starts the others, each
    rerunning this command line (effml.distributed.start). A sweep's jobs get their processes from
    a cluster launcher (hydra/launcher=slurm: one SLURM task per process), not from here."""
    from effml import distributed

    many = [p for p in plans if distributed.world_size(p.typed["hardware"]) > 1]
    if not many:
        return
    if MULTIRUN_FLAGS.intersection(args):
        if not any(a.startswith("hydra/launcher=") and "slurm" in a for a in args):
            raise EffmlError("a -m sweep runs its jobs in this one process: hardware.devices or num_nodes > 1 "
                             "needs hydra/launcher=slurm (one SLURM task per process), or one run at a time")
        return
    distributed.start(many[0].typed["hardware"], ["train", *args])


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
