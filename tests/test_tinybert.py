"""TinyBERT (Jiao et al., Findings of EMNLP 2020): the losses by hand, attention scores against
transformers' eager attention, the layer mapping, W_e/W_h in and out of the model, the stages end
to end with resume, and bad input."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import metrics_of, one_line_error
from effml.compressors.base import Stage
from effml.compressors.tinybert import (
    PROJECTION,
    TinyBERT,
    TinyBERTConfig,
    attention_scores,
    feature_paths,
    layer_mapping,
    masked_mse,
    read_features,
    soft_cross_entropy,
)
from effml.data import DataInfo
from effml.errors import EffmlError
from effml.models.bert import BertClassifier, BertClassifierConfig
from effml.teachers import FeatureTap

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread, as the runs use


def tiny_bert(hidden=32, layers=2, heads=4, vocab=120, attn="sdpa", seed=0) -> BertClassifier:
    torch.manual_seed(seed)
    shape = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
             "intermediate_size": 2 * hidden, "vocab_size": vocab, "max_position_embeddings": 32}
    cfg = BertClassifierConfig(pretrained=None, hf_config=shape, attn_implementation=attn)
    return BertClassifier.from_config(cfg, DataInfo(2, "text"))


def batch(vocab=120) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0  # padding must not count
    mask[2, 7:] = 0
    return {"input_ids": torch.randint(5, vocab, (3, 9), generator=generator), "attention_mask": mask,
            "labels": torch.tensor([0, 1, 1])}


def hook_count(model: nn.Module) -> int:
    """Forward hooks of feature taps (transformers adds hooks of its own on first use)."""
    return sum("FeatureTap" in getattr(h, "__qualname__", "") for m in model.modules() for h in m._forward_hooks.values())


# -- the losses by hand ------------------------------------------------------------------------
def test_soft_cross_entropy_and_masked_mse_by_hand():
    s, t = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 1.0, 3.0]])
    p = [math.exp(v) / sum(math.exp(u) for u in (0.0, 1.0, 3.0)) for v in (0.0, 1.0, 3.0)]
    log_q = [v - math.log(sum(math.exp(u) for u in (1.0, 2.0, 0.0))) for v in (1.0, 2.0, 0.0)]
    assert soft_cross_entropy(s, t, 1.0).item() == pytest.approx(-sum(a * b for a, b in zip(p, log_q, strict=True)))
    # t = 2 softens both sides and is not rescaled by t² (Eq. 10)
    assert soft_cross_entropy(s, t, 2.0).item() == pytest.approx(soft_cross_entropy(s / 2, t / 2, 1.0).item())
    assert soft_cross_entropy(s, t, 1.0) > soft_cross_entropy(t, t, 1.0)  # its minimum: the teacher's entropy

    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])  # [1, 3 tokens, 2]; the third is padding
    b = torch.zeros_like(a)
    mask = torch.tensor([[1.0, 1.0, 0.0]])[:, :, None]
    assert masked_mse(a, b, mask).item() == pytest.approx((1 + 4 + 9 + 16) / 4)


# -- attention scores, checked against transformers' eager attention ----------------------------
def test_tapped_attention_scores_are_the_eager_pre_softmax_scores():
    x = batch()
    mask = x["attention_mask"]
    eager = tiny_bert(attn="eager").eval()
    with FeatureTap(eager, feature_paths([0, 1], attention=True)) as tap:
        out = eager.bert(input_ids=x["input_ids"], attention_mask=mask, output_attentions=True,
                         output_hidden_states=True)
        features = read_features(eager, tap.features, [0, 1], attention=True)
    assert hook_count(eager) == 0  # the tap leaves no hooks behind
    blocked = (1 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for layer in range(2):
        scores = features.scores[layer]
        assert scores.shape == (3, 4, 9, 9)
        # softmax(scores + mask) is exactly what eager attention returns as its weights ...
        torch.testing.assert_close((scores + blocked).softmax(-1), out.attentions[layer])
        # ... and the scores are QKᵀ/√d_k of the layer's input, before the mask (unnormalized)
        attention = eager.bert.encoder.layer[layer].attention.self
        h = out.hidden_states[layer]
        by_hand = attention_scores(attention.query(h), attention.key(h), 8)
        q = attention.query(h).view(3, 9, 4, 8).transpose(1, 2)
        k = attention.key(h).view(3, 9, 4, 8).transpose(1, 2)
        torch.testing.assert_close(by_hand, q @ k.transpose(-1, -2) / math.sqrt(8))
        torch.testing.assert_close(scores, by_hand)
        torch.testing.assert_close(features.hidden[layer], out.hidden_states[layer + 1])
    torch.testing.assert_close(features.embedding, out.hidden_states[0])

    # the taps read Q and K, so SDPA (which never forms the weights) gives the same scores
    sdpa = tiny_bert(attn="sdpa").eval()
    with FeatureTap(sdpa, feature_paths([1], attention=True)) as tap:
        sdpa(input_ids=x["input_ids"], attention_mask=mask)
        torch.testing.assert_close(read_features(sdpa, tap.features, [1], True).scores[0], features.scores[1])


# -- the layer mapping -------------------------------------------------------------------------
def test_layer_mapping_uniform_top_bottom_custom_and_out_of_range():
    assert layer_mapping(3, 6) == [2, 4, 6]  # g(m) = 2m: every other layer, as model.layers=[1,3,5]
    assert layer_mapping(4, 12) == [3, 6, 9, 12]  # the paper's TinyBERT4 from BERT-base
    assert layer_mapping(4, 6) == [2, 3, 5, 6]  # not divisible: ⌈m·N/M⌉, still ending at N
    assert layer_mapping(3, 6, "top") == [4, 5, 6]
    assert layer_mapping(3, 6, "bottom") == [1, 2, 3]
    assert layer_mapping(3, 6, "uniform", [1, 1, 6]) == [1, 1, 6]
    with pytest.raises(EffmlError, match=r"compressor.layer_map maps student layer 3 to layer 9, beyond the teacher's 6"):
        layer_mapping(3, 6, layer_map=[2, 4, 9])
    with pytest.raises(EffmlError, match="compressor.mapping=bottom maps student layer 4 to layer 4, beyond"):
        layer_mapping(4, 3, "bottom")
    with pytest.raises(EffmlError, match="compressor.layer_map has 2 entries, but the student has 3 layers"):
        layer_mapping(3, 6, layer_map=[2, 4])
    for bad, field in ({"layer_map": [0, 2]}, "layer_map"), ({"mapping": "middle"}, "mapping"), \
            ({"intermediate_epochs": -1}, "intermediate_epochs"), ({"attention_weight": -1.0}, "attention_weight"), \
            ({"intermediate_epochs": 0, "prediction_epochs": 0}, "prediction_epochs"):
        with pytest.raises(EffmlError, match=f"compressor.{field}"):
            TinyBERTConfig(**bad)


# -- W_e / W_h, compatibility checks, and the loss against a hand computation -------------------
def bound(student, teacher, **cfg) -> TinyBERT:
    compressor = TinyBERT(TinyBERTConfig(**cfg))
    compressor.attach(student)
    compressor.teacher_module = teacher.eval().requires_grad_(False)
    compressor.bind(student, compressor.teacher_module)
    return compressor


def test_projection_joins_the_student_for_training_and_leaves_it_in_finalize():
    student, teacher = tiny_bert(hidden=32, layers=2), tiny_bert(hidden=64, layers=4, seed=1)
    compressor = bound(student, teacher)
    projection = getattr(student, PROJECTION)
    assert projection["hidden"].weight.shape == (64, 32) and projection["embedding"].weight.shape == (64, 32)
    assert any(n.startswith(PROJECTION) for n, _ in student.named_parameters())  # trained and checkpointed
    assert compressor.maps["teacher"] == [2, 4]
    compressor.finalize(student, None)
    assert not hasattr(student, PROJECTION) and not any(PROJECTION in k for k in student.state_dict())
    assert compressor.report()["projection_params"] == 2 * (64 * 32 + 64)
    same_width = tiny_bert(hidden=64, layers=2)
    bound(same_width, teacher)
    assert not hasattr(same_width, PROJECTION)  # equal widths: nothing to learn


def test_teachers_with_another_vocabulary_or_head_count_are_refused():
    with pytest.raises(EffmlError, match="compressor.teacher has a vocabulary of 99 tokens, the student 120"):
        bound(tiny_bert(), tiny_bert(vocab=99))
    with pytest.raises(EffmlError, match="student layer 1 has 4 attention heads, compressor.teacher layer 2 has 8"):
        bound(tiny_bert(hidden=32, heads=4), tiny_bert(hidden=64, heads=8, layers=4))
    bound(tiny_bert(hidden=32, heads=4), tiny_bert(hidden=64, heads=8, layers=4), attention_weight=0.0)
    with pytest.raises(EffmlError, match="the student .* must be a BERT"):
        TinyBERT(TinyBERTConfig()).attach(nn.Linear(2, 2))


class FakeTask:
    def log(self, *args, **kwargs):
        pass


def test_intermediate_and_prediction_losses_match_a_hand_computation():
    student, teacher = tiny_bert(hidden=32, layers=2), tiny_bert(hidden=64, layers=4, seed=1)
    compressor = bound(student, teacher)
    x = batch()
    compressor.begin_stage(Stage("intermediate", 1, "tinybert", role="plain"), FakeTask())
    assert hook_count(student) == 1 + 2 * 3  # the embedding; per layer its output, Q and K
    assert compressor.hard_loss_weight == 0.0  # no labels in TinyBERT's stages
    student.eval()  # no dropout: the hand computation below runs the same forward
    inputs = {k: v for k, v in x.items() if k != "labels"}
    loss = compressor.loss(FakeTask(), x, student(**inputs))

    s = student.bert(**inputs, output_hidden_states=True).hidden_states
    t = teacher.bert(**inputs, output_hidden_states=True).hidden_states
    real = x["attention_mask"].bool()
    projection = getattr(student, PROJECTION)

    def mse(a, b):  # over the real tokens only
        return ((a - b)[real]).square().mean()

    def scores(model, h, layer):
        attention = model.bert.encoder.layer[layer].attention.self
        return attention_scores(attention.query(h), attention.key(h), attention.attention_head_size)

    pairs = real[:, None, :, None] & real[:, None, None, :]
    expected = mse(projection["embedding"](s[0]), t[0])
    for m, n in ((1, 2), (2, 4)):  # g(m) = 2m
        expected = expected + mse(projection["hidden"](s[m]), t[n])
        diff = scores(student, s[m - 1], m - 1) - scores(teacher, t[n - 1], n - 1)
        expected = expected + diff.square()[pairs.expand_as(diff)].mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()  # W_h and the student's Q/K learn from it; the teacher stays frozen
    assert projection["hidden"].weight.grad.abs().sum() > 0
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    compressor.end_stage(Stage("intermediate", 1, "tinybert", role="plain"), {})
    assert hook_count(student) == 0

    compressor.begin_stage(Stage("prediction", 1, "tinybert", role="plain"), FakeTask())
    logits = student(**inputs)
    prediction = compressor.loss(FakeTask(), x, logits)
    target = F.softmax(teacher(**inputs), -1)
    torch.testing.assert_close(prediction, -(target * F.log_softmax(logits, -1)).sum(-1).mean())
    assert hook_count(student) == 0  # no features needed: no taps


# -- end to end: every stage, resume, bad input ---------------------------------------------------
TEACHER = "{hidden_size:64,num_hidden_layers:4,num_attention_heads:4,intermediate_size:128}"
RUN = ["compressor=tinybert", "model=minilm_l6", "data=rotten_tomatoes", "data.train_subset=64",
       "data.max_length=24", "data.batch_size=32", "data.eval_batch_size=64", "trainer.limit_train_batches=2",
       "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.progress_bar=off",
       "measure.batch_size=4", "measure.iters=2", "measure.warmup=1", "measure.min_time_s=0",
       "measure.train_step=false", "model.pretrained=null", "+model.hf_config.hidden_size=32",
       "+model.hf_config.num_hidden_layers=2", "+model.hf_config.num_attention_heads=4",
       "+model.hf_config.intermediate_size=64",
       f"compressor.teacher={{source:stage,epochs:1,model:{{name:bert,pretrained:null,hf_config:{TEACHER}}}}}",
       "compressor.intermediate_epochs=1", "compressor.prediction_epochs=1"]


def test_stages_run_end_to_end_and_resume_to_the_same_weights(effml, tmp_path):
    general = tiny_bert(hidden=64, layers=2, vocab=30522, seed=3)  # a "pre-trained" BERT of the teacher's width
    torch.save(general.state_dict(), tmp_path / "general.pt")
    general_cfg = ("compressor.general_teacher={source:checkpoint,path:" + str(tmp_path / "general.pt") +
                   ",model:{name:bert,pretrained:null,hf_config:{hidden_size:64,num_hidden_layers:2,"
                   "num_attention_heads:4,intermediate_size:128,max_position_embeddings:32}}}")
    code, _, err = effml("train", *RUN, general_cfg, "compressor.general_epochs=1")
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    assert [s["name"] for s in m["stages"]] == ["teacher", "general", "intermediate", "prediction"]
    stages = {s["name"]: s for s in m["stages"]}
    assert set(stages["general"]["tinybert_losses"]) == {"embedding", "hidden", "attention"}
    assert set(stages["prediction"]["tinybert_losses"]) == {"prediction"}
    report = m["compressors"]["tinybert"]
    assert report["layer_map"] == [2, 4] and report["general_layer_map"] == [1, 2]
    assert report["projection_params"] == 2 * (64 * 32 + 64)
    assert m["speed_reference"] == "teacher" and m["speed"]["compressed"]["params"] < m["speed"]["dense"]["params"]
    run = next((tmp_path / "outputs").rglob("metrics.json")).parent
    weights = torch.load(run / "model.pt", weights_only=True)
    assert not any(PROJECTION in k for k in weights)  # W_e, W_h do not ship with the student
    assert any(PROJECTION in k for k in torch.load(run / "stages/02_intermediate/end.pt", weights_only=False)["model"])

    # resume after the intermediate stage: the projection and the in-run teacher come back, and the
    # prediction stage ends on the very same weights
    shutil.rmtree(run / "stages/03_prediction")
    (run / "metrics.json").unlink()
    (run / "model.pt").unlink()
    code, _, err = effml("train", *RUN, general_cfg, "compressor.general_epochs=1")
    assert code == 0, err
    resumed = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)


def test_bad_layer_map_or_teacher_is_one_line(effml):
    code, _, err = effml("train", *RUN, "compressor.layer_map=[2,9]")
    one_line_error(code, err, "compressor.layer_map maps student layer 2 to layer 9, beyond the teacher's 4 layers")
    other_vocab = TEACHER.replace("{", "{vocab_size:1000,", 1)  # it could not even read the student's tokens
    teacher = f"compressor.teacher={{source:stage,model:{{name:bert,pretrained:null,hf_config:{other_vocab}}}}}"
    code, _, err = effml("train", *[a for a in RUN if not a.startswith("compressor.teacher=")], teacher)
    one_line_error(code, err, "compressor.teacher has a vocabulary of 1000 tokens, the student 30522")
    code, _, err = effml("train", *RUN, "compressor.mapping=sideways")
    one_line_error(code, err, "compressor.mapping must be one of uniform, top, bottom")
