"""What a training step pays for masks: effml's magnitude masks vs Lightning's ``ModelPruning`` callback.

Issue 25, item 4. One process, one model and one batch per case, every variant timed interleaved
(``effml.measure._time_interleaved``: the same clocks and load for all):

- ``dense``: the model with the pruned weights folded in (zeros, no mask machinery): the baseline;
- ``dense (again)``: a second copy of it, timed like the others: the spread between two identical
  models, i.e. the noise floor of the overhead numbers;
- ``effml``: ``MagnitudePruning`` (``compressors/magnitude.py``, masks of ``compressors/_masks.py``
  applied in place: the forward uses the parameter itself, and ``reapply_masks`` re-zeroes the pruned
  entries after each optimizer step, as the compressor's ``on_train_batch_end`` does), attached and
  pruned as a run does (``attach``, ``prune_to``), global scope;
- ``effml (hook)``: the same masks through ``torch.nn.utils.prune``'s forward-pre hook
  (``weight = weight_orig * weight_mask`` on every forward), what effml did before and still does for
  masks that can grow back (movement pruning, SLTH);
- ``ModelPruning``: Lightning's callback (``lightning.pytorch.callbacks.ModelPruning``,
  ``l1_unstructured``, global, its forward-pre hooks) given the same parameters (every weight
  effml masks) and pruned to the same sparsity through its own ``setup`` + ``apply_pruning``, as at
  an epoch end. Its masks are checked equal to effml's, and all of these compute the same function
  (logits compared);
- ``ModelPruning (defaults)``: the callback as ``ModelPruning("l1_unstructured", amount=s)`` sets
  itself up: every ``weight`` and ``bias`` of every leaf module (embeddings and LayerNorms too), so a
  different function; informational;

A train step is forward (bf16 autocast on CUDA) + cross-entropy + backward + AdamW (fused where
available) + zero_grad, in plain PyTorch: ``ModelPruning`` has no per-batch hook, so the Lightning loop
around it would add the same cost to every variant. The learning rate is 0 so that every variant
multiplies exactly the same values at every step (zeros can make a matmul faster; the optimizer
does the same work at any learning rate).

Goals (issue 25, fixed before any GPU number was seen), on every GPU case: effml's overhead
(effml ms / dense ms - 1) <= 3% of a dense step, and <= half of ``ModelPruning``'s overhead on the
same parameters. Cases: BERT-base shape (random weights) at batch 32 x seq 128 (EarlyBERT's GLUE
setting), and ResNet-20 (CIFAR shape, 3x32x32) at batch 128; 90% sparsity.

Without CUDA a 2-layer BERT and a ResNet-8 run at tiny batches in fp32: the code path (what CI
exercises), not a measurement worth reading.

    python benchmarks/mask_overhead.py            # GPU: ~1 min on an H200
    python benchmarks/mask_overhead.py --quick    # few rounds

Results: benchmarks/results/mask_overhead_<device>.json and .md (``--out`` elsewhere).
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
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/_checkout.py, however this is run
import structured_bert as sb  # noqa: E402  (use_checkout() runs there: effml from this checkout)

from effml import measure  # noqa: E402
from effml.compressors._masks import mask_layers, reapply_masks, set_mask  # noqa: E402
from effml.compressors.magnitude import MagnitudeConfig, MagnitudePruning  # noqa: E402
from effml.data import DataInfo  # noqa: E402
from effml.models.resnet import ResNet, ResNetConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SPARSITY = 0.9
GOAL_OVERHEAD, GOAL_FRACTION = 0.03, 0.5  # <= 3% of a dense step; <= half of ModelPruning's
# case: (kind, GPU size, CPU size); sizes are (batch, seq) for BERT, (batch, depth) for ResNet
CASES = {
    "bert_base": ("bert", (32, 128), (4, 32)),
    "resnet20": ("resnet", (128, 20), (8, 8)),
}
FULL = sb.Timing(warmup=5, iters=30, min_time_s=3.0, max_time_s=40.0)
QUICK = sb.Timing(warmup=1, iters=3, min_time_s=0.0, max_time_s=3.0)
VARIANTS = ("dense", "dense (again)", "effml", "effml (hook)", "ModelPruning", "ModelPruning (defaults)")


# -- models and variants ---------------------------------------------------------------------------
def build(case: str, gpu: bool, device: torch.device) -> tuple[nn.Module, dict, torch.Tensor, dict]:
    """The dense model (random weights, seed 0), one batch and its labels, and a description."""
    kind, gpu_size, cpu_size = CASES[case]
    batch, extra = gpu_size if gpu else cpu_size
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if kind == "bert":
        shape = sb.MODELS["bert-base"] if gpu else sb.MODELS["tiny"]
        model = sb.build_dense(shape)
        x, labels = sb.make_inputs(shape, batch, extra, device)
        info = {"model": "bert-base shape" if gpu else "tiny bert", "batch": batch, "seq": extra,
                "shape": {"layers": shape.layers, "hidden": shape.hidden, "heads": shape.heads, "ffn": shape.ffn}}
    else:
        model = ResNet.from_config(ResNetConfig(depth=extra), DataInfo(10, "image", (3, 32, 32)))
        x = {"x": torch.randn(batch, 3, 32, 32, generator=generator).to(device)}
        labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
        info = {"model": f"resnet-{extra} (3x32x32)", "batch": batch, "seq": None}
    info["params"] = sum(p.numel() for p in model.parameters())
    return model.to(device).train(), x, labels, info


def variants(base: nn.Module, sparsity: float) -> tuple[dict[str, nn.Module], dict[str, Any], dict[str, Any]]:
    """Every variant of VARIANTS from ``base``; what was masked; effml's masked layers."""
    from lightning.pytorch.callbacks import ModelPruning

    effml = copy.deepcopy(base)
    pruner = MagnitudePruning(MagnitudeConfig(sparsity=sparsity, scope="global"))
    pruner.attach(effml)
    pruner.prune_to(sparsity)
    names = list(pruner.layers)
    masks = {n: effml.get_submodule(n).weight_mask.detach().clone() for n in names}

    dense = copy.deepcopy(base)
    with torch.no_grad():
        for n in names:
            dense.get_submodule(n).weight.mul_(masks[n])

    same = copy.deepcopy(base)
    callback = ModelPruning("l1_unstructured", parameters_to_prune=[(same.get_submodule(n), "weight") for n in names],
                            amount=sparsity, use_global_unstructured=True, use_lottery_ticket_hypothesis=False)
    callback.setup(None, same, "fit")  # sanitize_parameters_to_prune: what Trainer.fit calls first
    callback.apply_pruning(sparsity)  # what its on_train_epoch_end does
    differing = sum(int((same.get_submodule(n).weight_mask != masks[n]).sum()) for n in names)

    everything = copy.deepcopy(base)
    defaults = ModelPruning("l1_unstructured", amount=sparsity, use_lottery_ticket_hypothesis=False)
    defaults.setup(None, everything, "fit")
    defaults.apply_pruning(sparsity)

    hooked = copy.deepcopy(base)
    for name, module in mask_layers(hooked, pruner.cfg.layer_types, pruner.cfg.skip, "hook").items():
        set_mask(module, masks[name])
    models = {"dense": dense, "dense (again)": copy.deepcopy(dense), "effml": effml, "effml (hook)": hooked,
              "ModelPruning": same, "ModelPruning (defaults)": everything}
    masked = {"effml": len(names), "effml (hook)": len(names), "ModelPruning": len(callback._parameters_to_prune),
              "ModelPruning (defaults)": len(defaults._parameters_to_prune)}
    return models, {"masked_tensors": masked, "mask_entries_differing_effml_vs_modelpruning": differing,
                    "masked_weights": sum(m.numel() for m in masks.values())}, pruner.layers


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def same_function(models: dict[str, nn.Module], x: dict, device: torch.device, dtype) -> dict[str, float]:
    """Largest |logits - dense logits| / max |dense logits| of each variant, in eval mode (no dropout)."""
    out = {}
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    for key, model in models.items():
        model.eval()
        with autocast:
            out[key] = model(**x).float()
        model.train()
    ref = out["dense"]
    scale = ref.abs().max().clamp_min(1e-12)
    return {k: float((v - ref).abs().max() / scale) for k, v in out.items() if k != "dense"}


# -- timing ------------------------------------------------------------------------------------------
def optimizer_for(model: nn.Module) -> tuple[torch.optim.Optimizer, str]:
    """AdamW at lr 0 (module docstring), the fastest implementation here: fused, else foreach."""
    params = [p for p in model.parameters() if p.requires_grad]
    for kind in ("fused", "foreach"):
        try:
            return torch.optim.AdamW(params, lr=0.0, weight_decay=0.01, **{kind: True}), kind
        except (RuntimeError, ValueError):
            continue
    return torch.optim.AdamW(params, lr=0.0, weight_decay=0.01), "for-loop"


def step_fn(model: nn.Module, x: dict, labels: torch.Tensor, device: torch.device, dtype, after_step=None):
    optimizer, kind = optimizer_for(model)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def step() -> torch.Tensor:
        with autocast:
            logits = model(**x)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, kind


def time_steps(models: dict[str, nn.Module], effml_layers: dict[str, nn.Module], x: dict, labels: torch.Tensor, device: torch.device,
               dtype, timing: sb.Timing) -> dict[str, dict[str, Any]]:
    fns, kind = {}, None
    for key, model in models.items():
        after = (lambda: reapply_masks(effml_layers)) if key == "effml" else None  # noqa: E731
        fns[key], kind = step_fn(model, x, labels, device, dtype, after)
    seconds = measure._time_interleaved(fns, device, timing.warmup, timing.iters, timing.min_time_s, 100_000,
                                        timing.max_time_s)
    out = {}
    for key, fn in fns.items():
        s = sorted(seconds[key])
        q = lambda f, s=s: 1e3 * s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
        peak = (measure._peak_memory(fn, device, measure.resident_bytes(models[key]))["peak_mem_bytes"]
                if device.type == "cuda" else None)
        out[key] = {"train_ms": q(0.5), "train_p25_ms": q(0.25), "train_p75_ms": q(0.75), "rounds": len(s),
                    "train_host_ms": sb.host_ms(fn, device), "peak_mem_bytes": peak,
                    "forward_pre_hooks": hooks(models[key]), "optimizer": f"AdamW ({kind}, lr 0)"}
    return out


# -- the benchmark -----------------------------------------------------------------------------------
def run_case(case: str, device: torch.device, dtype, timing: sb.Timing, sparsity: float) -> dict[str, Any]:
    start = time.perf_counter()
    base, x, labels, info = build(case, device.type == "cuda", device)
    models, masked, effml_layers = variants(base, sparsity)
    del base
    errors = same_function(models, x, device, dtype)
    times = time_steps(models, effml_layers, x, labels, device, dtype, timing)
    dense_ms = times["dense"]["train_ms"]
    for key, t in times.items():
        t["overhead"] = t["train_ms"] / dense_ms - 1
        t["logits_rel_diff"] = errors.get(key)
        t["masked_tensors"] = masked["masked_tensors"].get(key, 0)
    row = {"case": case, **info, "sparsity": sparsity, **{k: v for k, v in masked.items() if k != "masked_tensors"},
           "variants": times, "elapsed_s": time.perf_counter() - start}
    row["goal"] = case_goal(times)
    del models
    sb.free(device)
    return row


def case_goal(times: dict[str, dict[str, Any]]) -> dict[str, Any]:
    effml, mp = times["effml"]["overhead"], times["ModelPruning"]["overhead"]
    within = effml <= GOAL_OVERHEAD
    half = mp > 0 and effml <= GOAL_FRACTION * mp
    return {"effml_overhead": effml, "modelpruning_overhead": mp,
            "effml_over_modelpruning": effml / mp if mp > 0 else None,
            "noise": abs(times["dense (again)"]["overhead"]),
            "within_3_percent": within, "at_most_half_of_modelpruning": half, "passed": within and half}


def line(row: dict) -> str:
    v = row["variants"]
    cells = "  ".join(f"{k} {v[k]['train_ms']:.3f} ms ({v[k]['overhead']:+.1%})" for k in VARIANTS)
    return f"{row['case']} {row['model']} batch {row['batch']}: {cells}"


def markdown(result: dict[str, Any]) -> str:
    cuda = f", CUDA {result['cuda']}" if result["cuda"] else ""
    lines = [
        f"# Mask overhead — {result['device']} ({result['dtype']}), torch {result['torch']}{cuda}, "
        f"lightning {result['lightning']}", "",
        "One train step (forward under autocast + cross-entropy + backward + AdamW + zero_grad, plain PyTorch) of the "
        f"same model and batch, {result['sparsity']:.0%} of the masked weights zero, every variant timed interleaved in "
        "one process (median ms). Overhead = variant ms / dense ms − 1. `dense`: the pruned weights folded in, no "
        "masks. `effml`: `MagnitudePruning`, masks applied in place (the forward uses the parameter; one "
        "`torch._foreach_mul_` re-zeroes the pruned entries after each optimizer step). `effml (hook)`: the same masks "
        "through `torch.nn.utils.prune`'s forward-pre hook (a product per layer each forward), effml's way before "
        "and still for masks that grow back. "
        "`ModelPruning`: Lightning's callback (`l1_unstructured`, global) on the same weights, its own `setup` and "
        "`apply_pruning`; its masks equal effml's (up to ties at the threshold: counted below each table). `ModelPruning (defaults)`: every weight and bias of every module. "
        "`dense (again)`: a second dense copy: the noise floor. Learning rate 0: every variant multiplies the same values.", "",
        *sb.goal_section("effml's overhead ≤ 3% of a dense step and ≤ half of ModelPruning's", result["meaningful"]),
    ]
    for r in result["rows"]:
        g = r["goal"]
        ratio = "n/a" if g["effml_over_modelpruning"] is None else f"{g['effml_over_modelpruning']:.2f}×"
        lines.append(
            f"- {r['case']} ({r['model']}, batch {r['batch']}{'' if r['seq'] is None else ' × seq ' + str(r['seq'])}): "
            f"effml {g['effml_overhead']:+.2%} (≤ 3%: **{'PASS' if g['within_3_percent'] else 'FAIL'}**), "
            f"ModelPruning {g['modelpruning_overhead']:+.2%}, effml / ModelPruning {ratio} (≤ 0.5: "
            f"**{'PASS' if g['at_most_half_of_modelpruning'] else 'FAIL'}**); noise (dense vs dense again) "
            f"{g['noise']:.2%}")
    lines += [f"- overall: **{'PASS' if result['passed'] else 'FAIL'}**", ""]
    for r in result["rows"]:
        lines += [f"## {r['case']}: {r['model']}, batch {r['batch']}"
                  + ("" if r["seq"] is None else f" × seq {r['seq']}") + f" ({r['params'] / 1e6:.2f} M params, "
                  f"{r['masked_weights'] / 1e6:.2f} M masked)", "",
                  "| variant | masked tensors | forward-pre hooks | train ms (p25–p75) | host ms | overhead | peak MiB | "
                  "logits vs dense |", "|---|---|---|---|---|---|---|---|"]
        for key in VARIANTS:
            v = r["variants"][key]
            peak = "—" if v["peak_mem_bytes"] is None else f"{v['peak_mem_bytes'] / 2**20:.0f}"
            host = "—" if v["train_host_ms"] is None else f"{v['train_host_ms']:.2f}"
            diff = "—" if v["logits_rel_diff"] is None else f"{v['logits_rel_diff']:.1e}"
            lines.append(f"| {key} | {v['masked_tensors']} | {v['forward_pre_hooks']} | {v['train_ms']:.3f} "
                         f"({v['train_p25_ms']:.3f}–{v['train_p75_ms']:.3f}) | {host} | {v['overhead']:+.2%} | {peak} | "
                         f"{diff} |")
        lines += ["", f"{r['variants']['dense']['rounds']} rounds; mask entries differing between effml and "
                  f"ModelPruning: {r['mask_entries_differing_effml_vs_modelpruning']}. host ms = the CPU time to issue "
                  "one step (close to train ms: launch-bound). Logits vs dense: max |Δ| / max |dense|, eval mode "
                  "(`ModelPruning (defaults)` prunes embeddings, biases and LayerNorms too: another function).", ""]
    lines.append(f"Total run time {result['elapsed_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sb.common_arguments(parser, RESULTS)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--sparsity", type=float, default=SPARSITY)
    parser.add_argument("--quick", action="store_true", help="few rounds (CI)")
    args, device = sb.parse_arguments(parser, argv)
    started = time.perf_counter()
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else None
    preset = sb.hardware_preset(device)
    import lightning

    header = {"device": measure.device_name(device), "device_type": device.type, "torch": torch.__version__,
              "cuda": torch.version.cuda if gpu else None, "lightning": lightning.__version__,
              "transformers": sb._version("transformers"), "python": platform.python_version(),
              "dtype": str(dtype or torch.float32).removeprefix("torch."), "sparsity": args.sparsity,
              "preset": preset["name"], "quick": args.quick, "meaningful": gpu and not args.quick,
              "goal": {"max_overhead": GOAL_OVERHEAD, "max_fraction_of_modelpruning": GOAL_FRACTION}}
    rows = []
    with sb.kernel_settings(preset, device) as order:
        header["sdpa_backends"] = order
        for case in args.cases:
            rows.append(run_case(case, device, dtype, QUICK if args.quick else FULL, args.sparsity))
            sb.log(line(rows[-1]) + f" ({rows[-1]['elapsed_s']:.0f} s)")
    result = {**header, "passed": all(r["goal"]["passed"] for r in rows), "rows": rows,
              "elapsed_s": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"mask_overhead_{sb.slug(result['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(result))
    for r in rows:
        g = r["goal"]
        sb.log(f"goal {r['case']}: effml {g['effml_overhead']:+.2%} (<= 3%: {g['within_3_percent']}), ModelPruning "
               f"{g['modelpruning_overhead']:+.2%} (effml <= half: {g['at_most_half_of_modelpruning']}), noise "
               f"{g['noise']:.2%}")
    sb.log(f"mask overhead: {'PASS' if result['passed'] else 'FAIL'}; results: {stem.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
