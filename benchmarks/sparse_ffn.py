"""FFN time with a sparse activation: dense down-projection vs the gather path (effml/kernels/sparse_ffn.py).

Issue 23: at batch 1 an FFN whose activation is sparse needs only the rows of the down-projection
(W_downᵀ) for its nonzero activations (TEAL, CATS). Which batch sizes does that still pay at?

For each FFN shape, activation sparsity and batch (rows of tokens sharing one gather), one process
times, interleaved round by round, the whole FFN ``down(act(up(x)))``:

- ``dense``: two ``nn.Linear`` and the activation;
- ``gather``: the same up-projection and activation, then ``GatherLinear`` (the active rows only).

The activation is a threshold at the given per-token sparsity, each token's zeros drawn independently
(CATS-style thresholds give about that): at batch b the gather reads the union of b tokens' active rows,
1 − s^b of them. Each case checks that both paths agree (max |Δ| / max |dense|). Shapes: MiniLM-L6's FFN
(384 → 1536 → 384, the issue's claim model) and a Llama-2-7B FFN without the gate (4096 → 11008 → 4096;
the non-gated FFN keeps the up-projection dense, so 1/2 of the FFN is the most a down-only gather saves).

    python benchmarks/sparse_ffn.py              # CPU: ~2 min; CUDA if present (--device cpu to force)
    python benchmarks/sparse_ffn.py --quick

Results: benchmarks/results/sparse_ffn_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _checkout import use_checkout  # noqa: E402

use_checkout()
from effml.kernels.sparse_ffn import GatherLinear, gather_down_union  # noqa: E402
from effml.measure import device_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPES = {"minilm_l6": (384, 1536), "llama2_7b_nogate": (4096, 11008)}
SPARSITIES = (0.0, 0.5, 0.7, 0.9, 0.95)
BATCHES = (1, 2, 4, 8)


class Threshold(nn.Module):
    """Zero a fixed fraction of each token's activations (a random mask per token, fixed for the case)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.mask


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@torch.no_grad()
def case(hidden: int, ffn: int, sparsity: float, batch: int, device: torch.device, rounds: int,
         calls: int | None) -> dict[str, Any]:
    torch.manual_seed(0)
    up, down = nn.Linear(hidden, ffn).to(device).eval(), nn.Linear(ffn, hidden).to(device).eval()
    gather = GatherLinear(down)
    x = torch.randn(batch, hidden, device=device)
    mask = (torch.rand(batch, ffn, device=device) >= sparsity).float()
    act = Threshold(mask)

    def dense_fn():
        return down(act(torch.relu(up(x)) + 1e-3))  # +1e-3: every unmasked activation is nonzero

    def gather_fn():
        return gather(act(torch.relu(up(x)) + 1e-3))

    def union_fn():
        return gather_down_union(act(torch.relu(up(x)) + 1e-3), gather.weight_t, gather.bias)

    a = dense_fn()
    error = max(float((a - fn()).abs().max() / a.abs().max()) for fn in (gather_fn, union_fn))
    active = float(mask.ne(0).any(0).float().mean())
    paths = (("dense", dense_fn), ("gather", gather_fn), ("union", union_fn))
    times: dict[str, list[float]] = {name: [] for name, _ in paths}
    for _, fn in paths:  # warm-up
        for _ in range(3):
            fn()
    if calls is None:  # about 20 ms of dense calls per timing, so that the clock's resolution does not matter
        start = time.perf_counter()
        dense_fn()
        calls = max(1, min(50, round(0.02 / max(time.perf_counter() - start, 1e-6))))
    for _ in range(rounds):
        for name, fn in paths:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1e3 / calls)
    # the fastest round: on a shared machine the other rounds measure the neighbours' load (medians kept too)
    ms = {name: min(t) for name, t in times.items()}
    medians = {f"{name}_median_ms": round(statistics.median(t), 5) for name, t in times.items()}
    return {"hidden": hidden, "ffn": ffn, "sparsity": sparsity, "batch": batch, "union_rows": round(active, 4),
            "dense_ms": round(ms["dense"], 5), "gather_ms": round(ms["gather"], 5), "union_ms": round(ms["union"], 5),
            "speedup": round(ms["dense"] / ms["gather"], 3), "union_speedup": round(ms["dense"] / ms["union"], 3),
            "calls": calls, **medians, "max_rel_error": error}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Sparse FFN (gather rows of W_down) — {result['device']}, torch {result['torch']}", "",
             "FFN = down(act(up(x))) per call (up-projection and activation dense in every path), timed "
             f"interleaved in one process: the fastest of {result['rounds']} rounds (each ~20 ms of dense calls; the "
             "json has the medians too: on a shared machine the slower rounds measure the neighbours). "
             "`gather`: each token reads only its active rows of W_downᵀ, one `embedding_bag` for all tokens "
             "(`effml/kernels/sparse_ffn.py:gather_down`, what `GatherLinear` runs). `union`: one `index_select` "
             "of the rows active in any token, then a matmul (`gather_down_union`). speedup = dense ms / path ms "
             "(>1: faster than dense). union rows = share of rows active in some token of the batch. Each "
             "token's zeros are drawn independently at the given sparsity.", "",
             f"Load average when it ran (1, 5, 15 min): {result['load_average_1_5_15min']} on "
             f"{os.cpu_count()} cores; above the core count, the timings measure the neighbours as much as "
             "the kernels.", ""]
    for shape in result["shapes"]:
        rows = [r for r in result["cases"] if r["shape"] == shape]
        lines += [f"## {shape} ({rows[0]['hidden']} → {rows[0]['ffn']} → {rows[0]['hidden']})", "",
                  "| sparsity | batch | dense ms | gather ms | gather speedup | union rows | union ms | union speedup | max rel. error |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['sparsity']:.0%} | {r['batch']} | {r['dense_ms']:.4f} | {r['gather_ms']:.4f} | "
                         f"{r['speedup']:.2f}× | {r['union_rows']:.1%} | {r['union_ms']:.4f} | {r['union_speedup']:.2f}× | "
                         f"{r['max_rel_error']:.1e} |")
        pays = {s: sorted(r["batch"] for r in rows if r["sparsity"] == s and r["speedup"] >= 1.0)
                for s in sorted({r["sparsity"] for r in rows})}
        lines += ["", "Batches at which `gather` is faster than dense, by sparsity: "
                  + "; ".join(f"{s:.0%}: {b or 'none'}" for s, b in pays.items()) + ".", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--quick", action="store_true", help="few rounds: the code path, not a measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--suffix", default="")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per case (median)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rounds, calls = (3, 2) if args.quick else (args.rounds, None)
    cases = []
    for shape in args.shapes:
        hidden, ffn = SHAPES[shape]
        for sparsity in SPARSITIES[:2] if args.quick else SPARSITIES:
            for batch in BATCHES[:2] if args.quick else BATCHES:
                cases.append({"shape": shape, **case(hidden, ffn, sparsity, batch, device, rounds, calls)})
                print(json.dumps(cases[-1]), flush=True)
    load = os.getloadavg()  # a shared machine's load, beside its timings
    result = {"device": device_name(device), "torch": torch.__version__, "rounds": rounds,
              "load_average_1_5_15min": [round(x, 2) for x in load],
              "shapes": args.shapes, "cases": cases}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"sparse_ffn_{slug(result['device'])}{args.suffix}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {args.out / stem}.{{json,md}}")
    return result


if __name__ == "__main__":
    main()
