"""Efficient attention: every self-attention layer of a transformers model (the LMs, the BERT
classifiers) computes one of these variants instead of dense softmax attention. ``kind`` picks it:

- ``window``: sliding-window attention with ``dilation`` and ``global_tokens`` (Beltagy, Peters &
  Cohan, "Longformer", arXiv 2004.05150, §3.1 sliding and dilated windows, §3.2 global attention);
  ``window`` is one-sided (keys at distance < window; bidirectional: 2·window − 1 keys);
- ``linear``: the elu(x)+1 feature map (Katharopoulos et al., "Transformers are RNNs", ICML 2020,
  arXiv 2006.16236, §3.2-3.3), causal and bidirectional;
- ``performer``: FAVOR+ positive orthogonal random features, ``features`` of them (Choromanski et al.,
  "Rethinking Attention with Performers", ICLR 2021, arXiv 2009.14794, §2.3-2.4; 256 features in its
  experiments), causal and bidirectional;
- ``linformer``: K and V projected along the sequence to ``k`` rows (Wang et al., "Linformer",
  arXiv 2006.04768, §4; k = 128-256 there for n = 512-4096), per layer, heads sharing (§4.1); the
  paper is bidirectional: on a causal model we use a segment-restricted causal adaptation
  (effml/models/efficient_attention.py says how);
- ``lsh``: Reformer's shared-QK LSH attention, ``n_hashes`` rounds, ``bucket_size`` tokens per chunk
  (Kitaev, Kaiser & Levskaya, "Reformer", ICLR 2020, arXiv 2001.04451, §2; 4 hashes, 64-token chunks
  there).

The variants are installed through transformers' attention-function registry (``AttentionInterface``,
``config._attn_implementation``): the models' own attention modules keep their projections, RoPE and
head layout and call our function, which reads the variant from the module (``module.effml_attention``,
a submodule: Linformer's E and F train and checkpoint with the model, Performer's features and LSH's
rotations are seeded buffers in every checkpoint). The math is in effml/models/efficient_attention.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from effml.choice import check_choices, choice
from effml.compressors.base import Compressor, CompressorConfig, RunContext, Smoke
from effml.errors import EffmlError
from effml.models import efficient_attention as ea
from effml.registry import COMPRESSORS

Kind = choice("Kind", "window linear performer linformer lsh")
WindowBackend = choice("WindowBackend", "auto sdpa flex")  # auto: flex on CUDA, masked SDPA on CPU


@dataclass
class AttentionConfig(CompressorConfig):
    """Efficient attention in every layer (kind: window | linear | performer | linformer | lsh): Longformer's
    sliding window (window 64, no dilation or global tokens), Katharopoulos's elu+1 linear attention,
    Performer's FAVOR+ (256 features), Linformer (k 32), Reformer's LSH (4 hashes, 64-token buckets)."""

    name: str = "attention"
    kind: Kind = Kind.window
    window: int = 64  # window: keys at distance < window (one-sided)
    dilation: int = 1  # window: every dilation-th key within the window
    global_tokens: int = 0  # window: the first tokens see and are seen by all
    window_backend: WindowBackend = WindowBackend.auto
    features: int = 256  # performer: random features (Performer's experiments: 256)
    k: int = 32  # linformer: projected length
    n_hashes: int = 4  # lsh: hashing rounds (Reformer: 4 in most experiments)
    bucket_size: int = 64  # lsh: tokens per chunk; length / bucket_size buckets

    def __post_init__(self):
        check_choices(self, "compressor")
        for field in ("window", "dilation", "features", "k", "n_hashes", "bucket_size"):
            if getattr(self, field) <= 0:
                raise EffmlError(f"compressor.{field} must be > 0, got {getattr(self, field)}")
        if self.global_tokens < 0:
            raise EffmlError(f"compressor.global_tokens must be >= 0, got {self.global_tokens}")
        if self.kind == "window" and self.window > 1 and self.dilation >= self.window:
            raise EffmlError(f"compressor.dilation ({self.dilation}) leaves no key in the window but the token itself: "
                             f"it must be < compressor.window ({self.window})")


def context_length(ctx: RunContext, datamodule: Any) -> int:
    """The longest sequence the run feeds the model: the LM's block length, else the text's max_length."""
    for value in (getattr(datamodule.info, "seq_len", None), getattr(ctx.data, "seq_len", None),
                  getattr(ctx.data, "max_length", None)):
        if value:
            return int(value)
    raise EffmlError(f"compressor attention needs a sequence dataset (seq_len or max_length), got data={ctx.data.name}")


def check_against_context(cfg: AttentionConfig, context: int) -> None:
    if cfg.kind == "window" and cfg.window > context:
        raise EffmlError(f"compressor.window must be in [1, {context}] (the context length), got {cfg.window}")
    if cfg.kind == "window" and cfg.global_tokens > context:
        raise EffmlError(f"compressor.global_tokens must be <= {context} (the context length), got {cfg.global_tokens}")
    if cfg.kind == "linformer" and cfg.k > context:
        raise EffmlError(f"compressor.k must be in [1, {context}] (the context length), got {cfg.k}")
    if cfg.kind == "lsh":
        if context % cfg.bucket_size:
            raise EffmlError(f"compressor.bucket_size ({cfg.bucket_size}) must divide the context length ({context})")
        buckets = context // cfg.bucket_size
        if buckets > 1 and buckets % 2:
            raise EffmlError(f"compressor.bucket_size gives {buckets} buckets for {context} tokens; LSH's [xR; -xR] "
                             "hashing needs 1 or an even number")


def make_variant(cfg: AttentionConfig, module: nn.Module, context: int, seed: int) -> nn.Module:
    head_dim = getattr(module, "head_dim", None) or module.attention_head_size
    if cfg.kind == "window":
        return ea.WindowAttention(cfg.window, cfg.dilation, cfg.global_tokens, str(cfg.window_backend))
    if cfg.kind == "linear":
        return ea.LinearAttention()
    if cfg.kind == "performer":
        return ea.PerformerAttention(head_dim, cfg.features, seed)
    if cfg.kind == "linformer":
        return ea.LinformerAttention(context, cfg.k, causal=bool(module.is_causal))
    return ea.LSHAttention(head_dim, context, cfg.bucket_size, cfg.n_hashes, seed)


@COMPRESSORS.register("attention", AttentionConfig)
class EfficientAttention(Compressor):
    """Replaces every layer's softmax attention by the chosen efficient variant."""

    smoke = Smoke(setups=("lm", "bert"), settings=("kind=window", "window=8", "global_tokens=1"))
    owns = frozenset({"attention"})
    tasks = ("lm", "classification")

    @classmethod
    def effect(cls, name: str, metrics: dict[str, Any]) -> str | None:
        report = metrics["compressors"][name]
        if report.get("layers", 0) < 1:
            return f"no attention layer was replaced: {report}"
        return None

    def __init__(self, cfg: AttentionConfig):
        super().__init__(cfg)
        self.modules: list[nn.Module] = []
        self.context: int | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        self.modules = ea.attention_modules(model)
        if not self.modules:
            raise EffmlError(f"compressor attention needs a transformers model with attention layers (model=lm_tiny, "
                             f"lm_small, lm_base, minilm_l6, bert_base); {type(model).__name__} has none")
        return model

    def prepare(self, ctx: RunContext, datamodule: Any) -> None:
        """Install the variants now that the context length and the seed are known (still before any
        checkpoint loads, so Linformer's parameters and the seeded buffers are there for a resume)."""
        self.context = context_length(ctx, datamodule)
        check_against_context(self.cfg, self.context)
        if self.cfg.window_backend == "flex" and ctx.device.type != "cuda":
            raise EffmlError("compressor.window_backend=flex needs a CUDA device (the locked torch has no "
                             "FlexAttention backward on CPU); use auto or sdpa")
        for index, module in enumerate(self.modules):
            # a different draw per layer, the same for the same seed (a rerun, a resume)
            ea.install(module, make_variant(self.cfg, module, self.context, seed=ctx.seed * 1000 + index))

    def report(self) -> dict[str, Any]:
        cfg = self.cfg
        settings = {"window": {"window": cfg.window, "dilation": cfg.dilation, "global_tokens": cfg.global_tokens},
                    "linear": {}, "performer": {"features": cfg.features}, "linformer": {"k": cfg.k},
                    "lsh": {"n_hashes": cfg.n_hashes, "bucket_size": cfg.bucket_size}}[str(cfg.kind)]
        extra = sum(p.numel() for m in self.modules if hasattr(m, "effml_attention")
                    for p in m.effml_attention.parameters())
        return {"kind": str(cfg.kind), **settings, "layers": len(self.modules), "context": self.context,
                "causal": bool(self.modules and self.modules[0].is_causal), "added_params": extra}
