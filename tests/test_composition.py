"""The composition contract (docs/ARCHITECTURE.md §3), checked over the registry: every pair of
compressors either composes, and then both methods' effects hold after a smoke run
(``Compressor.effect``), or it is refused with one line before anything is written.

Pairs whose owned things conflict (``Compressor.owned``, ``CONFLICTS``) are refused by the contract;
pairs with no model both can act on are refused by the method that cannot act on the other's model.
"""

from __future__ import annotations

import itertools

import pytest

from conftest import TINY, metrics_of, one_line_error, smoke_args
from effml.compressors.base import CONFLICTS, Stage
from effml.registry import COMPRESSORS
from effml.runner import stage_plan

NAMES = [name for name in COMPRESSORS.names() if name != "none"]
PAIRS = list(itertools.combinations(NAMES, 2))


def method(name: str):
    return COMPRESSORS.get(name).target


def common_setup(first: str, second: str) -> str | None:
    return next((s for s in method(first).smoke.setups if s in method(second).smoke.setups), None)


@pytest.mark.slow  # 210 pairs, 68 of them trained: about 25 minutes on 2 CPUs (make test-slow, CI)
@pytest.mark.parametrize("first, second", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_every_pair_composes_with_both_effects_or_is_refused_in_one_line(effml, tmp_path, first, second):
    conflicting = any(frozenset({x, y}) in CONFLICTS for x in method(first).owns for y in method(second).owns)
    setup = common_setup(first, second) or method(first).smoke.setups[0]
    code, _, err = effml("train", *TINY, *smoke_args(setup, [first, second]))
    if conflicting:
        one_line_error(code, err, f"compressors {first} and {second} cannot compose: {first} ")
    elif common_setup(first, second) is None:
        one_line_error(code, err, "")  # one of them cannot act on the other's model
    else:
        assert code == 0, err
        m = metrics_of(tmp_path / "outputs")
        assert {first, second} <= set(m["compressors"])
        assert method(first).effect(first, m) is None and method(second).effect(second, m) is None
        return
    assert not (tmp_path / "outputs").exists()


class Declares:
    def __init__(self, *stages):
        self._stages = list(stages)

    def stages(self):
        return self._stages


def test_colliding_stage_keys_get_owner_labels_and_keep_their_keys():
    """Labels name the directories as they always were (owner_key once keys collide, so old runs
    resume); compressors match on keys, which the runner never rewrites."""
    magnitude = [Stage("train", owner="magnitude"), Stage("finetune", owner="magnitude")]
    lottery = [Stage("finetune", owner="bert_lottery"), Stage("retrain", owner="bert_lottery")]
    plan = stage_plan([Declares(*magnitude), Declares(*lottery)])
    assert [s.label for s in plan] == ["magnitude_train", "magnitude_finetune", "bert_lottery_finetune",
                                       "bert_lottery_retrain"]
    assert [s.key for s in plan] == ["train", "finetune", "finetune", "retrain"]
    assert plan[1].of("magnitude", "finetune") and not plan[2].of("magnitude", "finetune")
    assert [s.label for s in stage_plan([Declares(*magnitude)])] == ["train", "finetune"]


@pytest.mark.parametrize("order", [["bert_lottery", "magnitude"], ["magnitude", "bert_lottery"]])
def test_magnitude_beside_bert_lottery_is_refused_in_either_order(effml, tmp_path, order):
    """Once the one-shot prune silently never happened (stage names rewritten) in one order and the
    rewind to θ0 crashed on the masked layers in the other: now one line, before anything is written."""
    code, _, err = effml("train", *TINY, *smoke_args("bert", order))
    one_line_error(code, err, f"compressors {order[0]} and {order[1]} cannot compose: ")
    assert "removes heads and neurons physically" in err and "prunes the weights with masks" in err
    assert not (tmp_path / "outputs").exists()


def test_block_movement_owns_the_structure_it_cuts_so_a_quantizer_beside_it_is_refused(effml, tmp_path):
    """``granularity=row_col`` removes heads and channels at finalize: what a composed quantizer
    quantized would be cut under it. Per-weight movement only masks, and composes with ptq."""
    from effml.compressors.movement import MovementConfig

    movement = method("movement")
    assert movement.owned(MovementConfig(granularity="row_col")) == {"masks", "structure"}
    assert movement.owned(MovementConfig()) == movement.owns == {"masks"}
    code, _, err = effml("train", *TINY, *smoke_args("bert", ["movement", "ptq"]), "compressor.granularity=row_col")
    one_line_error(code, err, "compressors movement and ptq cannot compose: movement removes heads and neurons physically")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.e2e
def test_kd_and_nasty_teacher_each_train_their_own_teacher(effml, tmp_path):
    """Both declare a ``teacher`` stage: each must swap its own teacher in for its stage."""
    code, _, err = effml("train", *TINY, *smoke_args("mlp", ["kd", "nasty_teacher"]))
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    stages = {s["name"]: s for s in m["stages"]}
    assert list(stages) == ["kd_teacher", "nasty_teacher_teacher", "kd_train"]
    assert stages["kd_teacher"]["teacher_params"] == stages["nasty_teacher_teacher"]["teacher_params"] > 0
    assert method("kd").effect("kd", m) is None and method("nasty_teacher").effect("nasty_teacher", m) is None
