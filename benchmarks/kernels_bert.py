"""Kernels by measurement, checked: BERT encoder inference, dense bf16 vs every kernel, forced and selected.

For BERT-base and BERT-large shapes (random weights: speed does not depend on the values) at several
batch × sequence sizes, the dense bf16 model is timed interleaved, in one process, against:

- each SDPA backend forced (cuDNN, flash, memory-efficient, math), and the order
  ``effml.kernels.select.measured_sdpa_order`` picks (forward only, as inference uses it);
- each low-precision / sparse kernel of ``effml.kernels.library`` forced on every encoder Linear
  (``hardware.selection=force``), and as selected (``measure``: a layer keeps it only where it was
  measured >= ``selection_margin`` x faster than dense on that layer's shape; then the whole model is
  timed against dense and every layer goes back to dense unless it is faster: the same
  ``select.convert_linears`` that runs use). 2:4 runs on weights pruned to 2:4 by magnitude.

A selected model that kept every layer dense *is* the dense model: its ratio is 1.00 by construction,
not measured. Goals (issue 6): every selected model >= 1.00x dense at every size; fp8 on BERT-large
>= 1.3x; the forced columns show where picking a kernel by name would have cost speed.

Results: benchmarks/results/kernels_bert_<device>.json and .md. Without CUDA a 2-layer BERT at tiny
sizes runs in fp32: the code path (what CI exercises), not a measurement worth reading.

    python benchmarks/kernels_bert.py              # GPU: ~3-4 min on an H100
    python benchmarks/kernels_bert.py --quick      # one size per model
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/_checkout.py, however this is run
from _checkout import use_checkout  # noqa: E402

use_checkout()
from effml import measure  # noqa: E402
from effml.kernels import select  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPES = {  # hidden, layers, heads, FFN
    "bert_base": (768, 12, 12, 3072),
    "bert_large": (1024, 24, 16, 4096),
    "bert_tiny": (128, 2, 2, 512),
}
GPU_SIZES = [(8, 128), (32, 128), (32, 512), (128, 512)]
CPU_SIZES = [(2, 32), (4, 64)]
SDPA_BACKENDS = ["cudnn", "flash", "efficient", "math"]
METHODS = {"fp8": "fp8_rowwise", "fp8 torchao": "fp8_dynamic", "int8": "int8_dynamic", "int8_wo": "int8_weight_only", "2:4": "sparse_2to4"}
TIMING = {"warmup": 3, "iters": 10, "min_time_s": 0.2, "max_iters": 200, "max_time_s": 10.0}


def bert(shape: str, device: str, dtype: torch.dtype) -> nn.Module:
    from transformers import BertConfig, BertModel

    hidden, layers, heads, ffn = SHAPES[shape]
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=512)
    config._attn_implementation = "sdpa"  # transformers' documented way to pick it without from_pretrained
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).to(device, dtype).eval()


def encoder_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layer." in name]


def prune_2to4(model: nn.Module) -> nn.Module:
    """Keep the 2 largest magnitudes of every 4 consecutive input weights (what nm_sparsity trains)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for path in encoder_linears(model):
            w = model.get_submodule(path).weight
            groups = w.view(-1, 4)
            drop = groups.abs().argsort(dim=1)[:, :2]
            groups.scatter_(1, drop, 0)
    return model


def hardware(device: str, dtype: torch.dtype, selection: str) -> SimpleNamespace:
    """The fields of effml's HardwareConfig that kernel selection reads (no Hydra needed here)."""
    return SimpleNamespace(
        name="bench", accelerator="gpu" if device == "cuda" else "cpu", selection=selection,
        precision="bf16-true" if dtype == torch.bfloat16 else "32-true", selection_margin=1.05,
        kernels=list(METHODS.values()), kernel_cache="",
    )


def latencies(models: dict[str, nn.Module], inputs: dict, device: str) -> dict[str, float]:
    """Median ms of each model's forward, timed interleaved (inference mode)."""
    with torch.inference_mode():
        seconds = measure._time_interleaved({k: (lambda m=m: m(**inputs)) for k, m in models.items()},
                                            torch.device(device), **TIMING)
    return {k: 1e3 * sorted(v)[len(v) // 2] for k, v in seconds.items()}


def ratio(dense: nn.Module, other: nn.Module, inputs: dict, device: str) -> tuple[float, float, float]:
    """Dense ms, other ms, dense/other: the two timed interleaved."""
    ms = latencies({"dense": dense, "other": other}, inputs, device)
    return ms["dense"], ms["other"], ms["dense"] / ms["other"]


def attention_rows(model: nn.Module, inputs: dict, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Each SDPA backend alone, and the measured order, against PyTorch's default choice (interleaved)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from effml.kernels.hardware import SDPA

    def under(backends: list[str]):
        order = [getattr(SDPBackend, SDPA[b]) for b in backends]

        def forward():
            with sdpa_kernel(order, set_priority=True):
                return model(**inputs)

        return forward

    call = select.capture_attention_call(model, inputs)
    order, decision = select.measured_sdpa_order(call, hardware(device, dtype, "measure"), SDPA_BACKENDS, train=False)
    variants = {f"sdpa {b}": under([b]) for b in SDPA_BACKENDS} | {"sdpa selected": under(order)}
    row: dict[str, Any] = {"sdpa order": order, "sdpa decision": decision.as_dict()}
    for key, forward in variants.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                forward()
        except RuntimeError as e:  # the backend cannot run this call
            row[key] = {"ratio": None, "note": select._first_line(e)}
            continue
        with torch.inference_mode():
            seconds = measure._time_interleaved({"default": lambda: model(**inputs), key: forward},
                                                torch.device(device), **TIMING)
        ms = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in seconds.items()}
        row[key] = {"ratio": ms["default"] / ms[key], "ms": ms[key], "default_ms": ms["default"]}
    return row


def kernel_rows(model: nn.Module, inputs: dict, device: str, dtype: torch.dtype) -> dict[str, Any]:
    pruned = prune_2to4(model)
    variants = [(f"{label} {'forced' if selection == 'force' else 'selected'}", name, selection, True)
                for label, name in METHODS.items() for selection in ("force", "measure")]
    variants.append(("fp8 forced unfused", "fp8_rowwise", "force", False))  # what effml.kernels.fusion adds
    row: dict[str, Any] = {}
    for key, name, selection, fuse in variants:
        base = pruned if name.startswith("sparse") else model
        candidate = copy.deepcopy(base)
        try:
            decisions = select.convert_linears(candidate, {p: [name] for p in encoder_linears(base)}, inputs,
                                               hardware(device, dtype, selection), fuse=fuse)
        except Exception as e:  # noqa: BLE001 - forced kernels that cannot run are a result
            row[key] = {"ratio": None, "note": select._first_line(e)}
            continue
        row[key] = summarize(base, candidate, decisions, inputs, device)
        del candidate
        torch.cuda.empty_cache() if device == "cuda" else None
    return row


def compiled_rows(model: nn.Module, inputs: dict, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """fp8 (rowwise) forced and selected vs dense, all three under ``torch.compile``: compiled, the
    activations' quantization fuses into the ops before it, which eager mode cannot do."""
    torch._dynamo.reset()
    dense = torch.compile(model)
    row: dict[str, Any] = {}
    for selection in ("force", "measure"):
        candidate = copy.deepcopy(model)
        decisions = select.convert_linears(candidate, {p: ["fp8_rowwise"] for p in encoder_linears(model)}, inputs,
                                           hardware(device, dtype, selection), fuse=False)  # inductor fuses
        key = f"fp8 {'forced' if selection == 'force' else 'selected'} compiled"
        row[key] = summarize(dense, torch.compile(candidate), decisions, inputs, device)
    return row


def summarize(base: nn.Module, candidate: nn.Module, decisions: list, inputs: dict, device: str) -> dict[str, Any]:
    kernels = {}
    for d in decisions:
        kernels[d.kernel] = kernels.get(d.kernel, 0) + 1
    if set(kernels) <= {"dense"}:  # nothing converted: it is the dense model
        return {"ratio": 1.0, "kernels": kernels, "note": "all layers dense (identical to dense)",
                "reasons": sorted({d.reason for d in decisions})[:3]}
    dense_ms, ms, r = ratio(base, candidate, inputs, device)
    return {"ratio": r, "dense_ms": dense_ms, "ms": ms, "kernels": kernels}


def run(device: str, shapes: list[str], sizes: list[tuple[int, int]], compiled: bool) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for shape in shapes:
        model = bert(shape, device, dtype)
        for batch, seq in sizes:
            start = time.perf_counter()
            inputs = {"input_ids": torch.randint(1000, 30000, (batch, seq), device=device)}
            dense_ms = latencies({"dense": model}, inputs, device)["dense"]
            row = {"model": shape, "batch": batch, "seq": seq, "dense_ms": dense_ms}
            row |= attention_rows(model, inputs, device, dtype)
            row |= kernel_rows(model, inputs, device, dtype)
            if compiled and (batch, seq) == sizes[-1]:
                row |= compiled_rows(model, inputs, device, dtype)
            rows.append(row)
            print(line(row), f"({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def _cell(v: Any) -> str:
    return "n/a" if not isinstance(v, dict) or v.get("ratio") is None else f"{v['ratio']:.2f}×"


def line(row: dict) -> str:
    cells = [f"{k}={_cell(v)}" for k, v in row.items() if isinstance(v, dict) and "ratio" in v]
    return f"{row['model']} {row['batch']}x{row['seq']}: dense {row['dense_ms']:.2f} ms  " + "  ".join(cells)


def goals(rows: list[dict]) -> list[str]:
    selected = [(r, k) for r in rows for k in r if k.endswith("selected") and k != "sdpa selected"]
    slower = [f"{r['model']} {r['batch']}x{r['seq']} {k} {r[k]['ratio']:.2f}x" for r, k in selected
              if r[k].get("ratio") is not None and r[k]["ratio"] < 1.0]
    out = [("PASS" if not slower else "FAIL") + ": every selected model >= 1.00x dense"
           + (f" (slower: {', '.join(slower)})" if slower else "")]
    for suffix in ("selected", "selected compiled"):
        large = [r[f"fp8 {suffix}"]["ratio"] for r in rows
                 if r["model"] == "bert_large" and (r.get(f"fp8 {suffix}") or {}).get("ratio")]
        if large:
            best = max(large)
            out.append(f"{'PASS' if best >= 1.3 else 'FAIL'}: fp8 {suffix} on BERT-large >= 1.3x (best size {best:.2f}x; "
                       f"sizes measured: {', '.join(f'{x:.2f}x' for x in large)})")
    attention = [r["sdpa selected"]["ratio"] for r in rows if r["sdpa selected"].get("ratio")]
    out.append(f"measured SDPA order vs PyTorch's default choice: {min(attention):.2f}x to {max(attention):.2f}x")
    costly = [f"{r['model']} {r['batch']}x{r['seq']} {k} {r[k]['ratio']:.2f}x" for r in rows for k in r
              if k.endswith("forced") and r[k].get("ratio") is not None and r[k]["ratio"] < 1.0]
    out.append(f"forcing by name would have cost speed in {len(costly)} cases" + (f": {', '.join(costly)}" if costly else ""))
    return out


def markdown(rows: list[dict], header: dict) -> str:
    cols = [*(f"sdpa {b}" for b in SDPA_BACKENDS), "sdpa selected",
            *(f"{m} {s}" for m in METHODS for s in ("forced", "selected")),
            "fp8 forced unfused", "fp8 forced compiled", "fp8 selected compiled"]
    lines = [f"# Kernels by measurement — {header['device']}, torch {header['torch']}, torchao {header['torchao']}", "",
             "BERT encoder inference (random weights), bf16. Ratios are dense bf16 ms / variant ms, timed interleaved in",
             "one process (>1 = faster); the SDPA columns against PyTorch's default backend choice. `forced`: the kernel",
             "on every encoder Linear; `selected`: kept per layer only where measured faster, then kept for the model",
             "only if the whole model is faster (else all dense, 1.00×). 2:4 on weights pruned 2:4. fp8 (rowwise) fuses",
             "Q/K/V into one matmul and the FFN's GELU into the next quantization (`effml.kernels.fusion`); `unfused`:",
             "one kernel per layer. `compiled`: dense and fp8 under torch.compile (inductor fuses), largest size only.", "",
             "| model | batch×seq | dense ms | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']}×{r['seq']} | {r['dense_ms']:.2f} | "
                     + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    lines += ["", "## Goals", *(f"- {g}" for g in goals(rows)), "", "## Why a kernel was not kept (first reasons)"]
    for r in rows:
        for m in METHODS:
            v = r.get(f"{m} selected") or {}
            for reason in v.get("reasons", [])[:1]:
                lines.append(f"- {r['model']} {r['batch']}×{r['seq']} {m}: {reason}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=None)
    parser.add_argument("--quick", action="store_true", help="one size per model")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled fp8 comparison (largest size)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    shapes = args.models or (["bert_base", "bert_large"] if gpu else ["bert_tiny"])
    sizes = GPU_SIZES if gpu else CPU_SIZES
    rows = run(args.device, shapes, sizes[-1:] if args.quick else sizes, compiled=gpu and not args.no_compile)
    import torchao

    name = measure.device_name(args.device)
    header = {"device": name, "torch": torch.__version__, "torchao": torchao.__version__}
    print("\n".join(goals(rows)))
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    (args.out / f"kernels_bert_{slug}.json").write_text(json.dumps({**header, "rows": rows}, indent=2, default=str))
    (args.out / f"kernels_bert_{slug}.md").write_text(markdown(rows, header))
    print(f"results: {args.out / f'kernels_bert_{slug}.md'}")


if __name__ == "__main__":
    main()
