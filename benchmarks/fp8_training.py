"""fp8 training by measurement: torchao ``Float8Linear`` as ``hardware.fp8_training`` selects it, on BERT.

Issue 25, item 5. For BERT-base and BERT-large shapes (effml's ``BertClassifier``, random weights:
speed does not depend on the values) at batch 128 x seq 512, one process times the train step
(forward under bf16 autocast + cross-entropy + backward + fused AdamW, as ``structured_bert.py``)
interleaved for:

- ``dense``: every Linear in bf16 autocast;
- ``selected``: ``effml.kernels.fp8_training.apply`` with ``selection=measure``, what a run with
  ``hardware.fp8_training=true`` gets: each Linear's forward + backward timed on its training shape in
  bf16 and in fp8 (torchao ``Float8Linear``, dynamic tensorwise scales), fp8 kept where >= 1.05x faster;
- ``forced``: the same with ``selection=force``: every eligible Linear in fp8.

A selected model that kept no layer in fp8 *is* the dense model: its ratio is 1.00 by construction,
not timed. With ``--compile`` (default on CUDA) the same models are timed again under
``torch.compile`` (``hardware.compile=true``; inductor fuses the fp8 scaling into the neighbouring
ops, which eager mode cannot), while the time budget lasts.

Goals (issue 25, fixed before any GPU number was seen), on each model: where selection kept fp8 on
some layer, the selected train step is >= 1.2x dense; and the selected model is never slower than
dense (>= 1.00x). Judged on the eager step (effml's presets train with ``compile: false``); the
compiled ratios are reported beside them against the same thresholds.

Without CUDA a 2-layer BERT (hidden 192) runs at batch 4 x seq 32 in fp32: selection keeps every
layer dense (fp8 needs sm_89+), and ``forced`` is built with ``Float8Linear`` directly (torchao
emulates it on a CPU): the code path (what CI exercises), not a measurement.

    python benchmarks/fp8_training.py             # GPU: ~6-8 min on an H200 (compile included)
    python benchmarks/fp8_training.py --quick     # few rounds, no compile

Results: benchmarks/results/fp8_training_<device>.json and .md (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/_checkout.py, however this is run
import structured_bert as sb  # noqa: E402  (use_checkout() runs there: effml from this checkout)

from effml import measure  # noqa: E402
from effml.errors import EffmlError  # noqa: E402
from effml.kernels import fp8_training  # noqa: E402
from effml.kernels.select import set_module  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPES = {
    "bert_base": sb.Shape(layers=12, hidden=768, heads=12, ffn=3072),
    "bert_large": sb.Shape(layers=24, hidden=1024, heads=16, ffn=4096),
    "bert_tiny": sb.MODELS["tiny"],
}
GPU_SIZE, CPU_SIZE = (128, 512), (4, 32)
GOAL_KEPT, MARGIN = 1.2, 1.05
FULL = sb.Timing(warmup=3, iters=10, min_time_s=2.0, max_time_s=30.0)
QUICK = sb.Timing(warmup=1, iters=2, min_time_s=0.0, max_time_s=3.0)


def hardware(device: torch.device, selection: str, cache: str) -> SimpleNamespace:
    """The fields of effml's HardwareConfig that fp8_training.apply reads (no Hydra needed here)."""
    return SimpleNamespace(name="bench", accelerator="gpu" if device.type == "cuda" else "cpu", fp8_training=True,
                           selection=selection, selection_margin=MARGIN, kernels=[], kernel_cache=cache,
                           precision="bf16-mixed" if device.type == "cuda" else "32-true")


def forced_model(dense: nn.Module, x: dict, device: torch.device, cache: str) -> tuple[nn.Module, list[dict], str]:
    """Every eligible Linear in fp8 (``selection=force``); on a CPU, which apply refuses, directly."""
    model = copy.deepcopy(dense)
    try:
        decisions = fp8_training.apply(model, hardware(device, "force", cache), x)
        return model, [d.as_dict() for d in decisions], "fp8_training.apply(selection=force)"
    except EffmlError as err:  # a CPU; or a layer fp8 cannot take (the 2-class classifier: 768->2)
        refused = str(err)
    model = copy.deepcopy(dense)  # on a CPU torchao emulates the fp8 matmuls: the code path only
    decisions = []
    for path in fp8_training.linear_paths(model):
        layer = model.get_submodule(path)
        ok = layer.in_features % 16 == 0 and layer.out_features % 16 == 0
        if ok:
            set_module(model, path, fp8_training._float8(layer))
        decisions.append({"layer": path, "kernel": "fp8_training" if ok else "dense",
                          "reason": "forced directly (CPU)" if ok else "dense: widths not divisible by 16"})
    return model, decisions, f"Float8Linear.from_float on every Linear with widths divisible by 16 (apply refused: {refused})"


def kept(decisions: list[dict]) -> int:
    return sum(d["kernel"] == "fp8_training" for d in decisions)


def layer_table(decisions: list[dict]) -> list[dict[str, Any]]:
    """One entry per distinct layer shape: how many layers, fp8's measured speedup, kept or not."""
    by: dict[str, dict[str, Any]] = {}
    for d in decisions:
        t = d.get("timings_ms") or {}
        entry = by.setdefault(d.get("shape", "?"), {"shape": d.get("shape", "?"), "layers": 0, "kept": 0,
                                                    "dense_ms": t.get("dense"), "fp8_ms": t.get("fp8"),
                                                    "reason": d["reason"]})
        entry["layers"] += 1
        entry["kept"] += d["kernel"] == "fp8_training"
    for e in by.values():
        e["fp8_speedup"] = e["dense_ms"] / e["fp8_ms"] if e["dense_ms"] and e["fp8_ms"] else None
    return list(by.values())


def compiled_times(models: dict[str, nn.Module], x: dict, labels: torch.Tensor, device: torch.device, dtype,
                   timing: sb.Timing, deadline: float) -> dict[str, Any]:
    """Train steps under torch.compile (default mode), compiled one after the other, dense first; a model
    is skipped where compiling it would likely pass ``deadline``."""
    import torch._dynamo

    torch._dynamo.reset()
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    compiled, forwards, compile_s, skipped = {}, {}, {}, []
    for key, model in models.items():
        expected = 1.5 * max(compile_s.values()) + 20 if compile_s else 60  # s: the next compile + timing
        if time.perf_counter() + expected > deadline:
            skipped.append(key)
            continue
        start = time.perf_counter()
        forward = torch.compile(model)
        step, _, _ = sb.train_step_fn(model, forward, x, labels, device, dtype)
        step()
        step()
        measure._sync(device)
        compiled[key], forwards[key], compile_s[key] = model, forward, time.perf_counter() - start
        sb.log(f"  compiled {key}: {compile_s[key]:.0f} s")
    if len(compiled) < 2:
        return {"skipped": f"time budget: compiled {list(compiled)} only", "compile_s": compile_s}
    train = sb.time_train(compiled, forwards, x, labels, device, dtype, timing)
    out = {"compile_s": compile_s, "skipped": skipped or None, "times": train}
    out["ratios"] = {k: train["dense"]["train_ms"] / v["train_ms"] for k, v in train.items() if k != "dense"}
    return out


def run_model(name: str, device: torch.device, dtype, timing: sb.Timing, cache: str) -> tuple[dict, dict, tuple]:
    """The eager comparison of one model; returns its row, the models and the batch (for compile)."""
    start = time.perf_counter()
    gpu = device.type == "cuda"
    shape = SHAPES[name]
    batch, seq = GPU_SIZE if gpu else CPU_SIZE
    dense = sb.build_dense(shape).to(device)
    x, labels = sb.make_inputs(shape, batch, seq, device)
    flops = measure.count_flops(dense, x)["total"]
    selected = copy.deepcopy(dense)
    select_start = time.perf_counter()
    decisions = [d.as_dict() for d in fp8_training.apply(selected, hardware(device, "measure", cache), x)]
    select_s = time.perf_counter() - select_start
    forced, forced_decisions, forced_how = forced_model(dense, x, device, cache)
    row: dict[str, Any] = {
        "model": name, "batch": batch, "seq": seq, "tokens": batch * seq, "forward_flops": flops,
        "params": sum(p.numel() for p in dense.parameters()), "linears": len(fp8_training.linear_paths(dense)),
        "selected_kept": kept(decisions), "forced_converted": kept(forced_decisions), "forced_how": forced_how,
        "selection_s": select_s, "layers": layer_table(decisions), "decisions": decisions,
    }
    models = {"dense": dense, "forced": forced}
    if row["selected_kept"]:
        models["selected"] = selected
    else:
        del selected
    sb.log(f"{name} {batch}x{seq}: fp8 kept on {row['selected_kept']} of {row['linears']} Linears "
           f"(selection {select_s:.0f} s); forced on {row['forced_converted']}")
    train = sb.time_train(models, models, x, labels, device, dtype, timing)
    row["eager"] = train
    row["forced_ratio"] = train["dense"]["train_ms"] / train["forced"]["train_ms"]
    row["selected_ratio"] = (train["dense"]["train_ms"] / train["selected"]["train_ms"] if row["selected_kept"]
                             else 1.0)
    row["selected_note"] = None if row["selected_kept"] else "no layer kept: the dense model (1.00x by construction)"
    sb.log(f"  eager: dense {train['dense']['train_ms']:.2f} ms, forced {row['forced_ratio']:.2f}x, selected "
           f"{row['selected_ratio']:.2f}x" + ("" if row["selected_kept"] else " (nothing kept)"))
    row["goal"] = model_goal(row)
    row["elapsed_s"] = time.perf_counter() - start
    sb.free(device)
    return row, models, (x, labels)


def run_compiled(row: dict, models: dict, batch: tuple, device: torch.device, dtype, timing: sb.Timing,
                 deadline: float) -> None:
    """``row["compiled"]``: the same models under torch.compile (an error or a skip is recorded)."""
    start = time.perf_counter()
    sb.log(f"{row['model']} under torch.compile:")
    try:
        row["compiled"] = compiled_times(models, *batch, device, dtype, timing, deadline)
        for k, v in row["compiled"].get("ratios", {}).items():
            sb.log(f"  compiled: {k} {v:.2f}x (dense {row['compiled']['times']['dense']['train_ms']:.2f} ms)")
        if "ratios" in row["compiled"] and not row["selected_kept"]:
            row["compiled"]["ratios"]["selected"] = 1.0
    except Exception as err:  # compile is optional: record why it failed, keep the eager results
        row["compiled"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        sb.log(f"  torch.compile failed: {row['compiled']['error']}")
    row["goal"] = model_goal(row)
    row["elapsed_s"] += time.perf_counter() - start
    sb.free(device)


def model_goal(row: dict[str, Any]) -> dict[str, Any]:
    """>= GOAL_KEPT where kept (None: nothing kept), never slower as selected; eager and compiled."""
    out = {}
    compiled = (row.get("compiled") or {}).get("ratios") or {}
    for mode, ratio in (("eager", row["selected_ratio"]), ("compiled", compiled.get("selected"))):
        if ratio is None:
            continue
        out[mode] = {"selected_ratio": ratio,
                     "kept_goal": (ratio >= GOAL_KEPT) if row["selected_kept"] else None,
                     "never_slower": ratio >= 1.0}
    return out


def passed(rows: list[dict]) -> bool:
    eager = [r["goal"]["eager"] for r in rows]
    return all(g["never_slower"] and g["kept_goal"] is not False for g in eager)


def _optimizer(result: dict[str, Any]) -> str:
    rows = result["rows"]
    return rows[0]["eager"]["dense"]["optimizer"] if rows else "AdamW"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}×"


def _verdict(v: bool | None) -> str:
    return "n/a (nothing kept)" if v is None else "**PASS**" if v else "**FAIL**"


def markdown(result: dict[str, Any]) -> str:
    cuda = f", CUDA {result['cuda']}" if result["cuda"] else ""
    lines = [
        f"# fp8 training by measurement — {result['device']} ({result['dtype']}), torch {result['torch']}{cuda}, "
        f"torchao {result['torchao']}", "",
        f"Train step = forward + cross-entropy + backward + {_optimizer(result)} "
        f"{'under bf16 autocast' if result['dtype'] == 'bfloat16' else 'in ' + result['dtype']}, effml's `BertClassifier` "
        "(random weights), timed interleaved in one process (median). Ratios are dense ms / variant ms (> 1: faster). "
        "`selected`: `effml.kernels.fp8_training.apply` with `selection=measure` (each Linear's forward + backward timed "
        f"on its training shape, torchao `Float8Linear` kept where ≥ {MARGIN}× faster), what "
        "`hardware.fp8_training=true` trains; `forced`: every Linear with widths divisible by 16 in fp8 (`selection=force`; "
        "built directly where `apply` refuses, see the notes). A selected "
        "model with no fp8 layer is the dense model (1.00×, not timed). `compiled`: the same models under "
        "`torch.compile` (`hardware.compile=true`).", "",
        *sb.goal_section("≥ 1.2× train step where kept, never slower as selected", result["meaningful"]),
    ]
    for r in result["rows"]:
        for mode, g in r["goal"].items():
            lines.append(f"- {r['model']} {r['batch']}×{r['seq']} {mode}: selected {_x(g['selected_ratio'])} "
                         f"(fp8 on {r['selected_kept']} of {r['linears']} Linears); ≥ {GOAL_KEPT}× where kept: "
                         f"{_verdict(g['kept_goal'])}; never slower: {_verdict(g['never_slower'])}")
    nothing = not any(r["selected_kept"] for r in result["rows"])
    lines += [f"- overall (eager, as effml's presets train): **{'PASS' if result['passed'] else 'FAIL'}**"
              + (": never slower, because fp8 was kept on no layer; so no speedup either" if nothing else ""), "",
              "| model | batch×seq | fp8 Linears (selected / forced / all) | dense ms (host) | selected | forced | "
              "compiled dense ms | compiled selected | compiled forced | peak GiB dense / forced |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        e, c = r["eager"], r.get("compiled") or {}
        cr, ct = c.get("ratios") or {}, c.get("times") or {}
        peak = " / ".join("—" if e[k].get("train_peak_mem_bytes") is None else f"{e[k]['train_peak_mem_bytes'] / 2**30:.1f}"
                          for k in ("dense", "forced"))
        host = e["dense"].get("train_host_ms")
        lines.append(f"| {r['model']} | {r['batch']}×{r['seq']} | {r['selected_kept']} / {r['forced_converted']} / "
                     f"{r['linears']} | {e['dense']['train_ms']:.2f}" + (f" ({host:.1f})" if host else "")
                     + f" | {_x(r['selected_ratio'])} | {_x(r['forced_ratio'])} | "
                     + (f"{ct['dense']['train_ms']:.2f}" if ct else c.get("error") or c.get("skipped") or "—")
                     + f" | {_x(cr.get('selected'))} | {_x(cr.get('forced'))} | {peak} |")
    lines += ["", "## Per-layer selection (forward + backward of one Linear on its training shape, bf16 vs fp8)", "",
              "| model | shape | layers | dense ms | fp8 ms | fp8 speedup | kept |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for t in r["layers"]:
            ms = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(f"| {r['model']} | {t['shape']} | {t['layers']} | {ms(t['dense_ms'])} | {ms(t['fp8_ms'])} | "
                         f"{_x(t['fp8_speedup'])} | {t['kept']} |")
    notes = [f"{r['model']}: forced built by {r['forced_how']}" for r in result["rows"]
             if not r["forced_how"].startswith("fp8_training.apply")]
    notes += [f"{r['model']}: compile skipped {r['compiled']['skipped']}" for r in result["rows"]
              if (r.get("compiled") or {}).get("skipped")]
    lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    lines.append(f"Total run time {result['elapsed_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def write(out: Path, header: dict, rows: list[dict], started: float) -> Path:
    result = {**header, "passed": passed(rows), "rows": rows, "elapsed_s": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"fp8_training_{sb.slug(result['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(result))
    return stem


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sb.common_arguments(parser, RESULTS)
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=None,
                        help="default: bert_base bert_large on CUDA, bert_tiny on CPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the models under torch.compile (default: on for CUDA unless --quick)")
    parser.add_argument("--quick", action="store_true", help="few rounds, no compile (CI)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds for the whole run: compiling stops where it would run past them")
    args, device = sb.parse_arguments(parser, argv)
    started = time.perf_counter()
    gpu = device.type == "cuda"
    names = args.models or (["bert_base", "bert_large"] if gpu else ["bert_tiny"])
    dtype = torch.bfloat16 if gpu else None
    compile_on = args.compile if args.compile is not None else (gpu and not args.quick)
    preset = sb.hardware_preset(device)
    import torchao

    header = {"device": measure.device_name(device), "device_type": device.type, "torch": torch.__version__,
              "cuda": torch.version.cuda if gpu else None, "torchao": torchao.__version__,
              "transformers": sb._version("transformers"), "python": platform.python_version(),
              "dtype": str(dtype or torch.float32).removeprefix("torch."), "preset": preset["name"],
              "quick": args.quick, "meaningful": gpu and not args.quick and set(names) >= {"bert_base", "bert_large"},
              "selection_margin": MARGIN, "goal": {"kept_speedup": GOAL_KEPT, "never_slower": 1.0}}
    rows, kept_models = [], {}
    with tempfile.TemporaryDirectory() as tmp, sb.kernel_settings(preset, device) as order:
        header["sdpa_backends"] = order
        cache = os.path.join(tmp, "kernels.json")  # layers of one shape are timed once, nothing leaks out
        for name in names:  # eager first, for every model: the goals are judged there
            row, models, batch = run_model(name, device, dtype, QUICK if args.quick else FULL, cache)
            rows.append(row)
            kept_models[name] = (models, batch)
        stem = write(args.out, header, rows, started)  # kept if compiling runs out of time
        if compile_on:
            for row in sorted(rows, key=lambda r: -r["params"]):  # the largest first: where fp8 can pay
                models, batch = kept_models.pop(row["model"])
                run_compiled(row, models, batch, device, dtype, QUICK if args.quick else FULL,
                             started + args.budget_s)
                del models, batch
            stem = write(args.out, header, rows, started)
    result = json.loads(stem.with_suffix(".json").read_text())
    for r in rows:
        for mode, g in r["goal"].items():
            sb.log(f"goal {r['model']} {mode}: selected {g['selected_ratio']:.2f}x (kept {r['selected_kept']}); "
                   f">= {GOAL_KEPT}x where kept: {g['kept_goal']}; never slower: {g['never_slower']}")
    sb.log(f"fp8 training: {'PASS' if result['passed'] else 'FAIL'}; results: {stem.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
