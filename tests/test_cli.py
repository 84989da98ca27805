"""The command line as users meet it: runs, listings, Hydra flags, and bad input → one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import TINY, metrics_of, one_line_error

RUN = ["train", "recipe=magnitude_lenet", *TINY]


def test_magnitude_run_reports_measured_numbers(effml, tmp_path):
    code, out, err = effml(*RUN, "compressor.sparsity=0.8")
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    report = m["compressors"]["magnitude"]
    assert abs(report["achieved_sparsity"] - 0.8) < 0.001  # counted from the final weights
    assert 0.5 < m["test_acc"] <= 1.0  # real Fashion-MNIST, far above chance after 2 tiny epochs
    assert m["flops"]["effective"] < 0.35 * m["flops"]["dense"]
    speed = m["speed"]
    assert speed["dense"]["latency_ms"] > 0 and speed["compressed"]["latency_ms"] > 0
    assert speed["compressed"]["peak_mem_bytes"] > 0
    assert m["train_time_s"] > 0 and m["stages"][0]["name"] == "train"
    run_dir = Path(m["run_dir"])
    assert (tmp_path / run_dir / "config.yaml").exists()
    record = json.loads((tmp_path / run_dir / "run.json").read_text())
    assert record["versions"]["torch"] and record["kernels"]["precision"] == "32-true"
    assert (tmp_path / run_dir / "logs" / "csv" / "00_train" / "metrics.csv").exists()
    assert "sparsity" in out and "latency" in out  # the Rich summary


def test_finished_run_is_a_noop_that_says_where(effml, tmp_path):
    assert effml(*RUN)[0] == 0
    metrics = next((tmp_path / "outputs").rglob("metrics.json"))
    before = metrics.stat().st_mtime_ns
    code, out, _ = effml(*RUN)
    assert code == 0
    assert "finished already" in out and str(metrics.relative_to(tmp_path)) in out
    assert metrics.stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "recipe=nope"], "unknown recipe 'nope'; choose from: "),
        (["train", "compressor=nope"], "unknown compressor 'nope'; choose from: "),
        (["train", "model=nope"], "unknown model 'nope'; choose from: "),
        (["train", "recipe=magnitude_lenet", "compressor.sparsity=1.0"], "compressor.sparsity must be in [0, 1)"),
        (["train", "recipe=magnitude_lenet", "compressor.sparsity=-0.1"], "compressor.sparsity must be in [0, 1)"),
        (["train", "recipe=magnitude_lenet", "compressor.sparsty=0.5"], "sparsty"),
        (["train", "-m", "recipe=magnitude_lenet", "compressor.sparsity=0.5,1.5"], "compressor.sparsity"),
        (["train", "data.data_dir=/nonexistent"], "apt-get install dataset-fashion-mnist"),
        (["train", "hardware=h100"], "needs a CUDA GPU"),
        (["train", "recipe=magnitude_lenet", "trainer.lr=nan"], "trainer.lr must be a finite number; got nan"),
        (["train", "recipe=kd_magnitude_lenet", "compose.kd.temperature=inf"],
         "compose.kd.temperature must be a finite number; got inf"),
        (["train", "recipe=magnitude_lenet", "compressor.sparsity=-inf"], "compressor.sparsity must be a finite"),
        (["train", "recipe=magnitude_lenet", "+trainer.max_epoch=1"], "trainer.max_epoch is not a setting of effml; "
         "did you mean trainer.max_epochs?"),
        (["train", "recipe=magnitude_lenet", "+compresor=kd"], "compresor is not a setting of effml"),
        (["train", "recipe=kd_magnitude_lenet", "+compose.kd.temprature=2"], "compose.kd.temprature is not a setting"),
        (["train", "recipe=kd_magnitude_lenet", "compose.kd.temperature=0"], "compose.kd.temperature must be > 0"),
        (["list", "nothing"], "effml list needs one of"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(effml, tmp_path, args, message):
    code, out, err = effml(*args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("effml: error: ") and message in lines[0], err
    assert "Traceback" not in err + out
    assert not (tmp_path / "outputs").exists()


def test_corrupt_checkpoint_is_reported_and_kept(effml, tmp_path):
    code, _, _ = effml("train", "recipe=magnitude_lenet", "--cfg", "job")  # nothing runs
    assert code == 0
    from effml import runner
    from effml.cli.compose import compose_config

    run_dir = runner.plan(compose_config(["recipe=magnitude_lenet", *TINY])).run_dir
    checkpoint = tmp_path / run_dir.stage(0, "train").last_checkpoint
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")
    records = {tmp_path / run_dir.config: "seed: 0\n", tmp_path / run_dir.run_record: "{}\n"}
    for path, text in records.items():  # as the interrupted run left them
        path.write_text(text)
    code, _, err = effml(*RUN)
    assert code == 2 and "corrupt" in err and str(checkpoint.relative_to(tmp_path)) in err
    assert checkpoint.read_bytes() == b"not a checkpoint"  # nothing lost ...
    assert all(path.read_text() == text for path, text in records.items())  # ... nor rewritten before the check


@pytest.mark.parametrize("keep_last", [False, True])
def test_a_finished_stage_s_last_ckpt_is_deleted_unless_kept(effml, tmp_path, keep_last):
    code, _, err = effml(*RUN, "measure.enabled=false", f"trainer.keep_last={keep_last}")
    assert code == 0, err
    stage = next(tmp_path.rglob("stages/00_train"))
    assert (stage / "end.pt").is_file()
    assert (stage / "checkpoints" / "last.ckpt").is_file() == keep_last
    assert (stage / "checkpoints").exists() == keep_last


def test_cfg_job_and_help_behave_like_hydra(effml):
    code, out, _ = effml("train", "recipe=magnitude_lenet", "--cfg", "job")
    assert code == 0 and "sparsity: 0.9" in out and "hydra" not in out
    code, out, _ = effml("train", "--help")
    from effml.registry import COMPRESSORS

    assert code == 0 and "effml train" in out and f"compressor: {', '.join(sorted(COMPRESSORS.names()))}" in out


@pytest.mark.parametrize("kind", ["recipes", "models", "data", "compressors", "hardware"])
def test_list_shows_every_option_with_a_description(effml, kind, monkeypatch):
    from effml.cli.compose import presets
    from effml.cli.listing import KINDS

    monkeypatch.setenv("COLUMNS", "240")  # rich wraps descriptions to the terminal: one line each here
    code, out, _ = effml("list", kind)
    assert code == 0
    for name in presets(KINDS[kind]):
        assert name in out
    assert "Gradual magnitude pruning" in effml("list", "recipes")[1]


def test_multirun_grid_makes_one_run_per_point(effml, tmp_path):
    code, _, err = effml("train", "-m", *RUN[1:], "seed=0,1", "compressor.sparsity=0.5,0.8")
    assert code == 0, err
    runs = sorted((tmp_path / "outputs" / "magnitude_lenet").glob("*/seed_*/metrics.json"))
    assert len(runs) == 4
    assert len({r.parent.parent.name for r in runs}) == 2  # two sparsities → two hashes, two seeds each
    code, out, _ = effml("report", "outputs/magnitude_lenet")
    assert code == 0 and "4 runs" in out
    assert all(r.parent.parent.name in out for r in runs)


@pytest.mark.parametrize("logger", ["wandb", "tensorboard"])
def test_loggers_write_offline(effml, tmp_path, logger, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    code, _, err = effml(*RUN, f"logger={logger}", "trainer.max_epochs=1")
    assert code == 0, err
    logs = next((tmp_path / "outputs").rglob("logs"))
    if logger == "wandb":
        assert list(logs.rglob("offline-run-*")), os.listdir(logs)
    else:
        assert list(logs.rglob("events.out.tfevents.*"))


@pytest.mark.e2e
def test_joblib_launcher_runs_sweep_jobs_in_parallel_processes(tmp_path):
    from conftest import run_cli

    result = run_cli(["train", "-m", "recipe=magnitude_lenet", "data=digits", *TINY, "seed=0,1",
                      "hydra/launcher=local"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted((tmp_path / "outputs" / "magnitude_lenet").glob("*/seed_*/metrics.json"))
    assert [r.parent.name for r in runs] == ["seed_0", "seed_1"]
    assert "Joblib" in result.stderr + result.stdout  # Hydra's joblib launcher announced itself


def test_a_broken_recipe_file_is_named_in_one_line_and_leaves_the_others_usable(effml, tmp_path, monkeypatch):
    """A recipe that does not parse once broke every `effml train`, even of other recipes (a traceback,
    exit 1); a list at the top level gave 24 lines; an empty file was accepted as a recipe."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "unclosed.yaml").write_text("# @package _global_\nseed: 1\ntrainer: {max_epochs: [1, 2\n")
    (mine / "listy.yaml").write_text("- a\n- b\n")
    (mine / "empty.yaml").write_text("")
    monkeypatch.setenv("EFFML_RECIPES", str(mine))
    for name, message in [("unclosed", "unclosed.yaml:4: not valid YAML"), ("listy", "a recipe is a mapping"),
                          ("empty", "empty.yaml: empty")]:
        code, out, err = effml("train", f"recipe={name}")
        one_line_error(code, err, f"recipe {name}: ")
        assert message in err
    assert not (tmp_path / "outputs").exists()
    code, out, _ = effml("train", "recipe=magnitude_lenet", "--cfg", "job")
    assert code == 0 and "sparsity: 0.9" in out  # the shipped recipes still compose
    code, out, _ = effml("list", "recipes")
    assert code == 0 and out.count("broken:") == 3


def test_a_loss_that_becomes_nan_stops_the_run_in_one_line_and_records_nothing_finished(effml, tmp_path):
    code, _, err = effml(*RUN, "trainer.lr=1e30")
    one_line_error(code, err, "stage train: the training loss became nan at step ")
    assert not list((tmp_path / "outputs").rglob("end.pt")) and not list((tmp_path / "outputs").rglob("metrics.json"))


def test_a_recipe_cannot_make_hydra_instantiate_a_class(effml, tmp_path, monkeypatch):
    """A recipe applies at the top level, so `hydra.callbacks.x._target_` once ran code from a recipe
    file in $EFFML_RECIPES when Hydra built its callbacks."""
    sentinel = tmp_path / "payload-ran"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sly.yaml").write_text("# @package _global_\nhydra:\n  callbacks:\n    x:\n"
                                   f"      _target_: pathlib.Path.touch\n      self: {sentinel}\n")
    monkeypatch.setenv("EFFML_RECIPES", str(mine))
    code, _, err = effml("train", "recipe=sly")
    one_line_error(code, err, "a recipe may not set hydra: options")
    assert not sentinel.exists()



@pytest.fixture
def immutable_folder(tmp_path):
    """A folder nobody may write into, root included (``chattr +i``); skipped where unsupported."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("multirun", [False, True])
def test_an_outputs_folder_that_cannot_be_written_is_one_line(effml, immutable_folder, multirun):
    code, out, err = effml(*RUN[:1], *(["-m"] if multirun else []), *RUN[1:], f"output_root={immutable_folder / 'outputs'}")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("effml: error: cannot write ") and "Operation not permitted" in lines[-1], err
    assert "Traceback" not in err + out
    assert not any(immutable_folder.iterdir())
