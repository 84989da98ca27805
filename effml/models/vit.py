"""Vision Transformer: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale", ICLR 2021, §3.1 (Eq. 1-4); with DeiT's distillation token (Touvron et al.,
"Training data-efficient image transformers & distillation through attention", ICML 2021, §4).

The image is cut into P×P patches, each linearly embedded (a stride-P convolution); a learned class
token is prepended and a learned position embedding added:

    z0 = [x_cls; x_p¹E; …; x_pᴺE] + E_pos
    z'ℓ = MSA(LN(zℓ₋₁)) + zℓ₋₁,   zℓ = MLP(LN(z'ℓ)) + z'ℓ        (pre-norm blocks, ℓ = 1..L)
    y = classifier(LN(z_L⁰))

Attention is ``F.scaled_dot_product_attention``, so the hardware's SDPA backends apply. Weights
start from a truncated normal (std 0.02), as in DeiT. ``drop_path`` is stochastic depth (Huang et
al. 2016), DeiT's regularizer; ``dropout`` acts on the embeddings, the attention output and the MLP.

Distillation token (DeiT): ``add_distillation_token()`` inserts a second learned token after the
class token and a second linear head ``head_dist`` on its output. In training mode the model still
returns the class head's logits (what the task's cross-entropy uses); the distillation head's
logits are read by a forward hook on ``head_dist`` (``effml.teachers.FeatureTap``). In eval mode
it returns the fusion of the two heads chosen by ``inference``:

- ``softmax`` (the paper, §4: "we add the softmax output by the two classifiers"): the log of the
  mean of the two softmaxes, whose argmax is that of their sum and whose cross-entropy is the
  NLL of the averaged probabilities;
- ``logits``: the mean of the two heads' logits (the official DeiT code);
- ``class`` / ``distillation``: one head alone (the paper's Table 3 rows).

The distillation token has no position embedding of its own: a learned token plus a learned
position vector is one learned vector. A ViT asked to load a state dict that holds a distillation
token adds one first, so a finished DeiT run loads as a teacher like any other run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.data import DataInfo
from effml.errors import EffmlError
from effml.models._common import check_choice, check_positive, image_shape
from effml.registry import MODELS

INFERENCE = ("softmax", "logits", "class", "distillation")


@dataclass
class ViTConfig:
    name: str = "vit"
    patch_size: int = 4  # must divide the image's height and width
    dim: int = 192  # token width D
    depth: int = 6  # transformer blocks L
    heads: int = 3  # attention heads; dim must be a multiple
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio · dim (ViT: 4)
    dropout: float = 0.0  # on embeddings, attention output and MLP (DeiT uses none)
    attention_dropout: float = 0.0  # on the attention weights
    drop_path: float = 0.0  # stochastic depth, rising linearly to this over the blocks (DeiT: 0.1)

    def __post_init__(self):
        for field_name in ("patch_size", "dim", "depth", "heads", "mlp_ratio"):
            check_positive(f"model.{field_name}", getattr(self, field_name))
        if self.dim % self.heads:
            raise EffmlError(f"model.dim must be a multiple of model.heads ({self.heads}), got {self.dim}")
        for field_name in ("dropout", "attention_dropout", "drop_path"):
            value = getattr(self, field_name)
            if not 0 <= value < 1:
                raise EffmlError(f"model.{field_name} must be in [0, 1), got {value}")


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop a residual branch for a whole sample, rescale the kept ones."""
    if p == 0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.heads, self.attention_dropout = heads, attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class Block(nn.Module):
    """Pre-norm transformer block (ViT Eq. 2-3)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, attention_dropout: float,
                 drop_path: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, attention_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


@MODELS.register("vit", ViTConfig)
class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al., ICLR 2021): patches, class token, pre-norm blocks;
    optional DeiT distillation token (Touvron et al., ICML 2021)."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, cfg: ViTConfig):
        super().__init__()
        h, w = image_size
        patches = (h // cfg.patch_size) * (w // cfg.patch_size)
        self.patch_embed = nn.Conv2d(in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.Sequential(*(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.attention_dropout, rate) for rate in rates
        ))
        self.norm = nn.LayerNorm(cfg.dim)
        self.classifier = nn.Linear(cfg.dim, num_classes)
        self.dist_token: nn.Parameter | None = None
        self.head_dist: nn.Linear | None = None
        self.inference = "softmax"
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_linear)
        self.register_load_state_dict_pre_hook(_token_from_state)

    @classmethod
    def from_config(cls, cfg: ViTConfig, info: DataInfo) -> ViT:
        c, h, w = image_shape(info, "vit")
        if h % cfg.patch_size or w % cfg.patch_size:
            raise EffmlError(f"model.patch_size must divide the image size {h}x{w}, got {cfg.patch_size}")
        return cls(c, (h, w), info.num_classes, cfg)

    # -- DeiT ----------------------------------------------------------------------------------
    @property
    def distilled(self) -> bool:
        return self.dist_token is not None

    def add_distillation_token(self, inference: str = "softmax") -> None:
        """DeiT's distillation token and head; ``inference`` picks the eval-mode output (module docstring)."""
        check_choice("inference", inference, INFERENCE)
        self.inference = inference
        if self.distilled:
            return
        dim, ref = self.cls_token.shape[-1], self.cls_token
        self.dist_token = nn.Parameter(torch.empty(1, 1, dim, device=ref.device, dtype=ref.dtype))
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        head = self.classifier
        self.head_dist = nn.Linear(dim, head.out_features, device=head.weight.device, dtype=head.weight.dtype)
        _init_linear(self.head_dist)

    def remove_distillation_token(self) -> None:
        self.dist_token, self.head_dist = None, None

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The class head's and the distillation head's logits (None without a distillation token)."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        if self.distilled:  # [cls, dist, patches], as in DeiT
            dist = self.dist_token.expand(x.shape[0], -1, -1)
            tokens = torch.cat([tokens[:, :1], dist, tokens[:, 1:]], dim=1)
        out = self.norm(self.blocks(self.pos_drop(tokens)))
        logits = self.classifier(out[:, 0])
        return logits, self.head_dist(out[:, 1]) if self.distilled else None

    def forward(self, x: Tensor) -> Tensor:
        logits, dist_logits = self.heads(x)
        if dist_logits is None or self.training:
            return logits  # training: the class head; the distillation head is tapped by the compressor
        return fuse(logits, dist_logits, self.inference)


def fuse(logits: Tensor, dist_logits: Tensor, inference: str) -> Tensor:
    """The eval-mode output of a distilled ViT from its two heads (module docstring)."""
    if inference == "class":
        return logits
    if inference == "distillation":
        return dist_logits
    if inference == "logits":
        return (logits + dist_logits) / 2
    both = torch.stack([F.log_softmax(logits.float(), -1), F.log_softmax(dist_logits.float(), -1)])
    return torch.logsumexp(both, dim=0) - math.log(2)  # log of the mean softmax


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


def _token_from_state(module: ViT, state_dict: dict, prefix: str, *args) -> None:
    """A state dict with a distillation token (a finished DeiT run) makes this ViT a DeiT first."""
    if prefix + "dist_token" in state_dict and not module.distilled:
        module.add_distillation_token(module.inference)
