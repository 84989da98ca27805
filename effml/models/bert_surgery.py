"""Structured surgery on BERT encoders: gates on heads and neurons, physical removal, export.

What the structured-pruning compressors share (EarlyBERT, Chen et al. ACL 2021; BERT lottery
S-pruning, Prasanna et al. EMNLP 2020):

- **Gates**: one multiplicative parameter per attention head (scaling the head's context vector
  before the output projection), per FFN intermediate neuron (after the activation) and per whole
  FFN block (its output, before the residual). They are parameters of the model, so they train,
  are saved in every checkpoint and get gradients (Michel et al. 2019's importance is the gradient
  of the loss with respect to a head's gate at 1).
- **Physical removal**: a pruned head loses its Q/K/V rows and its output-projection columns, a
  pruned neuron its row of ``intermediate.dense`` and its column of ``output.dense``; the model is
  then smaller dense modules. Kept widths are rounded up to the hardware's channel multiple
  (docs/ARCHITECTURE.md §6: an FFN of 1843 ran 1.43x slower than dense, 1920 ran 1.23x faster).
- **Export**: ``save_pruned`` writes an HF directory whose ``config.json`` records the per-layer
  head indices and FFN widths under ``effml_structure``; ``load_pruned`` (and ``model.pretrained=
  <dir>`` in effml) rebuilds it. transformers 5 dropped ``prune_heads``, and ``BertConfig`` has a
  single ``intermediate_size``, so plain ``from_pretrained`` cannot rebuild per-layer widths.

transformers' ``BertSelfAttention`` reshapes to ``(-1, head_size)``, so a layer with fewer heads
runs unchanged; at least one head per layer is always kept.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from effml.errors import EffmlError

STRUCTURE_KEY = "effml_structure"  # in config.json of an exported pruned model
HEAD_FILE = "head.safetensors"  # the task head of a pruned export (safetensors: loading runs no code)


# -- anatomy ---------------------------------------------------------------------------------
def encoder_layers(model: nn.Module, who: str) -> list[nn.Module]:
    """The transformer layers of a BERT-family classifier; one clear line if there are none."""
    encoder = getattr(getattr(model, "bert", None), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None or not hasattr(layers[0], "attention"):
        raise EffmlError(
            f"compressor {who} needs a BERT encoder (model=minilm_l6 or model=bert_base); "
            f"got {type(model).__name__}"
        )
    return list(layers)


def head_size(layer: nn.Module) -> int:
    return layer.attention.self.attention_head_size


def num_heads(layer: nn.Module) -> int:
    return layer.attention.self.query.out_features // head_size(layer)


def ffn_width(layer: nn.Module) -> int:
    return layer.intermediate.dense.out_features


@dataclass
class Structure:
    """Which heads (original indices) and how many FFN neurons each layer keeps."""

    heads: list[list[int]] = field(default_factory=list)
    ffn: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module) -> Structure:
        layers = encoder_layers(model, "structure")
        kept = [getattr(layer.attention.self, "kept_heads", None) for layer in layers]
        heads = [k if k is not None else list(range(num_heads(layer))) for k, layer in zip(kept, layers, strict=True)]
        return cls(heads, [ffn_width(layer) for layer in layers])


# -- gates -----------------------------------------------------------------------------------
HEAD_GATE, NEURON_GATE, MLP_GATE = "head_gate", "neuron_gate", "mlp_gate"
GATE_OWNER = {HEAD_GATE: "attention.output", NEURON_GATE: "intermediate", MLP_GATE: "output"}


class Gates:
    """Multiplicative gates on heads, FFN neurons and/or whole FFN blocks of every layer.

    Each gate is a parameter registered on the module it belongs to (``attention.output.head_gate``,
    ``intermediate.neuron_gate``, ``output.mlp_gate``) and applied by a forward hook that reads it
    at call time, so loaded checkpoint values are used. ``remove`` takes hooks and parameters away
    again, optionally folding the gate values into the weights (the model's function is unchanged)."""

    def __init__(self, model: nn.Module, who: str, heads=False, neurons=False, mlp=False, init: float = 1.0):
        self.layers = encoder_layers(model, who)
        self.kinds = [k for k, on in ((HEAD_GATE, heads), (NEURON_GATE, neurons), (MLP_GATE, mlp)) if on]
        self.handles = []
        for layer in self.layers:
            for kind in self.kinds:
                owner = layer.get_submodule(GATE_OWNER[kind])
                size = {HEAD_GATE: num_heads(layer), NEURON_GATE: ffn_width(layer), MLP_GATE: 1}[kind]
                owner.register_parameter(kind, nn.Parameter(torch.full((size,), float(init))))
                self.handles.append(_hook(layer, kind))

    def of(self, kind: str) -> list[nn.Parameter]:
        """Each layer's gate ``kind`` (HEAD_GATE, NEURON_GATE or MLP_GATE)."""
        return [getattr(layer.get_submodule(GATE_OWNER[kind]), kind) for layer in self.layers]

    def parameters(self) -> list[nn.Parameter]:
        return [gate for kind in self.kinds for gate in self.of(kind)]

    @torch.no_grad()
    def remove(self, fold: bool) -> None:
        """Drop the hooks and gate parameters; with ``fold``, scale the weights by the gates first."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for layer in self.layers:
            for kind in self.kinds:
                gate = layer.get_submodule(GATE_OWNER[kind])._parameters.pop(kind)
                if fold:
                    _fold(layer, kind, gate.detach())


def _hook(layer: nn.Module, kind: str):
    """Register the forward hook that applies gate ``kind`` of ``layer``."""
    owner = layer.get_submodule(GATE_OWNER[kind])

    def scale_heads(module, args):  # (..., heads * head_size): each head's slice times its gate
        gate = getattr(owner, kind)
        (context,) = args
        return (context.unflatten(-1, (gate.numel(), -1)).mul(gate.to(context.dtype)[:, None]).flatten(-2),)

    def scale_output(module, args, output):
        return output * getattr(owner, kind).to(output.dtype)

    if kind == HEAD_GATE:
        return layer.attention.output.dense.register_forward_pre_hook(scale_heads)
    target = layer.intermediate if kind == NEURON_GATE else layer.output.dense  # MLP: before the residual
    return target.register_forward_hook(scale_output)


def _fold(layer: nn.Module, kind: str, gate: Tensor) -> None:
    """Put a gate's scaling into the weights it multiplies."""
    out = layer.output.dense
    if kind == HEAD_GATE:
        dense = layer.attention.output.dense  # its input columns are grouped by head
        dense.weight.mul_(gate.repeat_interleave(head_size(layer)).to(dense.weight.dtype))
    elif kind == NEURON_GATE:
        out.weight.mul_(gate.to(out.weight.dtype))
    else:
        out.weight.mul_(gate)
        out.bias.mul_(gate)


# -- choosing what to keep -------------------------------------------------------------------
def round_up(count: int, multiple: int, unit: int, limit: int) -> int:
    """The smallest k ≥ count with k·unit a multiple of ``multiple``, at most ``limit``.

    For heads ``unit`` is the head size (a width of k heads is k·head_size); for neurons it is 1.
    """
    k = max(count, 1)
    while k < limit and (k * unit) % multiple:
        k += 1
    return min(k, limit)


def top_indices(scores: Tensor, count: int) -> list[int]:
    """Indices of the ``count`` largest scores, in ascending index order."""
    return sorted(torch.topk(scores.float(), count).indices.tolist())


# -- physical removal ------------------------------------------------------------------------
def _keep_rows(linear: nn.Linear, index: Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[index].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[index].clone())
    linear.out_features = len(index)


def _keep_columns(linear: nn.Linear, index: Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, index].clone())
    linear.in_features = len(index)


def prune_heads(layer: nn.Module, keep: list[int]) -> None:
    """Keep only heads ``keep`` (indices into the layer's current heads): Q/K/V rows, O columns."""
    if not keep:
        raise EffmlError("a layer must keep at least one attention head")
    attention, size = layer.attention.self, head_size(layer)
    index = torch.cat([torch.arange(h * size, (h + 1) * size) for h in keep])
    for linear in (attention.query, attention.key, attention.value):
        _keep_rows(linear, index)
    _keep_columns(layer.attention.output.dense, index)
    original = getattr(attention, "kept_heads", None) or list(range(attention.num_attention_heads))
    attention.kept_heads = [original[h] for h in keep]  # original indices, for the export
    attention.num_attention_heads = len(keep)
    attention.all_head_size = len(keep) * size
    gate = getattr(layer.attention.output, HEAD_GATE, None)
    if gate is not None:
        layer.attention.output.head_gate = nn.Parameter(gate.detach()[keep].clone())


def prune_neurons(layer: nn.Module, keep: list[int]) -> None:
    """Keep only FFN neurons ``keep``: rows of ``intermediate.dense``, columns of ``output.dense``."""
    index = torch.as_tensor(keep, dtype=torch.long)
    _keep_rows(layer.intermediate.dense, index)
    _keep_columns(layer.output.dense, index)
    gate = getattr(layer.intermediate, NEURON_GATE, None)
    if gate is not None:
        layer.intermediate.neuron_gate = nn.Parameter(gate.detach()[index].clone())


def shrink(model: nn.Module, heads: list[list[int]], neurons: list[list[int]], who: str = "shrink") -> None:
    """Physically remove every head and neuron not listed, layer by layer."""
    for layer, keep_heads, keep_neurons in zip(encoder_layers(model, who), heads, neurons, strict=True):
        if len(keep_heads) < num_heads(layer):
            prune_heads(layer, keep_heads)
        if len(keep_neurons) < ffn_width(layer):
            prune_neurons(layer, keep_neurons)


# -- export and reload -----------------------------------------------------------------------
@contextlib.contextmanager
def quiet_transformers():
    """No "Writing model shards" bar inside effml's own progress output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def save_pruned(model: nn.Module, directory: Path) -> None:
    """``model.bert.save_pretrained`` with the per-layer structure recorded in config.json, and the
    task head (everything outside ``bert``) in ``head.safetensors`` (``load_head``)."""
    directory, structure, encoder = Path(directory), Structure.of(model), model.bert
    encoder.config.update({STRUCTURE_KEY: {"heads": structure.heads, "intermediate_sizes": structure.ffn}})
    try:
        with quiet_transformers():
            encoder.save_pretrained(directory)
    finally:
        encoder.config.__dict__.pop(STRUCTURE_KEY, None)
    from safetensors.torch import save_file

    head = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("bert.")}
    save_file(head, directory / HEAD_FILE)


def load_head(directory: str | Path) -> dict[str, torch.Tensor]:
    """The task head ``save_pruned`` wrote (a state dict without ``bert.``): tensors only, no pickle."""
    from safetensors.torch import load_file

    return load_file(Path(directory) / HEAD_FILE)


def is_pruned(model: nn.Module) -> bool:
    """Whether some layer has lost heads or FFN neurons (its config's widths no longer hold)."""
    config, structure = model.bert.config, Structure.of(model)
    return (any(len(h) != config.num_attention_heads for h in structure.heads)
            or any(w != config.intermediate_size for w in structure.ffn))


def save_classifier(model: nn.Module, directory: Path) -> str:
    """Export a fine-tuned classifier with ``save_pretrained``, in the format that loads it whole.

    A full-width model becomes transformers' ``BertForSequenceClassification``, whose parameter names
    ``BertClassifier`` shares, so ``AutoModelForSequenceClassification.from_pretrained(directory)``
    returns the same function (and ``model.pretrained=<dir>`` in effml its encoder). A structurally
    pruned one goes through ``save_pruned``, since a plain config has one width for every layer.
    Returns the format written."""
    if is_pruned(model):
        save_pruned(model, directory)
        return "effml_pruned"
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.bert.config)
    config.num_labels = model.classifier.out_features
    config.architectures = ["BertForSequenceClassification"]
    exported = AutoModelForSequenceClassification.from_config(config)
    exported.load_state_dict(model.state_dict(), strict=True)  # same names, same shapes, nothing left over
    with quiet_transformers():
        exported.save_pretrained(directory)  # safetensors
    return type(exported).__name__


def saved_structure(directory: str | Path) -> Structure | None:
    """The structure an exported pruned model records, or None for an ordinary checkpoint."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return None
    saved = json.loads(config.read_text()).get(STRUCTURE_KEY)
    return Structure(saved["heads"], saved["intermediate_sizes"]) if saved else None


def load_pruned(directory: str | Path, config=None, **kwargs) -> nn.Module:
    """Rebuild the encoder written by ``save_pruned``: an HF ``AutoModel`` shrunk to the saved widths.

    ``config`` (default: the saved one) and ``kwargs`` go to ``AutoModel.from_config`` (e.g.
    ``attn_implementation``). The task head is ``load_head``'s."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    directory = Path(directory)
    structure = saved_structure(directory)
    if structure is None:
        raise EffmlError(f"{directory} is not a pruned effml export (no {STRUCTURE_KEY} in config.json)")
    config = config or AutoConfig.from_pretrained(directory, local_files_only=True)
    config.__dict__.pop(STRUCTURE_KEY, None)
    encoder = AutoModel.from_config(config, **kwargs)
    holder = nn.Module()
    holder.bert = encoder
    # a fresh model has every head, so the saved original indices are the indices to keep
    shrink(holder, structure.heads, [list(range(width)) for width in structure.ffn], who="load_pruned")
    encoder.load_state_dict(load_file(directory / "model.safetensors"), strict=True)
    return encoder
