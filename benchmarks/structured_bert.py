"""Structured BERT pruning, measured: dense vs heads + FFN neurons physically removed (EarlyBERT-style).

BERT-base shape (12 layers, hidden 768, 12 heads x 64, FFN 3072; random weights: speed does not
depend on the values), bf16 autocast on CUDA, >= 16k tokens a step (batch 32 x seq 512 and 64 x 256).
For each pruning level (20/40/60 % of the heads of every layer and of the FFN neurons of every layer,
the same count in each layer, random indices) and each width multiple (1 = raw, 8, 64, 128; kept
widths rounded up with ``bert_surgery.round_up`` as the EarlyBERT compressor does), the pruned model
is built with ``bert_surgery.shrink`` and timed interleaved with the dense one in one process:

- train step = forward + backward + AdamW step (fused where available) under autocast, median ms;
- inference latency = forward in eval + inference mode (interleaved like ``measure.compare_models``);
- FLOPs of one forward (``effml.measure.count_flops``), dense / pruned;
- host ms: the CPU time to issue a step. Eager HF BERT steps can be launch-bound (the GPU waits for
  Python and kernel launches), and then a smaller model cannot run faster: the notes say so.

With ``--compile`` (default on CUDA) the 40/40 case is also timed under ``torch.compile``
(``--compile-mode``, default reduce-overhead = CUDA graphs, no launch overhead): dense, the preset's
multiple, then the other rounded multiples, fastest eager first, while the time budget
(``--budget-s``) lasts.

Goal check (docs/ARCHITECTURE.md §6), on the eager numbers (effml's presets train with compile: false): 40/40 at
the hardware preset's ``channel_multiple`` trains >= 1.4x faster than dense, and no level at that
multiple is slower than dense (train or forward). The fastest multiple is reported too, so that the
preset can be changed if another one wins.

Results: benchmarks/results/structured_bert_<device>.json and .md (``--out`` to write elsewhere).
Without CUDA (or with ``--model tiny``) a 2-layer hidden-192 BERT with 12 heads of 16 runs at batch
4 x seq 32 in fp32: the code path, not a measurement.

Needs torch, transformers and Lightning (what a GPU node has; plus PyYAML, a transformers
dependency): of effml it imports ``effml.measure``, ``effml.kernels.hardware`` (preset detection and
reading, SDPA names), ``effml.models`` (BertClassifier, bert_surgery) and ``heads_kept`` from the
EarlyBERT compressor, none of which imports Hydra, OmegaConf, datasets or wandb at module level.
If ``effml`` is not installed, the checkout it lives in is used (its top-level folders are mapped
into the ``effml`` package here, as pyproject's package-dir does). So on a GPU machine with torch and
transformers, from the repository root:

    python benchmarks/structured_bert.py            # full run: ~3-5 min on an H100 (compile included)
    python benchmarks/structured_bert.py --quick    # smoke test: ~1 min, no compile

or with effml installed from a wheel built here (``python -m pip wheel --no-deps -w dist .``):

    pip install --no-deps --target /tmp/site dist/effml-0.1.0-py3-none-any.whl
    PYTHONPATH=/tmp/site python benchmarks/structured_bert.py
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/_checkout.py, however this is run
from _checkout import use_checkout  # noqa: E402

use_checkout()
from effml import measure  # noqa: E402
from effml.compressors.earlybert import heads_kept  # noqa: E402
from effml.config import conf_dir  # noqa: E402
from effml.kernels import hardware  # noqa: E402
from effml.models import bert_surgery as surgery  # noqa: E402
from effml.models.bert import BertClassifier  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LEVELS = (0.2, 0.4, 0.6)
MULTIPLES = (1, 8, 64, 128)
TARGET_LEVEL, GOAL_SPEEDUP = 0.4, 1.4
NUM_CLASSES = 2


@dataclass(frozen=True)
class Shape:
    """A BERT encoder's shape (``transformers.BertConfig`` fields)."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int = 30522  # BERT's uncased WordPiece vocabulary

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads


MODELS = {
    "bert-base": Shape(layers=12, hidden=768, heads=12, ffn=3072),
    "tiny": Shape(layers=2, hidden=192, heads=12, ffn=768, vocab=2048),  # 12 heads of 16: BERT's head counts
}
BATCHES = {"bert-base": [(32, 512), (64, 256)], "tiny": [(4, 32)]}


@dataclass
class Timing:
    """How long to time: warmup calls per model, at least `iters` rounds and `min_time_s` per model."""

    warmup: int
    iters: int
    min_time_s: float
    max_time_s: float


FULL = {"infer": Timing(3, 10, 0.4, 10.0), "train": Timing(3, 10, 1.0, 15.0)}
QUICK = {"infer": Timing(1, 2, 0.0, 2.0), "train": Timing(1, 2, 0.0, 3.0)}


# -- the model: effml's own BertClassifier (its registry does not import Hydra) -------------------
def build_dense(shape: Shape, seed: int = 0) -> BertClassifier:
    from transformers import AutoModel, BertConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = BertConfig(num_hidden_layers=shape.layers, hidden_size=shape.hidden,
                        num_attention_heads=shape.heads, intermediate_size=shape.ffn, vocab_size=shape.vocab)
    return BertClassifier(AutoModel.from_config(config, attn_implementation="sdpa"), NUM_CLASSES).train()


def kept_widths(shape: Shape, level: float, multiple: int) -> tuple[int, int]:
    """Heads and FFN neurons each layer keeps with `level` of both removed, rounded up to `multiple`.

    The counts are the EarlyBERT compressor's (``heads_kept``: n - round(n * level), at least one;
    FFN: round(n * (1 - level))); heads round in units of the head size.
    """
    heads = heads_kept(shape.heads, level)
    ffn = max(1, round(shape.ffn * (1 - level)))
    return (surgery.round_up(heads, multiple, shape.head_size, shape.heads),
            surgery.round_up(ffn, multiple, 1, shape.ffn))


def pruned_copy(dense: nn.Module, heads: int, ffn: int, seed: int) -> nn.Module:
    """A copy of `dense` with `heads` heads and `ffn` FFN neurons left in every layer (random choice)."""
    model = copy.deepcopy(dense)
    generator = torch.Generator().manual_seed(seed)
    layers = surgery.encoder_layers(model, "structured_bert")
    keep_heads = [sorted(torch.randperm(surgery.num_heads(layer), generator=generator)[:heads].tolist())
                  for layer in layers]
    keep_ffn = [sorted(torch.randperm(surgery.ffn_width(layer), generator=generator)[:ffn].tolist())
                for layer in layers]
    surgery.shrink(model, keep_heads, keep_ffn, who="structured_bert")
    assert all(surgery.num_heads(layer) == heads and surgery.ffn_width(layer) == ffn for layer in layers)
    return model


def make_inputs(shape: Shape, batch: int, seq: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(shape.vocab // 30, shape.vocab, (batch, seq), generator=generator)  # past [PAD]/[CLS]/...
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}, labels.to(device)


# -- the hardware preset: effml's own (effml.kernels.hardware.preset, no Hydra or OmegaConf) -----------
def hardware_preset(device: torch.device) -> dict[str, Any]:
    """The preset `hardware=auto` would pick here (effml.kernels.hardware.detect_preset)."""
    name = "cpu" if device.type != "cuda" else hardware.detect_preset()
    if name == "gpu_generic":
        return {"name": "gpu (no preset)", "channel_multiple": 1, "sdpa_backends": ["flash", "efficient", "math"],
                "matmul_precision": "high"}
    preset = hardware.preset(name)
    return {"name": name, "channel_multiple": preset.channel_multiple, "sdpa_backends": list(preset.sdpa_backends),
            "matmul_precision": preset.matmul_precision, "source": str(conf_dir() / "hardware" / f"{name}.yaml")}


@contextlib.contextmanager
def kernel_settings(preset: dict[str, Any], device: torch.device):
    """The preset's matmul precision and SDPA backend order (as effml.kernels.hardware.kernel_context)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [b for b in preset["sdpa_backends"] if device.type == "cuda" or b in hardware.CPU_SDPA]
    order = order if "math" in order else [*order, "math"]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(preset["matmul_precision"])
    try:
        with sdpa_kernel([getattr(SDPBackend, hardware.SDPA[b]) for b in order], set_priority=True):
            yield order
    finally:
        torch.set_float32_matmul_precision(previous)


# -- timing ------------------------------------------------------------------------------------------
def make_optimizer(params: list[nn.Parameter], device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW, the fastest implementation this device has: fused, else foreach."""
    for kind in ("fused", "foreach"):
        try:
            return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **{kind: True}), kind
        except (RuntimeError, ValueError):
            continue
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01), "for-loop"


def train_step_fn(model: nn.Module, forward: nn.Module, x: dict, labels: torch.Tensor,
                  device: torch.device, dtype: torch.dtype | None):
    """One fine-tuning step: forward (autocast) + cross-entropy + backward + AdamW step."""
    optimizer, kind = make_optimizer([p for p in model.parameters() if p.requires_grad], device)
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())

    def step() -> torch.Tensor:
        with autocast:
            logits = forward(**x)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, optimizer, kind


def host_ms(fn, device: torch.device, calls: int = 5) -> float | None:
    """Median ms the CPU takes to issue one call (no sync until it returned); CUDA only.

    When this is about the synchronized time, the step is launch-bound: the GPU waits for Python and
    kernel launches, and a smaller model cannot run faster. (transformers syncs once at the start of
    a forward with an attention mask, ``padding_mask.all()``; the GPU is idle then, so that costs
    nothing here.)"""
    if device.type != "cuda":
        return None
    seconds = []
    for _ in range(calls):
        measure._sync(device)
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    measure._sync(device)
    return sorted(seconds)[len(seconds) // 2] * 1e3


def time_train(models: dict[str, nn.Module], forwards: dict[str, nn.Module], x: dict, labels: torch.Tensor,
               device: torch.device, dtype: torch.dtype | None, timing: Timing) -> dict[str, dict[str, Any]]:
    """Train steps of all models, interleaved (measure._time_interleaved): median ms, peak memory."""
    for model in models.values():
        model.train()
    fns, optimizers, kind = {}, {}, None
    for key, model in models.items():
        fns[key], optimizers[key], kind = train_step_fn(model, forwards[key], x, labels, device, dtype)
    times = measure._time_interleaved(fns, device, timing.warmup, timing.iters, timing.min_time_s,
                                      10_000, timing.max_time_s)
    out = {}
    for key, model in models.items():
        summary = measure._timing_summary(times[key], labels.shape[0])
        peak = measure._peak_memory(fns[key], device, measure.resident_bytes(model)) if device.type == "cuda" else {}
        out[key] = {"train_ms": summary["latency_ms"], "train_p90_ms": summary["latency_p90_ms"],
                    "train_iters": summary["iters"], "optimizer": f"AdamW ({kind})",
                    "train_host_ms": host_ms(fns[key], device),
                    "train_peak_mem_bytes": peak.get("peak_mem_bytes")}
    del fns, optimizers
    return out


def time_inference(models: dict[str, nn.Module], x: dict, device: torch.device, dtype: torch.dtype | None,
                   timing: Timing) -> dict[str, dict[str, Any]]:
    """Forwards in eval + inference mode under autocast, interleaved (as measure.compare_models, whose
    CPU peak-memory profiling is skipped here: the CPU run is a code-path check)."""
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    for model in models.values():
        model.eval()
    try:
        with torch.inference_mode(), autocast:
            fns = {k: (lambda m=m: m(**x)) for k, m in models.items()}
            times = measure._time_interleaved(fns, device, timing.warmup, timing.iters, timing.min_time_s,
                                              10_000, timing.max_time_s)
            out = {}
            for key, model in models.items():
                summary = measure._timing_summary(times[key], x["input_ids"].shape[0])
                peak = (measure._peak_memory(fns[key], device, measure.resident_bytes(model))
                        if device.type == "cuda" else {})
                out[key] = {"latency_ms": summary["latency_ms"], "latency_p90_ms": summary["latency_p90_ms"],
                            "latency_iters": summary["iters"], "latency_host_ms": host_ms(fns[key], device),
                            "peak_mem_bytes": peak.get("peak_mem_bytes")}
    finally:
        for model in models.values():
            model.train()
    return out


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- the benchmark -----------------------------------------------------------------------------------
def log(message: str) -> None:
    print(message, flush=True)


def common_arguments(parser: argparse.ArgumentParser, results: Path) -> None:
    """--device, --threads and --out, as every GPU-claim benchmark takes them."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=results, help="results folder")


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    """The arguments (``common_arguments`` among them), with --threads applied, and the device."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, torch.device(args.device)


def goal_section(goal: str, meaningful: bool) -> list[str]:
    """The goal-check heading of a results file, saying so when the numbers are no measurement."""
    lines = [f"## Goal check (issue 25: {goal})", ""]
    if not meaningful:
        lines += ["(not a GPU run: the numbers exercise the code, they are no measurement)", ""]
    return lines


def run_group(dense: nn.Module, shape: Shape, level: float, multiples: list[int], batch: int, seq: int,
              device: torch.device, dtype: torch.dtype | None, timings: dict[str, Timing],
              dense_flops: int, seed: int) -> tuple[dict, list[dict]]:
    """Dense and every multiple's pruned model at one level and one batch shape, timed together."""
    x, labels = make_inputs(shape, batch, seq, device)
    widths = {m: kept_widths(shape, level, m) for m in multiples}
    unique = sorted(set(widths.values()))
    models: dict[str, nn.Module] = {"dense": dense}
    for i, (heads, ffn) in enumerate(unique):
        models[f"h{heads}_f{ffn}"] = pruned_copy(dense, heads, ffn, seed=seed + i)
    flops = {k: measure.count_flops(m, x)["total"] for k, m in models.items() if k != "dense"}
    infer = time_inference(models, x, device, dtype, timings["infer"])
    train = time_train(models, models, x, labels, device, dtype, timings["train"])
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    d_train, d_infer = train["dense"]["train_ms"], infer["dense"]["latency_ms"]
    dense_row = {"batch": batch, "seq": seq, "level": level, "params": params["dense"], "flops": dense_flops,
                 **infer["dense"], **train["dense"]}
    rows = []
    for m in multiples:
        heads, ffn = widths[m]
        key = f"h{heads}_f{ffn}"
        rows.append({
            "batch": batch, "seq": seq, "tokens": batch * seq, "level": level, "multiple": m,
            "heads_kept": heads, "attention_width": heads * shape.head_size, "ffn_kept": ffn,
            "widths_before_rounding": list(kept_widths(shape, level, 1)),
            "same_model_as_multiple": next(o for o in multiples if widths[o] == widths[m]),
            "params": params[key], "flops": flops[key], "flops_ratio": dense_flops / flops[key],
            "dense_train_ms": d_train, "dense_latency_ms": d_infer,
            **infer[key], **train[key],
            "train_speedup": d_train / train[key]["train_ms"],
            "latency_speedup": d_infer / infer[key]["latency_ms"],
        })
    del models
    return dense_row, rows


def run_compiled(dense: nn.Module, shape: Shape, level: float, multiples: list[int], batch: int, seq: int,
                 device: torch.device, dtype: torch.dtype | None, timing: Timing, seed: int,
                 deadline: float, mode: str) -> dict[str, Any]:
    """Train steps under torch.compile(mode=`mode`): dense vs the pruned model at each of `multiples`.

    Models are compiled one after the other (dense first); a pruned one is skipped when compiling it
    would likely pass `deadline` (a time.perf_counter() value)."""
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):  # several models run through the same frames
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    x, labels = make_inputs(shape, batch, seq, device)
    wanted: dict[str, nn.Module] = {"dense": copy.deepcopy(dense)}
    wanted |= {f"m{m}": pruned_copy(dense, *kept_widths(shape, level, m), seed=seed + m) for m in multiples}
    models, forwards, compile_s, skipped = {}, {}, {}, []
    for key, model in wanted.items():  # compile outside the timing: the first fwd+bwd traces and compiles
        if key != "dense" and time.perf_counter() + 1.2 * compile_s["dense"] + 10 > deadline:
            skipped.append(key)
            log(f"  not compiling {key}: the time budget would run out")
            continue
        start = time.perf_counter()
        forward = torch.compile(model, mode=None if mode == "default" else mode)
        step, _, _ = train_step_fn(model, forward, x, labels, device, dtype)
        step()
        measure._sync(device)
        models[key], forwards[key], compile_s[key] = model, forward, time.perf_counter() - start
        log(f"  compiled {key}: {compile_s[key]:.0f} s")
    del wanted
    if len(models) == 1:
        return {"skipped": f"no pruned model compiled in the time budget (dense took {compile_s['dense']:.0f} s)"}
    train = time_train(models, forwards, x, labels, device, dtype, timing)
    result = {"mode": mode, "batch": batch, "seq": seq, "level": level,
              "dense_train_ms": train["dense"]["train_ms"], "dense_train_host_ms": train["dense"]["train_host_ms"],
              "compile_s": compile_s, "variants": [], "skipped_multiples": [int(k[1:]) for k in skipped]}
    for m in multiples:
        if f"m{m}" not in models:
            continue
        heads, ffn = kept_widths(shape, level, m)
        result["variants"].append({"multiple": m, "heads_kept": heads, "ffn_kept": ffn,
                                   "train_ms": train[f"m{m}"]["train_ms"],
                                   "train_host_ms": train[f"m{m}"]["train_host_ms"],
                                   "train_speedup": train["dense"]["train_ms"] / train[f"m{m}"]["train_ms"]})
    del forwards, models
    return result


def goal_check(rows: list[dict], multiple: int, levels: list[float]) -> dict[str, Any]:
    """The target level >= GOAL_SPEEDUP at `multiple` on every shape, and no level slower than dense there."""
    at = [r for r in rows if r["multiple"] == multiple]
    target = [r for r in at if r["level"] == TARGET_LEVEL]
    target_ok = bool(target) and all(r["train_speedup"] >= GOAL_SPEEDUP for r in target)
    slower_train = [r for r in at if r["train_speedup"] < 1.0]
    slower_infer = [r for r in at if r["latency_speedup"] < 1.0]
    return {
        "multiple": multiple,
        "target_train_speedups": {f"{r['batch']}x{r['seq']}": r["train_speedup"] for r in target},
        "target_met": target_ok,
        "levels": levels,
        "min_train_speedup": min((r["train_speedup"] for r in at), default=None),
        "min_latency_speedup": min((r["latency_speedup"] for r in at), default=None),
        "never_slower_train": not slower_train,
        "never_slower_inference": not slower_infer,
        "passed": target_ok and not slower_train and not slower_infer,
    }


def compiled_goal(goal: dict[str, Any]) -> bool | None:
    """The target level >= GOAL_SPEEDUP under torch.compile at the preset's multiple (None: not compiled)."""
    speedup = goal.get("compiled_target_speedups", {}).get(goal["multiple"])
    return None if speedup is None else speedup >= GOAL_SPEEDUP


def fastest_multiple(rows: list[dict], level: float) -> tuple[int, dict[int, float]]:
    """The multiple with the best geometric-mean train speedup over the shapes at `level`."""
    by: dict[int, list[float]] = {}
    for r in rows:
        if r["level"] == level:
            by.setdefault(r["multiple"], []).append(r["train_speedup"])
    means = {m: math.exp(sum(map(math.log, s)) / len(s)) for m, s in by.items()}
    return max(means, key=means.get), means


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    name = args.model or ("bert-base" if gpu else "tiny")
    shape = MODELS[name]
    batches = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else BATCHES[name]
    dtype = torch.bfloat16 if gpu and not args.fp32 else None
    timings = QUICK if args.quick else FULL
    preset = hardware_preset(device)
    if args.sdpa_backends:
        preset["sdpa_backends"] = args.sdpa_backends
    multiples = sorted(set(args.multiples) | {preset["channel_multiple"]})
    levels = sorted(args.levels)
    header = {
        "device": measure.device_name(device), "device_type": device.type, "torch": torch.__version__,
        "cuda": torch.version.cuda if gpu else None, "cudnn": torch.backends.cudnn.version() if gpu else None,
        "transformers": _version("transformers"), "python": platform.python_version(),
        "dtype": str(dtype or torch.float32).removeprefix("torch."), "model": name,
        "shape": {"layers": shape.layers, "hidden": shape.hidden, "heads": shape.heads,
                  "head_size": shape.head_size, "ffn": shape.ffn},
        "batches": [{"batch": b, "seq": s, "tokens": b * s} for b, s in batches],
        "levels": levels, "multiples": multiples, "preset": preset, "quick": args.quick,
        "timing": {k: vars(t) for k, t in timings.items()},
    }
    log(f"structured BERT on {header['device']} ({header['dtype']}), torch {torch.__version__}; "
        f"{name}: {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, FFN {shape.ffn}; "
        f"preset {preset['name']} (channel_multiple {preset['channel_multiple']})")
    dense = build_dense(shape, args.seed).to(device)
    dense_rows, rows, compiled = [], [], []
    with kernel_settings(preset, device) as sdpa_order:
        header["sdpa_backends"] = sdpa_order
        for batch, seq in batches:
            x, _ = make_inputs(shape, batch, seq, device)
            dense_flops = measure.count_flops(dense, x)["total"]
            for level in levels:
                t0 = time.perf_counter()
                d, group = run_group(dense, shape, level, multiples, batch, seq, device, dtype, timings,
                                     dense_flops, args.seed)
                dense_rows.append(d)
                rows.extend(group)
                free(device)
                log(f"{batch}x{seq} removed {level:.0%} heads/FFN ({time.perf_counter() - t0:.1f} s): dense "
                    f"train {d['train_ms']:.2f} ms, latency {d['latency_ms']:.2f} ms")
                for r in group:
                    log(f"  multiple {r['multiple']:>3}: heads {r['heads_kept']:>2}/{shape.heads}, FFN "
                        f"{r['ffn_kept']:>4}/{shape.ffn}, FLOPs {r['flops_ratio']:.2f}x fewer, train "
                        f"{r['train_speedup']:.2f}x, latency {r['latency_speedup']:.2f}x")
        best, means = fastest_multiple(rows, TARGET_LEVEL) if TARGET_LEVEL in levels else (None, {})
        compile_on = args.compile if args.compile is not None else (gpu and not args.quick)
        if compile_on and TARGET_LEVEL in levels:
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_s - args.compile_reserve_s:
                compiled.append({"skipped": f"{elapsed:.0f} s elapsed; compiling needs ~{args.compile_reserve_s:.0f} "
                                            f"s of the {args.budget_s:.0f} s budget"})
                log(f"torch.compile skipped: {compiled[-1]['skipped']}")
            else:
                batch, seq = batches[0]
                # the preset's multiple first, then the others by eager speedup; the deadline cuts the tail
                others = sorted((m for m in means if m not in (1, preset["channel_multiple"])), key=means.get,
                                reverse=True)
                chosen = ([preset["channel_multiple"]] + others)[: args.compile_max]
                log(f"torch.compile (mode {args.compile_mode}): {batch}x{seq}, {TARGET_LEVEL:.0%} removed, "
                    f"multiples {chosen} vs dense")
                try:
                    result = run_compiled(dense, shape, TARGET_LEVEL, chosen, batch, seq, device, dtype,
                                          timings["train"], args.seed, started + args.budget_s, args.compile_mode)
                    compiled.append(result)
                    for v in result.get("variants", []):
                        log(f"  compiled multiple {v['multiple']}: train {v['train_speedup']:.2f}x "
                            f"(dense {result['dense_train_ms']:.2f} ms, pruned {v['train_ms']:.2f} ms)")
                except Exception as err:  # compile is optional: record why it failed, keep the eager results
                    compiled.append({"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
                    log(f"torch.compile failed: {compiled[-1]['error']}")
                free(device)
    goal = goal_check(rows, preset["channel_multiple"], levels)
    goal["fastest_multiple_target"] = best
    goal["target_speedup_by_multiple"] = means
    goal["multiples_passing"] = [m for m in multiples if goal_check(rows, m, levels)["passed"]]
    goal["meaningful"] = gpu and name == "bert-base"
    goal["compiled_target_speedups"] = {v["multiple"]: v["train_speedup"] for c in compiled
                                        for v in c.get("variants", [])}
    goal["compiled_target_met"] = compiled_goal(goal)
    header["elapsed_s"] = time.perf_counter() - started
    return {**header, "goal": goal, "notes": notes(rows, dense_rows, preset["channel_multiple"]),
            "dense": dense_rows, "rows": rows, "compiled": compiled}


LAUNCH_BOUND = 0.85  # host ms / synchronized ms above which a step counts as launch-bound


def notes(rows: list[dict], dense_rows: list[dict], preset_multiple: int) -> list[str]:
    """Plain-language findings: launch-bound steps, FLOPs that fell without the time, odd widths."""
    out = []
    for kind, ms, host in (("train step", "train_ms", "train_host_ms"), ("forward", "latency_ms", "latency_host_ms")):
        bound = [r for r in rows if r.get(host) and r[host] >= LAUNCH_BOUND * r[ms]]
        dense_bound = [d for d in dense_rows if d.get(host) and d[host] >= LAUNCH_BOUND * d[ms]]
        if bound:
            out.append(
                f"eager {kind} launch-bound (CPU issue time >= {LAUNCH_BOUND:.0%} of the step) in {len(bound)} of "
                f"{len(rows)} pruned cases and {len(dense_bound)} of {len(dense_rows)} dense runs: the GPU waits for "
                "Python and kernel launches, so the pruned model's smaller kernels cannot show (compare torch.compile "
                "with CUDA graphs)")
    slow = [r for r in rows if r["flops_ratio"] >= 1.5 and r["train_speedup"] < 1.1]
    if slow:
        out.append(f"FLOPs fell >= 1.5x but the train step did not get >= 1.1x faster in {len(slow)} cases "
                   f"(multiples {sorted({r['multiple'] for r in slow})})")
    raw = [r for r in rows if r["multiple"] == 1 and r["train_speedup"] < 1.0]
    if raw:
        widths = sorted({r["ffn_kept"] for r in raw})
        out.append(f"unrounded widths (FFN {widths}) train SLOWER than dense: round to the hardware multiple")
    if any(r["multiple"] == preset_multiple and r["latency_speedup"] < 1.0 for r in rows):
        out.append(f"at the preset's multiple {preset_multiple} some forward latency is slower than dense")
    return out


def _version(package: str) -> str | None:
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        return version(package)
    return None


# -- report ------------------------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    s, goal, preset = result["shape"], result["goal"], result["preset"]
    cuda = f", CUDA {result['cuda']}" if result["cuda"] else ""
    lines = [
        f"# Structured BERT pruning — {result['device']} ({result['dtype']}), torch {result['torch']}{cuda}", "",
        f"{result['model']} shape: {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads × {s['head_size']}, "
        f"FFN {s['ffn']}; random weights. The same number of heads and FFN neurons is removed from every layer "
        "(random indices) and physically cut out (`bert_surgery.shrink`); kept widths are rounded up to the "
        "multiple (`bert_surgery.round_up`; heads in units of the head size).",
        "",
        "Speedups are dense ms / pruned ms, timed interleaved in one process (median), so > 1 means the pruned "
        f"model is faster. Train step = forward + backward + {_optimizer(result)} "
        f"{'under bf16 autocast' if result['dtype'] == 'bfloat16' else 'in ' + result['dtype']}; latency = forward in "
        f"inference mode. FLOPs: one forward (`torch.utils.flop_counter`). SDPA backends: "
        f"{', '.join(result.get('sdpa_backends', []))}. Hardware preset: {preset['name']} "
        f"(channel_multiple {preset['channel_multiple']}).",
        "",
        "## Goal check",
        "",
    ]
    if not goal["meaningful"]:
        lines += ["(not a GPU BERT-base run: the numbers exercise the code, they are no measurement)", ""]
    m = goal["multiple"]
    target = ", ".join(f"{v:.2f}× ({k})" for k, v in goal["target_train_speedups"].items()) or "n/a"
    lines += [
        f"- {TARGET_LEVEL:.0%}/{TARGET_LEVEL:.0%} removed at multiple {m} (preset): train {target}; goal ≥ "
        f"{GOAL_SPEEDUP:.2f}×: **{'met' if goal['target_met'] else 'NOT met'}**",
        f"- no level slower than dense at multiple {m}: train min {_x(goal['min_train_speedup'])} "
        f"({'ok' if goal['never_slower_train'] else 'SLOWER'}), latency min {_x(goal['min_latency_speedup'])} "
        f"({'ok' if goal['never_slower_inference'] else 'SLOWER'})",
        f"- fastest multiple for {TARGET_LEVEL:.0%}/{TARGET_LEVEL:.0%} (geometric mean of train speedups): "
        f"**{goal['fastest_multiple_target']}** ("
        + ", ".join(f"{k}: {v:.2f}×" for k, v in sorted(goal["target_speedup_by_multiple"].items())) + ")",
        f"- multiples that pass every check: {goal['multiples_passing'] or 'none'}",
        f"- overall (eager, as effml trains with the preset's compile: false): **{'PASS' if goal['passed'] else 'FAIL'}**",
    ]
    if goal.get("compiled_target_speedups"):
        mode = next(c["mode"] for c in result["compiled"] if "variants" in c)
        lines.append(f"- compiled ({mode}), {TARGET_LEVEL:.0%}/{TARGET_LEVEL:.0%}: " + ", ".join(
            f"multiple {k}: {v:.2f}×" for k, v in goal["compiled_target_speedups"].items()))
        met = goal.get("compiled_target_met")
        if met is not None:
            lines.append(f"- compiled at multiple {m} (preset), goal ≥ {GOAL_SPEEDUP:.2f}×: **{'met' if met else 'NOT met'}**"
                         + (" (train with `hardware.compile=true`)" if met else ""))
    lines += [""] + ([f"- {n}" for n in result.get("notes", [])] + [""] if result.get("notes") else [])
    for d in [d for d in result["dense"] if d["level"] == result["levels"][0]]:
        b, q = d["batch"], d["seq"]
        lines += [f"## batch {b} × seq {q} ({b * q} tokens)", "",
                  "| removed heads / FFN | multiple | heads kept | FFN kept | params (M) | FLOPs ratio | "
                  "train ms (host) | train speedup | latency ms (host) | latency speedup |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        dense = [x for x in result["dense"] if x["batch"] == b and x["seq"] == q]
        train = " / ".join(_ms(x["train_ms"], x.get("train_host_ms")) for x in dense)
        lat = " / ".join(_ms(x["latency_ms"], x.get("latency_host_ms")) for x in dense)
        lines.append(f"| dense | — | {s['heads']} | {s['ffn']} | {d['params'] / 1e6:.1f} | 1.00× | {train} | "
                     f"1.00× | {lat} | 1.00× |")
        for r in [r for r in result["rows"] if r["batch"] == b and r["seq"] == q]:
            mark = " (preset)" if r["multiple"] == preset["channel_multiple"] else ""
            lines.append(
                f"| {r['level']:.0%} / {r['level']:.0%} | {r['multiple']}{mark} | {r['heads_kept']} "
                f"({r['attention_width']}) | {r['ffn_kept']} | {r['params'] / 1e6:.1f} | {r['flops_ratio']:.2f}× | "
                f"{_ms(r['train_ms'], r.get('train_host_ms'))} | {_x(r['train_speedup'], bold_below=1.0)} | "
                f"{_ms(r['latency_ms'], r.get('latency_host_ms'))} | {_x(r['latency_speedup'], bold_below=1.0)} |")
        lines += ["", "Dense ms: one per level (each level is timed interleaved with its own dense run). (host) = ms "
                  "the CPU took to issue the call; close to the synchronized ms means launch-bound.", ""]
    for c in result["compiled"]:
        lines += ["## torch.compile", ""]
        if "variants" not in c:
            lines += [f"- {c.get('error') or c.get('skipped')}", ""]
            continue
        lines += [f"mode {c['mode']}; batch {c['batch']} × seq {c['seq']}, {c['level']:.0%} / {c['level']:.0%} "
                  "removed; the model is compiled, the AdamW step runs eager.", "",
                  "| multiple | heads kept | FFN kept | train ms (host) | train speedup | compile s |",
                  "|---|---|---|---|---|---|"]
        lines.append(f"| dense | {s['heads']} | {s['ffn']} | {_ms(c['dense_train_ms'], c.get('dense_train_host_ms'))} "
                     f"| 1.00× | {c['compile_s']['dense']:.0f} |")
        for v in c["variants"]:
            seconds = c["compile_s"]["m" + str(v["multiple"])]
            lines.append(f"| {v['multiple']} | {v['heads_kept']} | {v['ffn_kept']} | "
                         f"{_ms(v['train_ms'], v.get('train_host_ms'))} | {v['train_speedup']:.2f}× | {seconds:.0f} |")
        if c.get("skipped_multiples"):
            lines.append(f"\nnot compiled for lack of time: multiples {c['skipped_multiples']}")
        lines.append("")
    lines.append(f"Total run time {result['elapsed_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def _optimizer(result: dict[str, Any]) -> str:
    rows = result["rows"]
    return rows[0]["optimizer"] if rows else "AdamW"


def _ms(ms: float, host: float | None) -> str:
    return f"{ms:.2f}" + (f" ({host:.1f})" if host is not None else "")


def _x(value: float | None, bold_below: float | None = None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.2f}×"
    return f"**{text}**" if bold_below is not None and value < bold_below else text


def slug(device_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=list(MODELS), default=None,
                        help="encoder shape (default: bert-base on CUDA, tiny on CPU)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="BATCHxSEQ",
                        help="batch shapes, e.g. 32x512 64x256 (default: by --model)")
    parser.add_argument("--levels", type=float, nargs="+", default=list(LEVELS),
                        help="fractions of heads and FFN neurons removed per layer")
    parser.add_argument("--multiples", type=int, nargs="+", default=list(MULTIPLES),
                        help="width multiples (the preset's is always added)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the 40/40 case under torch.compile (default: on for CUDA unless --quick)")
    parser.add_argument("--compile-mode", default="reduce-overhead",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode (reduce-overhead = CUDA graphs: no launch overhead)")
    parser.add_argument("--compile-max", type=int, default=3,
                        help="pruned models to compile at most: the preset's multiple, then the fastest eager ones")
    parser.add_argument("--quick", action="store_true", help="few timing iterations, no compile (CI)")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="seconds for the whole run: compiling stops where it would run past them")
    parser.add_argument("--compile-reserve-s", type=float, default=120.0,
                        help="skip compile unless this many seconds of the budget are left after the eager runs")
    parser.add_argument("--sdpa-backends", nargs="+", choices=["cudnn", "flash", "efficient", "math"],
                        default=None, help="attention backend order (default: the hardware preset's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the goal check fails")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"structured_bert_{slug(result['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(result))
    goal = result["goal"]
    log(f"goal: {TARGET_LEVEL:.0%}/{TARGET_LEVEL:.0%} at multiple {goal['multiple']} train "
        + ", ".join(f"{v:.2f}x ({k})" for k, v in goal["target_train_speedups"].items())
        + f" (>= {GOAL_SPEEDUP}x: {'met' if goal['target_met'] else 'NOT met'}); never slower: train "
        f"{goal['never_slower_train']}, inference {goal['never_slower_inference']}; fastest multiple "
        f"{goal['fastest_multiple_target']} -> {'PASS' if goal['passed'] else 'FAIL'}")
    log(f"results: {stem.with_suffix('.md')} ({result['elapsed_s']:.0f} s)")
    if args.strict and not goal["passed"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
