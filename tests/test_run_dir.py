"""The run layout (effml.paths): a run directory written by an older effml resumes under this one,
and the lookups every module shares find what the runner wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from effml.paths import RunDir, atomic_save, atomic_write_text, runs_of

# Written by effml at 29baaff (before Contract v2 moved every file name into effml.paths), with
#   OMP_NUM_THREADS=1 effml train <OLD_RUN>
# killed by SIGKILL after stage 00_train had finished; expected/ holds that version's uninterrupted
# run of the same command (its metrics.json and model.pt). One thread, as the test runs: float sums
# in another order (more threads, `make test`'s workers have one) give other last bits. Stage 00's last.ckpt, which that version
# kept, holds numpy's RNG state as an ndarray: a finished stage's last.ckpt is never loaded again.
OLD = Path(__file__).parent / "fixtures" / "run_29baaff"
OLD_RUN = ["train", "recipe=magnitude_lenet", "compressor.schedule=oneshot", "data=digits", "model.hidden=[32,16]",
           "trainer.max_epochs=2", "compressor.finetune_epochs=3", "trainer.progress_bar=off", "measure.enabled=false"]


@pytest.mark.e2e
def test_a_run_dir_of_an_older_effml_resumes_to_that_version_s_result(effml, tmp_path, one_thread):
    shutil.copytree(OLD, tmp_path / "old")
    code, out, err = effml(*OLD_RUN, f"output_root={tmp_path / 'old'}")
    assert code == 0, err
    assert "resuming" in out + err  # the same hash, so the same directory, and its finished stage is kept
    code, _, err = effml(*OLD_RUN, f"output_root={tmp_path / 'new'}")  # the same run, uninterrupted, today
    assert code == 0, err
    resumed, straight = (RunDir(tmp_path / root / "magnitude_lenet" / "9db468f65c" / "seed_0") for root in ("old", "new"))
    assert [s.name for s in resumed.finished_stages()] == ["00_train", "01_finetune"]

    # bit for bit as today's uninterrupted run ...
    mine, today = (torch.load(run.model, weights_only=True) for run in (resumed, straight))
    assert mine.keys() == today.keys() and all(torch.equal(mine[k], today[k]) for k in mine)
    # ... and as that version's, up to the last bits (another CPU may sum in another order): a resume
    # that went wrong differs by far more (0.20 test accuracy instead of 0.38, before refresh_masked_weights)
    metrics, expected = json.loads(resumed.metrics.read_text()), json.loads((OLD / "expected" / "metrics.json").read_text())
    assert abs(metrics["test_acc"] - expected["test_acc"]) <= 0.01 and metrics["sparsity"] == expected["sparsity"]
    assert [(s["name"], s["steps"]) for s in metrics["stages"]] == [(s["name"], s["steps"]) for s in expected["stages"]]
    theirs = torch.load(OLD / "expected" / "model.pt", weights_only=True)
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-4) for k in mine)


def test_runs_of_finds_finished_runs_by_recipe_seed_and_hash(tmp_path):
    finished, unfinished, other_seed = (RunDir.of(tmp_path, "r", h, s) for h, s in (("aaa", 0), ("bbb", 0), ("aaa", 1)))
    for run in (finished, unfinished, other_seed):
        atomic_write_text(run.config, "model: {}\n")
    atomic_write_text(finished.metrics, "{}")
    assert runs_of(tmp_path, "r", 0) == [finished]
    assert runs_of(tmp_path, "r", 0, where=lambda run: True) == [finished, unfinished]
    assert runs_of(tmp_path, "r", 0, "bbb") == [] and runs_of(tmp_path, "missing", 0) == []
    assert (finished.recipe, finished.hash, str(finished)) == ("r", "aaa", str(tmp_path / "r" / "aaa" / "seed_0"))


def test_stage_end_finds_a_stage_by_key_whatever_its_index_or_owner_prefix(tmp_path):
    run = RunDir(tmp_path)
    for index, label in enumerate(["teacher", "imp_level_00", "level_01"]):
        atomic_save({"i": index}, run.stage(index, label).end)
    atomic_write_text(run.stage(3, "level_02").record, "{}")  # started, not finished: no end.pt
    assert run.stage_end("level_00") == run.stage(1, "imp_level_00").end
    assert run.stage_end("level_01") == run.stage(2, "level_01").end
    assert run.stage_end("level_02") is None and run.stage_end("vel_01") is None


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = atomic_write_text(tmp_path / "metrics.json", "old")
    with pytest.raises(AttributeError):
        atomic_save({"x": lambda: None}, path)  # a lambda does not pickle: the write fails midway
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_recipe_lookup_picks_the_config_trained_on_the_asking_runs_data_as_written(tmp_path):
    """A table's runs share one outputs folder: Q-BERT's QAT series must load the plain fine-tuned
    bert_finetune, not another series' `bert_finetune compressor=magnitude`, nor one on other data."""
    from effml.data._base import DataConfig
    from effml.errors import EffmlError
    from effml.identity import non_default_values
    from effml.teachers import TeacherConfig, find_recipe_run

    subset, full = DataConfig(name="rt", train_subset=2000), DataConfig(name="rt")
    made = {}
    for config_hash, data, command in (("plain2k", subset, "recipe=bert_finetune data.train_subset=2000"),
                                       ("magn2k", subset, "recipe=bert_finetune compressor=magnitude data.train_subset=2000"),
                                       ("plainall", full, "recipe=bert_finetune")):
        run = made[config_hash] = RunDir.of(tmp_path, "bert_finetune", config_hash, 0)
        record = {"identity": {"data": non_default_values(data)}, "command": f"effml train -m {command} seed=0"}
        atomic_write_text(run.run_record, json.dumps(record))
        atomic_write_text(run.metrics, "{}")
    teacher = TeacherConfig(source="recipe", recipe="bert_finetune")
    assert find_recipe_run(teacher, tmp_path, 0, data=subset) == made["plain2k"]
    assert find_recipe_run(teacher, tmp_path, 0, data=full) == made["plainall"]
    with pytest.raises(EffmlError, match="several configs .*magn2k.*plain2k.*plainall.*; set teacher.hash"):
        find_recipe_run(teacher, tmp_path, 0, data=DataConfig(name="rt", train_subset=500))  # none fits: all named
    with pytest.raises(EffmlError, match="several configs"):
        find_recipe_run(teacher, tmp_path, 0)  # nothing to choose by
    assert find_recipe_run(TeacherConfig(source="recipe", recipe="bert_finetune", hash="magn2k"), tmp_path, 0,
                           data=subset) == made["magn2k"]  # a hash still names any one
