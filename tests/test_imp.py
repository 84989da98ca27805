"""Lottery tickets (compressors/imp.py): the pruning arithmetic, rewinding, the controls, transfer,
per-level outputs, resume after a kill mid-level, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_resume import kill_when, stage_files, start

from conftest import TINY, metrics_of, one_line_error
from effml.compressors.base import Stage
from effml.compressors.imp import IMPConfig, IterativeMagnitudePruning, finds_own_ticket, keep_largest
from effml.models.lenet import LeNet
from effml.paths import RunDir

LENET = ["train", "recipe=lth_lenet", *TINY, "data.batch_size=32", "trainer.val_check_interval=5",
         "measure.enabled=false"]


def level_masks(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    """{level: {layer.weight_mask: mask}} from every finished level of a run."""
    masks = {}
    for end in sorted((run_dir / "stages").glob("*_level_*/end.pt")):
        state = torch.load(end, weights_only=True)["model"]
        masks[int(end.parent.name.rsplit("_", 1)[1])] = {k: v for k, v in state.items() if k.endswith("_mask")}
    return masks


def run_dirs(root: Path) -> dict[str, Path]:
    """control → run dir of every finished run under root."""
    dirs = {}
    for metrics in root.rglob("metrics.json"):
        m = json.loads(metrics.read_text())
        dirs[m["compressors"]["imp"]["control"]] = metrics.parent
    return dirs


# -- the arithmetic, on a real LeNet-300-100 --------------------------------------------------
def lenet_with_imp(**cfg) -> tuple[IterativeMagnitudePruning, SimpleNamespace]:
    torch.manual_seed(0)
    model = LeNet(784, [300, 100], 10)
    imp = IterativeMagnitudePruning(IMPConfig(**cfg))
    imp.attach(model)
    return imp, SimpleNamespace(model=model)


def test_each_level_prunes_the_papers_rate_of_the_survivors_and_rewinds_them_to_init():
    imp, task = lenet_with_imp(levels=3, prune_fraction=0.2)  # output layer at half rate: 10%
    theta0 = {n: m.weight_orig.detach().clone() for n, m in imp.layers.items()}
    previous = None
    for level in range(4):
        imp.begin_stage(Stage(f"level_{level:02d}", owner="imp"), task)
        for name, module in imp.layers.items():
            rate = 0.1 if name == "classifier" else 0.2
            expected = module.weight.numel() * (1 - rate) ** level
            assert abs(int(module.weight_mask.sum()) - expected) <= level + 1, name  # rounding per level
            if previous is not None:  # nested: what was pruned stays pruned
                assert not (module.weight_mask.bool() & ~previous[name]).any()
            # survivors start from θ0 at every level, pruned weights are exactly zero
            assert torch.equal(module.weight, theta0[name] * module.weight_mask)
        previous = {n: m.weight_mask.bool().clone() for n, m in imp.layers.items()}
        imp.end_stage(Stage(f"level_{level:02d}", owner="imp"), {"test_acc": 0.5, "val_acc": 0.5, "steps": 1})
        with torch.no_grad():  # "training": change the weights so the next level's ranking is by new values
            for module in imp.layers.values():
                module.weight_orig.add_(torch.randn_like(module.weight_orig))
    levels = imp.report()["levels"]
    assert [lv["level"] for lv in levels] == [0, 1, 2, 3]
    remaining = [lv["weights_remaining"] for lv in levels]
    assert remaining[0] == 1.0 and remaining == sorted(remaining, reverse=True)
    # nested masks: the normalized Hamming distance is exactly the fraction pruned at that level
    for before, after in zip(levels, levels[1:], strict=False):
        assert after["hamming"] == pytest.approx(before["weights_remaining"] - after["weights_remaining"], abs=1e-5)
    assert imp.target_sparsity() == pytest.approx(1 - remaining[-1], abs=1e-3)


def test_global_scope_ranks_all_hidden_layers_together_and_oneshot_prunes_at_once():
    imp, task = lenet_with_imp(levels=4, scope="global", oneshot=True, output_fraction=0.0)
    assert [s.key for s in imp.stages()] == ["level_00", "level_04"]
    assert "classifier" not in imp.layers  # output_fraction=0: the output layer stays dense
    with torch.no_grad():
        imp.layers["features.1"].weight_orig.mul_(10)  # global ranking: the scaled layer keeps far more
    imp.begin_stage(Stage("level_04", owner="imp"), task)
    assert imp.weights_remaining() == pytest.approx(0.8**4, abs=1e-4)
    assert imp.layers["features.1"].weight_mask.mean() > 5 * imp.layers["features.3"].weight_mask.mean()


def test_keep_largest_never_revives_a_pruned_weight():
    scores = [torch.tensor([5.0, 4.0, 3.0, 2.0])]
    masks = [torch.tensor([0.0, 1.0, 1.0, 1.0])]  # the largest is pruned already
    assert keep_largest(scores, masks, 2)[0].tolist() == [0.0, 1.0, 1.0, 0.0]


# -- end to end on real Fashion-MNIST ---------------------------------------------------------
@pytest.mark.e2e
def test_lth_lenet_levels_controls_and_transfer(effml, tmp_path):
    base = [*LENET, "compressor.levels=2"]
    code, _, err = effml(*base, "compressor.control=reinit")
    assert code == 2 and "needs its base run" in err and "train that run first" in err
    assert not (tmp_path / "outputs").exists()  # nothing written

    assert effml(*base)[0] == 0
    m = metrics_of(tmp_path / "outputs")
    levels = m["compressors"]["imp"]["levels"]
    assert [lv["level"] for lv in levels] == [0, 1, 2]
    assert [lv["weights_remaining"] for lv in levels] == pytest.approx([1.0, 0.8, 0.64], abs=0.01)
    for lv in levels:
        assert 0.5 < lv["test_acc"] <= 1 and lv["early_stop_step"] % 5 == 0  # validated every 5 steps
    assert m["stages"][1]["test_acc"] == levels[1]["test_acc"]
    assert m["sparsity"]["sparsity"] == pytest.approx(1 - levels[-1]["weights_remaining"], abs=1e-4)

    for control in ("reinit", "random_prune"):
        code, _, err = effml(*base, f"compressor.control={control}")
        assert code == 0, err
    dirs = run_dirs(tmp_path / "outputs")
    ticket, reinit, rand = (level_masks(dirs[c]) for c in ("none", "reinit", "random_prune"))
    for level in (1, 2):
        for key, mask in ticket[level].items():
            assert torch.equal(reinit[level][key], mask)  # reinit: the ticket's own masks
            assert rand[level][key].sum() == mask.sum() and not torch.equal(rand[level][key], mask)
    reinit_end = torch.load(next((dirs["reinit"] / "stages").glob("01_*/end.pt")), weights_only=True)
    assert reinit_end["compressors"]["compressor/imp"]["history"][1]["level"] == 1

    # ticket transfer: the ticket's masks on other data; a recipe name finds the run that found its own
    # ticket (not the control runs beside it)
    code, _, err = effml(*base, "data=mnist5k", "compressor.ticket_from=lth_lenet")
    assert code == 0, err
    transfer = next(d for d in (tmp_path / "outputs" / "lth_lenet").glob("*/seed_0") if d not in dirs.values())
    assert metrics_of(transfer)["compressors"]["imp"]["masks_from"] == str(dirs["none"].relative_to(tmp_path))
    assert all(torch.equal(level_masks(transfer)[2][k], v) for k, v in ticket[2].items())


@pytest.mark.e2e
def test_rewind_to_a_step_keeps_that_steps_weights(effml, tmp_path):
    assert effml(*LENET, "compressor.levels=1", "compressor.rewind=step:3")[0] == 0
    run_dir = next((tmp_path / "outputs").rglob("metrics.json")).parent
    level0 = torch.load(next((run_dir / "stages").glob("00_*/end.pt")), weights_only=True)
    rewind = level0["compressors"]["compressor/imp"]["rewind_weights"]
    torch.manual_seed(0)
    theta0 = LeNet(784, [300, 100], 10).state_dict()
    assert not torch.equal(rewind["features.1.weight"], theta0["features.1.weight"])  # three steps of training later
    assert not torch.equal(rewind["features.1.weight"], level0["model"]["features.1.weight_orig"])  # not the trained end


@pytest.mark.parametrize(
    "override, message",
    [
        ("compressor.prune_fraction=0", "compressor.prune_fraction must be in (0, 1)"),
        ("compressor.prune_fraction=1.0", "compressor.prune_fraction must be in (0, 1)"),
        ("compressor.levels=0", "compressor.levels must be >= 1"),
        ("compressor.rewind=step:100000", "beyond level 0's"),
        ("compressor.rewind=epoch:9", "beyond level 0's 2 epochs"),
        ("compressor.rewind=later", "compressor.rewind must be init, none, step:N or epoch:N"),
        ("compressor.control=shuffled", "compressor.control must be one of"),
        ("compressor.ticket_from=nowhere", "ticket source 'nowhere' not found"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(effml, tmp_path, override, message):
    code, _, err = effml(*LENET, override)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.e2e
def test_kill_mid_level_then_rerun_gives_the_same_masks(tmp_path):
    args = ["train", "recipe=lth_lenet", "compressor.levels=3", "trainer.max_epochs=3", "data.train_subset=3000",
            "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.progress_bar=off",
            "measure.enabled=false"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    assert start(straight, [], args).wait(timeout=600) == 0
    # killed after level 1 finished, inside level 2 (its first epoch's checkpoint exists)
    kill_when(start(killed, [], args), "outputs/*/*/*/stages/02_level_02/checkpoints/last.ckpt", killed)
    assert not list(killed.rglob("metrics.json"))
    assert start(killed, [], args).wait(timeout=600) == 0
    a, b = (next(root.rglob("metrics.json")).parent for root in (straight, killed))
    masks_a, masks_b = level_masks(a), level_masks(b)
    assert masks_a.keys() == masks_b.keys() == {0, 1, 2, 3}
    for level, masks in masks_a.items():
        assert all(torch.equal(mask, masks_b[level][k]) for k, mask in masks.items())
    metrics_a, metrics_b = metrics_of(straight), metrics_of(killed)
    assert metrics_a["compressors"]["imp"]["levels"] == metrics_b["compressors"]["imp"]["levels"]
    assert stage_files(straight) == stage_files(killed)  # every end.pt and model.pt, byte for byte


@pytest.mark.slow  # minutes on 2 CPUs: make test-slow
def test_lth_bert_shuffle_control_and_transfer_to_subjectivity(effml, tmp_path):
    """Chen et al.'s setting at toy scale: IMP from pre-trained MiniLM-L6, the shuffled-weights
    control on the ticket's masks, and the ticket reused on the subjectivity task."""
    bert = ["train", "recipe=lth_bert", *TINY, "data.train_subset=64", "data.batch_size=32", "data.eval_batch_size=32",
            "trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
            "compressor.levels=1", "trainer.val_check_interval=2", "measure.enabled=false"]
    assert effml(*bert)[0] == 0
    code, _, err = effml(*bert, "compressor.control=shuffle")
    assert code == 0, err
    code, _, err = effml(*bert[:1], "recipe=lth_bert_transfer", *bert[2:])
    assert code == 0, err
    ticket = next(d for d in (tmp_path / "outputs" / "lth_bert").glob("*/seed_0") if finds_own_ticket(RunDir(d)))
    shuffled = next(d for d in (tmp_path / "outputs" / "lth_bert").glob("*/seed_0") if d != ticket)
    transfer = next((tmp_path / "outputs" / "lth_bert_transfer").glob("*/seed_0"))
    masks = level_masks(ticket)[1]
    assert "classifier.weight_mask" not in masks and "bert.pooler.dense.weight_mask" in masks
    assert sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()) == pytest.approx(0.8)
    for other in (shuffled, transfer):
        assert all(torch.equal(level_masks(other)[1][k], m) for k, m in masks.items())
    levels = metrics_of(transfer)["compressors"]["imp"]["levels"]
    assert [lv["weights_remaining"] for lv in levels] == pytest.approx([1.0, 0.8], abs=1e-4)


def test_shuffle_control_permutes_each_layers_pretrained_values():
    imp, task = lenet_with_imp(control="shuffle")
    shuffled = imp._shuffled_initial()
    for name in imp.layers:
        before, after = imp.initial_weights[f"{name}.weight"], shuffled[f"{name}.weight"]
        assert not torch.equal(before, after) and torch.equal(before.flatten().sort()[0], after.flatten().sort()[0])


def test_conv_layers_use_their_own_rate_as_in_lth_conv():
    from effml.data import DataInfo
    from effml.registry import MODELS

    entry = MODELS.get("conv")
    model = entry.target.from_config(entry.config(depth=2), DataInfo(10, "image", (1, 28, 28)))
    imp = IterativeMagnitudePruning(IMPConfig(prune_fraction=0.2, conv_fraction=0.1, output_fraction=0.1))
    imp.attach(model)
    imp.begin_stage(Stage("level_01", owner="imp"), SimpleNamespace(model=model))
    kept = {name: float(m.weight_mask.mean()) for name, m in imp.layers.items()}
    convs = [n for n, m in imp.layers.items() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 and all(kept[n] == pytest.approx(0.9, abs=1e-3) for n in convs)
    assert kept["classifier"] == pytest.approx(0.9, abs=1e-3)
    assert sorted(v for n, v in kept.items() if n not in convs and n != "classifier") == pytest.approx([0.8, 0.8], abs=1e-3)
