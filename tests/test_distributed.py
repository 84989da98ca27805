"""Runs of several processes on the CPU (Lightning's DDP over gloo, effml.distributed): every rank
makes the same decisions; 2 processes train what 1 process does on the same global batch; rank 0
alone writes; a SIGKILL of the whole run resumes exactly; bad settings are one line, exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, metrics_of, one_line_error, run_cli, smoke_args
from effml import distributed
from effml.registry import COMPRESSORS

TWO = ["hardware.devices=2"]
QUIET = ["measure.enabled=false"]


def two_ranks(tmp_path: Path, args: list[str], name: str = "d") -> tuple[subprocess.CompletedProcess, list[str]]:
    """``effml train ARGS hardware.devices=2`` as a user runs it; the two ranks' digests of their
    model and compressor state (``effml.distributed.digest``) at the end of training."""
    digests = tmp_path / f"digests_{name}"
    done = run_cli(["train", *args, *TWO], tmp_path, env={distributed.DIGEST_DIR_ENV: str(digests),
                                                         "OMP_NUM_THREADS": "1"})
    found = sorted(digests.glob("rank*.txt")) if digests.exists() else []
    return done, [f.read_text() for f in found]


def model_of(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(next(root.rglob("model.pt")), weights_only=True)


# -- bad input: one line, exit 2, nothing written ------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["hardware.devices=100000"], "hardware.devices=100000 but only"),
    (["hardware.strategy=fsdp"], "hardware.strategy=fsdp needs GPUs"),
    (["hardware.devices=2", "data.batch_size=61"], "must divide evenly over 2 processes"),
    (["hardware.num_nodes=0"], "hardware.num_nodes must be >= 1"),
])
def test_bad_multi_process_settings_are_one_line(effml, tmp_path, args, message):
    code, _, err = effml("train", "recipe=magnitude_lenet", *args)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()


def test_a_single_process_compressor_refuses_more_processes(effml, tmp_path, monkeypatch):
    monkeypatch.setattr(COMPRESSORS.get("magnitude").target, "multi_process", False)
    code, _, err = effml("train", "recipe=magnitude_lenet", *TWO)
    one_line_error(code, err, "compressor magnitude runs in a single process only")
    assert not (tmp_path / "outputs").exists()


def test_a_local_sweep_of_several_processes_is_refused(effml, tmp_path):
    code, _, err = effml("train", "-m", "recipe=magnitude_lenet", "seed=0,1", *TWO)
    one_line_error(code, err, "needs hydra/launcher=slurm")
    assert not (tmp_path / "outputs").exists()


def test_each_rank_takes_its_slice_of_every_global_batch():
    from effml.data._base import EpochSeededSampler

    one = list(EpochSeededSampler(103, seed=3, batch=10))
    ranks = [list(EpochSeededSampler(103, seed=3, rank=r, world=2, batch=5)) for r in range(2)]
    # ten global batches of 10, and the last 3 split 2 + 1: 11 batches on each rank (DDP needs as many)
    assert (len(ranks[0]), len(ranks[1])) == (52, 51)
    for b in range(10):  # global batch b: rank 0 has its first half, rank 1 its second, in order
        assert ranks[0][5 * b:5 * b + 5] + ranks[1][5 * b:5 * b + 5] == one[10 * b:10 * b + 10]
    assert ranks[0][50:] + ranks[1][50:] == one[100:]


def test_broadcast_and_reduce_are_no_ops_in_one_process():
    t = torch.arange(3.0)
    assert distributed.broadcast_from_rank0({"a": 1}) == {"a": 1}
    assert distributed.all_reduce_mean(t) is t and distributed.shard() == (0, 1)


# -- 2 processes end to end ------------------------------------------------------------------------
# 2 processes sum the same per-example gradients in another order (gloo's all-reduce of two halves):
# weights agree to float32 rounding, amplified by training; masks and accuracies agree exactly on these
# runs, and are allowed one borderline weight's worth of difference.
WEIGHT_ATOL = 1e-4
ACC_TOL = 0.01


def assert_two_match_one(tmp_path: Path, args: list[str]) -> None:
    two, digests = two_ranks(tmp_path, [*args, "output_root=two"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(digests) == 2 and digests[0] == digests[1], "the ranks ended in different states"
    one = run_cli(["train", *args, "output_root=one"], tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    m1, m2 = metrics_of(tmp_path / "one"), metrics_of(tmp_path / "two")
    assert m2["distributed"] == {"world_size": 2, "devices": 2, "num_nodes": 1, "strategy": "ddp", "backend": "gloo"}
    assert m1["distributed"]["world_size"] == 1
    assert [s["steps"] for s in m1["stages"]] == [s["steps"] for s in m2["stages"]]
    for key in ("test_acc", "val_acc"):
        assert abs(m1[key] - m2[key]) <= ACC_TOL, (key, m1[key], m2[key])
    w1, w2 = model_of(tmp_path / "one"), model_of(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert w1[k].shape == w2[k].shape, k
        if w1[k].is_floating_point():
            assert torch.allclose(w1[k], w2[k], atol=WEIGHT_ATOL), (k, (w1[k] - w2[k]).abs().max())
            zeros1, zeros2 = w1[k] == 0, w2[k] == 0
            assert (zeros1 != zeros2).sum() <= 1, k  # the same pruned weights
    assert m1["sparsity"] == pytest.approx(m2["sparsity"], abs=1e-4)
    # rank 0 alone wrote: the layout of a one-process run, one summary, a record naming the processes
    files = [sorted(str(p.relative_to(tmp_path / r)) for p in (tmp_path / r).rglob("*") if p.is_file()) for r in ("one", "two")]
    assert files[0] == files[1]
    record = json.loads(next((tmp_path / "two").rglob("run.json")).read_text())
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["strategy"] == "ddp"
    assert two.stdout.count("run: ") == 1


NO_DROPOUT = ["+model.hf_config.hidden_dropout_prob=0", "+model.hf_config.attention_probs_dropout_prob=0"]
MATCHED = {  # method: (its smoke setup, extra args, in make test); no dropout: each rank draws its own masks
    "magnitude": ("mlp", [], True),
    "imp": ("mlp", [], True),
    "nm_sparsity": ("mlp", [], False),
    "kd": ("mlp", [], False),
    "earlybert": ("bert", NO_DROPOUT, False),
}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.e2e if fast else pytest.mark.slow) for n, (_, _, fast) in MATCHED.items()])
def test_two_processes_train_what_one_does_on_the_same_global_batch(tmp_path, name):
    setup, extra, _ = MATCHED[name]
    assert_two_match_one(tmp_path, [*TINY, *QUIET, *smoke_args(setup, [name]), *extra])


# -- every compressor, through the registry: every rank ends in the same state -----------------------
FAST_REGISTRY = {"nm_sparsity"}  # magnitude and imp: in the match test above


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.e2e if n in FAST_REGISTRY else pytest.mark.slow) for n in COMPRESSORS.names()])
def test_every_rank_ends_with_the_same_masks_and_structure(tmp_path, name):
    entry = COMPRESSORS.get(name)
    done, digests = two_ranks(tmp_path, [*TINY, *smoke_args(entry.target.smoke.setups[0], [name])])
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(digests) == 2 and digests[0] == digests[1], f"{name}: the ranks ended in different states"
    m = metrics_of(tmp_path / "outputs")
    assert m["distributed"]["world_size"] == 2 and entry.target.effect(name, m) is None


# -- SIGKILL of the whole DDP run, then the same command: exact resume -------------------------------
KILL_RUN = ["train", "recipe=magnitude_lenet", "data=digits", "data.train_subset=1000", "data.batch_size=50",
            "trainer.max_epochs=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=2",
            "trainer.progress_bar=off", "compressor.frequency=5", "trainer.checkpoint_every_n_steps=7", *QUIET, *TWO]


def run_whole(cwd: Path) -> subprocess.Popen:
    """The run in a session of its own: a SIGKILL to its process group kills every rank at once."""
    return subprocess.Popen([sys.executable, "-m", "effml.cli.main", *KILL_RUN], cwd=cwd, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


@pytest.mark.e2e
def test_sigkill_of_every_rank_mid_stage_then_rerun_resumes_exactly(tmp_path):
    from test_resume import stage_files

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    process = run_whole(killed)
    deadline = time.time() + 300
    while not list(killed.glob("outputs/*/*/*/stages/00_train/checkpoints/last.ckpt")):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    time.sleep(0.5)  # into the next steps, past the checkpoint
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not list(killed.rglob("metrics.json")), "the run ended before the kill"
    for cwd in (killed, whole):
        process = run_whole(cwd)
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0, out[-3000:]
    # end.pt of every stage and model.pt bit for bit (the CSV log of the cut epoch is not compared, as
    # in test_resume_mid_epoch: Lightning restarts the epoch-level train/acc mean at the resume)
    assert stage_files(killed) == stage_files(whole)
    m1, m2 = metrics_of(killed / "outputs"), metrics_of(whole / "outputs")
    assert m1["test_acc"] == m2["test_acc"] and m1["sparsity"] == m2["sparsity"]


# -- MoE: the auxiliary loss and the expert gradients do not change with the data-parallel size -------
MOE_TOKENS, MOE_DIM = 2048, 16


def _moe_step(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One training step of a Switch layer under DDP: rank r takes its half of the same global batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from effml.models.switch import SwitchFFN

    torch.set_num_threads(1)
    from datetime import timedelta

    # a timeout: a rank that dies must fail the test, not hang it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    torch.manual_seed(0)
    # capacity for every token (no drop depends on the slice size); no jitter (no per-rank random draws)
    layer = SwitchFFN(MOE_DIM, 32, 4, capacity_factor=4.0, jitter_eps=0.0, aux_loss_coef=0.5)
    x, target = torch.randn(MOE_TOKENS, MOE_DIM), torch.randn(MOE_TOKENS, MOE_DIM)
    mine = slice(rank * MOE_TOKENS // world, (rank + 1) * MOE_TOKENS // world)
    model = DistributedDataParallel(layer)
    out = model(x[mine])
    loss = torch.nn.functional.mse_loss(out, target[mine]) + layer.pop_router_loss()
    loss.backward()
    aux = layer.aux_loss.detach().clone()
    dist.all_reduce(aux)  # the aux loss the run reports: the mean over ranks
    if rank == 0:
        torch.save({"aux": aux / world, **{k: p.grad for k, p in layer.named_parameters()}},
                   f"{out_dir}/world{world}.pt")
    dist.barrier()  # both ranks leave together: a rank gone before the other's teardown hung it (25 min)
    # DDP's Reducer holds the process group. Freed on return, after destroy_process_group, it held the
    # last reference: ~ProcessGroupGloo then joined its worker thread with the GIL held while that thread
    # waited for the GIL to free the barrier's tensors (hung 38 min, torch 2.13; pytorch/pytorch#56297).
    # Freed here, the group is still registered; destroy_process_group then drops it from Python, whose
    # binding releases the GIL in the destructor (pytorch/pytorch#154976).
    del model, out, loss
    dist.destroy_process_group()


def test_moe_aux_loss_and_expert_gradients_do_not_scale_with_the_data_parallel_size(tmp_path):
    import torch.multiprocessing as mp

    for world in (1, 2):
        mp.spawn(_moe_step, args=(world, str(tmp_path / f"init{world}"), str(tmp_path)), nprocs=world)
    one, two = (torch.load(tmp_path / f"world{n}.pt", weights_only=True) for n in (1, 2))
    # DeepSpeed and MegaBlocks once multiplied expert gradients by the parallel size: here they are the
    # global batch's, to float rounding (the task loss is a mean per rank, DDP averages the ranks)
    for name in ("w_in", "w_out", "b_in", "b_out"):
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-7), (name, (one[name] - two[name]).abs().max())
    # the load-balancing loss is per rank, as in the paper's per-core groups (Fedus et al., §2.2): a
    # mean of slices' f·P, which differs from the whole batch's only by sampling, not by a factor
    assert two["aux"] == pytest.approx(float(one["aux"]), rel=0.02)
    assert torch.allclose(one["router.weight"], two["router.weight"], rtol=0.05, atol=1e-3)


def test_the_slurm_launcher_asks_for_one_task_and_one_gpu_per_rank():
    from effml.cli.compose import compose_config

    launcher = compose_config(["hydra/launcher=slurm", "hardware.devices=4", "hardware.num_nodes=2"]).hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


# -- clusters: Hydra's submitit launcher, with its local executor -----------------------------------
@pytest.mark.e2e
def test_a_submitit_local_sweep_runs_both_jobs_and_lists_them(tmp_path):
    done = run_cli(["train", "-m", "hydra/launcher=submitit_local", "recipe=magnitude_lenet", "data=digits",
                    *TINY, *QUIET, "seed=0,1"], tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = sorted((tmp_path / "outputs").rglob("metrics.json"))
    assert [json.loads(r.read_text())["seed"] for r in runs] == [0, 1]
    assert "2 jobs, 2 finished, 0 skipped, 0 failed" in " ".join(done.stdout.split())
    assert list((tmp_path / "outputs" / "multirun").glob("*/.submitit/*"))  # submitit ran them


# A preemption or a timeout on a cluster: submitit sends the job SIGUSR2, calls the launcher's
# checkpoint() (Hydra's BaseSubmititLauncher resubmits the same job with the same arguments) and requeues
# it; the rerun resumes from the run's own last checkpoint, as the same command does after a SIGKILL.
# The local executor does the same thing in-place (its controller restarts the task), so it is tested here.
PREEMPT_RUN = [{"trainer.max_epochs=3": "trainer.max_epochs=8"}.get(a, a) for a in KILL_RUN if a not in TWO]


def submitit_tasks(folder: Path) -> list[int]:
    """The pids of the submitit tasks (``submitit.core._submit``) running jobs under ``folder``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in words and any(str(folder).encode() in w for w in words):
            found.append(int(cmdline.parent.name))
    return found


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the submitit task through /proc")
def test_a_preempted_submitit_job_is_requeued_and_resumes_exactly(tmp_path):
    from test_resume import stage_files

    whole, preempted = tmp_path / "whole", tmp_path / "preempted"
    whole.mkdir(), preempted.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen([sys.executable, "-m", "effml.cli.main", "train", "-m", "hydra/launcher=submitit_local",
                              *PREEMPT_RUN[1:]], cwd=preempted, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not list(preempted.glob("outputs/*/*/*/stages/00_train/checkpoints/last.ckpt")):
            assert sweep.poll() is None, sweep.stdout.read()
            assert time.time() < deadline, "no checkpoint was written"
            time.sleep(0.05)
        tasks = submitit_tasks(preempted)  # (one process trains 160 steps in seconds: signal it at once)
        assert len(tasks) == 1, tasks
        os.kill(tasks[0], signal.SIGUSR2)  # what SLURM sends before a timeout or a preemption
        out, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 0, out[-3000:]
    assert "1 jobs, 1 finished, 0 skipped, 0 failed" in " ".join(out.split()), out[-3000:]
    logs = " ".join(f.read_text() for f in preempted.rglob(".submitit/*/*_log.*"))
    assert "Requeued job" in logs, logs[-3000:]
    run_log = next(preempted.rglob("run.log")).read_text()
    assert ": resuming from" in run_log, run_log[-3000:]  # not a start from scratch
    done = run_cli(PREEMPT_RUN, whole, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert stage_files(preempted) == stage_files(whole)  # every stage's end.pt and model.pt, bit for bit
    m1, m2 = metrics_of(preempted / "outputs"), metrics_of(whole / "outputs")
    assert m1["test_acc"] == m2["test_acc"] and m1["sparsity"] == m2["sparsity"]


def test_hardware_auto_keeps_the_process_settings():
    from effml.config import HardwareConfig
    from effml.kernels import hardware as hw

    resolved = hw.resolve(HardwareConfig(name="auto", accelerator="auto", devices=2, num_nodes=3, strategy="ddp"))
    assert (resolved.devices, resolved.num_nodes, resolved.strategy) == (2, 3, "ddp")


@pytest.mark.parametrize("found", ["cpu", "h100", "gpu_generic"])
def test_hardware_auto_keeps_every_field_set_on_the_command_line(found, monkeypatch):
    """``hardware=auto hardware.compile=true`` compiles: the preset found fills only what was not set."""
    from effml.config import HardwareConfig
    from effml.kernels import hardware as hw

    monkeypatch.setattr(hw, "detect_preset", lambda: found)
    resolved = hw.resolve(HardwareConfig(name="auto", accelerator="auto", compile=True, channel_multiple=16))
    assert resolved.compile is True and resolved.channel_multiple == 16
    assert resolved.accelerator == ("cpu" if found == "cpu" else "gpu")
    if found != "gpu_generic":  # the rest is the preset's
        assert resolved.precision == hw.preset(found).precision
        assert resolved.sdpa_backends == hw.preset(found).sdpa_backends
