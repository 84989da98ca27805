"""Decode-time KV-cache memory and tokens/s of MHA, GQA and MQA, measured (issue 20, table ``gqa``).

Ainslie et al., GQA (arXiv 2305.13245) Fig. 3 / Table 1: GQA decodes at close to MQA's speed, because
incremental decoding reads the whole KV cache at every step and the cache shrinks by heads / K/V heads.
This builds effml's Llama-style LM (``effml.models.causal_lm``) at each K/V head count, converted
from the same multi-head weights by ``compressors.gqa.convert`` (speed and memory do not depend on the
values: random weights), and runs a greedy decode loop with HF's ``DynamicCache``: a prefill of
``prompt`` tokens, then ``new`` steps of one token per sequence. Measured per variant:

- KV-cache bytes: the bytes of every key and value tensor the cache holds at the end of decoding;
- decode tokens/s: batch × new tokens / the median wall time of the decode steps (prefill excluded),
  over ``rounds`` rounds, the variants interleaved within each round (the same clocks and load).

    python benchmarks/gqa_decode.py            # CPU: the table's model (8 heads of 16), short and long context
    python benchmarks/gqa_decode.py --smoke    # tiny shapes, seconds: the code path (tests)

Results: benchmarks/results/gqa_decode_<device>.json and .md (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/_checkout.py, however this is run
import structured_bert as sb  # noqa: E402  (use_checkout() runs there: effml from this checkout)

from effml.compressors.gqa import cache_argument, cache_bytes, convert  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# case: model shape (hidden, layers, heads, ffn, vocab), batch, prompt, new tokens, K/V head counts
CASES = {
    "table model, short context": dict(shape=(128, 4, 8, 512, 2048), batch=8, prompt=64, new=64, kv=(8, 2, 1)),
    "table model, long context": dict(shape=(128, 4, 8, 512, 2048), batch=8, prompt=1024, new=64, kv=(8, 2, 1)),
}
GPU_CASES = {
    "lm_base shape (768, 12 heads), long context": dict(shape=(768, 12, 12, 2048, 2048), batch=32, prompt=2048,
                                                        new=128, kv=(12, 2, 1)),
}
SMOKE_CASES = {"smoke": dict(shape=(32, 2, 4, 64, 300), batch=2, prompt=8, new=4, kv=(4, 2, 1))}


def build(shape: tuple[int, ...], kv: int, device: torch.device) -> torch.nn.Module:
    from effml.data import DataInfo
    from effml.models.causal_lm import CausalLM, CausalLMConfig

    hidden, layers, heads, ffn, vocab = shape
    torch.manual_seed(0)  # the same multi-head weights for every variant, then pooled
    model = CausalLM.from_config(CausalLMConfig(hidden=hidden, layers=layers, heads=heads, ffn=ffn,
                                                max_positions=8192), DataInfo(num_classes=vocab, modality="text", task="lm"))
    convert(model, kv)
    return model.lm.eval().to(device)


@torch.inference_mode()
def decode(lm: torch.nn.Module, batch: int, prompt: int, new: int, device: torch.device) -> tuple[float, int]:
    """Seconds of ``new`` greedy decode steps after a prefill, and the cache's bytes at the end."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config)
    ids = torch.randint(0, lm.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    logits = lm(input_ids=ids, use_cache=True, **cache_argument(lm, cache)).logits
    sync(device)
    started = time.perf_counter()
    for _ in range(new):
        token = logits[:, -1:].argmax(-1)
        logits = lm(input_ids=token, use_cache=True, **cache_argument(lm, cache)).logits
    sync(device)
    return time.perf_counter() - started, cache_bytes(cache)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: dict[str, Any], device: torch.device, rounds: int) -> dict[str, Any]:
    models = {kv: build(case["shape"], kv, device) for kv in case["kv"]}
    for lm in models.values():  # warm-up: allocator, kernels
        decode(lm, case["batch"], case["prompt"], 2, device)
    times: dict[int, list[float]] = {kv: [] for kv in models}
    cache: dict[int, int] = {}
    for _ in range(rounds):
        for kv, lm in models.items():
            seconds, cache[kv] = decode(lm, case["batch"], case["prompt"], case["new"], device)
            times[kv].append(seconds)
    heads = case["shape"][2]
    tokens = case["batch"] * case["new"]
    variants = {}
    for kv in models:
        name = "MHA" if kv == heads else "MQA" if kv == 1 else f"GQA-{kv}"
        variants[name] = {"kv_heads": kv, "kv_cache_bytes": cache[kv], "decode_s": statistics.median(times[kv]),
                          "decode_tokens_per_s": tokens / statistics.median(times[kv])}
    mha = variants["MHA"]
    for v in variants.values():
        v["cache_vs_mha"] = v["kv_cache_bytes"] / mha["kv_cache_bytes"]
        v["speed_vs_mha"] = v["decode_tokens_per_s"] / mha["decode_tokens_per_s"]
    return {**{k: case[k] for k in ("batch", "prompt", "new")}, "shape": dict(zip(
        ("hidden", "layers", "heads", "ffn", "vocab"), case["shape"], strict=True)), "rounds": rounds, "variants": variants}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Decode-time KV cache and tokens/s: MHA vs GQA vs MQA", "",
             f"Device: {result['device']}, torch {result['torch']}, {result['dtype']}. Greedy decoding with HF's "
             "`DynamicCache` (benchmarks/gqa_decode.py); K/V heads mean-pooled from the same multi-head weights "
             "(`compressors.gqa.convert`). KV cache: measured bytes of the cache's tensors after the last step; "
             "tokens/s: batch × new tokens / median decode time (prefill excluded), variants interleaved.", ""]
    if result["device_type"] == "cpu":
        lines += ["CPU run on a machine shared with other jobs: the ratios, measured interleaved, are what to "
                  "read; absolute tokens/s move with the load.", ""]
    for name, r in result["cases"].items():
        s = r["shape"]
        lines += [f"## {name}: width {s['hidden']}, {s['layers']} layers, {s['heads']} heads, batch {r['batch']}, "
                  f"prompt {r['prompt']} + {r['new']} new tokens ({r['rounds']} rounds)", "",
                  "| variant | K/V heads | KV cache (MiB) | vs MHA | decode tokens/s | vs MHA |", "|---|---|---|---|---|---|"]
        for key, v in r["variants"].items():
            lines.append(f"| {key} | {v['kv_heads']} | {v['kv_cache_bytes'] / 2**20:.2f} | {v['cache_vs_mha']:.3f}× | "
                         f"{v['decode_tokens_per_s']:.0f} | {v['speed_vs_mha']:.2f}× |")
        lines.append("")
    lines.append(f"Total run time {result['elapsed_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sb.common_arguments(parser, RESULTS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds: the code path (tests)")
    args, device = sb.parse_arguments(parser, argv)
    from effml import measure

    started = time.perf_counter()
    cases = SMOKE_CASES if args.smoke else GPU_CASES if device.type == "cuda" else CASES
    rounds = 2 if args.smoke else args.rounds
    result = {"device": measure.device_name(device), "device_type": device.type, "torch": torch.__version__,
              "python": platform.python_version(), "dtype": "float32", "cases": {}}
    for name, case in cases.items():
        result["cases"][name] = run_case(case, device, rounds)
        sb.log(f"{name}: " + ", ".join(f"{k} {v['decode_tokens_per_s']:.0f} tok/s, {v['kv_cache_bytes'] / 2**20:.2f} MiB"
                                       for k, v in result["cases"][name]["variants"].items()))
    result["elapsed_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gqa_decode_{sb.slug(result['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(result))
    sb.log(f"gqa decode: results in {stem.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
