"""TinyBERT: Transformer distillation of a BERT teacher into a shallower (and narrower) student.

Jiao, Yin, Shang, Jiang, Chen, Li, Wang, Liu, "TinyBERT: Distilling BERT for Natural Language
Understanding", Findings of EMNLP 2020 (arXiv 1909.10351), §3. Student layer m learns from teacher
layer n = g(m) (§3.1); g(0) = 0 is the embedding layer, g(M + 1) = N + 1 the prediction layer:

    L_embd = MSE(E^S W_e, E^T)                          (Eq. 9)
    L_hidn = MSE(H^S_m W_h, H^T_g(m))                   (Eq. 8, for m = 1..M)
    L_attn = 1/h Σ_i MSE(A^S_{m,i}, A^T_{g(m),i})       (Eq. 7; A = QKᵀ/√d_k, the scores *before*
                                                         the softmax: "the unnormalized attention")
    L_pred = CE(softmax(z^T / t), z^S / t), t = 1       (Eq. 10, soft cross-entropy, no T²)
    L_model = Σ_m λ_m L_layer(m)                        (Eq. 11; λ = 1, summed over the layers)

W_e and W_h (student width → teacher width) are learned with the student; they exist only when the
widths differ (MiniLM-style students of the teacher's width need none) and leave the model in
``finalize``. MSEs average over the real tokens (and real query/key pairs for A): the padding
positions carry no language; the official code also averages over padding, setting masked scores to 0.

Layer mapping g (the paper's ablation compares these): ``uniform`` g(m) = ⌈m·N/M⌉ (the paper's default: every N/M-th
layer, g(M) = N), ``top`` g(m) = N − M + m, ``bottom`` g(m) = m, or an explicit ``layer_map`` list of
teacher layers numbered 1..N. Teacher attention scores need equal head counts per mapped pair (the
paper keeps h = 12 in both); vocabularies must match (inputs are shared token by token).

Two-stage learning (§3.2), each stage of the run skippable by its epochs:

1. ``general`` (a ``prepare`` stage, off by default): embedding + hidden + attention distillation
   from the *pre-trained* BERT (``general_teacher``, by default the embedded MiniLM-L6, features
   only) on the task's training text with its labels ignored. The paper runs it on English
   Wikipedia (2.5B words, 3 epochs): offline there is only the task's text, and a student
   initialized from the pre-trained teacher's layers already starts where general distillation
   would lead; turn it on for a randomly initialized narrow student.
2. task-specific, under the fine-tuned teacher (``teacher``): ``intermediate`` (embedding + hidden
   + attention MSE; paper: 20 epochs on augmented data, lr 5e-5) then ``prediction`` (L_pred only;
   paper: 3 epochs, lr from {1e-5, 2e-5, 3e-5}). Neither uses the labels (``hard_loss_weight`` 0).

Not implemented: the data augmentation of §3.2 (GloVe + BERT-MLM word replacement; neither a GloVe
table nor an MLM head ships offline). Composed beside a compressor with its own ``train`` stage (a
pruner), TinyBERT's ``plain`` stages give way and that stage trains with L_embd + L_hidn + L_attn +
L_pred together.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.choice import check_choices, choice
from effml.compressors._distill import DistillConfig, Distiller, without_labels
from effml.compressors.base import RunContext, Smoke, Stage
from effml.errors import EffmlError
from effml.registry import COMPRESSORS
from effml.teachers import FeatureTap, Teacher, TeacherConfig, build_teacher

LayerMapping = choice("LayerMapping", "uniform top bottom")  # g(m) (the paper's mapping ablation)
TERMS = ("embedding", "hidden", "attention", "prediction")
PROJECTION = "tinybert_projection"  # the attribute W_e, W_h live under while the student trains


@dataclass
class TinyBERTConfig(DistillConfig):
    """TinyBERT (Jiao et al., Findings of EMNLP 2020): embedding + hidden + attention MSE through
    g(m) = uniform (intermediate stage, 20 epochs), then soft cross-entropy at t=1 (prediction stage,
    3 epochs); general distillation from the pre-trained MiniLM-L6 off (general_epochs=0). Set
    compressor.teacher (the fine-tuned BERT)."""

    name: str = "tinybert"
    temperature: float = 1.0  # t of L_pred (Eq. 10: "set to 1 in this work")
    # the pre-trained teacher of general distillation (features only: no trained head needed)
    general_teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(source="hf", path="minilm_l6"))
    general_epochs: int = 0  # paper: 3 epochs on Wikipedia; 0 skips the stage (see the module docstring)
    intermediate_epochs: int = 20  # paper: 20 (on 20x augmented data); 0 skips the stage
    prediction_epochs: int = 3  # paper: 3; 0 skips the stage
    # learning rates as multiples of trainer.lr, the paper's for trainer.lr = 5e-5:
    general_lr_scale: float = 2.0  # 1e-4, BERT pre-training's
    intermediate_lr_scale: float = 1.0  # 5e-5
    prediction_lr_scale: float = 0.6  # 3e-5
    mapping: LayerMapping = LayerMapping.uniform
    layer_map: list[int] | None = None  # explicit g(1..M), teacher layers numbered 1..N; overrides mapping
    embedding_weight: float = 1.0  # λ of L_embd (0: the ablation "w/o Embd")
    hidden_weight: float = 1.0  # λ of L_hidn ("w/o Hidn")
    attention_weight: float = 1.0  # λ of L_attn ("w/o Attn")
    prediction_weight: float = 1.0  # λ of L_pred ("w/o Pred")

    def __post_init__(self):
        super().__post_init__()
        check_choices(self, "compressor")
        if self.layer_map is not None and (not self.layer_map or min(self.layer_map) < 1):
            raise EffmlError(
                "compressor.layer_map must list teacher layers numbered from 1 (0, the embedding, is always "
                f"matched to the student's embedding); got {self.layer_map}"
            )
        for name in ("general_epochs", "intermediate_epochs", "prediction_epochs"):
            if getattr(self, name) < 0:
                raise EffmlError(f"compressor.{name} must be >= 0 (0 skips the stage); got {getattr(self, name)}")
        for name in ("general_lr_scale", "intermediate_lr_scale", "prediction_lr_scale"):
            if getattr(self, name) <= 0:
                raise EffmlError(f"compressor.{name} must be > 0; got {getattr(self, name)}")
        for term in TERMS:
            if getattr(self, f"{term}_weight") < 0:
                raise EffmlError(f"compressor.{term}_weight must be >= 0; got {getattr(self, f'{term}_weight')}")
        self._check_stages()
        if self.general_teacher.source == "stage":
            raise EffmlError("compressor.general_teacher must be a pre-trained BERT (source hf, run, recipe or "
                             "checkpoint), not trained in the run (source stage)")

    def _check_stages(self) -> None:
        if not self.intermediate_epochs and not self.prediction_epochs:
            raise EffmlError("compressor.intermediate_epochs and compressor.prediction_epochs are both 0: "
                             "TinyBERT needs at least one task-specific stage")
        features = self.embedding_weight + self.hidden_weight + self.attention_weight
        if (self.intermediate_epochs or self.general_epochs) and features == 0:
            raise EffmlError("compressor.embedding_weight, hidden_weight and attention_weight are all 0: "
                             "the general and intermediate stages would learn nothing (set their epochs to 0)")
        if self.prediction_epochs and self.prediction_weight == 0:
            raise EffmlError("compressor.prediction_weight is 0: the prediction stage would learn nothing "
                             "(set compressor.prediction_epochs=0)")


# -- the losses --------------------------------------------------------------------------------
def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """−Σ softmax(z^T/t) · log_softmax(z^S/t), averaged over the batch (Eq. 10)."""
    targets = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return -(targets * F.log_softmax(student_logits.float() / temperature, dim=-1)).sum(-1).mean()


def masked_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the entries where ``mask`` (broadcast to the inputs) is 1."""
    squared = (student.float() - teacher.float()).square() * mask
    return squared.sum() / mask.expand_as(squared).sum().clamp_min(1)


def attention_scores(query: Tensor, key: Tensor, head_size: int) -> Tensor:
    """QKᵀ/√d_k per head, [batch, heads, length, length], from the Q and K projections
    ([batch, length, heads·d_k]): the scores eager attention adds the mask to and softmaxes."""
    batch, length, width = query.shape
    q = query.view(batch, length, width // head_size, head_size).transpose(1, 2)
    k = key.view(batch, length, width // head_size, head_size).transpose(1, 2)
    return q @ k.transpose(-1, -2) / math.sqrt(head_size)


def layer_mapping(student_layers: int, teacher_layers: int, mapping: str = "uniform",
                  layer_map: list[int] | None = None, teacher: str = "teacher") -> list[int]:
    """g(1..M): the teacher layer (numbered 1..N) each student layer learns from; one-line errors."""
    m, n = student_layers, teacher_layers
    if layer_map is not None:
        if len(layer_map) != m:
            raise EffmlError(f"compressor.layer_map has {len(layer_map)} entries, but the student has {m} layers")
        g, what = list(layer_map), "compressor.layer_map"
    else:
        g = {
            "uniform": [math.ceil(i * n / m) for i in range(1, m + 1)],
            "top": [n - m + i for i in range(1, m + 1)],
            "bottom": list(range(1, m + 1)),
        }[mapping]
        what = f"compressor.mapping={mapping}"
    for index, layer in enumerate(g):
        if not 1 <= layer <= n:
            raise EffmlError(
                f"{what} maps student layer {index + 1} to layer {layer}, beyond the {teacher}'s {n} layers "
                f"(teacher layers are numbered 1..{n})"
            )
    return g


# -- features of a BERT ------------------------------------------------------------------------
@dataclass
class Features:
    embedding: Tensor
    hidden: list[Tensor]  # per mapped layer, [batch, length, width]
    scores: list[Tensor]  # per mapped layer, [batch, heads, length, length] (empty without attention)


def bert_encoder(model: nn.Module, who: str) -> nn.Module:
    """``model.bert`` when it is a BERT (embeddings, encoder.layer.N.attention.self.query/key)."""
    bert = getattr(model, "bert", None)
    layers = getattr(getattr(bert, "encoder", None), "layer", None)
    if bert is None or not layers or not hasattr(getattr(layers[0].attention, "self", None), "query"):
        raise EffmlError(f"tinybert: {who} must be a BERT (bert.encoder.layer.N); got {type(model).__name__}")
    return bert


def feature_paths(layers: list[int], attention: bool) -> list[str]:
    """Module paths to tap for the embedding, the outputs of ``layers`` (0-based) and their Q, K."""
    paths = ["bert.embeddings", *(f"bert.encoder.layer.{i}" for i in layers)]
    if attention:
        paths += [f"bert.encoder.layer.{i}.attention.self.{p}" for i in layers for p in ("query", "key")]
    return list(dict.fromkeys(paths))


def read_features(model: nn.Module, features: dict[str, Tensor], layers: list[int], attention: bool) -> Features:
    scores = []
    for i in layers if attention else []:
        prefix = f"bert.encoder.layer.{i}.attention.self"
        head_size = model.bert.encoder.layer[i].attention.self.attention_head_size
        scores.append(attention_scores(features[f"{prefix}.query"], features[f"{prefix}.key"], head_size))
    hidden = [features[f"bert.encoder.layer.{i}"] for i in layers]
    return Features(features["bert.embeddings"], hidden, scores)


def heads_of(bert: nn.Module, layer: int) -> int:
    attention = bert.encoder.layer[layer].attention.self
    return attention.query.out_features // attention.attention_head_size  # also right for pruned layers


def width_of(bert: nn.Module) -> int:
    return bert.embeddings.word_embeddings.embedding_dim


# -- the compressor ----------------------------------------------------------------------------
@COMPRESSORS.register("tinybert", TinyBERTConfig)
class TinyBERT(Distiller):
    """TinyBERT (Jiao et al. 2020): embedding, hidden-state and attention MSE through g(m), then soft CE."""

    # the smoke setup's 2-layer, 32-wide random BERT learns from a 4-layer, 64-wide one (W_h 32→64)
    smoke = Smoke(("bert",), (
        "teacher={source:stage,epochs:1,model:{name:bert,pretrained:null,hf_config:{hidden_size:64,"
        "num_hidden_layers:4,num_attention_heads:4,intermediate_size:128}}}",
        "intermediate_epochs=1", "prediction_epochs=1"))
    owns = frozenset({"modules"})  # the projections W_h, trained with the student and removed

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        if not any("tinybert_losses" in s for s in metrics["stages"]):
            return "no stage recorded TinyBERT's losses"
        return super().effect(name, metrics)

    def __init__(self, cfg: TinyBERTConfig):
        super().__init__(cfg)
        self.needs_teacher_logits = cfg.prediction_epochs > 0  # intermediate-only runs need features only
        self.student_model: nn.Module | None = None
        self.general_module: nn.Module | None = None
        self.maps: dict[str, list[int]] = {}  # teacher kind → g(1..M)
        self.mode: str | None = None  # general | intermediate | prediction | all | None (not distilling)
        self.student_tap: FeatureTap | None = None
        self.sums: dict[str, Tensor] = {}
        self.batches = 0
        self.projection_params = 0  # W_e + W_h, counted when finalize removes them

    # -- stages --------------------------------------------------------------------------------
    def student_stages(self) -> list[Stage]:
        c = self.cfg
        stages = [Stage("general", c.general_epochs, self.name, c.general_lr_scale, role="prepare")]
        stages += [Stage("intermediate", c.intermediate_epochs, self.name, c.intermediate_lr_scale, role="plain")]
        stages += [Stage("prediction", c.prediction_epochs, self.name, c.prediction_lr_scale, role="plain")]
        return [s for s in stages if s.max_epochs]

    def stage_mode(self, stage: Stage) -> str | None:
        if stage.owner != self.name:  # another compressor's stage: all of TinyBERT's task losses
            return None if stage.role == "prepare" else "all"
        return stage.key if stage.key in ("general", "intermediate", "prediction") else None

    @property
    def hard_loss_weight(self) -> float:
        return 0.0 if self.mode else 1.0  # TinyBERT learns from the teacher only

    # -- attach / prepare ------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        bert_encoder(model, "the student (model)")
        self.student_model = model
        return model

    def prepare(self, ctx: RunContext, datamodule) -> None:
        """Both teachers, then the structural checks (``bind``) before the teacher first runs on the data."""
        self.teacher_module = self.build(self.cfg.teacher, "teacher", ctx, datamodule)
        if self.cfg.general_epochs:
            self.general_module = self.build(self.cfg.general_teacher, "general_teacher", ctx, datamodule)
        self.bind(self.student_model, self.teacher_module, self.general_module)
        self.use_teacher(datamodule, without_logits=", or compressor.prediction_epochs=0 (features only)")

    @staticmethod
    def build(cfg: TeacherConfig, kind: str, ctx: RunContext, datamodule) -> nn.Module:
        try:
            return build_teacher(cfg, datamodule, ctx.output_root, ctx.seed, ctx.data)
        except EffmlError as err:  # effml.teachers names compressor.teacher in its messages
            raise EffmlError(str(err).replace("compressor.teacher", f"compressor.{kind}")) from None

    def bind(self, student: nn.Module, teacher: nn.Module, general: nn.Module | None = None) -> None:
        """Check the student against its teachers, fix g, and add W_e, W_h when the widths differ.

        Called from ``prepare``, not ``attach``: the teacher's width is known once it is built; this
        is still before any checkpoint loads and before the optimizer is made."""
        student_bert = bert_encoder(student, "the student (model)")
        teachers = {"teacher": teacher} | ({"general_teacher": general} if general is not None else {})
        widths = set()
        for kind, module in teachers.items():
            self.maps[kind] = self.check_teacher(student_bert, bert_encoder(module, f"compressor.{kind}"), kind)
            widths.add(width_of(module.bert))
        if len(widths) > 1:
            raise EffmlError(f"compressor.general_teacher and compressor.teacher have different widths "
                             f"({sorted(widths)}); one W_h maps the student to both, so they must match")
        width, own = widths.pop(), width_of(student_bert)
        if width != own and not hasattr(student, PROJECTION):
            std = student_bert.config.initializer_range
            projection = nn.ModuleDict({"embedding": nn.Linear(own, width), "hidden": nn.Linear(own, width)})
            for linear in projection.values():  # BERT's own initialization, as the official code
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
            setattr(student, PROJECTION, projection)

    def check_teacher(self, student: nn.Module, teacher: nn.Module, kind: str) -> list[int]:
        vocab_s, vocab_t = student.embeddings.word_embeddings.num_embeddings, teacher.embeddings.word_embeddings.num_embeddings
        if vocab_s != vocab_t:
            raise EffmlError(f"compressor.{kind} has a vocabulary of {vocab_t} tokens, the student {vocab_s}: "
                             "TinyBERT matches them token by token, so both need the same tokenizer")
        m, n = len(student.encoder.layer), len(teacher.encoder.layer)
        g = layer_mapping(m, n, self.cfg.mapping, self.cfg.layer_map, kind)
        if self.cfg.attention_weight > 0:
            for index, layer in enumerate(g):
                hs, ht = heads_of(student, index), heads_of(teacher, layer - 1)
                if hs != ht:
                    raise EffmlError(
                        f"student layer {index + 1} has {hs} attention heads, compressor.{kind} layer {layer} has "
                        f"{ht}: attention distillation needs the same heads (or compressor.attention_weight=0)"
                    )
        return g

    # -- per stage -------------------------------------------------------------------------------
    def begin_stage(self, stage: Stage, task) -> None:
        super().begin_stage(stage, task)
        self.close_tap()
        self.mode = None if self.training_teacher else self.stage_mode(stage)
        if self.mode in ("general", "intermediate", "all") and self.feature_weight > 0:
            layers = list(range(len(self.student_model.bert.encoder.layer)))
            paths = feature_paths(layers, self.cfg.attention_weight > 0)
            self.student_tap = FeatureTap(self.student_model, paths, "the student")

    def end_stage(self, stage: Stage, record: dict) -> dict | None:
        own = super().end_stage(stage, record) or {}
        self.close_tap()
        if self.mode and self.batches:  # the last epoch's mean of each weighted term
            own["tinybert_losses"] = {k: round(float(v) / self.batches, 6) for k, v in self.sums.items()}
        self.mode = None
        return own or None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.sums, self.batches = {}, 0

    def close_tap(self) -> None:
        if self.student_tap is not None:
            self.student_tap.close()
            self.student_tap = None

    @property
    def feature_weight(self) -> float:
        return self.cfg.embedding_weight + self.cfg.hidden_weight + self.cfg.attention_weight

    # -- the loss --------------------------------------------------------------------------------
    def loss(self, task, batch: dict, logits: Tensor) -> Tensor | None:
        if not self.mode:
            return None
        kind = "general_teacher" if self.mode == "general" else "teacher"
        module = self.general_module if kind == "general_teacher" else self.teacher_module
        inputs = without_labels(batch)
        features = self.student_tap is not None
        layers = [g - 1 for g in self.maps[kind]]
        attention = self.cfg.attention_weight > 0
        tap = FeatureTap(module, feature_paths(layers, attention), kind) if features else contextlib.nullcontext()
        with tap, torch.no_grad():
            teacher_logits = Teacher(module)(inputs)
            theirs = read_features(module, tap.features, layers, attention) if features else None
        terms = {}
        if features:
            mine = read_features(self.student_model, self.student_tap.features, list(range(len(layers))), attention)
            mask = batch.get("attention_mask", torch.ones_like(inputs["input_ids"])).float()
            terms = self.intermediate_terms(mine, theirs, mask)
            self.student_tap.features.clear()  # drop the references to this step's graph
        if self.mode in ("prediction", "all"):
            terms["prediction"] = self.cfg.prediction_weight * soft_cross_entropy(
                logits, teacher_logits, self.cfg.temperature)
        self.record(task, terms, logits.shape[0])
        return sum(terms.values())

    def intermediate_terms(self, mine: Features, theirs: Features, mask: Tensor) -> dict[str, Tensor]:
        """λ-weighted L_embd, Σ_m L_hidn and Σ_m L_attn over the real tokens (Eqs. 7-9, 11)."""
        c, tokens = self.cfg, mask[:, :, None]
        pairs = mask[:, None, :, None] * mask[:, None, None, :]
        terms = {}
        if c.embedding_weight > 0:
            terms["embedding"] = c.embedding_weight * masked_mse(self.project(mine.embedding, "embedding"),
                                                                 theirs.embedding, tokens)
        if c.hidden_weight > 0:
            terms["hidden"] = c.hidden_weight * sum(
                masked_mse(self.project(s, "hidden"), t, tokens) for s, t in zip(mine.hidden, theirs.hidden, strict=True))
        if c.attention_weight > 0:
            terms["attention"] = c.attention_weight * sum(
                masked_mse(s, t, pairs) for s, t in zip(mine.scores, theirs.scores, strict=True))
        return terms

    def project(self, states: Tensor, which: str) -> Tensor:
        projection = getattr(self.student_model, PROJECTION, None)
        return states if projection is None else projection[which](states)

    def record(self, task, terms: dict[str, Tensor], size: int) -> None:
        for key, value in terms.items():
            task.log(f"train/tinybert_{key}", value, batch_size=size, on_step=False, on_epoch=True)
            self.sums[key] = self.sums.get(key, 0.0) + value.detach()
        self.batches += 1

    # -- the end ---------------------------------------------------------------------------------
    def finalize(self, model: nn.Module, hardware: Any) -> nn.Module:
        self.close_tap()
        if hasattr(self.student_model, PROJECTION):  # W_e, W_h served training only
            self.projection_params = sum(p.numel() for p in getattr(self.student_model, PROJECTION).parameters())
            delattr(self.student_model, PROJECTION)
        return model

    def report(self) -> dict[str, Any]:
        c = self.cfg
        student = self.student_model.bert if self.student_model is not None else None
        return super().report() | {
            "general_teacher": c.general_teacher.describe() if c.general_epochs else None,
            "layer_map": self.maps.get("teacher"),  # g(1..M), teacher layers numbered 1..N
            "general_layer_map": self.maps.get("general_teacher"),
            "student_layers": len(student.encoder.layer) if student is not None else None,
            "teacher_layers": len(self.teacher_module.bert.encoder.layer) if self.teacher_module is not None else None,
            "student_width": width_of(student) if student is not None else None,
            "teacher_width": width_of(self.teacher_module.bert) if self.teacher_module is not None else None,
            "projection_params": self.projection_params,  # trained with the student, then removed
            "epochs": {"general": c.general_epochs, "intermediate": c.intermediate_epochs,
                       "prediction": c.prediction_epochs},
        }
