"""TernaryBERT: ternary weights, 8-bit activations, trained by distillation from the full-precision BERT.

Zhang, Hou, Yin, Shang, Chen, Jiang, Liu, "TernaryBERT: Distillation-aware Ultra-low Bit BERT", EMNLP
2020 (arXiv 2009.12812), §3. Every weight w of a Transformer Linear and of the word embedding is
replaced in the forward pass by ŵ = α·b, b ∈ {−1, 0, +1}, with one α per layer or per row (§3.1):

- ``twn`` (Li & Liu 2016, the paper's approximation-based ternarization): b = I(w > Δ) − I(w < −Δ),
  Δ = 0.7 · mean|w|, α = mean of |w| over the kept entries;
- ``lat`` (Hou & Kwok 2018, loss-aware): the same form, but α and b minimize the second-order
  approximation of the loss, ‖w − αb‖²_D with D = diag(√v̂ + ε) from Adam's second moment:
  α = ‖b ⊙ d ⊙ w‖₁ / ‖b ⊙ d‖₁ and b = I(|w| > α/2)·sign(w), alternated from TWN's solution.
  So LAT keeps the weights whose *curvature* is high at their own magnitude, and its threshold is α/2,
  not 0.7·mean|w|.

The paper ternarizes Transformer Linears layer-wise and the word embedding row-wise (the official
``QuantizeEmbedding`` sets ``layerwise=False``); both granularities are fields. Backward: the
straight-through estimator, ∂L/∂w = ∂L/∂ŵ (the official code also zeroes it beyond a clip of ±2.5,
which BERT's fine-tuned weights never reach; not done here). Activations (§3.2): every ternarized
Linear's input is fake-quantized to 8 bits, symmetric, on its own batch's max|x| (the official code's
dynamic scaling: "gives better performance than static"), so it has no state to resume. The attention
matmuls' inputs, which the official code also quantizes, stay in full precision here (transformers'
attention kernel computes them). Pooler and classifier stay full precision.

Distillation-aware training (§3.3): the student starts from the full-precision fine-tuned model (its
teacher, copied in at the start of the stage) and learns from it only: L = L_trm + L_pred, with
L_trm = Σ_l MSE(H^S_l, H^T_l) (embedding output and every layer's output) + Σ_l MSE(A^S_l, A^T_l)
(attention scores QKᵀ/√d) and L_pred = SCE(z^S, z^T) (soft cross-entropy at t=1). The losses,
feature taps and teacher life cycle are TinyBERT's and the Distiller's (compressors/tinybert.py,
compressors/_distill.py), with the one-to-one layer map of a student as deep and wide as its teacher.

Export (``finalize``): the weights are snapped to α·b and written to ``ternary.safetensors``: each
ternary tensor as 2-bit codes, 4 per byte (code = b + 1), plus its α (one per row or per layer) in
fp32; everything else (LayerNorm, biases, position embeddings, pooler, classifier) in fp32; the list
of ternary tensors and the activation bits in the file's metadata. ``load_ternary`` unpacks it into a
plain model of the same config and computes the finalized model's outputs exactly. The official code
saves the ternarized model as fp32 (no smaller on disk); the report gives the file's bytes against the
fp32 model's (both safetensors, written and measured) as ``export.size_ratio`` (the paper: 14.9x).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.choice import check_choices, choice
from effml.compressors._distill import DistillConfig, Distiller, without_labels
from effml.compressors._quant import (
    FakeQuantized,
    Grid,
    check_bits,
    deployed_copy,
    fake_quantize,
    observe_range,
    plain_keys_to_wrapped,
    scale_zero_point,
    simulated,
    wrap,
)
from effml.compressors.base import RunContext, Smoke, Stage
from effml.compressors.tinybert import feature_paths, masked_mse, read_features, soft_cross_entropy
from effml.errors import EffmlError
from effml.kernels.select import set_module
from effml.registry import COMPRESSORS
from effml.teachers import FeatureTap, Teacher, load_weights

Method = choice("Method", "twn lat")  # the ternarization approximation (§3.1)
Granularity = choice("Granularity", "layer row")  # one α per weight matrix, or one per output row
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings"
EXPORT = "ternary.safetensors"
LAT_EPS = 1e-8  # ε of D = diag(√v̂ + ε); Adam's own default


@dataclass
class TernaryBERTConfig(DistillConfig):
    """TernaryBERT (Zhang et al., EMNLP 2020): TWN ternary weights (Δ = 0.7·mean|w|; Linears one α per
    layer, word embedding one α per row), 8-bit symmetric activations, distillation from the
    full-precision model (hidden states + attention scores MSE, soft cross-entropy on the logits at
    t=1; no hard labels); the student starts from the teacher. Exported 2 bits per weight. Set
    compressor.teacher (the fine-tuned BERT)."""

    name: str = "ternarybert"
    temperature: float = 1.0  # t of the soft cross-entropy (the official code: plain softmax)
    method: Method = Method.twn
    granularity: Granularity = Granularity.layer  # Transformer Linears (paper: layer-wise)
    embedding_granularity: Granularity = Granularity.row  # the word embedding (paper: row-wise)
    threshold: float = 0.7  # TWN's Δ = threshold · mean|w| (Li & Liu 2016's approximation)
    lat_iterations: int = 2  # LAT: alternations of α and b, from TWN's solution
    bits: int = 2  # weights: ternary, stored in 2 bits; nothing else is TernaryBERT
    activation_bits: int | None = 8  # symmetric, per tensor, dynamic; None: weight-only
    embeddings: bool = True  # ternarize the word embedding too (the paper does)
    init_from_teacher: bool = True  # the student starts as its full-precision teacher (the paper)
    logits_weight: float = 1.0  # L_pred
    hidden_weight: float = 1.0  # Σ_l MSE of the hidden states (embedding output included)
    attention_weight: float = 1.0  # Σ_l MSE of the attention scores

    def __post_init__(self):
        super().__post_init__()
        check_choices(self, "compressor")
        if self.bits != 2:
            raise EffmlError(f"compressor.bits must be 2 (ternary weights, packed 2 bits each); got {self.bits}")
        if self.activation_bits is not None:
            check_bits("compressor.activation_bits", self.activation_bits)
        if not 0 < self.threshold <= 1:
            raise EffmlError(f"compressor.threshold must be in (0, 1] (Δ = threshold · mean|w|); got {self.threshold}")
        if self.lat_iterations < 1:
            raise EffmlError(f"compressor.lat_iterations must be >= 1; got {self.lat_iterations}")
        weights = {k: getattr(self, f"{k}_weight") for k in ("logits", "hidden", "attention")}
        for key, value in weights.items():
            if value < 0:
                raise EffmlError(f"compressor.{key}_weight must be >= 0; got {value}")
        if not sum(weights.values()):
            raise EffmlError("compressor.logits_weight, hidden_weight and attention_weight are all 0: "
                             "the student would learn nothing")


# -- ternarization -----------------------------------------------------------------------------------
def _rows(w: Tensor, rowwise: bool) -> Tensor:
    return w.flatten(1) if rowwise else w.reshape(1, -1)


def twn(w: Tensor, rowwise: bool, threshold: float = 0.7) -> tuple[Tensor, Tensor]:
    """TWN's (b, α): b ∈ {−1, 0, 1} in w's shape, α per row ([rows]) or per layer ([])."""
    rows = _rows(w.detach().float(), rowwise)
    delta = threshold * rows.abs().mean(1, keepdim=True)
    return _codes_and_alpha(rows, rows.abs() > delta, torch.ones_like(rows), w.shape, rowwise)


def lat(w: Tensor, d: Tensor, rowwise: bool, threshold: float = 0.7, iterations: int = 2) -> tuple[Tensor, Tensor]:
    """LAT's (b, α) under the diagonal curvature d (§3.1): alternate α = Σ b·d·|w| / Σ b·d and
    b = I(|w| > α/2), starting from TWN's b."""
    rows, weight = _rows(w.detach().float(), rowwise), _rows(d.detach().float(), rowwise)
    kept = rows.abs() > threshold * rows.abs().mean(1, keepdim=True)
    for _ in range(iterations):
        alpha = _weighted_alpha(rows, kept, weight)
        kept = rows.abs() > alpha[:, None] / 2
    return _codes_and_alpha(rows, kept, weight, w.shape, rowwise)


def _weighted_alpha(rows: Tensor, kept: Tensor, weight: Tensor) -> Tensor:
    mass = (kept * weight).sum(1)
    return torch.where(mass > 0, (kept * weight * rows.abs()).sum(1) / mass.clamp(min=torch.finfo(mass.dtype).tiny),
                       torch.zeros_like(mass))


def _codes_and_alpha(rows: Tensor, kept: Tensor, weight: Tensor, shape, rowwise: bool) -> tuple[Tensor, Tensor]:
    alpha = _weighted_alpha(rows, kept, weight)
    codes = (torch.sign(rows) * kept).to(torch.int8).reshape(shape)
    return codes, (alpha if rowwise else alpha[0])


def dequantize(codes: Tensor, alpha: Tensor) -> Tensor:
    """α·b in fp32 (α per row broadcast over the row)."""
    scale = alpha.reshape(-1, *([1] * (codes.dim() - 1))) if alpha.dim() else alpha
    return codes.float() * scale


class _StraightThrough(torch.autograd.Function):
    """Forward: the ternary weight, exactly; backward: the gradient passes to w unchanged (STE)."""

    @staticmethod
    def forward(ctx, weight: Tensor, ternary: Tensor) -> Tensor:
        return ternary

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class TernaryWeight(nn.Module):
    """The weight quantizer of a ``FakeQuantized`` layer: w ↦ α·b (TWN or LAT), straight-through.

    LAT's curvature d (√v̂ + ε of the weight, from Adam) is a buffer the compressor refreshes after
    every optimizer step, so a checkpoint holds the d the next forward pass uses: exact resume."""

    def __init__(self, weight: Tensor, method: str, rowwise: bool, threshold: float, iterations: int):
        super().__init__()
        self.method, self.rowwise, self.threshold, self.iterations = method, rowwise, threshold, iterations
        if method == "lat":
            self.register_buffer("curvature", torch.ones_like(weight, dtype=torch.float32))

    def ternarize(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        if self.method == "lat":
            return lat(weight, self.curvature, self.rowwise, self.threshold, self.iterations)
        return twn(weight, self.rowwise, self.threshold)

    def forward(self, weight: Tensor) -> Tensor:
        with torch.no_grad():
            ternary = dequantize(*self.ternarize(weight)).to(weight.dtype)
        return _StraightThrough.apply(weight, ternary)

    def extra_repr(self) -> str:
        return f"{self.method}, one α per {'row' if self.rowwise else 'layer'}"


class DynamicActivations(nn.Module):
    """Symmetric b-bit fake quantization on the input's own max|x| (per tensor, no state)."""

    def __init__(self, bits: int):
        super().__init__()
        self.grid = Grid(bits, symmetric=True)

    def forward(self, x: Tensor) -> Tensor:
        lo, hi = observe_range(x, "minmax", self.grid)
        return fake_quantize(x, *scale_zero_point(lo, hi, self.grid), self.grid)

    def extra_repr(self) -> str:
        return f"{self.grid.describe()}, dynamic"


class TernaryEmbedding(FakeQuantized):
    """An ``nn.Embedding`` looked up in its ternarized table (no input quantizer: inputs are ids)."""

    def forward(self, ids: Tensor) -> Tensor:
        e, weight = self.layer, self.layer.weight
        if self.weight_quantizer is not None:
            weight = self.weight_quantizer(weight)
        return F.embedding(ids, weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)


# -- the 2-bit export ----------------------------------------------------------------------------------
def pack_codes(codes: Tensor) -> Tensor:
    """{−1, 0, 1} codes → uint8, 4 per byte (code + 1 in 2 bits, first code in the low bits)."""
    flat = (codes.flatten().to(torch.int16) + 1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 4)]).view(-1, 4)
    return flat[:, 0] | flat[:, 1] << 2 | flat[:, 2] << 4 | flat[:, 3] << 6


def unpack_codes(packed: Tensor, shape) -> Tensor:
    numel = int(torch.Size(shape).numel())
    fields = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], 1).flatten()[:numel]
    return (fields.to(torch.int8) - 1).reshape(shape)


def ternary_of(weight: Tensor, rowwise: bool) -> tuple[Tensor, Tensor]:
    """(b, α) of a weight already snapped to α·b: α is its max |w| (per row or layer), b its sign."""
    rows = _rows(weight.detach().float(), rowwise)
    alpha = rows.abs().amax(1)
    if not torch.equal(rows.abs(), (rows != 0) * alpha[:, None]):
        raise EffmlError("a weight to export is not ternary (not snapped to α·{-1, 0, 1})")
    return torch.sign(weight.detach()).to(torch.int8), (alpha if rowwise else alpha[0])


def export_ternary(model: nn.Module, path: Path, rowwise: dict[str, bool], activation_bits: int | None,
                   activation_layers: list[str]) -> None:
    """The plain ``model`` (ternary weights snapped) as 2-bit codes + α per row/layer; the rest fp32."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    ternary = {}
    for layer, rows in rowwise.items():
        weight = state.pop(f"{layer}.weight")
        codes, alpha = ternary_of(weight, rows)
        state[f"{layer}.weight.codes"] = pack_codes(codes)
        state[f"{layer}.weight.alpha"] = alpha.contiguous()
        ternary[layer] = list(weight.shape)
    metadata = {"ternary": json.dumps(ternary), "activation_bits": json.dumps(activation_bits),
                "activation_layers": json.dumps(activation_layers)}
    save_file(state, str(path), metadata=metadata)


def load_ternary(path: str | Path, model: nn.Module) -> nn.Module:
    """Unpack an ``export_ternary`` file into ``model`` (a plain model of the same config), and put back
    the input quantization it was trained and evaluated with; returns the model."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for layer, shape in json.loads(metadata["ternary"]).items():
        codes = unpack_codes(tensors.pop(f"{layer}.weight.codes"), shape)
        tensors[f"{layer}.weight"] = dequantize(codes, tensors.pop(f"{layer}.weight.alpha"))
    model.load_state_dict(tensors, strict=True)
    bits = json.loads(metadata["activation_bits"])
    if bits is not None:
        for layer in json.loads(metadata["activation_layers"]):
            set_module(model, layer, FakeQuantized(model.get_submodule(layer), None, DynamicActivations(bits)))
    return model


def safetensors_bytes(model: nn.Module) -> int:
    """On-disk bytes of ``model``'s fp32 state dict as one safetensors file (written, then measured)."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, f"{tmp}/fp32.safetensors")
        return Path(tmp, "fp32.safetensors").stat().st_size


# -- the compressor ------------------------------------------------------------------------------------
def ternary_targets(model: nn.Module, embeddings: bool) -> dict[str, nn.Module]:
    """Every Linear of the Transformer layers (and the word embedding): the layers TernaryBERT ternarizes."""
    encoder = getattr(getattr(getattr(model, "bert", None), "encoder", None), "layer", None)
    if not encoder:
        raise EffmlError(f"compressor ternarybert needs a BERT-family transformer (model.bert.encoder.layer.N, "
                         f"e.g. model=minilm_l6); got {type(model).__name__}")
    layers = {n: m for n, m in model.named_modules() if n.startswith("bert.encoder.") and isinstance(m, nn.Linear)}
    if embeddings:
        layers[WORD_EMBEDDINGS] = model.get_submodule(WORD_EMBEDDINGS)
    return layers


@COMPRESSORS.register("ternarybert", TernaryBERTConfig)
class TernaryBERT(Distiller):
    """TernaryBERT (Zhang et al. 2020): TWN/LAT ternary weights, 8-bit activations, distillation-aware training."""

    # the smoke setup's 2-layer random BERT learns from a teacher of its own shape, trained in the run
    smoke = Smoke(("bert",), (
        "teacher={source:stage,epochs:1,model:{name:bert,pretrained:null,hf_config:{hidden_size:32,"
        "num_hidden_layers:2,num_attention_heads:4,intermediate_size:64}}}",))
    owns = frozenset({"quantization", "training quantization"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        report = metrics["compressors"][name]
        if not report["ternary_layers"]:
            return "no layer was ternarized"
        if not report["export"] or report["export"]["size_ratio"] <= 1:
            return "the 2-bit export is missing or no smaller than fp32"
        return super().effect(name, metrics)

    def __init__(self, cfg: TernaryBERTConfig):
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.layers: dict[str, FakeQuantized] = {}
        self.ctx: RunContext | None = None
        self.distilling_now = False
        self.student_tap: FeatureTap | None = None
        self.sums: dict[str, Tensor] = {}
        self.batches = 0
        self.errors: dict[str, float] = {}
        self.zeros = 0.0  # share of the ternary weights that are 0, measured at finalize
        self.export: dict[str, Any] | None = None

    # -- attach / prepare ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        self.model = model
        targets = ternary_targets(model, self.cfg.embeddings)
        self.layers = wrap(model, targets, self.ternarized)  # before any checkpoint loads: keys match
        return model

    def ternarized(self, path: str, layer: nn.Module) -> FakeQuantized:
        c = self.cfg
        weight = TernaryWeight(layer.weight, c.method, self.rowwise(path), c.threshold, c.lat_iterations)
        if isinstance(layer, nn.Embedding):
            return TernaryEmbedding(layer, weight)
        return FakeQuantized(layer, weight, DynamicActivations(c.activation_bits) if c.activation_bits else None)

    def prepare(self, ctx: RunContext, datamodule) -> None:
        if self.cfg.method == "lat" and ctx.trainer.optimizer not in ("adam", "adamw"):
            raise EffmlError(f"compressor.method=lat reads the curvature from Adam's second moment: "
                             f"trainer.optimizer must be adam or adamw; got {ctx.trainer.optimizer}")
        self.ctx = ctx
        super().prepare(ctx, datamodule)
        self.check_teacher(self.teacher_module)

    def check_teacher(self, teacher: nn.Module) -> None:
        """A student as deep and wide as its teacher: layer l learns from layer l (the paper's setting)."""
        bert = getattr(teacher, "bert", None)
        mine = self.model.bert
        if bert is None or not hasattr(bert, "encoder"):
            raise EffmlError(f"compressor.teacher must be a BERT of the student's shape; got {type(teacher).__name__}")
        shape_t = (len(bert.encoder.layer), bert.config.hidden_size)
        shape_s = (len(mine.encoder.layer), mine.config.hidden_size)
        if shape_t != shape_s:
            raise EffmlError(f"compressor.teacher has {shape_t[0]} layers of width {shape_t[1]}, the student "
                             f"{shape_s[0]} of width {shape_s[1]}: TernaryBERT distils layer l into layer l")

    # -- per stage -----------------------------------------------------------------------------------
    def begin_stage(self, stage: Stage, task) -> None:
        super().begin_stage(stage, task)
        self.close_tap()
        self.distilling_now = not self.training_teacher and (stage.owner == self.name or stage.role != "prepare")
        if stage.of(self.name, "train") and self.cfg.init_from_teacher:
            self.start_from_teacher()  # a resumed fit then loads its last.ckpt over it
        if self.distilling_now and self.feature_weight > 0:
            self.student_tap = FeatureTap(self.model, self.paths(), "the student")

    def start_from_teacher(self) -> None:
        state = plain_keys_to_wrapped(self.teacher_module.state_dict(), self.layers)
        own = {k: v for k, v in self.model.state_dict().items() if ".weight_quantizer." in k}
        load_weights(self.model, {**own, **state}, self.cfg.teacher.describe(), "teacher")

    def end_stage(self, stage: Stage, record: dict) -> dict | None:
        own = super().end_stage(stage, record) or {}
        self.close_tap()
        if self.distilling_now and self.batches:  # the last epoch's mean of each weighted term
            own["ternarybert_losses"] = {k: round(float(v) / self.batches, 6) for k, v in self.sums.items()}
        self.distilling_now = False
        return own or None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.sums, self.batches = {}, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cfg.method == "lat" and self.distilling_now:
            self.update_curvature(trainer.optimizers[0])

    @torch.no_grad()
    def update_curvature(self, optimizer: torch.optim.Optimizer) -> None:
        """d = √v̂ + ε of every ternarized weight, from Adam's bias-corrected second moment."""
        beta2 = {id(p): group["betas"][1] for group in optimizer.param_groups for p in group["params"]}
        for layer in self.layers.values():
            weight, quantizer = layer.layer.weight, layer.weight_quantizer
            state = optimizer.state.get(weight, {})
            if quantizer is None or "exp_avg_sq" not in state:
                continue
            step = float(state["step"])
            v_hat = state["exp_avg_sq"] / (1 - beta2[id(weight)] ** step)
            quantizer.curvature.copy_(v_hat.sqrt() + LAT_EPS)

    def close_tap(self) -> None:
        if self.student_tap is not None:
            self.student_tap.close()
            self.student_tap = None

    # -- the loss --------------------------------------------------------------------------------------
    @property
    def feature_weight(self) -> float:
        return self.cfg.hidden_weight + self.cfg.attention_weight

    @property
    def hard_loss_weight(self) -> float:
        return 0.0 if self.distilling_now else 1.0  # the official code trains on the teacher's outputs only

    def paths(self) -> list[str]:
        return feature_paths(list(range(len(self.model.bert.encoder.layer))), self.cfg.attention_weight > 0)

    def loss(self, task, batch: dict, logits: Tensor) -> Tensor | None:
        if not self.distilling_now:
            return None
        c, inputs = self.cfg, without_labels(batch)
        layers, attention = list(range(len(self.model.bert.encoder.layer))), c.attention_weight > 0
        features = self.student_tap is not None
        tap = FeatureTap(self.teacher_module, self.paths(), "teacher") if features else None
        try:
            with torch.no_grad():
                teacher_logits = Teacher(self.teacher_module)(inputs)
                theirs = read_features(self.teacher_module, tap.features, layers, attention) if features else None
        finally:
            if tap is not None:
                tap.close()
        terms = {}
        if c.logits_weight > 0:
            terms["logits"] = c.logits_weight * soft_cross_entropy(logits, teacher_logits, c.temperature)
        if features:
            mine = read_features(self.model, self.student_tap.features, layers, attention)
            self.student_tap.features.clear()  # drop the references to this step's graph
            mask = batch.get("attention_mask", torch.ones_like(inputs["input_ids"])).float()
            terms |= self.feature_terms(mine, theirs, mask)
        self.record(task, terms, logits.shape[0])
        return sum(terms.values())

    def feature_terms(self, mine, theirs, mask: Tensor) -> dict[str, Tensor]:
        """Σ_l MSE(H^S_l, H^T_l) over the embedding output and every layer, Σ_l MSE of the scores (§3.3)."""
        c, tokens = self.cfg, mask[:, :, None]
        pairs = mask[:, None, :, None] * mask[:, None, None, :]
        terms = {}
        if c.hidden_weight > 0:
            states = zip([mine.embedding, *mine.hidden], [theirs.embedding, *theirs.hidden], strict=True)
            terms["hidden"] = c.hidden_weight * sum(masked_mse(s, t, tokens) for s, t in states)
        if c.attention_weight > 0:
            terms["attention"] = c.attention_weight * sum(
                masked_mse(s, t, pairs) for s, t in zip(mine.scores, theirs.scores, strict=True))
        return terms

    def record(self, task, terms: dict[str, Tensor], size: int) -> None:
        for key, value in terms.items():
            task.log(f"train/ternarybert_{key}", value, batch_size=size, on_step=False, on_epoch=True)
            self.sums[key] = self.sums.get(key, 0.0) + value.detach()
        self.batches += 1

    # -- the end ---------------------------------------------------------------------------------------
    def finalize(self, model: nn.Module, hardware: Any) -> nn.Module:
        """Snap every weight to α·b for good, keep the 8-bit inputs, write the 2-bit export."""
        self.close_tap()
        self.errors = {path: layer.snap() for path, layer in self.layers.items()}
        rowwise = {path: self.rowwise(path) for path in self.layers}
        zeros = sum(int((layer.layer.weight == 0).sum()) for layer in self.layers.values())
        self.zeros = zeros / max(sum(layer.layer.weight.numel() for layer in self.layers.values()), 1)
        for path, layer in self.layers.items():
            set_module(model, path, simulated(layer))
        if self.ctx is not None:
            self.export = self.write_export(model, rowwise)
        return model

    def rowwise(self, path: str) -> bool:
        c = self.cfg
        return (c.embedding_granularity if path == WORD_EMBEDDINGS else c.granularity) == "row"

    def write_export(self, model: nn.Module, rowwise: dict[str, bool]) -> dict[str, Any]:
        plain = deployed_copy(model)
        path = self.ctx.run_dir.artifact(EXPORT)
        activation_layers = [p for p, layer in self.layers.items() if layer.input_quantizer is not None]
        export_ternary(plain, path, rowwise, self.cfg.activation_bits, activation_layers)
        fp32 = safetensors_bytes(plain)
        packed = path.stat().st_size
        ternary = sum(plain.get_submodule(p).weight.numel() for p in rowwise)
        scales = sum(1 if not rows else plain.get_submodule(p).weight.shape[0] for p, rows in rowwise.items())
        return {
            "file": EXPORT,
            "bytes": packed,
            "fp32_bytes": fp32,  # the same model's state dict, fp32 safetensors
            "size_ratio": round(fp32 / packed, 3),
            # the ternarized weights alone: fp32 bytes / (2-bit codes + fp32 α)
            "ternary_weights_ratio": round(4 * ternary / (-(-ternary // 4) + 4 * scales), 3),
        }

    def deployable(self, model: nn.Module) -> nn.Module:
        """model.pt and the speed: plain layers with their ternary weights (no kernel quantizes inputs)."""
        return deployed_copy(model) if any(isinstance(m, FakeQuantized) for m in model.modules()) else model

    def report(self) -> dict[str, Any]:
        c = self.cfg
        params = sum(layer.layer.weight.numel() for layer in self.layers.values())
        return super().report() | {
            "method": c.method,
            "granularity": {"linear": c.granularity, "word_embedding": c.embedding_granularity if c.embeddings else None},
            "activation_bits": c.activation_bits,
            "ternary_layers": len(self.layers),
            "ternary_params": params,
            "ternary_zeros": round(self.zeros, 6),  # share of the ternary weights that are 0
            "mean_weight_error": round(sum(self.errors.values()) / max(len(self.errors), 1), 6),
            "loss_weights": {"logits": c.logits_weight, "hidden": c.hidden_weight, "attention": c.attention_weight},
            "export": self.export,
        }
