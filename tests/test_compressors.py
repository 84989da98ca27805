"""Every registered compressor fits end to end; magnitude pruning keeps its promises exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY, metrics_of
from effml.compressors.magnitude import MagnitudeConfig, MagnitudePruning, cubic_sparsity, keep_masks
from effml.errors import EffmlError
from effml.registry import COMPRESSORS

# Compressors of BERT structure (heads, FFN neurons) need a BERT and text; the rest get digits.
SMOKE_DATA = {"earlybert": ["model=minilm_l6", "data=rotten_tomatoes", "data.train_subset=128",
                            "data.max_length=32", "trainer.limit_train_batches=2", "data.eval_batch_size=16"]}
SMOKE_DATA["bert_lottery"] = [*SMOKE_DATA["earlybert"], "compressor.search_batches=1", "compressor.max_steps=2"]
# Distillers need a teacher: a wider LeNet trained in the run's first stage.
SMOKE_DATA["kd"] = ["data=digits", "compressor.teacher.model={name:lenet_300_100,hidden:[256,128]}"]
SMOKE_DATA["deit"] = [*SMOKE_DATA["kd"], "model=vit_tiny", "model.dim=32", "model.depth=2", "model.heads=2"]  # a small ViT student
SMOKE_DATA["nasty_teacher"] = SMOKE_DATA["kd"]  # the LeNet trained in the first stage is the adversary
SMOKE_DATA["skeptical"] = [*SMOKE_DATA["kd"], "model=resnet20", "model.depth=8", "model.width=8"]  # ACs after layer1/2
SMOKE_DATA["tinybert"] = [*SMOKE_DATA["earlybert"], "model.pretrained=null", "+model.hf_config.hidden_size=32", "+model.hf_config.num_hidden_layers=2", "+model.hf_config.num_attention_heads=4", "+model.hf_config.intermediate_size=64", "compressor.teacher={source:stage,epochs:1,model:{name:bert,pretrained:null,hf_config:{hidden_size:64,num_hidden_layers:4,num_attention_heads:4,intermediate_size:128}}}", "compressor.intermediate_epochs=1", "compressor.prediction_epochs=1"]  # random tiny BERTs, W_h 32→64
SMOKE_DATA["self_distill"] = ["data=digits", "model=resnet20", "model.depth=8", "model.width=8"]  # exits after layer1/2
SMOKE_DATA["zskt"] = [*SMOKE_DATA["kd"], "compressor.beta=0", "compressor.student_steps=1",  # data-free: MLPs learn
                      "compressor.iterations_per_epoch=40", "compressor.batch_size=64"]  # fastest; AT in test_zskt


@pytest.mark.parametrize("name", COMPRESSORS.names())
def test_every_compressor_runs_a_smoke_fit(effml, tmp_path, name):
    code, _, err = effml("train", f"compressor={name}", *TINY, *SMOKE_DATA.get(name, ["data=digits"]))
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    assert m["test_acc"] > 0.2  # 10 classes: above chance after two tiny epochs
    assert name in m["compressors"]


def test_cubic_schedule_matches_zhu_and_gupta():
    assert cubic_sparsity(0, 10, 110, 0.0, 0.9) == 0.0
    assert cubic_sparsity(110, 10, 110, 0.0, 0.9) == 0.9
    assert cubic_sparsity(60, 10, 110, 0.0, 0.9) == pytest.approx(0.9 * (1 - 0.5**3))
    steps = [cubic_sparsity(t, 10, 110, 0.0, 0.9) for t in range(0, 130, 10)]
    assert steps == sorted(steps)  # monotone; fastest early, as the paper intends
    assert steps[2] - steps[1] > steps[-3] - steps[-4]


def test_masks_prune_exact_counts_layerwise_and_global():
    torch.manual_seed(0)
    weights = [torch.randn(300, 784), torch.randn(100, 300) * 10]
    layerwise = keep_masks(weights, 0.9, "layerwise")
    for w, m in zip(weights, layerwise, strict=True):
        assert int((m == 0).sum()) == round(0.9 * w.numel())
    global_ = keep_masks(weights, 0.9, "global")
    total = sum(w.numel() for w in weights)
    assert sum(int((m == 0).sum()) for m in global_) == round(0.9 * total)
    # global ranks all weights together: the layer with 10x larger weights keeps far more of them
    assert global_[1].mean() > 5 * global_[0].mean()


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(64, 32)
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(torch.relu(self.hidden(x.flatten(1))))


def test_masked_weights_stay_zero_through_optimizer_steps_and_finalize():
    model = TinyNet()
    pruner = MagnitudePruning(MagnitudeConfig(sparsity=0.75))
    pruner.attach(model)
    pruner.prune_to(0.75)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(5):
        loss = model(torch.randn(16, 1, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert (model.hidden.weight == 0).float().mean() == 0.75
    pruner.finalize(model, None)
    assert not hasattr(model.hidden, "weight_mask") and (model.hidden.weight == 0).float().mean() == 0.75
    assert (model.classifier.weight != 0).all()  # skipped layer stays dense
    assert pruner.report()["achieved_sparsity"] == 0.75


@pytest.mark.parametrize(
    "field, value", [("sparsity", 1.0), ("sparsity", -0.5), ("scope", "sideways"), ("frequency", 0),
                     ("start_fraction", 0.9), ("layer_types", ["LSTM"])],
)
def test_magnitude_config_rejects_bad_values(field, value):
    with pytest.raises(EffmlError, match=f"compressor.{field}"):
        MagnitudeConfig(**{field: value})


@pytest.mark.e2e
def test_magnitude_recipe_hits_target_sparsity_on_fashion_mnist(effml, tmp_path):
    """The issue's acceptance run at reduced length: sparsity within 0.1% of target, real accuracy."""
    code, _, err = effml("train", "recipe=magnitude_lenet", "trainer.max_epochs=2", "trainer.progress_bar=off",
                         "measure.iters=3", "measure.min_time_s=0")
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    assert abs(m["compressors"]["magnitude"]["achieved_sparsity"] - 0.9) < 0.001
    assert m["test_acc"] > 0.80  # dense LeNet-300-100 reaches about 0.88 on Fashion-MNIST
