"""Measured, not estimated (docs/ARCHITECTURE.md §6): sparsity, FLOPs, size, latency and memory of a model.

Pure functions over a model and a dict of forward kwargs (`model(**inputs)`); no Hydra, no Lightning.

- `sparsity_report`  zeros counted in the weights themselves (prune-reparametrized modules included).
- `count_flops`      `torch.utils.flop_counter`, plus "effective" FLOPs if zeros were skipped.
- `measure_inference` / `measure_train_step`  wall-clock time on the target device, synchronized.
- `compare_dense_compressed`  both models timed interleaved on the same inputs, with ratios and notes
  that say so when FLOPs fall but time does not.

Memory semantics, the same on every device: `peak_mem_bytes` = bytes resident before the forward
(the model's own parameters and buffers + the inputs) + the peak of extra bytes allocated during one
forward (`activation_peak_bytes`). On CUDA the extra comes from `max_memory_allocated`; on CPU from
the tensor storage that ops allocate (see `_cpu_peak_extra_bytes`: an approximation that sees
tensors, not scratch memory inside one op).
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.sparse import SparseSemiStructuredTensor
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
INDEX_BYTES = 4  # int32 column index per stored nonzero in CSR


# --------------------------------------------------------------------------- weights and sizes


def _is_wrapper(t: torch.Tensor) -> bool:
    """A tensor subclass holding other tensors: torchao's quantized weights, 2:4 semi-structured ones."""
    return is_traceable_wrapper_subclass(t) or isinstance(t, SparseSemiStructuredTensor)


def holds_kernels(model: nn.Module) -> bool:
    """Whether ``model`` runs an inference-only kernel somewhere: a quantized or 2:4 weight tensor, or
    a module that says so (``effml_inference_kernel``, e.g. the fp8 ``Fp8Linear``)."""
    return any(_is_wrapper(p) for p in model.parameters()) or any(
        getattr(m, "effml_inference_kernel", False) for m in model.modules())


def _values(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor a weight stands for (quantized and 2:4 weights are expanded to count zeros)."""
    if isinstance(t, SparseSemiStructuredTensor):
        return t.to_dense()
    if _is_wrapper(t) and hasattr(t, "dequantize"):
        return t.dequantize()
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # comparisons are not defined on fp8
        return t.float()
    return t


def _leaves(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The tensors that hold a (possibly wrapped) tensor's bytes: int8 data and scales, not the bf16 it stands for."""
    if isinstance(t, SparseSemiStructuredTensor):
        yield from (x for x in (t.packed, t.meta, t.packed_t, t.meta_t) if x is not None)
    elif is_traceable_wrapper_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from _leaves(getattr(t, name))
    else:
        yield t


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the forward uses (masks' cache never stale: effml.compressors._masks), as plain values."""
    from effml.compressors._masks import effective_weight

    return _values(effective_weight(module))


def _effective_params(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter, with `X_orig` of a pruned module replaced by `X_orig * X_mask`.

    Masks are buffers, so they are not parameters and are never counted.
    """
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # shared (tied) parameters count once
                continue
            seen.add(id(p))
            full = f"{mod_name}.{name}" if mod_name else name
            base = name.removesuffix("_orig")
            mask = getattr(module, f"{base}_mask", None) if name.endswith("_orig") else None
            if isinstance(mask, torch.Tensor):
                yield full.removesuffix("_orig"), p.detach() * mask
            else:
                yield full, _values(p.detach())


def sparsity_report(model: nn.Module, layer_types: tuple[type[nn.Module], ...] = PRUNABLE) -> dict[str, Any]:
    """Zeros counted in the weights of `layer_types` layers; params counted over the whole model.

    Returns {"sparsity": zeros / prunable weights, "prunable_weights", "nonzero_prunable",
    "params_total", "params_nonzero", "layers": {qualified_name: {"shape", "numel", "sparsity"}}}.
    """
    layers: dict[str, dict[str, Any]] = {}
    prunable = nonzero = 0
    for name, module in model.named_modules():
        if not isinstance(module, layer_types) or getattr(module, "weight", None) is None:
            continue
        w = _effective_weight(module)
        nnz = int(torch.count_nonzero(w))
        layers[name] = {"shape": list(w.shape), "numel": w.numel(), "sparsity": 1.0 - nnz / max(w.numel(), 1)}
        prunable += w.numel()
        nonzero += nnz
    params = list(_effective_params(model))
    return {
        "sparsity": 1.0 - nonzero / prunable if prunable else 0.0,
        "prunable_weights": prunable,
        "nonzero_prunable": nonzero,
        "params_total": sum(t.numel() for _, t in params),
        "params_nonzero": sum(int(torch.count_nonzero(t)) for _, t in params),
        "layers": layers,
    }


def _storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of distinct storages (views and tied weights count once)."""
    seen: dict[tuple, int] = {}
    for leaf in (leaf for t in tensors if isinstance(t, torch.Tensor) for leaf in _leaves(t)):
        if leaf.device.type != "meta":
            s = leaf.untyped_storage()
            seen[(leaf.device.type, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def resident_bytes(model: nn.Module) -> int:
    """Bytes the model occupies in memory now: parameters and buffers (pruning masks included)."""
    return _storage_bytes(iter([*model.parameters(), *model.buffers()]))


def model_size_bytes(model: nn.Module) -> int:
    """Dense storage of the model as it would be saved after pruning is made permanent.

    A prune-reparametrized weight counts once (not weight_orig + weight_mask); a quantized or 2:4
    weight counts the bytes it holds (int8 data + scales), not those of the dtype it stands for.
    """
    params = sum(_nbytes(p) for _, p in _stored_params(model))
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.endswith("_mask"))
    return params + buffers


def _nbytes(t: torch.Tensor) -> int:
    return sum(leaf.numel() * leaf.element_size() for leaf in _leaves(t))


def _stored_params(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Like `_effective_params`, but wrapped (quantized, 2:4) weights as they are stored."""
    stored = {n: p for n, p in model.named_parameters()}
    for name, t in _effective_params(model):
        p = stored.get(name)
        yield name, p.detach() if p is not None and _is_wrapper(p) else t


def sparse_size_bytes(model: nn.Module, layer_types: tuple[type[nn.Module], ...] = PRUNABLE) -> int:
    """Storage estimate with each prunable weight in CSR where that is smaller, everything else dense.

    CSR = nnz * (value bytes + 4 index bytes) + (rows + 1) * 4 row pointers.
    """
    prunable = {
        f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, layer_types)
    }
    total = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.endswith("_mask"))
    for name, t in _effective_params(model):
        dense = t.numel() * t.element_size()
        if name in prunable and t.dim() >= 2:
            csr = (
                int(torch.count_nonzero(t)) * (t.element_size() + INDEX_BYTES)
                + (t.shape[0] + 1) * INDEX_BYTES
            )
            dense = min(dense, csr)
        total += dense
    return total


# --------------------------------------------------------------------------- FLOPs


def _batch_size(inputs: Mapping[str, Any]) -> int:
    """Leading dimension of the first tensor input."""
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


def _model_device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def _to(inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """int8 x int8 matmuls (torchao's int8 kernels) count like any matmul: 2 M K N."""
    (m, k), (_, n) = a_shape, b_shape
    return 2 * m * k * n


_KERNEL_FLOPS = {torch.ops.aten._int_mm: _int_mm_flops}


def count_flops(
    model: nn.Module, inputs: Mapping[str, Any], layer_types: tuple[type[nn.Module], ...] = PRUNABLE
) -> dict[str, Any]:
    """FLOPs of one `model(**inputs)` in eval mode (a multiply-add counts 2).

    Returns {"total", "total_per_sample", "effective", "effective_per_sample", "batch_size",
    "per_module": {qualified_name: flops}} ("" is the root module). "effective" scales each `layer_types` module's FLOPs by its
    weight density: what a kernel that skipped every zero would do. Other modules count dense.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = _to(inputs, _model_device(model))
    with _eval_mode(model), torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_KERNEL_FLOPS) as counter:
        model(**x)
    total = int(counter.get_total_flops())
    # Keys are "<RootClass>.<fqn>"; strip the root so names match model.named_modules().
    root = type(model).__name__
    per_module = {
        "" if key == root else key.removeprefix(root + "."): int(sum(ops.values()))
        for key, ops in counter.get_flop_counts().items()
        if key != "Global"
    }
    effective = total
    layers = sparsity_report(model, layer_types)["layers"]
    for name, info in layers.items():
        flops = per_module.get(name, 0)
        effective -= round(flops * info["sparsity"])
    bs = _batch_size(inputs)
    return {
        "total": total,
        "total_per_sample": total / bs,
        "effective": effective,
        "effective_per_sample": effective / bs,
        "batch_size": bs,
        "per_module": per_module,
    }


# --------------------------------------------------------------------------- timing


def device_name(device: torch.device | str) -> str:
    """GPU name from CUDA, or the CPU's "model name" from /proc/cpuinfo (with the thread count)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return f"{name} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _on_device(model: nn.Module, device: torch.device, train: bool = False) -> Iterator[nn.Module]:
    """Move the model to `device` in eval (or train) mode; put device and mode back afterwards."""
    home, was_training = _model_device(model), model.training
    model.to(device).train(train)
    try:
        yield model
    finally:
        model.to(home).train(was_training)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    device: torch.device,
    warmup: int,
    iters: int,
    min_time_s: float,
    max_iters: int,
    max_time_s: float,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, called in alternating order round after round.

    Interleaving makes both models see the same clocks, thermals and background load. Stops once
    `iters` rounds are done and `min_time_s` per fn has elapsed, or at `max_iters` rounds, or after
    `max_time_s` (with at least 3 rounds).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    start = time.perf_counter()
    rounds = 0
    while rounds < max_iters:
        elapsed = time.perf_counter() - start
        if rounds >= iters and elapsed >= min_time_s * len(fns):
            break
        if rounds >= 3 and elapsed >= max_time_s:
            break
        for k in order if rounds % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            fns[k]()
            _sync(device)  # CUDA launches are async: the time is only real once the kernels finished
            times[k].append(time.perf_counter() - t0)
        rounds += 1
    return times


def _timing_summary(seconds: list[float], batch_size: int) -> dict[str, Any]:
    ms = sorted(s * 1e3 for s in seconds)
    median = statistics.median(ms)
    return {
        "latency_ms": median,
        "latency_p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
        "latency_min_ms": ms[0],
        "throughput": batch_size / (median / 1e3),  # samples / s
        "iters": len(ms),
    }


# --------------------------------------------------------------------------- memory


class _LiveCpuBytes(TorchDispatchMode):
    """Bytes of CPU tensor storage that ops allocated and that are still referenced, and their peak.

    Every op's outputs are seen at dispatch; a storage counts once, only if the op allocated it (not
    a view or in-place result of its inputs), and stops counting when its last reference dies (a
    weak reference, checked at each op).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        inputs = {s._cdata for s in map(_storage, tree_leaves((args, kwargs))) if s is not None}
        for t in tree_leaves(out):
            storage = _storage(t)
            if storage is not None and t.device.type == "cpu":
                if storage._cdata not in self.live and storage._cdata not in inputs:  # a new allocation
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _storage(t: Any) -> torch.UntypedStorage | None:
    """A dense tensor's storage; None for non-tensors and for tensors without one (sparse, wrapper
    subclasses such as torchao's quantized weights, whose inner tensors are seen by their own ops)."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def _cpu_peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by `fn` on CPU beyond what was live before it (approximation).

    The peak, over op boundaries, of the storage that ops inside `fn` allocated and that is still
    referenced: outputs, intermediates, saved activations, gradients. It does not see scratch memory
    that lives inside one op (oneDNN/MKL workspaces), nor Python objects. On an MLP it equals the
    live activations at the widest point (e.g. Linear output + ReLU output), as CUDA's
    max_memory_allocated does. (torch.profiler gave the same figure, but prints two USDT lines per
    call that no setting silences.)
    """
    with _LiveCpuBytes() as tracker:
        out = fn()
        del out
    return tracker.peak


def _peak_memory(fn: Callable[[], Any], device: torch.device, resident: int) -> dict[str, Any]:
    """{"peak_mem_bytes": resident + peak extra during fn, "activation_peak_bytes", "memory_method"}."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        extra = torch.cuda.max_memory_allocated(device) - before
        method = "cuda.max_memory_allocated"
    else:
        extra = _cpu_peak_extra_bytes(fn)
        method = "cpu live tensor storage (approx.)"
    return {"peak_mem_bytes": resident + extra, "activation_peak_bytes": extra, "memory_method": method}


def _inputs_bytes(inputs: Mapping[str, Any]) -> int:
    return _storage_bytes(iter(v for v in inputs.values() if isinstance(v, torch.Tensor)))


# --------------------------------------------------------------------------- inference and training


def _header(device: torch.device, dtype: torch.dtype | None, batch_size: int) -> dict[str, Any]:
    return {
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "batch_size": batch_size,
    }


def measure_inference(model: nn.Module, inputs: Mapping[str, Any], device: torch.device | str,
                      **options: Any) -> dict[str, Any]:
    """Latency, throughput and peak memory of `model(**inputs)` on `device` (eval, inference_mode);
    ``options`` are ``compare_models``'s (dtype, warmup, iters, min_time_s, max_iters, max_time_s).

    `dtype` (e.g. torch.bfloat16) runs the forward under autocast. The model is moved to `device` for
    the measurement and back afterwards. Returns {"device", "device_name", "dtype", "batch_size",
    "latency_ms" (median), "latency_p90_ms", "latency_min_ms", "throughput" (samples/s), "iters",
    "peak_mem_bytes", "activation_peak_bytes", "memory_method"}.
    """
    return compare_models({"model": model}, inputs, device, **options)["model"]


def compare_models(
    models: Mapping[str, nn.Module],
    inputs: Mapping[str, Any],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    warmup: int = 3,
    iters: int = 20,
    min_time_s: float = 0.5,
    max_iters: int = 1000,
    max_time_s: float = 60.0,
    compile: bool = False,
) -> dict[str, dict[str, Any]]:
    """`measure_inference` for several models at once, timed interleaved on the same inputs. With
    ``compile``, each runs through ``torch.compile`` (compiled in the warmup, which is then at least
    one call), as a deployment under ``hardware.compile=true`` would."""
    device = torch.device(device)
    x = _to(inputs, device)
    bs = _batch_size(inputs)
    with contextlib.ExitStack() as stack:
        ms = {k: stack.enter_context(_on_device(m, device)) for k, m in models.items()}
        stack.enter_context(torch.inference_mode())
        stack.enter_context(_autocast(device, dtype))
        runs = {k: torch.compile(m) if compile else m for k, m in ms.items()}
        fns = {k: (lambda m=m: m(**x)) for k, m in runs.items()}
        times = _time_interleaved(fns, device, max(warmup, 2) if compile else warmup, iters, min_time_s,
                                  max_iters, max_time_s)
        return {
            k: _header(device, dtype, bs) | {"compiled": compile}
            | _timing_summary(times[k], bs)
            | _peak_memory(fns[k], device, resident_bytes(ms[k]) + _inputs_bytes(x))
            for k in ms
        }


def _logits(out: Any) -> torch.Tensor:
    """The tensor a loss applies to, from a tensor, an HF-style output, a dict or a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping):
        return out["logits"]
    return out[0]


def _default_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if labels.is_floating_point():
        return nn.functional.mse_loss(logits.float(), labels.float())
    return nn.functional.cross_entropy(logits.float().flatten(0, -2), labels.flatten())


@contextlib.contextmanager
def _preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Train steps change the weights; put them back. (deepcopy fails on pruned modules' weights.)"""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield model
    finally:
        model.load_state_dict(saved)


def _train_step_fn(model, x, labels, loss_fn, lr, device, dtype) -> Callable[[], torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    loss_fn = loss_fn or _default_loss

    def step() -> torch.Tensor:
        with _autocast(device, dtype):
            loss = loss_fn(_logits(model(**x)), labels)
        loss.backward()
        opt.step()
        # Free the grads inside the step, so no step starts holding memory from the previous one.
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def compare_train_steps(
    models: Mapping[str, nn.Module],
    inputs: Mapping[str, Any],
    labels: torch.Tensor,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    lr: float = 1e-3,
    warmup: int = 2,
    iters: int = 10,
    min_time_s: float = 0.5,
    max_iters: int = 500,
    max_time_s: float = 60.0,
) -> dict[str, dict[str, Any]]:
    """`measure_train_step` for several models, interleaved; weights are restored afterwards."""
    device = torch.device(device)
    x, y = _to(inputs, device), labels.to(device)
    bs = _batch_size(inputs)
    with contextlib.ExitStack() as stack:
        ms = {k: stack.enter_context(_on_device(m, device, train=True)) for k, m in models.items()}
        for m in ms.values():
            stack.enter_context(_preserved_state(m))
        fns = {k: _train_step_fn(m, x, y, loss_fn, lr, device, dtype) for k, m in ms.items()}
        times = _time_interleaved(fns, device, warmup, iters, min_time_s, max_iters, max_time_s)
        out = {}
        for k, m in ms.items():
            t = _timing_summary(times[k], bs)
            mem = _peak_memory(fns[k], device, resident_bytes(m) + _inputs_bytes(x))
            out[k] = _header(device, dtype, bs) | {
                "train_step_ms": t["latency_ms"],
                "train_step_p90_ms": t["latency_p90_ms"],
                "train_throughput": t["throughput"],
                "train_iters": t["iters"],
                "train_peak_mem_bytes": mem["peak_mem_bytes"],
            }
        return out


def measure_train_step(model: nn.Module, inputs: Mapping[str, Any], labels: torch.Tensor, device: torch.device | str,
                       **options: Any) -> dict[str, Any]:
    """Time of one forward + backward + SGD step (train mode); the model's weights are restored after.
    ``options`` are ``compare_train_steps``'s (dtype, loss_fn, lr, warmup, iters, min_time_s, ...).

    `loss_fn(logits, labels)` defaults to cross-entropy (integer labels) or MSE (float labels).
    Returns {"device", "device_name", "dtype", "batch_size", "train_step_ms" (median),
    "train_step_p90_ms", "train_throughput" (samples/s), "train_iters", "train_peak_mem_bytes"}.
    """
    return compare_train_steps({"model": model}, inputs, labels, device, **options)["model"]


# --------------------------------------------------------------------------- dense vs compressed


def _static_report(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """What needs no clock: params, sparsity, sizes, FLOPs per sample."""
    sp = sparsity_report(model)
    flops = count_flops(model, inputs)
    return {
        "params": sp["params_total"],
        "params_nonzero": sp["params_nonzero"],
        "sparsity": sp["sparsity"],
        "size_bytes": model_size_bytes(model),
        "sparse_size_bytes": sparse_size_bytes(model),
        "flops_per_sample": flops["total_per_sample"],
        "effective_flops_per_sample": flops["effective_per_sample"],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _notes(r: dict[str, Any], device: torch.device) -> list[str]:
    """Plain-language warnings where the measurement contradicts what the FLOPs suggest."""
    notes = []
    speedup, eff, counted = r["speedup"], r["flops_ratio"], r["flops_ratio_dense"]
    if eff and eff > 1.5 and speedup < 1.1:
        why = (
            f"unstructured zeros run as dense kernels on {device.type}"
            if not counted or counted < 1.1
            else f"the smaller shapes do not run faster on {device.type} (round widths to the hardware's multiple?)"
        )
        notes.append(
            f"FLOPs fell {eff:.1f}x (counting skipped zeros) but measured latency did not ({speedup:.2f}x): {why}"
        )
    if speedup < 0.9:
        notes.append(f"the compressed model is {1 / speedup:.2f}x SLOWER than dense on {device.type}")
    if r["compressed"]["sparsity"] > 0.5 and r["size_ratio"] and r["size_ratio"] < 1.1:
        notes.append(
            f"{r['compressed']['sparsity']:.0%} zeros are stored dense: model size unchanged "
            f"(sparse storage would be {r['sparse_size_ratio']:.1f}x smaller)"
        )
    if "train_speedup" in r and eff and eff > 1.5 and r["train_speedup"] < 1.1:
        notes.append(f"training step is not faster either ({r['train_speedup']:.2f}x)")
    return notes


def compare_dense_compressed(
    dense: nn.Module,
    compressed: nn.Module,
    inputs: Mapping[str, Any],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    labels: torch.Tensor | None = None,
    warmup: int = 3,
    iters: int = 20,
    min_time_s: float = 0.5,
    max_iters: int = 1000,
    max_time_s: float = 60.0,
    compile: bool = False,
) -> dict[str, Any]:
    """Dense and compressed side by side on the same inputs and device, timed interleaved (with
    ``compile``, the inference of both through ``torch.compile``; training steps stay eager).

    With `labels`, training steps are timed too. Returns
    {"device", "device_name", "dtype", "batch_size",
     "dense"/"compressed": {measure_inference keys (less the header) + "params", "params_nonzero",
        "sparsity", "size_bytes", "sparse_size_bytes", "flops_per_sample", "effective_flops_per_sample"
        [+ "train_step_ms", "train_step_p90_ms", "train_throughput", "train_iters", "train_peak_mem_bytes"]},
     "speedup": dense ms / compressed ms, "flops_ratio": dense / compressed effective FLOPs,
     "flops_ratio_dense": the same for FLOPs counted dense, "memory_ratio": peak memory dense / compressed,
     "size_ratio", "sparse_size_ratio" [, "train_speedup"], "notes": [str]}.
    """
    device = torch.device(device)
    models = {"dense": dense, "compressed": compressed}
    timed = compare_models(models, inputs, device, dtype, warmup, iters, min_time_s, max_iters, max_time_s, compile)
    inference_only = holds_kernels(compressed)  # quantized / 2:4 weights: no backward, nothing to time
    labels = None if inference_only else labels
    if labels is not None:
        trained = compare_train_steps(models, inputs, labels, device, dtype, warmup=warmup, iters=iters, min_time_s=min_time_s)
        for k in models:
            timed[k] |= trained[k]
    header = {k: timed["dense"][k] for k in ("device", "device_name", "dtype", "batch_size", "compiled")}
    sides = {
        k: {n: v for n, v in timed[k].items() if n not in header} | _static_report(m, inputs)
        for k, m in models.items()
    }
    d, c = sides["dense"], sides["compressed"]
    r = (
        header
        | sides
        | {
            "speedup": d["latency_ms"] / c["latency_ms"],
            "flops_ratio": _ratio(d["effective_flops_per_sample"], c["effective_flops_per_sample"]),
            "flops_ratio_dense": _ratio(d["flops_per_sample"], c["flops_per_sample"]),
            "memory_ratio": _ratio(d["peak_mem_bytes"], c["peak_mem_bytes"]),
            "size_ratio": _ratio(d["size_bytes"], c["size_bytes"]),
            "sparse_size_ratio": _ratio(d["sparse_size_bytes"], c["sparse_size_bytes"]),
        }
    )
    if labels is not None:
        r["train_speedup"] = d["train_step_ms"] / c["train_step_ms"]
    r["notes"] = _notes(r, device)
    if inference_only:
        r["notes"].append("training step not timed: the compressed model holds inference kernels (quantized / 2:4)")
    return r
