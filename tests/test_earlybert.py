"""EarlyBERT (Chen et al., ACL 2021) and the BERT surgery under it: gates, physical removal, export,
the early-bird search and the draw, end to end on Rotten Tomatoes, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_resume import kill_when, start

from conftest import metrics_of, one_line_error
from effml.compressors.earlybert import EarlyBERT, EarlyBERTConfig, heads_kept
from effml.data import DataInfo
from effml.models import bert_surgery as surgery
from effml.models.bert import BertClassifier, BertClassifierConfig
from effml.paths import RunDir

TOY = ["recipe=earlybert", "data.train_subset=320", "data.batch_size=32", "data.eval_batch_size=32", "data.max_length=32",
       "compressor.check_every=2", "compressor.window=3", "trainer.limit_val_batches=2",
       "trainer.limit_test_batches=2", "trainer.progress_bar=off", "measure.batch_size=4",
       "measure.iters=2", "measure.warmup=1", "measure.min_time_s=0"]


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return BertClassifier.from_config(BertClassifierConfig(), DataInfo(2, "text")).eval()


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(1000, 5000, (3, 12), generator=generator),
         "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    x["attention_mask"][1, 7:] = 0  # padding must not change anything either
    return x


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(**inputs())


def test_removing_heads_and_neurons_computes_what_zero_gates_compute(minilm, tmp_path):
    import copy

    model = copy.deepcopy(minilm)
    dense = logits(model)
    gates = surgery.Gates(model, "test", heads=True, neurons=True)
    assert torch.equal(logits(model), dense)  # gates at 1 change nothing
    heads = [[h for h in range(12) if (h + layer) % 3] for layer in range(6)]  # 8 of 12, varying by layer
    neurons = [list(range(layer, 1536, 2)) for layer in range(6)]
    with torch.no_grad():
        for layer, keep_h, keep_n in zip(gates.layers, heads, neurons, strict=True):
            gate = layer.attention.output.head_gate
            gate.zero_()[keep_h] = torch.linspace(0.5, 1.5, len(keep_h))
            layer.intermediate.neuron_gate.zero_()[keep_n] = 2.0
    gated = logits(model)
    assert not torch.allclose(gated, dense)
    surgery.shrink(model, heads, neurons)
    assert torch.allclose(logits(model), gated, atol=1e-5)
    gates.remove(fold=True)  # the coefficients go into the weights: the same function, no gates left
    assert torch.allclose(logits(model), gated, atol=1e-5)
    assert not [k for k in model.state_dict() if "gate" in k]
    layer0 = model.bert.encoder.layer[0]
    assert layer0.attention.self.query.weight.shape == (8 * 32, 384)
    assert layer0.attention.output.dense.weight.shape == (384, 8 * 32)
    assert layer0.intermediate.dense.weight.shape == (768, 384)
    assert layer0.output.dense.weight.shape == (384, 768)

    # export: reloads with its per-layer structure, directly and as model.pretrained
    surgery.save_pruned(model, tmp_path / "ticket")
    assert surgery.saved_structure(tmp_path / "ticket").heads == heads
    reloaded = BertClassifier.from_config(BertClassifierConfig(pretrained=str(tmp_path / "ticket")), DataInfo(2, "text"))
    reloaded.load_state_dict(surgery.load_head(tmp_path / "ticket"), strict=False)
    assert torch.allclose(logits(reloaded), logits(model), atol=1e-6)
    encoder = surgery.load_pruned(tmp_path / "ticket")
    assert sum(p.numel() for p in encoder.parameters()) == sum(p.numel() for p in model.bert.parameters())


@pytest.mark.parametrize("count, multiple, unit, limit, expected", [
    (7, 128, 64, 12, 8),  # BERT-base heads: 7 × 64 = 448 → 8 × 64 = 512
    (8, 128, 32, 12, 8),  # MiniLM heads (32 wide): 8 × 32 = 256 already aligned
    (1843, 128, 1, 3072, 1920),  # docs/ARCHITECTURE.md §6: 1843 ran slower than dense, 1920 faster
    (1843, 1, 1, 3072, 1843),
    (3071, 128, 1, 3072, 3072),  # never beyond the layer's width
    (0, 8, 1, 100, 8),  # never zero
])
def test_round_up_to_the_hardware_multiple(count, multiple, unit, limit, expected):
    assert surgery.round_up(count, multiple, unit, limit) == expected


def earlybert_on(model, channel_multiple: int = 1, **cfg) -> EarlyBERT:
    compressor = EarlyBERT(EarlyBERTConfig(**cfg))
    compressor.attach(model)
    hardware = SimpleNamespace(channel_multiple=channel_multiple)
    compressor.prepare(SimpleNamespace(hardware=hardware, model=BertClassifierConfig(), run_dir=RunDir(Path("/nonexistent"))),
                       None)
    return compressor


def set_coefficients(compressor: EarlyBERT, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in compressor.gates.parameters():
            gate.copy_(torch.rand(gate.shape, generator=generator))


@pytest.mark.parametrize("multiple", [1, 128])
def test_draw_prunes_a_third_of_heads_per_layer_and_40_percent_of_neurons_globally(minilm, multiple):
    import copy

    compressor = earlybert_on(copy.deepcopy(minilm), channel_multiple=multiple)
    set_coefficients(compressor)
    ticket = compressor._draw()
    heads, ffn = compressor._coefficients()
    for kept, scores in zip(ticket.heads, heads, strict=True):
        assert len(kept) == 8  # 12 − round(12 / 3); 8 × 32 = 256 is a multiple of 128 too
        assert set(kept) == set(scores.topk(8).indices.tolist())  # the largest |c| of the layer
    drawn = compressor.draw["ffn_drawn"]
    assert sum(drawn) == round(6 * 1536 * 0.6)  # one global ranking
    flat = torch.cat(ffn)
    threshold = flat.topk(sum(drawn)).values.min()
    assert drawn == [int((c >= threshold).sum()) for c in ffn]
    for kept, count in zip(ticket.neurons, drawn, strict=True):
        assert len(kept) % multiple == 0 or len(kept) == 1536
        assert count <= len(kept) < count + multiple

    compressor.cfg.ticket = "random"  # the control: the same counts at random positions
    random = compressor._draw()
    assert [len(k) for k in random.heads] == [len(k) for k in ticket.heads]
    assert [len(k) for k in random.neurons] == [len(k) for k in ticket.neurons]
    assert random.heads != ticket.heads and random.neurons != ticket.neurons


def test_early_bird_stops_when_the_window_of_masks_settles(minilm):
    import copy

    compressor = earlybert_on(copy.deepcopy(minilm), window=3, threshold=0.1)
    for step, seed in enumerate([0, 1, 2, 2, 2], start=1):
        set_coefficients(compressor, seed)
        compressor._record_mask(step)
        settled = compressor._early_bird()
        assert settled == (step == 5), step  # masks 3, 4, 5 identical: within any threshold
    assert compressor.search[1]["head_distance"] > 0.1 and compressor.search[4]["ffn_distance"] == 0.0


@pytest.mark.parametrize("fraction, kept", [(0.0, 12), (0.333, 8), (0.5, 6), (0.95, 1), (0.99, 1)])
def test_every_layer_keeps_at_least_one_head(fraction, kept):
    assert heads_kept(12, fraction) == kept


def test_the_search_penalty_is_l1_on_every_coefficient():
    torch.manual_seed(0)
    model = BertClassifier.from_config(BertClassifierConfig(), DataInfo(2, "text"))
    earlybert = EarlyBERT(EarlyBERTConfig(l1_heads=1e-3, l1_ffn=1e-4))
    earlybert.attach(model)
    with torch.no_grad():
        for gate in earlybert.gates.parameters():
            gate.uniform_(-2, 2)
    heads, ffn = earlybert.gates.of(surgery.HEAD_GATE), earlybert.gates.of(surgery.NEURON_GATE)
    penalty = earlybert.loss(None, None, None)
    expected = 1e-3 * sum(float(g.abs().sum()) for g in heads) + 1e-4 * sum(float(g.abs().sum()) for g in ffn)
    assert abs(float(penalty) - expected) < 1e-6 * expected
    penalty.backward()
    assert all(torch.equal(g.grad, 1e-3 * g.detach().sign()) for g in heads)
    assert all(torch.equal(g.grad, 1e-4 * g.detach().sign()) for g in ffn)
    # the mask check reads |c| of every layer in one copy, split back per layer
    abs_heads, abs_ffn = earlybert._coefficients()
    assert all(torch.equal(a, g.detach().abs()) for a, g in zip([*abs_heads, *abs_ffn], [*heads, *ffn], strict=True))


def test_the_official_schedule_trains_the_ticket_shorter_at_a_higher_lr(minilm):
    # github.com/VITA-Group/EarlyBERT finetune/launch_earlybert_glue.sh: 2 epochs at 2x the lr
    from effml.config import TrainerConfig
    from effml.task import ClassificationTask

    search, ticket = EarlyBERT(EarlyBERTConfig(ticket_epochs=2, ticket_lr_scale=2.0)).stages()
    assert (search.key, search.max_epochs, search.lr_scale) == ("search", 1, 1.0)
    assert (ticket.key, ticket.max_epochs, ticket.lr_scale) == ("ticket", 2, 2.0)
    task = ClassificationTask(minilm, TrainerConfig(optimizer="adamw", lr=5e-5, lr_schedule="constant", warmup_fraction=0))
    task.lr_scale = ticket.lr_scale  # as the runner sets it per stage
    assert task.configure_optimizers().param_groups[0]["lr"] == 1e-4


def test_earlybert_end_to_end_reports_a_smaller_faster_ticket(effml, tmp_path):
    code, out, err = effml("train", *TOY, "trainer.max_epochs=1")
    assert code == 0, err
    m = metrics_of(tmp_path)
    report = m["compressors"]["earlybert"]
    assert [s["name"] for s in m["stages"]] == ["search", "ticket"]
    search = report["search"]
    assert report["stopped_early"] and report["early_bird_step"] == search[-1]["step"] < m["stages"][0]["steps"] + 1
    assert m["stages"][0]["early_bird_step"] == report["early_bird_step"]
    assert report["heads_per_layer"] == [8] * 6 and len(report["ffn_per_layer"]) == 6
    assert sum(report["ffn_per_layer"]) == round(6 * 1536 * 0.6)
    speed = m["speed"]
    assert speed["compressed"]["params"] < 0.85 * speed["dense"]["params"]
    assert m["flops"]["dense"] / m["flops"]["compressed"] > 1.4
    assert speed["dense"]["train_step_ms"] > 0 and speed["compressed"]["train_step_ms"] > 0
    assert "train_speedup" in speed and "speedup" in speed
    export = Path(report["export"])
    assert surgery.saved_structure(export).ffn == report["ffn_per_layer"]
    assert (export / surgery.HEAD_FILE).exists() and (export / "tokenizer.json").exists()
    # the ticket is a model of its own: fine-tune it again from its export
    shared = [a for a in TOY if not a.startswith(("recipe=", "compressor."))]
    code, out, err = effml("train", *shared, "recipe=bert_finetune", f"model.pretrained={export}",
                           "trainer.max_epochs=1", "trainer.limit_train_batches=2", "measure.enabled=false")
    assert code == 0, err
    again = json.loads(next((tmp_path / "outputs" / "bert_finetune").rglob("metrics.json")).read_text())
    assert again["sparsity"]["params_total"] == speed["compressed"]["params"]


@pytest.mark.slow  # minutes on 2 CPUs: make test-slow
def test_kill_mid_ticket_and_after_it_then_rerun_gives_the_same_ticket(tmp_path):
    # 5 steps an epoch: the early bird at step 3, then a 2-epoch ticket with a checkpoint after epoch 1;
    # the random ticket, so its draw must also come out the same after each kill
    args = [*TOY, "data.train_subset=160", "compressor.check_every=1", "trainer.max_epochs=2",
            "measure.enabled=false", "compressor.ticket=random"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    assert start(straight, [], ["train", *args]).wait(timeout=600) == 0
    # 1) inside the ticket stage: the draw is redone from the search's coefficients, then resumed
    kill_when(start(killed, [], ["train", *args]), "outputs/*/*/*/stages/01_ticket/checkpoints/last.ckpt", killed)
    assert not list(killed.rglob("01_ticket/end.pt"))
    # 2) after the ticket finished: the saved ticket shape is restored before its weights load
    kill_when(start(killed, [], ["train", *args]), "outputs/*/*/*/stages/01_ticket/end.pt", killed)
    assert start(killed, [], ["train", *args]).wait(timeout=600) == 0
    a, b = metrics_of(straight), metrics_of(killed)
    report = a["compressors"]["earlybert"]  # plain JSON: no tensors leak from the compressor state
    assert report["ticket_kind"] == "random" and all(isinstance(h, int) for h in report["kept_heads"][0])
    assert a["compressors"]["earlybert"] == {**b["compressors"]["earlybert"], "export": a["compressors"]["earlybert"]["export"]}
    assert a["test_acc"] == b["test_acc"] and a["val_acc"] == b["val_acc"]
    ends = [torch.load(next(root.rglob("01_ticket/end.pt")), weights_only=False)["model"] for root in (straight, killed)]
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


@pytest.mark.parametrize("override, message", [
    ("compressor.head_fraction=1.0", "compressor.head_fraction must be in [0, 1)"),
    ("compressor.ffn_fraction=1.0", "compressor.ffn_fraction must be in [0, 1)"),
    ("compressor.ffn_fraction=-0.1", "compressor.ffn_fraction must be in [0, 1)"),
    ("compressor.ticket=lucky", "compressor.ticket must be one of searched, random"),
    ("model=lenet_300_100", "compressor earlybert needs a BERT encoder"),
])
def test_bad_input_is_one_line_and_writes_nothing(effml, tmp_path, override, message):
    extra = ["data=fashion_mnist"] if override.startswith("model=") else []
    code, _, err = effml("train", "recipe=earlybert", override, *extra)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()
