"""Efficient attention variants, as functions of (query, key, value) heads, and the hook that puts them
into transformers' models (compressors/attention.py chooses and configures them).

Every variant takes ``q, k, v`` of shape (batch, heads, length, head_dim) (after RoPE, K/V heads
already repeated for grouped-query attention) and returns the same shape. None loops over tokens in
Python: masks are index arithmetic, linear attention's causal prefix sums run per chunk of
``CHUNK`` tokens with one ``cumsum`` across chunks, and LSH attention sorts and chunks.

- ``window``: sliding-window attention with dilation and global tokens (Beltagy et al., Longformer,
  arXiv 2004.05150, §3.1-3.2). ``window`` is one-sided: a query sees keys at distance < ``window``
  (causal: the ``window`` tokens up to itself; bidirectional: ``2·window − 1`` tokens centred on it,
  Longformer's w = 2·window − 1), of those only every ``dilation``-th, and the first ``global_tokens``
  tokens see and are seen by every token (causal: every earlier one). On CUDA it runs through
  FlexAttention (``torch.nn.attention.flex_attention``, compiled) with a block mask built once per
  length bucket (``bucket_length``), the batch padded to the bucket's length (so no recompile); on CPU through SDPA with a boolean mask built
  the same way. Measured in the locked torch (2.13, CPU): flex_attention has no backward on CPU
  ("FlexAttention does not support backward on CPU") and ``create_block_mask`` took 6.5 s for one
  256-token mask, so the CPU path is the exact masked SDPA, chosen by the device.
- ``linear``: the elu(x)+1 feature map (Katharopoulos et al., arXiv 2006.16236, §3.2 eq. 7, causal
  §3.3 eq. 8-10), normalised by the feature sums (eps 1e-6 as the paper's code).
- ``performer``: FAVOR+ positive orthogonal random features for the softmax kernel (Choromanski et
  al., arXiv 2009.14794, §2.3 Lemma 1 positive features, §2.4 orthogonal features; the numerical
  stabiliser of the official code: the max of the exponent subtracted, per query / per head for keys).
  The features are drawn once from a seeded generator and kept as a buffer (in every checkpoint).
- ``linformer``: keys and values projected along the sequence to ``k`` rows by learned E, F (k × n) per
  layer, shared by heads (Wang et al., arXiv 2006.04768, §4 eq. 7, §4.1 head-wise sharing). The
  paper is bidirectional only. For a causal model we use a causal adaptation of our own (not the
  paper's): row j of E and F mixes only the tokens of segment j (n/k consecutive positions), a query
  sees the rows of segments that end before it, plus its own key; at k = n with E = F = identity it
  is dense causal attention.
- ``lsh``: Reformer's shared-QK LSH attention (Kitaev et al., arXiv 2001.04451, §2): keys are the
  unit-normalised queries, hashed by random rotations (argmax of [xR; −xR], n_buckets = length /
  bucket_size), sorted by (bucket, position), chunked into ``bucket_size``, each chunk attending to
  itself and the previous chunk, within its bucket; a token attends to itself only when nothing else
  is there (−1e5, as the paper's code); ``n_hashes`` rounds combine by their log-sum-exp weights. The
  rotations are drawn once, seeded, and kept as a buffer. Causal LSH masks every later key, but which
  earlier keys share a query's chunk depends on the whole sequence's sort, so a later token can change
  an earlier output (measured: up to 0.008 in the tiny LM's logits): the paper's chunked scheme has
  this property too; the other variants are exactly causal (tests/test_attention.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effml.errors import EffmlError

IMPLEMENTATION = "effml_attention"  # the name registered in transformers' AttentionInterface
CHUNK = 64  # tokens per chunk of causal linear attention (intra-chunk quadratic, inter-chunk prefix sum)
SELF_SCORE = -1e5  # LSH: a token attends to itself only when no other key is there (Reformer §2)
MIN_BUCKET = 128  # FlexAttention's block size: the smallest length bucket
BUILDS = {"masks": 0}  # block masks / boolean masks built (tests: no rebuild within a bucket)


def bucket_length(length: int) -> int:
    """The length a mask is built for: the next power of two, at least ``MIN_BUCKET``. Masks depend only
    on positions, so a shorter batch uses the top-left corner of its bucket's mask."""
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())


# -- window: sliding, dilated, global ---------------------------------------------------------------
def window_rule(window: int, dilation: int, global_tokens: int, causal: bool) -> Callable:
    """FlexAttention's ``mask_mod(b, h, q, kv)`` (True: attend); also evaluated on index grids."""

    def mask_mod(b, h, q, kv):
        distance = q - kv
        near = (distance.abs() < window) & (distance % dilation == 0)
        glob = (kv < global_tokens) | (q < global_tokens)
        keep = near | glob
        return keep & (distance >= 0) if causal else keep

    return mask_mod


class WindowAttention(nn.Module):
    kind = "window"

    def __init__(self, window: int, dilation: int = 1, global_tokens: int = 0, backend: str = "auto"):
        super().__init__()
        self.window, self.dilation, self.global_tokens, self.backend = window, dilation, global_tokens, backend
        self.options = dict(window=window, dilation=dilation, global_tokens=global_tokens, backend=backend)
        self._masks: dict[tuple, object] = {}  # (bucket, causal, device, kind) → mask; not state

    def extra_repr(self) -> str:
        return f"window={self.window}, dilation={self.dilation}, global_tokens={self.global_tokens}"

    def use_flex(self, device: torch.device) -> bool:
        return self.backend == "flex" or (self.backend == "auto" and device.type == "cuda")

    def dense_mask(self, length: int, causal: bool, device: torch.device) -> Tensor:
        key = (bucket_length(length), causal, str(device), "bool")
        if key not in self._masks:
            n = key[0]
            positions = torch.arange(n, device=device)
            self._masks[key] = window_rule(self.window, self.dilation, self.global_tokens, causal)(
                None, None, positions[:, None], positions[None, :])
            BUILDS["masks"] += 1
        return self._masks[key][:length, :length]

    def block_mask(self, length: int, causal: bool, device: torch.device):
        """The bucket's BlockMask, built once (``length`` is a bucket length)."""
        from torch.nn.attention.flex_attention import create_block_mask

        key = (length, causal, str(device), "block")
        if key not in self._masks:
            rule = window_rule(self.window, self.dilation, self.global_tokens, causal)
            self._masks[key] = create_block_mask(rule, None, None, length, length, device=device)
            BUILDS["masks"] += 1
        return self._masks[key]

    def forward(self, q, k, v, mask, scaling, dropout, causal):
        if self.use_flex(q.device):
            return self.flex(q, k, v, mask, scaling, causal)
        allowed = self.dense_mask(q.shape[-2], causal, q.device)
        if mask is not None:
            allowed = allowed & as_bool_mask(mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling)

    def flex(self, q, k, v, mask, scaling, causal):
        """FlexAttention at the bucket's length: the batch is padded up to it, so every batch of the bucket
        has the same shapes and BlockMask and the compiled kernel is reused (no recompile). Padded keys
        (and a padding mask's) are removed by a score_mod reading a (batch, bucket) tensor."""
        length = q.shape[-2]
        n = bucket_length(length)
        keep = key_keep(mask)
        score_mod = None
        if n > length or keep is not None:
            if keep is None:
                keep = torch.ones(q.shape[0], length, dtype=torch.bool, device=q.device)
            keep = F.pad(keep, (0, n - length), value=False)
            q, k, v = (F.pad(t, (0, 0, 0, n - length)) for t in (q, k, v))

            def score_mod(score, b, h, qi, kv):
                return torch.where(keep[b, kv], score, -float("inf"))
        out = compiled_flex()(q, k, v, score_mod=score_mod, block_mask=self.block_mask(n, causal, q.device),
                              scale=scaling)
        return out[:, :, :length]


_FLEX: list = []


def compiled_flex():
    """flex_attention compiled once per process (uncompiled it materialises the full score matrix)."""
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


# -- masks from transformers -------------------------------------------------------------------------
def as_bool_mask(mask: Tensor) -> Tensor:
    """transformers' SDPA mask (bool, True: attend; or additive float) as a boolean (B, 1, Lq, Lk)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def key_keep(mask: Tensor | None) -> Tensor | None:
    """(B, Lk) True where a key is a real token (a padding mask's columns)."""
    if mask is None:
        return None
    return as_bool_mask(mask)[:, 0].any(dim=1)


# -- kernelized attention: linear (elu+1) and Performer -----------------------------------------------
def kernel_attention(fq: Tensor, fk: Tensor, v: Tensor, causal: bool, eps: float = 1e-6) -> Tensor:
    """softmax-free attention with non-negative features: out_i = φ(q_i)·Σ_j φ(k_j) v_jᵀ / φ(q_i)·Σ_j φ(k_j),
    j over all keys or (causal) j ≤ i; cost linear in the length."""
    if not causal:
        num = fq @ (fk.transpose(-2, -1) @ v)
        den = fq @ fk.sum(-2).unsqueeze(-1)
        return num / (den + eps)
    b, h, length, m = fq.shape
    c = min(CHUNK, length)
    pad = -length % c
    if pad:  # zero features add nothing to the sums; the padded queries are cut off below
        fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    n = (length + pad) // c
    fq, fk, v = fq.view(b, h, n, c, m), fk.view(b, h, n, c, m), v.view(b, h, n, c, -1)
    within = (fq @ fk.transpose(-2, -1)).tril()  # (b, h, n, c, c): keys of the same chunk, up to the query
    chunk_kv = fk.transpose(-2, -1) @ v  # (b, h, n, m, d): each chunk's Σ φ(k) vᵀ
    chunk_z = fk.sum(-2)  # (b, h, n, m)
    before_kv = chunk_kv.cumsum(2) - chunk_kv  # the sums over all earlier chunks
    before_z = chunk_z.cumsum(2) - chunk_z
    num = within @ v + fq @ before_kv
    den = within.sum(-1) + (fq * before_z.unsqueeze(-2)).sum(-1)
    out = num / (den.unsqueeze(-1) + eps)
    return out.reshape(b, h, n * c, -1)[:, :, :length]


def elu_features(x: Tensor) -> Tensor:
    return F.elu(x) + 1


class LinearAttention(nn.Module):
    kind = "linear"
    options: dict = {}  # nothing to rebuild it with

    def forward(self, q, k, v, mask, scaling, dropout, causal):
        dtype = q.dtype  # the prefix sums run in float32: bf16 loses them over long sequences
        fk = elu_features(k.float())
        keep = key_keep(mask)
        if keep is not None:
            fk = fk * keep[:, None, :, None]
        return kernel_attention(elu_features(q.float()), fk, v.float(), causal).to(dtype)


def orthogonal_features(m: int, d: int, generator: torch.Generator) -> Tensor:
    """(m, d) Gaussian rows made orthogonal in blocks of d (QR), each row rescaled to a χ_d-distributed
    norm, so that the marginals stay Gaussian (Performer §2.4, the official code's ``regularized``=False)."""
    blocks = []
    for _ in range(math.ceil(m / d)):  # a loop over blocks of features, not tokens
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
        blocks.append(q.T)
    rows = torch.cat(blocks)[:m]
    return rows * torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)


def favor_features(x: Tensor, projection: Tensor, is_query: bool) -> Tensor:
    """Positive random features of the softmax kernel, exp(wᵀx − |x|²/2)/√m (Lemma 1), with ``x`` already
    scaled by d^-1/4 and both sides shifted so that nothing overflows and nothing depends on other
    tokens: a key's feature is exp(−|w − x|²/2) ≤ 1 (shifted by |w|²/2 per feature), a query's takes the
    |w|²/2 back and is shifted by its own row maximum, which cancels in the row's normalisation. (The
    official code shifts keys by their maximum over all keys, which in a causal model leaks a statistic
    of future tokens through its eps.)"""
    wx = x @ projection.T
    half_norm = x.square().sum(-1, keepdim=True) / 2
    half_w = projection.square().sum(-1) / 2
    if not is_query:
        return torch.exp(wx - half_norm - half_w) / math.sqrt(projection.shape[0])
    exponent = wx - half_norm + half_w
    return torch.exp(exponent - exponent.amax(-1, keepdim=True).detach()) / math.sqrt(projection.shape[0])


class PerformerAttention(nn.Module):
    kind = "performer"

    def __init__(self, head_dim: int, features: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", orthogonal_features(features, head_dim, generator))
        self.options = dict(head_dim=head_dim, features=features, seed=seed)

    def extra_repr(self) -> str:
        return f"features={self.projection.shape[0]}"

    def forward(self, q, k, v, mask, scaling, dropout, causal):
        dtype, root = q.dtype, math.sqrt(scaling)  # softmax(q·k·s) = exp((√s q)·(√s k))
        q, k, v = q.float(), k.float(), v.float()  # the exponentials need float32's range
        fq = favor_features(q * root, self.projection.float(), is_query=True)
        fk = favor_features(k * root, self.projection.float(), is_query=False)
        keep = key_keep(mask)
        if keep is not None:
            fk = fk * keep[:, None, :, None]
        return kernel_attention(fq, fk, v, causal, eps=1e-30).to(dtype)


# -- Linformer ---------------------------------------------------------------------------------------
class LinformerAttention(nn.Module):
    kind = "linformer"

    def __init__(self, context: int, k: int, causal: bool):
        super().__init__()
        self.context, self.k, self.causal = context, k, causal
        self.options = dict(context=context, k=k, causal=causal)
        bound = 1 / math.sqrt(k)  # uniform ±1/√k, as the reference implementations initialise E and F
        self.E = nn.Parameter(torch.empty(k, context).uniform_(-bound, bound))
        self.F = nn.Parameter(torch.empty(k, context).uniform_(-bound, bound))
        if causal:
            segment = torch.arange(context) * k // context  # the row each position is projected into
            last = torch.zeros(k, dtype=torch.long).scatter_reduce(0, segment, torch.arange(context), "amax")
            self.register_buffer("segment", segment, persistent=False)
            self.register_buffer("segment_end", last, persistent=False)

    def extra_repr(self) -> str:
        return f"context={self.context}, k={self.k}, causal={self.causal}"

    def forward(self, q, k, v, mask, scaling, dropout, causal):
        length = q.shape[-2]
        if length > self.context:
            raise EffmlError(f"compressor.kind=linformer was built for {self.context} tokens, got a batch of {length}")
        E, Fm = self.E[:, :length], self.F[:, :length]
        keep = key_keep(mask)
        if keep is not None:  # padded keys and values contribute nothing to the projected rows
            k, v = k * keep[:, None, :, None], v * keep[:, None, :, None]
        if causal:
            own = (self.segment[:length][None, :] == torch.arange(self.k, device=q.device)[:, None])
            E, Fm = E * own, Fm * own
        keys = torch.einsum("kn,bhnd->bhkd", E, k)
        values = torch.einsum("kn,bhnd->bhkd", Fm, v)
        scores = (q @ keys.transpose(-2, -1)) * scaling  # (b, h, length, k)
        if not causal:
            return F.softmax(scores, dim=-1) @ values
        positions = torch.arange(length, device=q.device)
        visible = self.segment_end[None, :] < positions[:, None]  # rows of segments ended before the query
        scores = scores.masked_fill(~visible, -float("inf"))
        own_score = (q * k).sum(-1, keepdim=True) * scaling  # the query's own key, always visible
        weights = F.softmax(torch.cat([scores, own_score], dim=-1), dim=-1)
        return weights[..., :-1] @ values + weights[..., -1:] * v


# -- Reformer LSH ------------------------------------------------------------------------------------
class LSHAttention(nn.Module):
    kind = "lsh"

    def __init__(self, head_dim: int, context: int, bucket_size: int, n_hashes: int, seed: int):
        super().__init__()
        self.bucket_size, self.n_hashes = bucket_size, n_hashes
        self.options = dict(head_dim=head_dim, context=context, bucket_size=bucket_size, n_hashes=n_hashes, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        half = max(1, context // bucket_size // 2)
        self.register_buffer("rotations", torch.randn(n_hashes, head_dim, half, generator=generator))

    def extra_repr(self) -> str:
        return f"bucket_size={self.bucket_size}, n_hashes={self.n_hashes}"

    def buckets(self, keys: Tensor, n_buckets: int) -> Tensor:
        """(B, H, R, L) bucket ids: argmax over [xR; −xR] (Reformer §2, angular LSH)."""
        if n_buckets == 1:
            return torch.zeros(*keys.shape[:2], self.n_hashes, keys.shape[2], dtype=torch.long, device=keys.device)
        rotated = torch.einsum("bhld,rdc->bhrlc", keys, self.rotations[..., : (n_buckets + 1) // 2].to(keys.dtype))
        return torch.cat([rotated, -rotated], dim=-1).argmax(-1) % n_buckets

    def forward(self, q, k, v, mask, scaling, dropout, causal):
        b, h, length, d = q.shape
        size = self.bucket_size
        if length % size:
            raise EffmlError(f"compressor.bucket_size ({size}) must divide the sequence length, got a batch of {length}")
        keys = F.normalize(q, dim=-1)  # shared QK: the keys are the unit-length queries
        bucket = self.buckets(keys, length // size)  # (b, h, r, l)
        positions = torch.arange(length, device=q.device)
        order = (bucket * length + positions).argsort(dim=-1)  # sort by bucket, then position
        r, chunks = self.n_hashes, length // size

        def gather(x: Tensor) -> Tensor:  # (b, h, l, d) → sorted, chunked (b, h, r, chunks, size, d)
            index = order.unsqueeze(-1).expand(-1, -1, -1, -1, x.shape[-1])
            return x.unsqueeze(2).expand(-1, -1, r, -1, -1).gather(3, index).view(b, h, r, chunks, size, -1)

        sq, sk, sv = gather(q), gather(keys), gather(v)
        spos = order.view(b, h, r, chunks, size)
        sbucket = bucket.gather(-1, order).view(b, h, r, chunks, size)
        keep = key_keep(mask)
        skeep = (keep[:, None, None, :].expand(-1, h, r, -1).gather(-1, order).view(b, h, r, chunks, size)
                 if keep is not None else None)
        if chunks > 1:  # each chunk also attends to the one before it (the first to the last, as Reformer)
            sk, sv, kpos, kbucket = (torch.cat([t, t.roll(1, dims=3)], dim=4) for t in (sk, sv, spos, sbucket))
            kkeep = torch.cat([skeep, skeep.roll(1, dims=3)], dim=4) if skeep is not None else None
        else:
            kpos, kbucket, kkeep = spos, sbucket, skeep
        scores = (sq @ sk.transpose(-2, -1)) * scaling  # (b, h, r, chunks, size, keys)
        allowed = sbucket.unsqueeze(-1) == kbucket.unsqueeze(-2)
        if causal:
            allowed = allowed & (kpos.unsqueeze(-2) <= spos.unsqueeze(-1))
        if kkeep is not None:
            allowed = allowed & kkeep.unsqueeze(-2)
        scores = scores.masked_fill(~allowed, -float("inf"))
        scores = scores.masked_fill(kpos.unsqueeze(-2) == spos.unsqueeze(-1), SELF_SCORE)
        lse = scores.logsumexp(-1, keepdim=True)
        out = torch.exp(scores - lse) @ sv  # (b, h, r, chunks, size, d)
        # back to the original order, then the rounds weighted by their share of the normaliser
        inverse = order.argsort(dim=-1)
        out = out.view(b, h, r, length, d).gather(3, inverse.unsqueeze(-1).expand(-1, -1, -1, -1, d))
        lse = lse.view(b, h, r, length).gather(3, inverse)
        weights = torch.softmax(lse, dim=2).unsqueeze(-1)
        return (out * weights).sum(2)


# -- dense references (tests, benchmark) -------------------------------------------------------------
def dense_attention(q, k, v, causal: bool, scaling: float | None = None, mask: Tensor | None = None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scaling)


def dense_shared_qk(q, v, causal: bool, scaling: float) -> Tensor:
    """Dense attention with Reformer's shared QK and self-masking: what LSH attention computes with one bucket."""
    keys = F.normalize(q, dim=-1)
    scores = (q @ keys.transpose(-2, -1)) * scaling
    length = q.shape[-2]
    eye = torch.eye(length, dtype=torch.bool, device=q.device)
    if causal:
        scores = scores.masked_fill(~torch.ones_like(eye).tril(), -float("inf"))
    scores = scores.masked_fill(eye, SELF_SCORE)
    return torch.softmax(scores, -1) @ v


# -- the transformers hook ---------------------------------------------------------------------------
def repeat_kv(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature (``AttentionInterface``): the module's variant
    (``module.effml_attention``) on its heads; returns (batch, length, heads, head_dim) and no weights."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    causal = bool(getattr(module, "is_causal", False))
    out = module.effml_attention(query, key, value, attention_mask, scaling, dropout, causal)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the hook once, with SDPA's mask function: transformers then builds the same (boolean)
    padding masks for it as for SDPA, and none at all for unpadded causal batches."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """transformers' self-attention modules that dispatch through the AttentionInterface (Llama's
    ``self_attn``, BERT's ``attention.self``): they have a config and a causal flag."""
    return [m for m in model.modules()
            if hasattr(m, "config") and hasattr(m.config, "_attn_implementation") and hasattr(m, "is_causal")
            and type(m).__name__.endswith("Attention")]


def install(module: nn.Module, variant: nn.Module) -> None:
    """Make ``module`` (one of ``attention_modules``) compute ``variant`` instead of dense attention."""
    register()
    module.effml_attention = variant
    module.config._attn_implementation = IMPLEMENTATION


def describe(variant: nn.Module) -> dict:
    """What ``rebuild`` needs to make ``variant`` again, as JSON (its parameters and buffers travel with the
    model's weights: an export writes this beside them, so a reload computes the same attention)."""
    return {"kind": variant.kind, **variant.options}


def rebuild(description: dict) -> nn.Module:
    options = dict(description)
    return VARIANTS[options.pop("kind")](**options)


VARIANTS = {cls.kind: cls for cls in (WindowAttention, LinearAttention, PerformerAttention, LinformerAttention,
                                      LSHAttention)}
