"""Channel pruning, measured: dense conv nets vs the same nets with channels physically removed.

For ResNet-20 (option A shortcuts, 1x28x28 like Fashion-MNIST and 3x32x32 like CIFAR-10) and Conv-4
(3x32x32), random weights (speed does not depend on the values), every DepGraph channel group of
``effml/models/channel_surgery.py`` keeps a random 75%, 50% or 25% of its channels (a residual
stream keeps more where its padded shortcut feeds it: ``ChannelPlan.close``), widths rounded up to
a multiple of 1 and 8; the shrunk model comes from ``channel_surgery.remove_channels`` (Torch-Pruning)
and is timed interleaved with the dense one by ``effml.measure.compare_dense_compressed``: inference
latency, a training step (forward, backward, SGD step), FLOPs. The point: unlike unstructured zeros
(``benchmarks/run.py``: 1.0x at any sparsity on dense kernels), removed channels save time on a CPU.

Results: benchmarks/results/structured_conv_<device>.json and .md (``--out`` to write elsewhere).
``--quick``: one small case, for the test.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from effml import measure
from effml.models import channel_surgery as cs
from effml.models.conv import ConvNet
from effml.models.resnet import ResNet

RESULTS = Path(__file__).parent / "results"
CASES = {  # name: (builder, input shape)
    "resnet20_fmnist": (lambda: ResNet(1, 20, 16, "A", 10), (1, 28, 28)),
    "resnet20_cifar": (lambda: ResNet(3, 20, 16, "A", 10), (3, 32, 32)),
    "conv4_cifar": (lambda: ConvNet((3, 32, 32), 4, 1.0, 10), (3, 32, 32)),
    "resnet8_tiny": (lambda: ResNet(1, 8, 8, "A", 10), (1, 8, 8)),  # --quick
}


def shrunk(model: torch.nn.Module, inputs: dict, keep_fraction: float, multiple: int, seed: int = 0):
    plan = cs.channel_plan(model, inputs)
    generator = torch.Generator().manual_seed(seed)
    keep = {}
    for group in plan.groups:
        kept = torch.zeros(group.size, dtype=torch.bool)
        kept[torch.randperm(group.size, generator=generator)[: max(1, round(group.size * keep_fraction))]] = True
        keep[group.name] = kept
    return cs.remove_channels(model, inputs, keep, multiple, plan=plan)


def run(cases: list[str], fractions: list[float], multiples: list[int], batch: int, iters: int,
        device: str = "cpu") -> list[dict]:
    rows = []
    for case in cases:
        build, shape = CASES[case]
        torch.manual_seed(0)
        dense = build().eval()
        inputs = {"x": torch.randn(batch, *shape)}
        labels = torch.randint(10, (batch,))
        for fraction in fractions:
            for multiple in multiples:
                small, widths = shrunk(dense, inputs, fraction, multiple)
                result = measure.compare_dense_compressed(dense, small.eval(), inputs, device, labels=labels,
                                                          iters=iters)
                after = sum(w["after"] for w in widths.values()) / sum(w["before"] for w in widths.values())
                rows.append({"model": case, "keep": fraction, "multiple": multiple, "batch": batch,
                             "channels_after": round(after, 4), **result})
                print(f"{case:16s} keep {fraction:.2f} x{multiple}: channels {after:.2f}, latency "
                      f"{result['speedup']:.2f}x, train step {result.get('train_speedup', float('nan')):.2f}x, "
                      f"FLOPs {result['flops_ratio']:.2f}x fewer")
    return rows


def markdown(rows: list[dict], header: dict) -> str:
    lines = [f"# Channel pruning, measured — {header['device']} (fp32), torch {header['torch']}", "",
             "Ratios are dense / shrunk, timed interleaved in one process (>1 = shrunk is faster). Channels kept",
             "at random per DepGraph group, removed with Torch-Pruning (`effml/models/channel_surgery.py`).", "",
             "| model | batch | channels kept | multiple | channels after rounding | dense ms | shrunk ms | latency | "
             "train step | FLOPs ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['keep']:.0%} | {r['multiple']} | {r['channels_after']:.0%} | "
                     f"{r['dense']['latency_ms']:.2f} | {r['compressed']['latency_ms']:.2f} | {r['speedup']:.2f}× | "
                     f"{r.get('train_speedup', float('nan')):.2f}× | {r['flops_ratio']:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--quick", action="store_true", help="one tiny case: the code path, not a measurement")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cases = ["resnet8_tiny"] if args.quick else ["resnet20_fmnist", "resnet20_cifar", "conv4_cifar"]
    fractions, iters = ([0.5], 2) if args.quick else (args.fractions, args.iters)
    rows = run(cases, fractions, args.multiples, 8 if args.quick else args.batch, iters, args.device)
    device = measure.device_name(torch.device(args.device))
    header = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_") + (f"_batch{args.batch}" if args.device != "cpu" else "")
    (args.out / f"structured_conv_{slug}.json").write_text(json.dumps({**header, "rows": rows}, indent=2, default=str))
    (args.out / f"structured_conv_{slug}.md").write_text(markdown(rows, header))
    print(f"results: {args.out / f'structured_conv_{slug}.md'}")


if __name__ == "__main__":
    main()
