"""A Switch Transformer mixture-of-experts FFN: a drop-in replacement for a transformer block's FFN.

Fedus, Zoph & Shazeer, "Switch Transformers: Scaling to Trillion Parameter Models with Simple and
Efficient Sparsity", JMLR 2022 (arXiv:2101.03961):

- §2.1 Switch routing: a router ``W_r`` (no bias) gives logits ``h(x) = W_r x``, softmax gives
  ``p_i(x)``; each token goes to its top-1 expert and the expert's output is multiplied by the gate
  value ``p_i(x)`` (so the router gets a gradient). ``top_k`` > 1 is kept for comparison (Shazeer
  et al. 2017); as in the official router (flaxformer ``TokensChooseMaskedRouter``, copied into
  transformers' ``switchtransformers/router_flax.py``) the top-k gates are *not* renormalised and
  top-1 choices fill the experts' buffers before top-2 choices, in token order.
- §2.2 expert capacity ``ceil(tokens / experts × capacity_factor)`` (× ``top_k`` here, as every
  assignment takes a slot), 1.25 in training and 2.0 at eval (the paper's Table 1 / Appendix); a token
  over capacity is not processed: this layer outputs 0 for it and the block's residual carries it.
- Eq. 4 load-balancing loss ``α · N · Σ_i f_i · P_i`` (α = 0.01) with ``f_i`` the fraction of tokens
  whose choice is expert ``i`` (before capacity, as in the official code) and ``P_i`` the mean router
  probability of expert ``i``.
- §2.4 selective precision: the router (its input, jitter, logits, softmax) runs in float32 even under
  bf16 autocast; ``router_dtype="bfloat16"`` is the paper's Table 2 ablation. Jitter: the router input
  is multiplied by uniform noise in ``[1 - eps, 1 + eps]`` in training only (Appendix A, eps 0.01 as
  Mesh TF and transformers' ``router_jitter_noise``).
- §2.4 smaller init: every expert and router weight is drawn from a normal truncated at ±2σ with
  ``σ = sqrt(scale / fan_in)``, ``scale`` = 0.1 (Table 3: 0.1 vs 1.0).
- §2.4 expert dropout: dropout on the experts' hidden activations (for fine-tuning; 0 by default).
- the router z-loss of ST-MoE (Zoph et al. 2022, arXiv:2202.08906, eq. 5): ``mean(logsumexp(h)²)``,
  coefficient 1e-3, off unless ``z_loss_coef`` > 0.

Sparse upcycling (Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", ICLR 2023, arXiv:2212.05055): ``SwitchFFN.from_dense(ffn, upcycle=True)`` copies a
dense FFN into every expert; the router is new. With top-1 the upcycled layer then computes
``p(x) · FFN(x)``, not ``FFN(x)``: the gate multiplies, as in the paper's layer.

Dispatch has no Python loop over tokens. Assignments are sorted by expert (a stable sort: their
priority order is kept), a token's slot in its expert's buffer is its rank there, and then either
``grouped``: one grouped matmul per projection over the kept tokens (``torch.nn.functional.grouped_mm``
or ``torch._grouped_mm``, probed once per device and dtype; boolean selection of the kept tokens makes
one host sync per forward on a GPU) or ``bmm``: the kept tokens gathered into an (experts, capacity,
d) buffer with zero padding and one batched matmul (no host sync; computes the padding too).
``loop`` (a Python loop over experts) is the reference. ``auto`` takes ``grouped`` where it works.

Two FFN forms, with stacked expert weights of shape (experts, d_in, d_out):
``gated`` (Llama's SwiGLU, ``down(act(gate(x)) * up(x))``: ``w_in`` holds ``[gate | up]``) and plain
(GPT-2's ``proj(act(fc(x)))``).
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from effml.errors import EffmlError

ROUTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DISPATCHES = ("auto", "grouped", "bmm", "loop")
ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_new": lambda: nn.GELU(approximate="tanh"),
               "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": lambda: nn.ReLU(), "silu": lambda: nn.SiLU()}
MODES = ("train", "eval")


class SwitchFFN(nn.Module):
    """Switch FFN (top-1 routing by default). ``forward(x)`` → same shape as ``x``.

    After each forward: ``router_loss`` (the weighted aux + z loss to add to the training loss, with
    its graph; ``pop_router_loss()`` takes it once), ``aux_loss`` and ``z_loss`` (unweighted, with
    graph), ``last_stats`` (detached tensors) and running sums per mode (``stats()``, ``reset_stats()``).
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int = 8, *, gated: bool = False,
                 activation: nn.Module | str = "gelu", bias: bool = True, top_k: int = 1,
                 capacity_factor: float = 1.25, eval_capacity_factor: float = 2.0, jitter_eps: float = 0.01,
                 router_dtype: str = "float32", aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0,
                 expert_dropout: float = 0.0, output_dropout: float = 0.0, init_scale: float = 0.1,
                 dispatch: str = "auto", device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        _validate(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                  eval_capacity_factor=eval_capacity_factor, jitter_eps=jitter_eps, router_dtype=router_dtype,
                  aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, expert_dropout=expert_dropout,
                  output_dropout=output_dropout, init_scale=init_scale, dispatch=dispatch)
        self.d_model, self.d_ff, self.num_experts, self.gated, self.top_k = d_model, d_ff, num_experts, gated, top_k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.jitter_eps, self.router_dtype, self.init_scale, self.dispatch = jitter_eps, router_dtype, init_scale, dispatch
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        factory = {"device": device, "dtype": dtype}
        self.router = nn.Linear(d_model, num_experts, bias=False, **factory)
        width = 2 * d_ff if gated else d_ff  # gated: [gate | up] side by side, one matmul for both
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, width, **factory))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **factory))
        self.b_in = nn.Parameter(torch.zeros(num_experts, width, **factory)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model, **factory)) if bias else None
        self.act = ACTIVATIONS[activation]() if isinstance(activation, str) else activation
        self.expert_dropout = nn.Dropout(expert_dropout)
        self.dropout = nn.Dropout(output_dropout)  # GPT-2's MLP ends in resid dropout: kept in the same place
        self.reset_parameters()
        self.router_loss: Tensor | None = None
        self.aux_loss: Tensor | None = None
        self.z_loss: Tensor | None = None
        self.last_stats: dict[str, Any] | None = None
        self.last_dispatch: str | None = None
        self.reset_stats()

    # -- construction -------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Switch §2.4: truncated normal (±2σ), σ = sqrt(init_scale / fan_in), for router and experts."""
        for weight, fan_in in ((self.router.weight, self.d_model), (self.w_in, self.d_model), (self.w_out, self.d_ff)):
            std = math.sqrt(self.init_scale / fan_in)
            nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)

    @classmethod
    def from_dense(cls, ffn: nn.Module, num_experts: int = 8, *, upcycle: bool = True, **options: Any) -> SwitchFFN:
        """A Switch layer in place of ``ffn`` (Llama ``gate_proj/up_proj/down_proj/act_fn``; GPT-2
        ``c_fc/c_proj/act/dropout``; or ``fc1/fc2/act``), on its device and dtype.

        ``upcycle=True`` copies the dense weights into every expert (sparse upcycling); ``False`` draws
        the experts with the 0.1× init. ``options`` are the constructor's keywords.
        """
        form = dense_form(ffn)
        w_in, b_in, w_out, b_out = form["w_in"], form["b_in"], form["w_out"], form["b_out"]
        options.setdefault("output_dropout", form["dropout"])
        layer = cls(w_in.shape[0], w_out.shape[0], num_experts, gated=form["gated"], activation=copy.deepcopy(form["act"]),
                    bias=b_in is not None, device=w_in.device, dtype=w_in.dtype, **options)
        if upcycle:
            with torch.no_grad():
                layer.w_in.copy_(w_in.expand_as(layer.w_in))
                layer.w_out.copy_(w_out.expand_as(layer.w_out))
                if b_in is not None:
                    layer.b_in.copy_(b_in.expand_as(layer.b_in))
                    layer.b_out.copy_(b_out.expand_as(layer.b_out))
        return layer

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave out the last forward's losses: tensors inside a graph cannot be
        deep-copied (``copy.deepcopy(model)`` after a training step would fail)."""
        state = self.__dict__.copy()
        state.update(router_loss=None, aux_loss=None, z_loss=None)
        return state

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, gated={self.gated}, "
                f"top_k={self.top_k}, capacity_factor={self.capacity_factor}/{self.eval_capacity_factor}, "
                f"router_dtype={self.router_dtype}, dispatch={self.dispatch}")

    # -- forward ------------------------------------------------------------------------------------
    def capacity(self, tokens: int) -> int:
        """Slots per expert: ceil(tokens / experts × capacity factor × top_k), at least 1, at most tokens."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return max(1, min(tokens, math.ceil(tokens / self.num_experts * factor * self.top_k)))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        tokens, k = x.shape[0], self.top_k
        logits, probs = self.route(x)
        gates, experts = probs.topk(k, dim=-1)  # (T, k); top-1 first
        capacity = self.capacity(tokens)
        # assignments in priority order: every token's 1st choice (in token order), then every 2nd choice
        flat_experts = experts.t().reshape(-1)
        flat_gates = gates.t().reshape(-1)
        plan = _plan(flat_experts, self.num_experts, capacity)
        compute = _compute_dtype(x, self.w_in)
        path = self._path(x, compute)
        expert_out = getattr(self, f"_experts_{path}")(x.to(compute), plan, tokens, capacity, compute)
        weight = torch.where(plan["keep"], flat_gates, 0).to(expert_out.dtype)  # dropped: 0, the residual carries it
        out = (expert_out * weight[:, None]).view(k, tokens, self.d_model).sum(0)
        self._losses_and_stats(logits, probs, flat_experts, plan, tokens, capacity, path)
        return self.dropout(out).reshape(shape)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Router logits and probabilities (T, E), in ``router_dtype`` whatever autocast says (§2.4)."""
        dtype = ROUTER_DTYPES[self.router_dtype]
        with torch.autocast(x.device.type, enabled=False):
            h = x.to(dtype)
            if self.training and self.jitter_eps > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            logits = F.linear(h, self.router.weight.to(dtype))
            return logits, logits.softmax(dim=-1)

    def _path(self, x: Tensor, compute: torch.dtype) -> str:
        if self.dispatch != "auto":
            return self.dispatch
        size = torch.tensor([], dtype=compute).element_size()
        aligned = all(n * size % 16 == 0 for n in (self.d_model, self.d_ff))  # grouped GEMM's stride rule
        return "grouped" if aligned and grouped_mm_available(x.device, compute) else "bmm"

    def _experts_grouped(self, x: Tensor, plan: dict, tokens: int, capacity: int, compute: torch.dtype) -> Tensor:
        """One grouped matmul per projection over the kept assignments, sorted by expert."""
        kept = plan["sorted_keep"]
        assignment = plan["order"][kept]  # host sync: the number of kept tokens sets the shape
        expert = plan["sorted_experts"][kept]
        offsets = torch.cumsum(plan["counts"].clamp(max=capacity), 0, dtype=torch.int32)
        w_in, w_out = self.w_in.to(compute), self.w_out.to(compute)
        h = _contiguous_grad(_grouped_mm(x[assignment % tokens], w_in, offsets))
        if self.b_in is not None:
            h = h + self.b_in.to(compute)[expert]
        h = self._hidden(h)
        y = _contiguous_grad(_grouped_mm(h, w_out, offsets))
        if self.b_out is not None:
            y = y + self.b_out.to(compute)[expert]
        # back to assignment order; dropped assignments stay 0 (index_copy: unique indices, deterministic)
        return y.new_zeros(plan["order"].shape[0], self.d_model).index_copy(0, assignment, y)

    def _experts_bmm(self, x: Tensor, plan: dict, tokens: int, capacity: int, compute: torch.dtype) -> Tensor:
        """Kept assignments gathered into an (E, capacity, d) zero-padded buffer; one batched matmul.

        Gathers only (each slot reads its source row), so no scatter and no host sync.
        """
        n, e = plan["order"].shape[0], self.num_experts
        slot = torch.arange(capacity, device=x.device)
        source = (plan["starts"][:, None] + slot).clamp(max=n - 1)  # (E, C): sorted position filling that slot
        filled = slot < plan["counts"][:, None].clamp(max=capacity)
        buffer = x[plan["order"][source] % tokens] * filled[..., None].to(compute)
        if self.b_in is not None:
            h = torch.baddbmm(self.b_in.to(compute)[:, None], buffer, self.w_in.to(compute))
        else:
            h = torch.bmm(buffer, self.w_in.to(compute))
        h = self._hidden(h)
        if self.b_out is not None:
            y = torch.baddbmm(self.b_out.to(compute)[:, None], h, self.w_out.to(compute))
        else:
            y = torch.bmm(h, self.w_out.to(compute))
        # each assignment reads its slot; a dropped one reads slot capacity-1 of its expert and is zeroed later
        position = plan["position"].clamp(max=capacity - 1)
        return y.reshape(e * capacity, self.d_model)[plan["experts"] * capacity + position]

    def _experts_loop(self, x: Tensor, plan: dict, tokens: int, capacity: int, compute: torch.dtype) -> Tensor:
        """The reference: a Python loop over experts, each on its kept tokens."""
        out = x.new_zeros(plan["order"].shape[0], self.d_model)
        for i in range(self.num_experts):
            assignment = torch.nonzero((plan["experts"] == i) & plan["keep"]).squeeze(1)
            if assignment.numel() == 0:
                continue
            h = x[assignment % tokens] @ self.w_in[i].to(compute)
            if self.b_in is not None:
                h = h + self.b_in[i].to(compute)
            y = self._hidden(h) @ self.w_out[i].to(compute)
            if self.b_out is not None:
                y = y + self.b_out[i].to(compute)
            out = out.index_copy(0, assignment, y)
        return out

    def _hidden(self, h: Tensor) -> Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.expert_dropout(h)

    # -- losses and statistics ----------------------------------------------------------------------
    def _losses_and_stats(self, logits: Tensor, probs: Tensor, flat_experts: Tensor, plan: dict, tokens: int,
                          capacity: int, path: str) -> None:
        e = self.num_experts
        logits32, probs32 = logits.float(), probs.float()
        load = torch.bincount(flat_experts, minlength=e).to(torch.float32)  # assignments per expert, before capacity
        # eq. 4: f_i = fraction of tokens choosing expert i (a token counts once per chosen expert)
        f = load / tokens
        p = probs32.mean(dim=0)
        self.aux_loss = e * torch.sum(f * p)
        self.z_loss = torch.logsumexp(logits32, dim=-1).square().mean()
        loss = self.aux_loss_coef * self.aux_loss
        if self.z_loss_coef > 0:
            loss = loss + self.z_loss_coef * self.z_loss
        self.router_loss = loss
        with torch.no_grad():
            kept = plan["counts"].clamp(max=capacity).to(torch.float32)
            entropy = -(probs32 * torch.log_softmax(logits32, dim=-1)).sum(-1).mean()
            assignments = float(flat_experts.shape[0])
            self.last_stats = {"tokens": tokens, "capacity": capacity, "dispatch": path, "load": load, "kept": kept,
                               "dropped_fraction": 1.0 - kept.sum() / assignments, "aux_loss": self.aux_loss.detach(),
                               "z_loss": self.z_loss.detach(), "entropy": entropy}
            self.last_dispatch = path
            run = self._running["train" if self.training else "eval"]
            run["forwards"] += 1
            run["tokens"] += tokens
            run["assignments"] += assignments
            for key, value in (("load", load), ("kept", kept), ("aux_loss", self.aux_loss.detach()),
                               ("z_loss", self.z_loss.detach()), ("entropy", entropy)):
                # .to: the sums stay where they were made when the model moves (a GPU run measured on the CPU)
                run[key] = value if run[key] is None else run[key].to(value.device) + value

    def pop_router_loss(self) -> Tensor | None:
        """The weighted router loss of the last forward, once (None after): what a training step adds."""
        loss, self.router_loss = self.router_loss, None
        return loss

    def reset_stats(self) -> None:
        """Clear the running sums of both modes."""
        self._running = {m: {"forwards": 0, "tokens": 0, "assignments": 0.0, "load": None, "kept": None,
                             "aux_loss": None, "z_loss": None, "entropy": None} for m in MODES}

    def stats(self, mode: str = "train") -> dict[str, Any] | None:
        """Running statistics of ``mode`` since the last reset, as plain numbers (None if no forward).

        ``load_fraction``: share of assignments each expert was chosen for (before capacity);
        ``dropped_fraction``: share of assignments over capacity; ``aux_loss``, ``z_loss``,
        ``entropy`` (nats; log(num_experts) is uniform): means over forwards.
        """
        run = self._running[mode]
        n = run["forwards"]
        if n == 0:
            return None
        return {"forwards": n, "tokens": run["tokens"], "load": run["load"].tolist(),
                "load_fraction": (run["load"] / run["assignments"]).tolist(),
                "dropped_fraction": float(1.0 - run["kept"].sum() / run["assignments"]),
                "aux_loss": float(run["aux_loss"]) / n, "z_loss": float(run["z_loss"]) / n,
                "entropy": float(run["entropy"]) / n, "max_entropy": math.log(self.num_experts)}


# -- helpers ---------------------------------------------------------------------------------------------
def _validate(**v: Any) -> None:
    """One-line errors naming the field (the compressor's config repeats them with its prefix)."""
    if v["num_experts"] < 2:
        raise EffmlError(f"num_experts must be >= 2, got {v['num_experts']}")
    if not 1 <= v["top_k"] <= v["num_experts"]:
        raise EffmlError(f"top_k must be in [1, num_experts={v['num_experts']}], got {v['top_k']}")
    for name in ("capacity_factor", "eval_capacity_factor", "init_scale"):
        if not v[name] > 0:
            raise EffmlError(f"{name} must be > 0, got {v[name]}")
    for name in ("jitter_eps", "expert_dropout", "output_dropout"):
        if not 0 <= v[name] < 1:
            raise EffmlError(f"{name} must be in [0, 1), got {v[name]}")
    for name in ("aux_loss_coef", "z_loss_coef"):
        if v[name] < 0:
            raise EffmlError(f"{name} must be >= 0, got {v[name]}")
    if v["router_dtype"] not in ROUTER_DTYPES:
        raise EffmlError(f"router_dtype must be one of {', '.join(ROUTER_DTYPES)}, got {v['router_dtype']}")
    if v["dispatch"] not in DISPATCHES:
        raise EffmlError(f"dispatch must be one of {', '.join(DISPATCHES)}, got {v['dispatch']}")


def _plan(flat_experts: Tensor, num_experts: int, capacity: int) -> dict[str, Tensor]:
    """Sort assignments by expert (stable: priority order kept) and give each its slot in the buffer."""
    n = flat_experts.shape[0]
    sorted_experts, order = torch.sort(flat_experts, stable=True)
    counts = torch.bincount(flat_experts, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    sorted_position = torch.arange(n, device=flat_experts.device) - starts[sorted_experts]
    position = torch.empty_like(sorted_position).scatter_(0, order, sorted_position)  # a permutation: unique
    return {"experts": flat_experts, "order": order, "sorted_experts": sorted_experts, "counts": counts,
            "starts": starts, "position": position, "keep": position < capacity,
            "sorted_keep": sorted_position < capacity}


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """Autocast's dtype where autocast is on (grouped_mm is no autocast op), else the weights'."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm  # public in torch >= 2.10
    return fn(x, w, offs=offsets)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's backward needs 16-byte
    aligned strides, and a gradient from ``sum()`` is an expanded (stride 0) tensor."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _contiguous_grad(x: Tensor) -> Tensor:
    return _ContiguousGrad.apply(x) if x.requires_grad else x


@functools.cache
def _grouped_mm_probe(device_type: str, index: int | None, dtype: torch.dtype) -> bool:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            x = torch.randn(12, 16, device=device).to(dtype).requires_grad_()
            w = torch.randn(3, 16, 8, device=device).to(dtype).requires_grad_()
            offsets = torch.tensor([4, 4, 10], dtype=torch.int32, device=device)  # an empty group, rows past the end
            y = _grouped_mm(x, w, offsets)
            ref = torch.cat([x[:4] @ w[0], x[4:10] @ w[2]])
            ok = torch.allclose(y[:10].float(), ref.float(), atol=1e-2, rtol=1e-2)
            y[:10].float().square().sum().backward()
            return bool(ok and w.grad is not None and torch.isfinite(w.grad).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether a grouped matmul (forward and backward) runs on this device in this dtype (probed once)."""
    device = torch.device(device)
    return _grouped_mm_probe(device.type, device.index, dtype)


def _weight_in_out(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(d_in, d_out) weight and bias of an ``nn.Linear`` or of transformers' ``Conv1D`` (GPT-2)."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().t(), None if layer.bias is None else layer.bias.detach()
    if type(layer).__name__ == "Conv1D":  # stores (in, out) already
        return layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    raise EffmlError(f"switch_moe: cannot read the weights of {type(layer).__name__} (Linear or Conv1D expected)")


def dense_form(ffn: nn.Module) -> dict[str, Any]:
    """The weights of a dense FFN as (d_in, d_out) matrices, its form and activation."""
    names = {n for n, _ in ffn.named_children()}
    if {"gate_proj", "up_proj", "down_proj"} <= names and hasattr(ffn, "act_fn"):  # Llama / Mistral / Qwen MLP
        (gate, bg), (up, bu), (down, bd) = (_weight_in_out(getattr(ffn, n)) for n in ("gate_proj", "up_proj", "down_proj"))
        if (bg is None) != (bd is None):
            raise EffmlError("switch_moe: a gated FFN with bias on some projections only is not supported")
        return {"gated": True, "w_in": torch.cat([gate, up], dim=1), "b_in": None if bg is None else torch.cat([bg, bu]),
                "w_out": down, "b_out": bd, "act": ffn.act_fn, "dropout": 0.0}
    for fc, proj, act in (("c_fc", "c_proj", "act"), ("fc1", "fc2", "act"), ("fc1", "fc2", "activation_fn")):
        if {fc, proj} <= names and hasattr(ffn, act):  # GPT-2 MLP, a plain two-layer MLP
            (w_in, b_in), (w_out, b_out) = _weight_in_out(getattr(ffn, fc)), _weight_in_out(getattr(ffn, proj))
            if (b_in is None) != (b_out is None):
                raise EffmlError("switch_moe: an FFN with bias on one projection only is not supported")
            dropout = getattr(ffn, "dropout", None)
            return {"gated": False, "w_in": w_in, "b_in": b_in, "w_out": w_out, "b_out": b_out,
                    "act": getattr(ffn, act), "dropout": dropout.p if isinstance(dropout, nn.Dropout) else 0.0}
    raise EffmlError(f"switch_moe: {type(ffn).__name__} is no transformer FFN this layer can replace "
                     "(expected gate_proj/up_proj/down_proj, c_fc/c_proj or fc1/fc2)")


def switch_layers(model: nn.Module) -> dict[str, SwitchFFN]:
    """Every SwitchFFN of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SwitchFFN)}


def pop_router_loss(model: nn.Module) -> Tensor | None:
    """Sum of the weighted router losses of the last forward over every SwitchFFN (None if none ran)."""
    losses = [loss for m in switch_layers(model).values() if (loss := m.pop_router_loss()) is not None]
    return torch.stack(losses).sum() if losses else None
