"""LoRA and QLoRA: fine-tune low-rank adapters on a frozen (optionally 4-bit) transformer, then merge.

LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv 2106.09685,
§4: a frozen weight W0 gets a trainable update ΔW = (α/r)·B·A, with A (r × in) Gaussian and B
(out × r) zero at the start, so training starts at the pre-trained function; merged (W0 + ΔW) for
deployment, it adds no latency. Defaults are the paper's RoBERTa-base GLUE setting (§7.1, Table 9):
r = 8, α = 8, adapters on W_q and W_v; the task head (our pooler and classifier, as RoBERTa's
classification head) trains in full.

QLoRA: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023, arXiv
2305.14314, §3: the frozen base weights are stored in 4-bit NormalFloat (NF4, blocks of 64) with
double quantization (the blocks' scales in 8 bits, blocks of 256), dequantized on the fly in forward
and backward; adapters on top train in full precision. Here the NF4 comes from torchao (its
``to_nf4``/``linear_nf4``; bitsandbytes is not installed), so it runs on the CPU as on a GPU; every
frozen Linear of the encoder is stored in NF4.

Through HF PEFT (``get_peft_model``; fields ``r``, ``alpha``, ``dropout``, ``target_modules``).
``finalize`` merges with PEFT's ``merge_and_unload`` into a plain dense model and exports it with
``save_pretrained`` to ``<run>/model`` (transformers' ``BertForSequenceClassification`` with its
tokenizer; an EarlyBERT ticket's pruned base in effml's pruned format). PEFT cannot merge into
a 4-bit base (users of PEFT and Optimum report it broken), so for QLoRA ``finalize`` dequantizes
every NF4 weight first, merges in full precision, and reports the error that requantizing the
merged weights to NF4 would add (the deployed model stays dense fp32, merged).

Reported: trainable parameters, and the bytes training holds (weights as stored + gradients +
optimizer state, counted from the tensors at the end of training) against full fine-tuning of the
same model (every parameter in fp32 with its gradient and AdamW's two moments), as a ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke
from effml.errors import EffmlError
from effml.models import bert_surgery as surgery
from effml.registry import COMPRESSORS


@dataclass
class LoRAConfig(CompressorConfig):
    """LoRA (Hu et al., ICLR 2022, arXiv 2106.09685): rank-8 adapters (α = 8) on the query and value
    projections of a frozen transformer, the task head trained in full, merged at the end;
    qlora=true stores the frozen base in NF4 with double quantization (Dettmers et al. 2023)."""

    name: str = "lora"
    r: int = 8
    alpha: float = 8.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapters' input
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    train_modules: list[str] = field(default_factory=lambda: ["classifier", "pooler"])  # trained in full
    qlora: bool = False
    block_size: int = 64  # NF4 blocks (QLoRA §3)
    scaler_block_size: int = 256  # double quantization: blocks of the blocks' scales

    def __post_init__(self):
        if self.r <= 0:
            raise EffmlError(f"compressor.r must be > 0; got {self.r}")
        if self.alpha <= 0:
            raise EffmlError(f"compressor.alpha must be > 0; got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise EffmlError(f"compressor.dropout must be in [0, 1); got {self.dropout}")
        if not self.target_modules:
            raise EffmlError("compressor.target_modules must name at least one Linear layer")
        if self.block_size <= 0 or self.scaler_block_size <= 0:
            raise EffmlError(f"compressor.block_size and scaler_block_size must be > 0; got "
                             f"{self.block_size}, {self.scaler_block_size}")


def nf4_api():
    """torchao's NF4 (the CPU and GPU backend here), or one line saying there is none."""
    try:
        from torchao.quantization import to_nf4
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import (
            NF4Tensor,
            SubclassTensorArgs,
            linear_nf4,
        )
    except ImportError as error:
        raise EffmlError(f"compressor.qlora needs torchao's NF4 (or bitsandbytes on a GPU); neither is "
                         f"available here ({error}); use compressor.qlora=false") from None
    return to_nf4, NF4Tensor, SubclassTensorArgs, linear_nf4


class NF4Linear(nn.Module):
    """A frozen Linear whose weight is stored in NF4 with double quantization (QLoRA §3).

    The NF4 pieces are plain buffers (uint8 codes, int8 scales, fp32 factors), so checkpoints stay
    tensors only (``torch.load(weights_only=True)``); the NF4 tensor is rebuilt around them per call,
    and torchao's ``linear_nf4`` dequantizes in forward and backward without keeping a full copy."""

    def __init__(self, linear: nn.Linear, block_size: int, scaler_block_size: int):
        super().__init__()
        to_nf4, *_ = nf4_api()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        n_blocks = weight.numel() // block_size
        # double quantization needs whole scaler blocks: a small layer takes the largest that divides
        nf4 = to_nf4(weight.contiguous(), block_size, math.gcd(n_blocks, scaler_block_size))
        self.block_size, self.n_blocks, self.scaler_block_size = nf4.block_size, nf4.n_blocks, nf4.scaler_block_size
        self.dtype = weight.dtype
        for name in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4"):
            self.register_buffer(name, getattr(nf4, name))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def nf4_weight(self):
        _, NF4Tensor, SubclassTensorArgs, _ = nf4_api()
        shape = torch.Size((self.out_features, self.in_features))
        meta = SubclassTensorArgs(shape, (self.in_features, 1), 0, self.dtype, self.quantized_data.device, False)
        return NF4Tensor(meta, self.block_size, self.n_blocks, self.scaler_block_size, self.quantized_scalers,
                         self.quantization_factor, self.scaler_mean, self.quantized_data, self.nf4)

    def dequantized(self) -> torch.Tensor:
        return self.nf4_weight().get_original_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *_, linear_nf4 = nf4_api()
        out = linear_nf4(x, self.nf4_weight())
        return out if self.bias is None else out + self.bias

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.to(self.quantized_data.device)


def linear_names(model: nn.Module) -> list[str]:
    """The last parts of the model's Linear layers' names, which ``target_modules`` match."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@COMPRESSORS.register("lora", LoRAConfig)
class LoRA(Compressor):
    """LoRA / QLoRA fine-tuning through PEFT, merged into a dense model at the end (Hu et al. 2021)."""

    smoke = Smoke(("bert",), ("qlora=true",))
    owns = frozenset({"adapters"})

    @classmethod
    def effect(cls, name: str, metrics: dict) -> str | None:
        report = metrics["compressors"][name]
        if not 0 < report["trainable_params"] < report["total_params"]:
            return f"trainable parameters {report['trainable_params']} of {report['total_params']}"
        if report["merged_layers"] < 1 or report["memory_ratio"] >= 1:
            return f"nothing merged, or training held no less memory than full fine-tuning: {report}"
        return None

    def __init__(self, cfg: LoRAConfig):
        super().__init__(cfg)
        self.peft_model = None
        self.counts: dict = {}
        self.memory: dict = {}  # bytes training held, counted at its end (kept for a resumed run)
        self.merge: dict = {}
        self.full_bytes: dict = {}
        self.export_dir: Path | None = None  # <run>/model: the merged model, written by save_pretrained
        self.model_cfg = None  # to export the tokenizer beside it

    def prepare(self, ctx: RunContext, datamodule) -> None:
        self.export_dir = ctx.run_dir.export
        self.model_cfg = ctx.model

    def attach(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        if not hasattr(model, "bert"):
            raise EffmlError(f"compressor {self.name} adapts a transformer's attention and FFN layers; "
                             f"model {type(model).__name__} is not one (use model=minilm_l6 or model=bert_base)")
        names = linear_names(model)
        missing = [t for t in self.cfg.target_modules if t not in names]
        if missing:
            raise EffmlError(f"compressor.target_modules {missing} match no Linear layer of the model; "
                             f"its Linear layers are named {', '.join(names)}")
        self.counts["total_params"] = sum(p.numel() for p in model.parameters())
        self.full_bytes = full_finetuning_bytes(model)
        config = PeftLoraConfig(r=self.cfg.r, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout,
                                target_modules=list(self.cfg.target_modules), bias="none")
        self.peft_model = get_peft_model(model, config)  # freezes everything but the adapters
        for name, param in self.peft_model.named_parameters():
            if any(f".{m}." in f".{name}" for m in self.cfg.train_modules):
                param.requires_grad_(True)
        if self.cfg.qlora:
            self.counts.update(quantize_frozen(self.peft_model.base_model.model.bert.encoder, self.cfg))
        self.counts["trainable_params"] = sum(p.numel() for p in self.peft_model.parameters() if p.requires_grad)
        self.counts["adapter_params"] = sum(p.numel() for n, p in self.peft_model.named_parameters() if "lora_" in n)
        return self.peft_model

    def on_train_end(self, trainer, pl_module) -> None:
        # the bytes training holds at its end: the model as stored, a gradient per trainable
        # parameter, and the optimizer's state (AdamW: two moments), counted from the tensors
        model = pl_module.model
        trainable = [p for p in model.parameters() if p.requires_grad]
        state = [v for s in trainer.optimizers[0].state.values() for v in s.values() if torch.is_tensor(v)]
        held = {"weights": tensor_bytes([*model.parameters(), *model.buffers()]),
                "gradients": tensor_bytes(trainable), "optimizer": tensor_bytes(state)}
        self.memory = {**held, "total": sum(held.values())}

    def state_dict(self) -> dict:
        # adapters and head are parameters of the model; only the counted bytes live here
        return {"memory": dict(self.memory)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.memory = dict(state_dict["memory"])

    def finalize(self, model: nn.Module, hardware) -> nn.Module:
        if self.cfg.qlora:  # PEFT cannot merge into NF4: dequantize first, merge in fp32
            for name, module in list(model.named_modules()):
                if isinstance(module, NF4Linear):
                    replace(model, name, module.to_linear())
        merged_layers = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
        merged = model.merge_and_unload()
        self.merge = {"merged_layers": merged_layers}
        if self.cfg.qlora:
            self.merge["requantization_error"] = requantization_error(merged, self.cfg)
        if self.export_dir is not None:
            self.merge["export"] = {"path": str(self.export_dir),
                                    "format": surgery.save_classifier(merged, self.export_dir)}
            # the tokenizer too, so the folder is a complete model for from_pretrained
            type(merged).tokenizer_for(self.model_cfg).save_pretrained(self.export_dir)
        return merged

    def report(self) -> dict:
        full, held = self.full_bytes, self.memory.get("total")
        return {
            **self.counts,
            "trainable_fraction": self.counts["trainable_params"] / self.counts["total_params"],
            "r": self.cfg.r, "alpha": self.cfg.alpha, "target_modules": list(self.cfg.target_modules),
            "qlora": self.cfg.qlora,
            "training_bytes": self.memory,
            "full_finetuning_bytes": full,
            "memory_ratio": held / full["total"] if held else None,  # < 1: LoRA holds less
            **self.merge,
        }


def quantize_frozen(encoder: nn.Module, cfg: LoRAConfig) -> dict:
    """Store every frozen Linear of the encoder in NF4: the adapters' base layers and the rest. A
    weight that is no whole number of NF4 blocks (a pruned ticket's odd width) stays in fp32, named."""
    quantized, kept = 0, []
    for name, module in list(encoder.named_modules()):
        if isinstance(module, nn.Linear) and not module.weight.requires_grad and "lora_" not in name:
            if module.weight.numel() % cfg.block_size:
                kept.append(name)
                continue
            replace(encoder, name, NF4Linear(module, cfg.block_size, cfg.scaler_block_size))
            quantized += 1
    return {"nf4_layers": quantized, "fp32_layers": kept}


def full_finetuning_bytes(model: nn.Module) -> dict:
    """What full fine-tuning holds for the same model: every parameter in its dtype, its gradient and
    AdamW's two moments of the same size (plus the buffers)."""
    params = tensor_bytes(model.parameters())
    held = {"weights": params + tensor_bytes(model.buffers()), "gradients": params, "optimizer": 2 * params}
    return {**held, "total": sum(held.values())}


@torch.no_grad()
def requantization_error(model: nn.Module, cfg: LoRAConfig) -> dict:
    """The relative error (‖W − nf4(W)‖ / ‖W‖ over the encoder) that storing the merged weights in NF4
    again would add: the merge is exact in fp32, a 4-bit deployment is not."""
    num = den = 0.0
    for module in model.bert.encoder.modules():
        if isinstance(module, nn.Linear) and not module.weight.numel() % cfg.block_size:  # those stored in NF4
            weight = module.weight
            again = NF4Linear(module, cfg.block_size, cfg.scaler_block_size).dequantized()
            num += float((again - weight).square().sum())
            den += float(weight.square().sum())
    return {"relative": math.sqrt(num / den), "layers": "encoder Linears"}
