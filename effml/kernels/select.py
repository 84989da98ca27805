"""Kernel selection by measurement: keep an alternative kernel only where it is faster on this device.

A hardware target's promise is real speed, never a slowdown, and a kernel's name does not keep it
(docs/ARCHITECTURE.md §6). So, for each layer a method wants to convert (``ptq``/``qat`` to fp8 or int8,
``nm_sparsity`` to 2:4), :class:`KernelSelector` times the dense layer and every allowed alternative
on the run's real shapes (``measure.batch_size`` × the data's sequence length, captured by a forward
hook) in the run's precision, interleaved, and keeps the fastest only where it beats dense by
``hardware.selection_margin``. ``hardware.selection``:

- ``measure`` (default): as above; a kernel the device cannot run is skipped and reported.
- ``force``: the method's first kernel, unmeasured against the margin (timed for the report only);
  one clear line where the device cannot run it.
- ``off``: every layer stays dense.

Timings are cached in ``hardware.kernel_cache`` (JSON), keyed by device, torch version, layer
shape, input shape, dtype and kernel, so a sweep measures each shape once. Attention gets the
same treatment: :func:`measured_sdpa_order` times every configured SDPA backend on the model's own
attention call and orders them fastest first (the rest stay as the fallback chain).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effml import measure
from effml.errors import EffmlError
from effml.kernels.library import kernel
from effml.paths import atomic_write_text

TIMING = {"warmup": 3, "iters": 10, "min_time_s": 0.05, "max_iters": 200, "max_time_s": 2.0}
# A layer is timed over this many back-to-back calls per synchronization on a GPU: inside a model its
# launches overlap the previous layer's work, and one call between two syncs would charge a kernel of
# several launches (fp8: quantize, then matmul) the launch latency that the model never pays (H200,
# BERT-large 128x512: 48 of 144 layers kept fp8 and 1.16x one call a sync; every layer forced: 1.23x).
LAYER_CALLS = 8


@dataclass
class Decision:
    """What one layer (or the attention) got, and why."""

    layer: str
    kernel: str  # "dense" or a kernel name (attention: the backend order)
    reason: str
    shape: str  # e.g. "x[512, 768] w[3072, 768] bfloat16"
    timings_ms: dict[str, float] = field(default_factory=dict)
    forced: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v or k == "kernel"}


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype a layer computes in under this Lightning precision."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def check_allowed(hardware: Any, name: str) -> None:
    """A kernel a method names must be on the target's allow-list (``hardware.kernels``), whatever the
    selection mode (forcing never overrides it): one line."""
    if name not in hardware.kernels:
        raise EffmlError(f"kernel {name} is not in hardware.kernels "
                         f"({hardware.name} allows {', '.join(hardware.kernels) or 'none'})")


def hardware_device(hardware: Any) -> torch.device:
    return torch.device("cuda" if hardware.accelerator == "gpu" else "cpu")


class TimingCache:
    """Milliseconds per (device, torch, shape, dtype, kernel), shared by every run on the machine."""

    def __init__(self, path: str):
        path = os.environ.get("EFFML_KERNEL_CACHE", path)  # tests and shared clusters point it elsewhere
        self.path = Path(os.path.expanduser(path)) if path else None
        self.entries: dict[str, float] = self._read()
        self.new: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        if not self.path or not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # a damaged cache only costs a re-measurement
            return {}

    def get(self, key: str) -> float | None:
        return self.entries.get(key)

    def put(self, key: str, ms: float) -> None:
        self.entries[key] = self.new[key] = ms

    def save(self) -> None:
        """Merge this run's timings into the file under a lock (sweeps run in parallel)."""
        if not self.path or not self.new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = {**self._read(), **self.new}
            atomic_write_text(self.path, json.dumps(merged, indent=0, sort_keys=True))
        self.new = {}


class KernelSelector:
    """Chooses, layer by layer, between dense and the kernels a method asks for (module docstring)."""

    def __init__(self, hardware: Any, device: torch.device | None = None):
        self.hardware = hardware
        self.device = device or hardware_device(hardware)
        self.dtype = precision_dtype(hardware.precision)
        self.cache = TimingCache(hardware.kernel_cache)
        self.decisions: list[Decision] = []
        self.fastest: dict[str, tuple[str, nn.Module]] = {}  # path → its fastest alternative, kept or not
        self.layer_calls = LAYER_CALLS if self.device.type == "cuda" else 1
        self.key_prefix = (f"{measure.device_name(self.device)}|torch {torch.__version__}|torchao {_torchao_version()}"
                           f"|calls {self.layer_calls}")  # timings taken another way are not reused

    def choose(self, path: str, layer: nn.Linear, input_shape: tuple[int, ...], wanted: list[str]) -> nn.Module:
        """The module to use at ``path``: ``layer`` itself or a converted copy (on this device)."""
        shape = f"x{list(input_shape)} w{list(layer.weight.shape)} {str(self.dtype).removeprefix('torch.')}"
        mode = self.hardware.selection
        if mode == "off" or not wanted:
            reason = "hardware.selection=off" if mode == "off" else "dense: the method asked for no kernel"
            return self._keep(Decision(path, "dense", reason, shape), layer)
        here = copy.deepcopy(layer).to(self.device, self.dtype)
        if mode == "force":
            return self._forced(path, here, input_shape, wanted[0], shape)
        notes, runnable = [], {}
        for name in wanted:
            why_not = self._why_not(name, here)
            if why_not:
                notes.append(f"{name}: {why_not}")
                continue
            try:
                runnable[name] = kernel(name).convert(here)
            except Exception as e:  # noqa: BLE001 - a kernel that fails to build is reported, dense kept
                notes.append(f"{name}: failed to build ({_first_line(e)})")
        timings = self._time(here, runnable, input_shape, shape, notes) if runnable else {}
        return self._pick(Decision(path, "dense", "", shape, timings), layer, runnable, notes)

    def _why_not(self, name: str, layer: nn.Linear) -> str | None:
        if name not in self.hardware.kernels:
            return f"not in hardware.kernels ({self.hardware.name} allows {self.hardware.kernels or 'none'})"
        return kernel(name).unsupported(layer, self.device, self.dtype)

    def _forced(self, path: str, layer: nn.Linear, input_shape, name: str, shape: str) -> nn.Module:
        check_allowed(self.hardware, name)
        why_not = kernel(name).unsupported(layer, self.device, self.dtype)
        if why_not:
            raise EffmlError(f"hardware.selection=force: kernel {name} cannot run for {path}: {why_not}")
        converted = kernel(name).convert(layer)
        timings = self._time(layer, {name: converted}, input_shape, shape, [])
        ratio = _speedup(timings, name)
        reason = f"forced, not selected (measured {ratio:.2f}x of dense)" if ratio else "forced, not selected"
        self.decisions.append(Decision(path, name, reason, shape, timings, forced=True))
        return converted

    def _pick(self, d: Decision, dense: nn.Module, runnable: dict[str, nn.Module], notes: list[str]) -> nn.Module:
        timed = [k for k in runnable if k in d.timings_ms]
        best = min(timed, key=d.timings_ms.__getitem__, default=None)
        margin = self.hardware.selection_margin
        if best:
            self.fastest[d.layer] = (best, runnable[best])
        if best and _speedup(d.timings_ms, best) >= margin:
            d.kernel, d.reason = best, f"measured {_speedup(d.timings_ms, best):.2f}x faster than dense"
        elif best:
            d.reason = f"dense: fastest alternative {best} measured {_speedup(d.timings_ms, best):.2f}x (< {margin}x)"
        else:
            d.reason = "dense: no alternative runs here"
        if notes:
            d.reason += " [" + "; ".join(notes) + "]"
        return self._keep(d, runnable[best] if d.kernel != "dense" else dense)

    def _keep(self, d: Decision, module: nn.Module) -> nn.Module:
        self.decisions.append(d)
        return module

    def _time(self, dense: nn.Module, others: dict[str, nn.Module], input_shape, shape: str,
              notes: list[str]) -> dict[str, float]:
        """Milliseconds per forward, from the cache or measured interleaved; a kernel that fails to
        run is dropped from ``others`` and noted."""
        keys = {name: f"{self.key_prefix}|{shape}|{name}" for name in ["dense", *others]}
        if all(self.cache.get(k) is not None for k in keys.values()):
            return {name: self.cache.get(k) for name, k in keys.items()}
        x = torch.randn(*input_shape, device=self.device, dtype=self.dtype)
        calls = self.layer_calls
        fns = {"dense": _forward(dense, x, calls)}
        for name, module in list(others.items()):
            try:
                fns[name] = _forward(module, x, calls)
                fns[name]()
            except Exception as e:  # noqa: BLE001
                notes.append(f"{name}: failed to run ({_first_line(e)})")
                del others[name], fns[name]
        with torch.inference_mode():
            seconds = measure._time_interleaved(fns, self.device, **TIMING)
        timings = {name: round(1e3 * sorted(s)[len(s) // 2] / calls, 4) for name, s in seconds.items()}
        for name, ms in timings.items():
            self.cache.put(keys[name], ms)
        return timings


def _torchao_version() -> str:
    try:
        return version("torchao")
    except PackageNotFoundError:
        return "none"


def _forward(module: nn.Module, x: torch.Tensor, calls: int = 1):
    def fn():
        for _ in range(calls):
            module(x)

    return fn


def _speedup(timings: Mapping[str, float], name: str) -> float | None:
    if name not in timings or not timings[name]:
        return None
    return timings["dense"] / timings[name]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _on_model_device(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    return measure._to(inputs, measure._model_device(model))


def input_shapes(model: nn.Module, example_inputs: Mapping[str, Any], paths: list[str]) -> dict[str, tuple]:
    """The input shape each module at ``paths`` sees in one forward of ``example_inputs``."""
    shapes: dict[str, tuple] = {}

    def record(path: str):
        def hook(module, args) -> None:  # returns None: the inputs pass unchanged
            shapes.setdefault(path, tuple(args[0].shape))

        return hook

    hooks = [model.get_submodule(path).register_forward_pre_hook(record(path)) for path in paths]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(**_on_model_device(model, example_inputs))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def convert_linears(model: nn.Module, wanted: Mapping[str, list[str]], example_inputs: Mapping[str, Any],
                    hardware: Any, fuse: bool | None = None) -> list[Decision]:
    """Swap each ``nn.Linear`` at a path of ``wanted`` for its chosen kernel, in place.

    ``wanted`` maps module paths to the kernels the method would use, best first. Each layer is
    timed alone (:class:`KernelSelector`); the converted fp8 layers are fused where they share an
    input or follow a GELU (:mod:`effml.kernels.fusion`; ``fuse`` defaults to on unless
    ``hardware.compile``, where inductor fuses). Under ``measure`` the whole model is then timed
    against dense twice: with the layers that were faster alone, and with every layer that has a
    runnable alternative (fusions only pay when neighbours convert together), and the faster is
    kept if it beats dense by ``selection_margin``, else every layer goes back to dense
    (:func:`whole_model_guard`). Returns one :class:`Decision` per layer (what it got and why), in
    model order, plus one for the whole model when anything was converted."""
    selector = KernelSelector(hardware)
    shapes = input_shapes(model, example_inputs, list(wanted))
    originals, chosen = {}, {}  # the model stays dense until a layout is kept
    for path, kernels in wanted.items():
        if path not in shapes:  # not on the forward path of these inputs: nothing to time it on
            selector.decisions.append(Decision(path, "dense", "dense: layer not reached by the example inputs", ""))
            continue
        originals[path] = model.get_submodule(path)
        module = selector.choose(path, originals[path], shapes[path], kernels)
        if module is not originals[path]:
            chosen[path] = module
    fuse = not getattr(hardware, "compile", False) if fuse is None else fuse
    layouts = {"selected": layout(model, originals, chosen, fuse)} if chosen else {}
    every = {p: module for p, (_, module) in selector.fastest.items()}
    if hardware.selection == "measure" and every.keys() - chosen.keys():
        layouts["every layer"] = layout(model, originals, every, fuse)
    if layouts and hardware.selection == "measure":
        winner = whole_model_guard(model, layouts, example_inputs, selector)
    else:
        winner = "selected" if layouts else "dense"
    if winner != "dense":
        for path, module in layouts[winner].modules.items():
            set_module(model, path, module)
        _note_layout(selector, layouts[winner], converted_alone=chosen)
    selector.cache.save()
    return selector.decisions


@dataclass
class Layout:
    """A way to convert the model: the modules to put at each path (converted layers, fused where
    they can be), the dense modules they replace, and what each fused layer was fused with."""

    modules: dict[str, nn.Module]
    dense: dict[str, nn.Module]
    notes: dict[str, str]


def layout(model: nn.Module, originals: dict[str, nn.Module], converted: dict[str, nn.Module], fuse: bool) -> Layout:
    """``converted`` (path → its converted layer) with the fusions they allow; ``model`` is left dense."""
    from effml.kernels.fusion import Fusions, fp8_fusions

    for path, module in converted.items():
        set_module(model, path, module)
    fusions = fp8_fusions(model) if fuse else Fusions()
    for path in converted:
        set_module(model, path, originals[path])
    modules = {**converted, **{path: fused for path, (_, fused) in fusions.swaps.items()}}
    dense = {path: originals.get(path, before) for path, (before, _) in fusions.swaps.items()}  # a GELU fused away
    return Layout(modules, {**dense, **{p: originals[p] for p in converted}}, fusions.notes)


def _note_layout(selector: KernelSelector, kept: Layout, converted_alone: dict[str, nn.Module]) -> None:
    """Say in each layer's decision what the kept layout gave it beyond its own measurement."""
    for d in selector.decisions:
        if d.layer in kept.modules and d.layer not in converted_alone and d.layer in selector.fastest:
            alone = d.reason
            d.kernel = selector.fastest[d.layer][0]
            d.reason = f"converted with every layer (the whole model was faster so); alone: {alone}"
        if d.layer in kept.notes:
            d.reason += f"; fused: {kept.notes[d.layer]}"


def whole_model_guard(model: nn.Module, layouts: dict[str, Layout], example_inputs: Mapping[str, Any],
                      selector: KernelSelector) -> str:
    """The fastest of dense and ``layouts`` for the whole model ("dense" unless a layout beats it by
    ``selection_margin``); ``model`` is left dense, the layer decisions of a loss say so.

    Per-layer gains need not add up: dtype casts between layers, the quantization of activations and
    launch overhead at small shapes eat them, fusions across layers add to them. All versions are
    timed interleaved by swapping modules in and out of the same model on the target device."""
    model.to(selector.device)
    inputs = _on_model_device(model, example_inputs)
    dense = {path: module for lay in layouts.values() for path, module in lay.dense.items()}
    autocast = (torch.autocast(selector.device.type, dtype=selector.dtype) if selector.dtype != torch.float32
                else contextlib.nullcontext())

    def forward_with(modules: dict[str, nn.Module]):
        swaps = {**dense, **modules}

        def fn():
            for path, module in swaps.items():
                set_module(model, path, module)
            return model(**inputs)

        return fn

    was_training = model.training
    model.eval()
    fns = {"dense": forward_with({})} | {name: forward_with(lay.modules) for name, lay in layouts.items()}
    with torch.inference_mode(), autocast:
        seconds = measure._time_interleaved(fns, selector.device, **TIMING)
    for path, module in dense.items():
        set_module(model, path, module)
    model.train(was_training)
    ms = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in seconds.items()}
    best = min(layouts, key=ms.__getitem__)
    speedups = ", ".join(f"{name} {ms['dense'] / ms[name]:.2f}x" for name in layouts)
    winner = best if ms["dense"] / ms[best] >= selector.hardware.selection_margin else "dense"
    if winner == "dense":
        for d in selector.decisions:
            if d.kernel != "dense":
                d.reason = f"reverted to dense: the whole model measured {speedups} ({d.kernel} {d.reason})"
                d.kernel = "dense"
    layers = sum(d.layer in layouts.get(winner, layouts[best]).modules for d in selector.decisions)
    verdict = f"kept {winner} ({layers} layers converted)" if winner != "dense" else "reverted to dense"
    selector.decisions.append(Decision("(whole model)", "converted" if winner != "dense" else "dense",
                                       f"{verdict}: measured {speedups} of dense (margin {selector.hardware.selection_margin}x)",
                                       "", {k: round(v, 4) for k, v in ms.items()}))
    return winner


# -- attention ----------------------------------------------------------------------------------
@dataclass
class AttentionCall:
    """The shapes of a model's ``scaled_dot_product_attention`` call, as its training forward makes it."""

    q: tuple[int, ...]
    k: tuple[int, ...]
    v: tuple[int, ...]
    mask: tuple[int, ...] | None
    mask_dtype: torch.dtype | None
    dropout_p: float
    is_causal: bool

    def describe(self, dtype: torch.dtype) -> str:
        mask = f" mask{list(self.mask)}" if self.mask else ""
        return (f"q{list(self.q)} k{list(self.k)}{mask} dropout {self.dropout_p} causal {self.is_causal} "
                f"{str(dtype).removeprefix('torch.')}")


def capture_attention_call(model: nn.Module, example_inputs: Mapping[str, Any]) -> AttentionCall | None:
    """The first SDPA call of one training-mode forward (None: the model has no attention). The RNG
    state is restored, so capturing changes no run's randomness."""
    import torch.nn.functional as F

    original, calls = F.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if not calls:
            calls.append(AttentionCall(
                tuple(q.shape), tuple(k.shape), tuple(v.shape),
                tuple(attn_mask.shape) if attn_mask is not None else None,
                attn_mask.dtype if attn_mask is not None else None, float(dropout_p), bool(is_causal),
            ))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    F.scaled_dot_product_attention = spy
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.train()(**_on_model_device(model, example_inputs))
    finally:
        F.scaled_dot_product_attention = original
        model.train(was_training)
    return calls[0] if calls else None


def _attention_step(call: AttentionCall, device: torch.device, dtype: torch.dtype, train: bool):
    """One attention call (forward + backward when ``train``) on random tensors of the captured shapes."""
    import torch.nn.functional as F

    q, k, v = (torch.randn(s, device=device, dtype=dtype, requires_grad=train) for s in (call.q, call.k, call.v))
    mask = None
    if call.mask is not None:
        mask = (torch.ones(call.mask, device=device, dtype=torch.bool) if call.mask_dtype == torch.bool
                else torch.zeros(call.mask, device=device, dtype=dtype))

    def step():
        with torch.set_grad_enabled(train):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=call.dropout_p if train else 0.0,
                                                 is_causal=call.is_causal)
        if train:
            out.sum().backward()

    return step


def _with_backend(backend, step) -> None:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        step()


def time_and_cache(fns: Mapping[str, Any], keys: Mapping[str, str], selector: KernelSelector) -> dict[str, float]:
    """Median ms of each of ``fns``, timed interleaved, and stored in the timing cache under ``keys``."""
    timings = {}
    if fns:
        seconds = measure._time_interleaved(dict(fns), selector.device, **TIMING)
        for name, s in seconds.items():
            timings[name] = round(1e3 * sorted(s)[len(s) // 2], 4)
            selector.cache.put(keys[name], timings[name])
    selector.cache.save()
    return timings


def measured_sdpa_order(call: AttentionCall, hardware: Any, backends: list[str],
                        train: bool = True) -> tuple[list[str], Decision]:
    """``backends`` ordered for ``sdpa_kernel``: those that run this call, fastest first (fwd+bwd, as
    training uses them; forward only when not ``train``), then the others, then ``math``; the decision
    records every timing and every backend that cannot run the call."""
    from torch.nn.attention import SDPBackend

    from effml.kernels.hardware import SDPA

    selector = KernelSelector(hardware)
    shape = call.describe(selector.dtype) + ("" if train else " forward")
    keys = {b: f"{selector.key_prefix}|sdpa {shape}|{b}" for b in backends}
    timings = {b: selector.cache.get(k) for b, k in keys.items() if selector.cache.get(k) is not None}
    fns, notes = {}, []
    for backend in backends:
        if backend in timings:
            continue
        step, enum = _attention_step(call, selector.device, selector.dtype, train), getattr(SDPBackend, SDPA[backend])
        fns[backend] = lambda step=step, enum=enum: _with_backend(enum, step)
        try:
            with warnings.catch_warnings():  # a backend that cannot run warns why, then raises: we report it
                warnings.simplefilter("ignore")
                fns[backend]()
        except RuntimeError as e:  # this backend does not take these shapes / mask / dropout / device
            notes.append(f"{backend}: {_first_line(e)}")
            del fns[backend]
    timings |= time_and_cache(fns, keys, selector)
    # Those that ran, fastest first; unless math (which runs anything) is among them, then those that
    # could not run this call (they may run another, e.g. evaluation without dropout), then math.
    order = sorted(timings, key=timings.__getitem__)
    if "math" not in order:
        order += [b for b in backends if b not in timings and b != "math"] + ["math"]
    reason = f"measured fastest of {len(timings)} backends ({'fwd+bwd' if train else 'fwd'})" if timings else "no backend measured"
    if notes:
        reason += " [" + "; ".join(notes) + "]"
    return order, Decision("attention", order[0] if timings else "math", reason, shape, timings)


# -- Switch MoE dispatch ---------------------------------------------------------------------------
def measured_switch_dispatch(layer: nn.Module, tokens: int, hardware: Any) -> Decision:
    """The faster sorted dispatch of a Switch layer (``effml/models/switch.py``) on this device, timed
    fwd+bwd on a copy at the run's tokens per batch: ``grouped`` (one grouped matmul per projection)
    where the device runs it for these widths, against ``bmm`` (a zero-padded batch per expert). No
    rule orders them: on an H100 grouped won for the SwiGLU FFN and padded bmm by 1.37x for the GPT-2
    one, on the CPU grouped won (``benchmarks/results/moe_dispatch_*``)."""
    from effml.models.switch import grouped_mm_available

    selector = KernelSelector(hardware)
    probe = copy.deepcopy(layer).to(selector.device).train()
    shape = (f"switch d_model {probe.d_model} d_ff {probe.d_ff} experts {probe.num_experts} top_k {probe.top_k} "
             f"{'gated' if probe.gated else 'plain'} tokens {tokens} {str(selector.dtype).removeprefix('torch.')}")
    size = torch.tensor([], dtype=selector.dtype).element_size()
    aligned = all(n * size % 16 == 0 for n in (probe.d_model, probe.d_ff))  # grouped GEMM's stride rule
    paths = ["grouped", "bmm"] if aligned and grouped_mm_available(selector.device, selector.dtype) else ["bmm"]
    if len(paths) == 1:
        return Decision("switch dispatch", "bmm", "the only sorted dispatch this device runs here", shape, {})
    keys = {path: f"{selector.key_prefix}|{shape}|{path}" for path in paths}
    timings = {path: selector.cache.get(key) for path, key in keys.items() if selector.cache.get(key) is not None}
    x = torch.randn(tokens, probe.d_model, device=selector.device)
    autocast = torch.autocast(selector.device.type, dtype=selector.dtype, enabled=selector.dtype != torch.float32)

    def step(path: str) -> None:
        probe.dispatch = path
        with autocast:
            out = probe(x)
        (out.float().square().mean() + probe.pop_router_loss()).backward()

    timings |= time_and_cache({path: (lambda path=path: step(path)) for path in paths if path not in timings},
                              keys, selector)
    fastest = min(timings, key=timings.__getitem__)
    return Decision("switch dispatch", fastest, f"measured fastest of {len(timings)} dispatches (fwd+bwd)", shape, timings)
