"""Attention scaling, measured: forward + backward time and peak memory against sequence length, for every
exact SDPA backend and every efficient variant of the ``attention`` compressor.

Issue 20 ("IO-aware exact attention, measured"): the plot the FlashAttention papers argue from (Dao et
al. 2022, arXiv 2205.14135, Fig. 3; Dao 2023, arXiv 2307.08691). One causal self-attention call on
(batch, heads, length, head_dim) queries, keys and values that require gradients; the timed step is the
call, the sum of its output and the backward pass (no projections: they are the same for every
method). Methods:

- exact attention through ``F.scaled_dot_product_attention`` pinned to one backend
  (``torch.nn.attention.sdpa_kernel``): ``math``, ``efficient`` (memory-efficient), ``flash``,
  ``cudnn``, each where the device runs it (probed with one call), and ``flex`` (FlexAttention,
  compiled, with a causal block mask; CUDA only: the locked torch has no FlexAttention backward on CPU);
- the variants of effml/models/efficient_attention.py, causal: ``window`` (sliding window; on CUDA
  through FlexAttention with a block mask per length bucket, so blocks outside the window are skipped;
  on CPU the exact masked SDPA, which still computes every score), ``linear`` (elu+1), ``performer``
  (FAVOR+), ``linformer`` (our causal adaptation) and ``lsh`` (Reformer).

Every method is timed at each length, interleaved (``effml.measure._time_interleaved``: the same clocks
and load for all), median of the rounds; peak memory is ``effml.measure._peak_memory`` (CUDA: the
allocator's peak above what was allocated before the call; CPU: live tensor storage, approximate). A
method that runs out of memory at a length is recorded as OOM there and not run at longer lengths.
The slope is the least-squares fit of log(time) on log(length) over the longer half of the lengths
(short lengths measure launch overhead, not the algorithm); the crossover is the shortest measured
length from which a variant is faster than the fastest exact backend at every longer length.

    python benchmarks/attention_scaling.py                  # CPU, 1 thread: 128 .. 4096 tokens, under a minute
    python benchmarks/attention_scaling.py --device cuda    # GPU, bf16, batch 8: 256 .. 16384 tokens
    python benchmarks/attention_scaling.py --smoke          # tiny, seconds: the code path (tests)

Results: benchmarks/results/attention_scaling_<device>.json, .md and .png (``--out`` elsewhere). Needs
torch and effml's checkout (no Hydra; matplotlib for the plot, skipped if missing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/_checkout.py, however this is run
from _checkout import use_checkout  # noqa: E402

use_checkout()
from effml import measure  # noqa: E402
from effml.models import efficient_attention as ea  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# shape: batch, heads, head_dim; lengths; the variants' settings
CPU = dict(batch=1, heads=4, head_dim=32, lengths=[128, 256, 512, 1024, 2048, 4096], window=128, k=64,
           features=64, bucket=64, n_hashes=2, dtype=torch.float32)
GPU = dict(batch=8, heads=16, head_dim=64, lengths=[256, 512, 1024, 2048, 4096, 8192, 16384], window=256, k=256,
           features=256, bucket=64, n_hashes=2, dtype=torch.bfloat16)
SMOKE = dict(batch=1, heads=2, head_dim=16, lengths=[64, 128], window=16, k=16, features=16, bucket=16,
             n_hashes=2, dtype=torch.float32)
TIMING = {"full": dict(warmup=1, iters=5, min_time_s=0.05, max_time_s=5.0),
          "smoke": dict(warmup=1, iters=1, min_time_s=0.0, max_time_s=0.5)}
EXACT = ["math", "efficient", "flash", "cudnn", "flex"]


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


def exact_method(name: str, device: torch.device) -> Callable | None:
    """A causal exact-attention function pinned to one backend, or None where the device lacks it."""
    if name == "flex":
        if device.type != "cuda":
            return None
        from torch.nn.attention.flex_attention import create_block_mask

        masks: dict[int, Any] = {}

        def flex(q, k, v):
            n = q.shape[-2]
            if n not in masks:
                masks[n] = create_block_mask(lambda b, h, i, j: i >= j, None, None, n, n, device=device)
            return ea.compiled_flex()(q, k, v, block_mask=masks[n])

        return flex
    from torch.nn.attention import sdpa_kernel

    backend = sdpa_backend(name)

    def sdpa(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return sdpa


def variant_methods(shape: dict, device: torch.device) -> dict[str, Callable]:
    """The compressor's variants as (q, k, v) → out functions, causal, at the shape's settings."""
    d, n = shape["head_dim"], max(shape["lengths"])
    scaling = d**-0.5
    window = ea.WindowAttention(shape["window"])
    performer = ea.PerformerAttention(d, shape["features"], seed=0).to(device)
    linformer = ea.LinformerAttention(n, shape["k"], causal=True).to(device, shape["dtype"])
    lsh = ea.LSHAttention(d, n, shape["bucket"], shape["n_hashes"], seed=0).to(device)
    return {
        f"window {shape['window']}": lambda q, k, v: window(q, k, v, None, scaling, 0.0, True),
        "linear (elu+1)": lambda q, k, v: ea.LinearAttention()(q, k, v, None, scaling, 0.0, True),
        f"performer {shape['features']} features": lambda q, k, v: performer(q, k, v, None, scaling, 0.0, True),
        f"linformer k={shape['k']}": lambda q, k, v: linformer(q, k, v, None, scaling, 0.0, True),
        f"lsh {shape['n_hashes']}x{shape['bucket']}": lambda q, k, v: lsh(q, k, v, None, scaling, 0.0, True),
    }


def step_fn(method: Callable, q, k, v) -> Callable:
    def step():
        out = method(q, k, v)
        out.float().sum().backward()
        q.grad = k.grad = v.grad = None
        return None

    return step


def works(method: Callable, device: torch.device, shape: dict) -> bool:
    """One tiny call with backward: does the device (and this torch) run the method at all?"""
    q, k, v = inputs(shape, 128, device)
    try:
        step_fn(method, q, k, v)()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def inputs(shape: dict, length: int, device: torch.device):
    g = torch.Generator().manual_seed(length)
    return [torch.randn(shape["batch"], shape["heads"], length, shape["head_dim"], generator=g)
            .to(device, shape["dtype"]).requires_grad_() for _ in range(3)]


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure_length(methods: dict[str, Callable], shape: dict, length: int, device: torch.device,
                   timing: dict) -> dict[str, dict]:
    q, k, v = inputs(shape, length, device)
    fns, rows = {}, {}
    for name, method in methods.items():
        fn = step_fn(method, q, k, v)
        try:  # one call first: a method that does not fit is OOM at this length
            fn()
            peak = measure._peak_memory(fn, device, 0)["peak_mem_bytes"]
            fns[name] = fn
            rows[name] = {"peak_mem_bytes": peak}
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not is_oom(e):
                raise
            rows[name] = {"oom": True}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    seconds = measure._time_interleaved(fns, device, timing["warmup"], timing["iters"], timing["min_time_s"],
                                        10_000, timing["max_time_s"])
    for name, s in seconds.items():
        s = sorted(s)
        rows[name] |= {"ms": 1e3 * s[len(s) // 2], "rounds": len(s)}
    return rows


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(y) on log(length), over the longer half of the points."""
    points = points[len(points) // 2:] if len(points) >= 4 else points
    if len(points) < 2:
        return None
    xs, ys = [math.log(p[0]) for p in points], [math.log(p[1]) for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else None


def series(result: dict, method: str, key: str = "ms") -> list[tuple[int, float]]:
    return [(row["length"], row["methods"][method][key]) for row in result["rows"]
            if key in row["methods"].get(method, {})]


def crossover(result: dict, method: str) -> int | None:
    """The shortest length from which ``method`` beats the fastest exact backend at every longer length
    (lengths where every exact backend ran out of memory count as beaten)."""
    found = None
    for row in reversed(result["rows"]):
        exact = [row["methods"][m]["ms"] for m in result["exact"] if "ms" in row["methods"].get(m, {})]
        ours = row["methods"].get(method, {}).get("ms")
        if ours is None or (exact and ours >= min(exact)):
            break
        found = row["length"]
    return found


def run(shape: dict, device: torch.device, timing: dict) -> dict[str, Any]:
    started = time.perf_counter()
    exact = {name: fn for name in EXACT if (fn := exact_method(name, device)) is not None and works(fn, device, shape)}
    variants = variant_methods(shape, device)
    methods = {**{f"dense ({name})": fn for name, fn in exact.items()}, **variants}
    result: dict[str, Any] = {"exact": [f"dense ({name})" for name in exact], "variants": list(variants),
                              "skipped_exact": [name for name in EXACT if name not in exact], "rows": []}
    live = dict(methods)
    for length in shape["lengths"]:
        t0 = time.perf_counter()
        rows = measure_length(live, shape, length, device, timing)
        for name, row in rows.items():
            if row.get("oom"):
                live.pop(name)  # longer lengths would not fit either
        result["rows"].append({"length": length, "methods": rows})
        cells = "  ".join(f"{n} {r['ms']:.1f}" if "ms" in r else f"{n} OOM" for n, r in rows.items())
        print(f"{length:>6} tokens ({time.perf_counter() - t0:.0f} s): {cells} ms", flush=True)
    result["slopes"] = {m: slope(series(result, m)) for m in methods}
    result["memory_slopes"] = {m: slope(series(result, m, "peak_mem_bytes")) for m in methods}
    result["crossover"] = {m: crossover(result, m) for m in variants}
    result["elapsed_s"] = time.perf_counter() - started
    return result


def markdown(result: dict[str, Any]) -> str:
    s = result["shape"]
    lines = [f"# Attention scaling — {result['device']} ({s['dtype']}), torch {result['torch']}", "",
             f"One causal self-attention call, forward + backward, batch {s['batch']} × {s['heads']} heads × head "
             f"dim {s['head_dim']}; median ms of interleaved rounds, and peak memory ({result['memory_method']}). "
             f"Variants: window {s['window']}, Linformer k = {s['k']} (our causal adaptation), Performer "
             f"{s['features']} features, LSH {s['n_hashes']} hashes × buckets of {s['bucket']}. "
             f"Exact backends this device lacks: {', '.join(result['skipped_exact']) or 'none'}.", ""]
    if result["device_type"] == "cpu":
        lines += [f"CPU run with {result['threads']} thread(s) on a shared machine (1-minute load average "
                  f"{result['load_before']:.1f} before, {result['load_after']:.1f} after: the slopes move with the "
                  "load between lengths; the methods of one length are interleaved). The window variant runs as "
                  "masked SDPA here (FlexAttention has no CPU backward in this torch), which computes every score, "
                  "so its slope stays near 2; on CUDA it runs through FlexAttention and skips the masked blocks.",
                  ""]
    methods = result["exact"] + result["variants"]
    lines += ["## Time (ms, forward + backward)", "", "| length | " + " | ".join(methods) + " |",
              "|---" * (len(methods) + 1) + "|"]
    for row in result["rows"]:
        cells = [f"{row['methods'][m]['ms']:.2f}" if "ms" in row["methods"].get(m, {}) else
                 ("OOM" if row["methods"].get(m, {}).get("oom") else "—") for m in methods]
        lines.append(f"| {row['length']} | " + " | ".join(cells) + " |")
    lines += ["", "## Peak memory (MiB)", "", "| length | " + " | ".join(methods) + " |",
              "|---" * (len(methods) + 1) + "|"]
    for row in result["rows"]:
        cells = [f"{row['methods'][m]['peak_mem_bytes'] / 2**20:.1f}" if "peak_mem_bytes" in row["methods"].get(m, {})
                 else "—" for m in methods]
        lines.append(f"| {row['length']} | " + " | ".join(cells) + " |")
    lines += ["", "## Fitted slopes (log-log, longer half of the lengths) and crossovers", "",
              "| method | time slope | memory slope | faster than the best exact backend from |", "|---|---|---|---|"]
    for m in methods:
        t, mem = result["slopes"][m], result["memory_slopes"][m]
        cross = result["crossover"].get(m)
        where = "—" if m in result["exact"] else (f"{cross} tokens" if cross else "not within the measured lengths")
        lines.append(f"| {m} | {'—' if t is None else f'{t:.2f}'} | {'—' if mem is None else f'{mem:.2f}'} | {where} |")
    lines += ["", f"Plot: `{result['plot']}`. Total run time {result['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for m in result["exact"] + result["variants"]:
        style = "--" if m in result["exact"] else "-"
        for axis, key, slopes in ((axes[0], "ms", result["slopes"]), (axes[1], "peak_mem_bytes", result["memory_slopes"])):
            points = series(result, m, key)
            if points:
                xs, ys = zip(*points, strict=True)
                ys = ys if key == "ms" else [y / 2**20 for y in ys]
                label = m if slopes[m] is None else f"{m} (slope {slopes[m]:.2f})"
                axis.plot(xs, ys, style, marker="o", markersize=3, label=label)
    for axis, ylabel in ((axes[0], "forward + backward (ms)"), (axes[1], "peak memory (MiB)")):
        axis.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel=ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"Causal attention scaling — {result['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path.name


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--max-length", type=int, default=None, help="stop at this length")
    parser.add_argument("--batch", type=int, default=None, help="sequences per call (default: the device's shape)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one round: the code path (tests)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = dict(SMOKE if args.smoke else GPU if device.type == "cuda" else CPU)
    if args.max_length:
        shape["lengths"] = [n for n in shape["lengths"] if n <= args.max_length]
    if args.batch:
        shape["batch"] = args.batch
    result = {"device": measure.device_name(device), "device_type": device.type, "torch": torch.__version__,
              "cuda": torch.version.cuda if device.type == "cuda" else None, "python": platform.python_version(),
              "threads": torch.get_num_threads(),
              "memory_method": "cuda.max_memory_allocated" if device.type == "cuda" else "cpu live tensor storage (approx.)",
              "shape": {**shape, "dtype": str(shape["dtype"]).removeprefix("torch.")}, "smoke": args.smoke}
    for limit in ("recompile_limit", "cache_size_limit"):  # one compiled flex_attention per length and mask
        with contextlib.suppress(AttributeError):
            setattr(torch._dynamo.config, limit, 64)
    result["load_before"] = os.getloadavg()[0]
    result |= run(shape, device, TIMING["smoke" if args.smoke else "full"])
    result["load_after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_smoke" if args.smoke else f"_batch{args.batch}" if args.batch else ""
    stem = args.out / ("attention_scaling_" + slug(result["device"]) + suffix)
    result["plot"] = plot(result, stem.with_suffix(".png"))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(result))
    print(f"attention scaling: results in {stem.with_suffix('.md')}", flush=True)
    return result


def slug(device_name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")


if __name__ == "__main__":
    main()
