"""Switch MoE dispatch, measured: sorted dispatch vs a loop over experts vs dense FFNs of equal FLOPs and params.

Issue 19 ("Dispatch without a Python loop over tokens ... Benchmark it"). One FFN layer (the part the
``switch_moe`` compressor replaces), one batch of random tokens, every variant timed interleaved in
one process (``effml.measure._time_interleaved``: the same clocks and load for all):

- ``switch (grouped_mm)``: ``SwitchFFN`` (effml/models/switch.py), assignments sorted by expert, one
  grouped matmul per projection over the kept tokens (``torch.nn.functional.grouped_mm``); only where
  the device and dtype run it (probed);
- ``switch (padded bmm)``: the same layer, kept tokens gathered into an (experts, capacity, d)
  zero-padded buffer, one ``torch.bmm`` per projection (computes the padding too);
- ``switch (loop over experts)``: the same layer, a Python loop over the experts (what the sorted
  dispatch replaces);
- ``dense, equal FLOPs/token``: one dense FFN of the experts' shape (d → d_ff → d): what a token costs
  in a top-1 Switch layer, less the router;
- ``dense, equal params``: a dense FFN of width d_ff × experts: the same parameter count.

The three Switch variants hold the same weights and compute the same function (outputs compared).
Train = forward + (sum of squares + the router loss) + backward, no optimizer step (its cost follows the
parameter count, not the dispatch); inference = forward in eval + inference mode. Switch layers train
at capacity factor 1.25 and evaluate at 2.0 (the paper's defaults), from a fresh router (0.1× init,
so routing is close to uniform and few tokens drop; the dropped fraction is reported). tokens/s =
tokens of the batch / median seconds; peak memory = resident weights + the peak of live tensors during
one call (``measure._peak_memory``: CUDA's allocator peak; on CPU an approximation from live tensor
storage).

On CPU the run uses fp32 and whatever thread count torch has (``--threads``; ``make bench`` runs it with
``OMP_NUM_THREADS=1`` on a shared machine, and the device name says the thread count). On CUDA it runs
under bf16 autocast with larger shapes.

    python benchmarks/moe_dispatch.py             # CPU: ~2-3 min at one thread
    python benchmarks/moe_dispatch.py --quick     # few rounds
    python benchmarks/moe_dispatch.py --smoke     # tiny shapes, seconds: the code path (tests)

Results: benchmarks/results/moe_dispatch_<device>.json and .md (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/_checkout.py, however this is run
import structured_bert as sb  # noqa: E402  (use_checkout() runs there: effml from this checkout)

from effml import measure  # noqa: E402
from effml.models.switch import SwitchFFN, grouped_mm_available  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# case: d_model, d_ff, experts, batch, seq, gated
CPU_CASES = {
    "gpt2_tiny": dict(d=256, f=1024, experts=8, batch=8, seq=128, gated=False),
    "llama_tiny": dict(d=256, f=688, experts=8, batch=8, seq=128, gated=True),
}
GPU_CASES = {
    "gpt2_base": dict(d=768, f=3072, experts=8, batch=16, seq=512, gated=False),
    "llama_base": dict(d=768, f=2048, experts=8, batch=16, seq=512, gated=True),
}
SMOKE_CASES = {  # --smoke: the code path in seconds (tests)
    "gpt2_smoke": dict(d=32, f=64, experts=4, batch=2, seq=16, gated=False),
    "llama_smoke": dict(d=32, f=48, experts=4, batch=2, seq=16, gated=True),
}
FULL = sb.Timing(warmup=2, iters=15, min_time_s=1.5, max_time_s=30.0)
QUICK = sb.Timing(warmup=1, iters=2, min_time_s=0.0, max_time_s=2.0)
SWITCH = {"switch (grouped_mm)": "grouped", "switch (padded bmm)": "bmm", "switch (loop over experts)": "loop"}
DENSE_FLOPS, DENSE_PARAMS = "dense, equal FLOPs/token", "dense, equal params"


class DenseFFN(nn.Module):
    """A dense FFN in the Switch layer's two forms: GPT-2's fc → GELU → proj, Llama's SwiGLU."""

    def __init__(self, d: int, f: int, gated: bool):
        super().__init__()
        self.gated = gated
        self.fc = nn.Linear(d, 2 * f if gated else f, bias=not gated)
        self.proj = nn.Linear(f, d, bias=not gated)
        self.act = nn.SiLU() if gated else nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.proj(self.act(gate) * up)
        return self.proj(self.act(h))


def flops_per_token(d: int, f: int, gated: bool, experts: int = 0) -> int:
    """Multiply-adds × 2 of one forward per token: the projections (+ the router for a Switch layer)."""
    return 2 * d * f * (3 if gated else 2) + 2 * d * experts


def build(case: dict, device: torch.device) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    d, f, e, gated = case["d"], case["f"], case["experts"], case["gated"]
    torch.manual_seed(0)
    dense = DenseFFN(d, f, gated)
    switch = SwitchFFN(d, f, e, gated=gated, activation="silu" if gated else "gelu_tanh", bias=not gated)
    models: dict[str, nn.Module] = {}
    for key, path in SWITCH.items():
        if path == "grouped" and not grouped_mm_available(device, compute_dtype(device)):
            continue
        m = copy.deepcopy(switch)
        m.dispatch = path
        models[key] = m
    models[DENSE_FLOPS] = dense
    models[DENSE_PARAMS] = DenseFFN(d, f * e, gated)
    models = {k: m.to(device) for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    flops = {k: flops_per_token(d, f, gated, e) for k in SWITCH}
    flops[DENSE_FLOPS], flops[DENSE_PARAMS] = flops_per_token(d, f, gated), flops_per_token(d, f * e, gated)
    return models, {"params": params, "flops_per_token": flops}


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def train_fn(model: nn.Module, x: torch.Tensor, device: torch.device):
    def step() -> torch.Tensor:
        with autocast(device):
            y = model(x)
        loss = y.float().square().mean()
        if isinstance(model, SwitchFFN):
            loss = loss + model.pop_router_loss()
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss.detach()

    return step


def infer_fn(model: nn.Module, x: torch.Tensor, device: torch.device):
    def forward() -> torch.Tensor:
        with torch.inference_mode(), autocast(device):
            return model(x)

    return forward


def timed(fns: dict, models: dict, device: torch.device, timing: sb.Timing, tokens: int) -> dict[str, dict]:
    seconds = measure._time_interleaved(fns, device, timing.warmup, timing.iters, timing.min_time_s, 100_000,
                                        timing.max_time_s)
    out = {}
    for key, fn in fns.items():
        s = sorted(seconds[key])
        median = s[len(s) // 2]
        peak = measure._peak_memory(fn, device, measure.resident_bytes(models[key]))
        out[key] = {"ms": 1e3 * median, "p25_ms": 1e3 * s[len(s) // 4], "p75_ms": 1e3 * s[(3 * len(s)) // 4],
                    "rounds": len(s), "tokens_per_s": tokens / median, "peak_mem_bytes": peak["peak_mem_bytes"],
                    "memory_method": peak["memory_method"]}
    return out


@torch.no_grad()
def same_function(models: dict[str, nn.Module], x: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Max |Δ| / max |ref| of each Switch path against the loop over experts, in train and eval mode."""
    out: dict[str, Any] = {}
    for mode in ("train", "eval"):
        ys = {}
        for key in SWITCH:
            if key in models:
                m = models[key].train(mode == "train")
                torch.manual_seed(1)  # the same router jitter for every path
                with autocast(device):
                    ys[key] = m(x).float()
                out[f"dropped_fraction_{mode}"] = float(m.last_stats["dropped_fraction"])
                out[f"capacity_{mode}"] = m.last_stats["capacity"]
                m.pop_router_loss()
        ref = ys["switch (loop over experts)"]
        scale = ref.abs().max().clamp_min(1e-12)
        out[f"rel_diff_vs_loop_{mode}"] = {k: float((v - ref).abs().max() / scale) for k, v in ys.items()}
    for m in models.values():
        m.train()
    return out


def run_case(name: str, case: dict, device: torch.device, timing: sb.Timing) -> dict[str, Any]:
    start = time.perf_counter()
    models, info = build(case, device)
    tokens = case["batch"] * case["seq"]
    x = torch.randn(case["batch"], case["seq"], case["d"], generator=torch.Generator().manual_seed(2)).to(device)
    check = same_function(models, x, device)
    for m in models.values():
        m.train()
    train = timed({k: train_fn(m, x, device) for k, m in models.items()}, models, device, timing, tokens)
    for m in models.values():
        m.eval()
    infer = timed({k: infer_fn(m, x, device) for k, m in models.items()}, models, device, timing, tokens)
    for m in models.values():
        if isinstance(m, SwitchFFN):
            m.reset_stats()
    variants = {k: {"params": info["params"][k], "flops_per_token": info["flops_per_token"][k], "train": train[k],
                    "inference": infer[k]} for k in models}
    ratios = {}
    for ref in (DENSE_FLOPS, DENSE_PARAMS, "switch (loop over experts)"):
        for phase in ("train", "inference"):
            ratios[f"{phase} tokens/s vs {ref}"] = {
                k: v[phase]["tokens_per_s"] / variants[ref][phase]["tokens_per_s"] for k, v in variants.items()}
    row = {"case": name, **case, "tokens": tokens, **check, "variants": variants, "ratios": ratios,
           "elapsed_s": time.perf_counter() - start}
    sb.free(device)
    return row


def fastest_switch(row: dict) -> str:
    keys = [k for k in SWITCH if k in row["variants"] and k != "switch (loop over experts)"]
    return max(keys, key=lambda k: row["variants"][k]["train"]["tokens_per_s"])


def line(row: dict) -> str:
    v = row["variants"]
    cells = "  ".join(f"{k} {v[k]['train']['tokens_per_s'] / 1e3:.1f}k" for k in v)
    return f"{row['case']} (train tokens/s): {cells}"


def markdown(result: dict[str, Any]) -> str:
    cuda = f", CUDA {result['cuda']}" if result["cuda"] else ""
    lines = [
        f"# Switch MoE dispatch — {result['device']} ({result['dtype']}), torch {result['torch']}{cuda}", "",
        "One FFN layer, one batch, every variant timed interleaved in one process (median). Train = forward + "
        "loss (+ router loss) + backward, no optimizer step; inference = forward in eval + inference mode. "
        "The Switch variants are one layer (same weights, same function: outputs compared below) dispatched "
        "three ways: `grouped_mm` (sorted by expert, one grouped matmul per projection over the kept tokens), "
        "`padded bmm` (an (experts, capacity, d) zero-padded buffer), `loop over experts` (a Python loop). "
        "`dense, equal FLOPs/token` is one expert's FFN; `dense, equal params` has d_ff × experts. Switch "
        f"trains at capacity factor {result['capacity_factor']} and evaluates at {result['eval_capacity_factor']}; "
        "fresh 0.1×-init router. Peak memory: resident weights + the peak of live tensors during one call "
        f"({result['memory_method']}).", "",
    ]
    if result["device_type"] == "cpu":
        lines += [f"CPU run with {result['threads']} torch thread(s) on a machine shared with other jobs "
                  "(`OMP_NUM_THREADS=1` in `make bench`): the ratios, measured interleaved, are what to read; "
                  "absolute tokens/s move with the load.", ""]
    if result["quick"]:
        lines += ["(`--quick`: few rounds, the code path rather than a measurement)", ""]
    for r in result["rows"]:
        gated = "SwiGLU (Llama form)" if r["gated"] else "GELU (GPT-2 form)"
        lines += [f"## {r['case']}: d {r['d']}, d_ff {r['f']}, {r['experts']} experts, {gated}, "
                  f"batch {r['batch']} × seq {r['seq']} = {r['tokens']} tokens", "",
                  "| variant | params (M) | MFLOPs/token | train ms (p25–p75) | train tokens/s | train peak MiB | "
                  "infer ms | infer tokens/s | infer peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
        for key, v in r["variants"].items():
            t, i = v["train"], v["inference"]
            lines.append(
                f"| {key} | {v['params'] / 1e6:.2f} | {v['flops_per_token'] / 1e6:.2f} | {t['ms']:.2f} "
                f"({t['p25_ms']:.2f}–{t['p75_ms']:.2f}) | {t['tokens_per_s'] / 1e3:.1f}k | "
                f"{t['peak_mem_bytes'] / 2**20:.1f} | {i['ms']:.2f} | {i['tokens_per_s'] / 1e3:.1f}k | "
                f"{i['peak_mem_bytes'] / 2**20:.1f} |")
        lines += ["", "Ratios of tokens/s (> 1: the row is faster than the reference):", "",
                  "| variant | train vs equal FLOPs | train vs equal params | train vs loop | infer vs equal FLOPs | "
                  "infer vs equal params | infer vs loop |", "|---|---|---|---|---|---|---|"]
        ra = r["ratios"]
        for key in r["variants"]:
            cells = [ra[f"{phase} tokens/s vs {ref}"][key] for phase in ("train", "inference")
                     for ref in (DENSE_FLOPS, DENSE_PARAMS, "switch (loop over experts)")]
            lines.append(f"| {key} | " + " | ".join(f"{c:.2f}×" for c in cells) + " |")
        diffs = ", ".join(f"{k.removeprefix('switch ')} {d:.1e}" for k, d in r["rel_diff_vs_loop_train"].items()
                          if "loop" not in k)
        lines += ["", f"Capacity {r['capacity_train']} (train) / {r['capacity_eval']} (eval) slots per expert; "
                  f"dropped {r['dropped_fraction_train']:.1%} (train) / {r['dropped_fraction_eval']:.1%} (eval) of the "
                  f"tokens. Outputs vs the loop over experts (max |Δ| / max |ref|, train mode): {diffs}. Fastest "
                  f"sorted dispatch in training: {fastest_switch(r)}.", ""]
    lines.append(f"Total run time {result['elapsed_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sb.common_arguments(parser, RESULTS)
    parser.add_argument("--quick", action="store_true", help="few rounds (CI)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few rounds: the code path (tests)")
    args, device = sb.parse_arguments(parser, argv)
    started = time.perf_counter()
    gpu = device.type == "cuda"
    cases = SMOKE_CASES if args.smoke else GPU_CASES if gpu else CPU_CASES
    args.quick = args.quick or args.smoke
    probe = SwitchFFN(8, 8, 2)
    header = {"device": measure.device_name(device), "device_type": device.type, "torch": torch.__version__,
              "cuda": torch.version.cuda if gpu else None, "python": platform.python_version(),
              "threads": torch.get_num_threads(), "dtype": "bfloat16 (autocast)" if gpu else "float32",
              "grouped_mm": grouped_mm_available(device, compute_dtype(device)),
              "capacity_factor": probe.capacity_factor, "eval_capacity_factor": probe.eval_capacity_factor,
              "memory_method": "cuda.max_memory_allocated" if gpu else "cpu live tensor storage (approx.)",
              "quick": args.quick}
    rows = []
    for name, case in cases.items():
        rows.append(run_case(name, case, device, QUICK if args.quick else FULL))
        sb.log(line(rows[-1]) + f" ({rows[-1]['elapsed_s']:.0f} s)")
    result = {**header, "rows": rows, "elapsed_s": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"moe_dispatch_{sb.slug(result['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(result))
    sb.log(f"moe dispatch: results in {stem.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
