"""``make bench``: dense vs magnitude-pruned models, measured side by side on this machine.

For each model (LeNet-300-100, Conv-4, MiniLM-L6 at embedded shapes) and sparsity, the weights are
pruned by magnitude (layerwise, output layer dense, masks made permanent) and both models are timed
interleaved in one process: inference latency, a training step, peak memory, FLOPs counted dense
and counting skipped zeros. The point the table makes: unstructured zeros cut FLOPs, not time, on
dense kernels; structured and kernel-level methods (later compressors) must beat this baseline.

Results: benchmarks/results/<device>.json and .md, with the device name and torch version.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import torch

from effml import measure
from effml.compressors.magnitude import MagnitudeConfig, MagnitudePruning
from effml.data import DataInfo
from effml.registry import MODELS

RESULTS = Path(__file__).parent / "results"
CASES = {  # name: (registry name, config values, data info, input builder)
    "lenet_300_100": ("lenet_300_100", {}, DataInfo(10, "image", (1, 28, 28))),
    "conv4": ("conv", {"depth": 4}, DataInfo(10, "image", (3, 32, 32))),
    # transformer shapes with random weights: speed does not depend on the values
    "minilm_l6_shape": ("bert", {"pretrained": None, "hf_config": {
        "num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536}},
        DataInfo(2, "text")),
    "bert_base_shape": ("bert", {"pretrained": None}, DataInfo(2, "text")),
}
CPU_CASES = ("lenet_300_100", "conv4", "minilm_l6_shape")


def inputs_for(info: DataInfo, batch: int, seq: int) -> tuple[dict, torch.Tensor]:
    labels = torch.randint(0, info.num_classes, (batch,))
    if info.modality == "text":
        ids = torch.randint(1000, 30000, (batch, seq))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels
    return {"x": torch.randn(batch, *info.input_shape)}, labels


def pruned(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    model = copy.deepcopy(model)
    pruner = MagnitudePruning(MagnitudeConfig(sparsity=sparsity))
    pruner.attach(model)
    pruner.prune_to(sparsity)
    return pruner.finalize(model, None)


def run(device: str, dtype, batch: int, seq: int, sparsities: list[float], cases: list[str]) -> list[dict]:
    rows = []
    for case in cases:
        name, values, info = CASES[case]
        entry = MODELS.get(name)
        dense = entry.target.from_config(entry.make_config(values), info)
        inputs, labels = inputs_for(info, batch, seq)
        for sparsity in sparsities:
            result = measure.compare_dense_compressed(dense, pruned(dense, sparsity), inputs, device,
                                                      dtype=dtype, labels=labels)
            rows.append({"model": case, "sparsity": sparsity, "batch": batch,
                         "seq": seq if info.modality == "text" else None, **result})
            print(f"{case:14s} sparsity {sparsity:.2f}: latency {result['speedup']:.2f}x, "
                  f"train step {result.get('train_speedup', float('nan')):.2f}x, "
                  f"FLOPs (zeros skipped) {result['flops_ratio']:.1f}x fewer")
    return rows


def markdown(rows: list[dict], header: dict) -> str:
    lines = [f"# make bench — {header['device']} ({header['dtype']}), torch {header['torch']}", "",
             "Ratios are dense / pruned, measured interleaved in one process (>1 = pruned is faster).", "",
             "| model | batch | sparsity | dense ms | pruned ms | latency | train step | FLOPs ratio (zeros skipped) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['sparsity']:.0%} | {r['dense']['latency_ms']:.3f} | "
                     f"{r['compressed']['latency_ms']:.3f} | {r['speedup']:.2f}× | "
                     f"{r.get('train_speedup', float('nan')):.2f}× | {r['flops_ratio']:.1f}× |")
    notes = sorted({n for r in rows for n in r.get("notes", [])})
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=None)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    cases = args.models or (list(CASES) if gpu else list(CPU_CASES))
    dtype = torch.bfloat16 if gpu else None
    batch = args.batch or (256 if gpu else 32)
    rows = run(args.device, dtype, batch, args.seq, args.sparsities, cases)
    device_name = measure.device_name(args.device)
    header = {"device": device_name, "dtype": str(dtype or torch.float32), "torch": torch.__version__}
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    (RESULTS / f"magnitude_{slug}.json").write_text(json.dumps({**header, "rows": rows}, indent=2, default=str))
    (RESULTS / f"magnitude_{slug}.md").write_text(markdown(rows, header))
    print(f"results: {RESULTS / f'magnitude_{slug}.md'}")


if __name__ == "__main__":
    main()
