"""A run's metrics.json, written atomically and rendered as one table a person can trust.

metrics.json (filled by the runner; every key optional, the table skips what is missing):

    recipe            str                 recipe name
    run_dir           str                 outputs/<recipe>/<hash>/seed_<n>
    seed              int
    test_acc, val_acc float in [0, 1] (the final, compressed model)
                      or {"dense": float, "compressed": float}
    test_ppl, test_bpb, val_*  language models: perplexity, bits per byte (and test_loss, NLL per token)
    sparsity          measure.sparsity_report(...) without "layers":
                      {"sparsity", "prunable_weights", "nonzero_prunable", "params_total", "params_nonzero"}
    target_sparsity   float               what the recipe asked for
    layers            {qualified_name: {"shape", "numel", "sparsity"}}   (not shown in the table)
    flops             {"dense", "compressed", "effective"}   FLOPs per sample; "effective" counts the
                      compressed model's zeros as skipped
    speed             measure.compare_dense_compressed(...) output: "device_name", "batch_size",
                      "dense"/"compressed" {"latency_ms", "latency_p90_ms", "throughput", "peak_mem_bytes",
                      "params", "params_nonzero", "size_bytes", "sparse_size_bytes", ["train_step_ms"]},
                      "speedup", "flops_ratio", "memory_ratio", "notes"
    train_time_s      float               all stages
    stages            [{"name", "time_s", "val_acc", "test_acc", "epochs", ...}] (compressors add keys,
                      e.g. IMP's "weights_remaining", "hamming", "early_stop_step")
    compressors       {name: report dict}  (scalars shown; lists/dicts left to the json)
    device            str                 e.g. "cuda:0"
    kernels           {layer or op: kernel chosen}
    notes             [str]               shown under the table, with speed["notes"]

The "gain" column is oriented so that > 1× is better: dense/compressed for costs (time, memory, FLOPs,
params, bytes), compressed/dense for throughput; accuracy shows the change in percentage points.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from effml.errors import EffmlError
from effml.paths import atomic_write_text

MiB = 2**20


# --------------------------------------------------------------------------- number formatting


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def _si(n: float | None, unit: str = "") -> str:
    """266610 -> '266.6k', 5.3e8 -> '530.0M' (FLOPs, parameter counts)."""
    if n is None:
        return ""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _mib(b: float | None) -> str:
    return "" if b is None else f"{b / MiB:.2f} MiB"


def _ms(x: float | None) -> str:
    return "" if x is None else f"{x:.3g} ms"


def _x(r: float | None) -> str:
    return "" if r is None or not math.isfinite(r) else f"{r:.2f}×"


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _pair(value: Any) -> tuple[Any, Any]:
    """(dense, compressed) from either a {"dense", "compressed"} dict or a plain compressed value."""
    if isinstance(value, Mapping):
        return value.get("dense"), value.get("compressed")
    return None, value


# --------------------------------------------------------------------------- table sections

Row = tuple[str, str, str, str]  # metric, dense, compressed, gain


def _accuracy_rows(m: Mapping[str, Any]) -> list[Row]:
    rows = []
    for key, label in (("test_acc", "test accuracy"), ("val_acc", "val accuracy")):
        if key not in m:
            continue
        d, c = _pair(m[key])
        delta = f"{100 * (c - d):+.2f} pt" if d is not None and c is not None else ""
        rows.append((label, _pct(d), _pct(c), delta))
    return rows


LM_METRICS = (("ppl", "perplexity", "{:.2f}"), ("bpb", "bits per byte", "{:.4f}"), ("loss", "loss (nats/token)", "{:.4f}"))


def _language_model_rows(m: Mapping[str, Any]) -> list[Row]:
    """Perplexity, bits per byte and loss of a language model (lower is better), test then val."""
    if "test_ppl" not in m:
        return []
    return [(f"{split} {label}", "", fmt.format(m[f"{split}_{key}"]), "")
            for split in ("test", "val") for key, label, fmt in LM_METRICS if m.get(f"{split}_{key}") is not None]


def _cost_row(label: str, dense: float | None, comp: float | None, fmt, gain: float | None = None) -> Row:
    """A row where less is better: gain = dense / compressed unless given."""
    return (label, fmt(dense), fmt(comp), _x(gain if gain is not None else _div(dense, comp)))


def _weight_rows(m: Mapping[str, Any]) -> list[Row]:
    sp, speed = m.get("sparsity") or {}, m.get("speed") or {}
    d, c = speed.get("dense") or {}, speed.get("compressed") or {}
    rows = []
    if "sparsity" in sp or "sparsity" in c:
        target = m.get("target_sparsity")
        got = sp.get("sparsity", c.get("sparsity"))
        goal = f"target {_pct(target)}" if target is not None else ""
        rows.append(("sparsity (prunable weights)", _pct(d.get("sparsity")), _pct(got), goal))
    dense_params = d.get("params", sp.get("params_total"))
    nonzero = c.get("params_nonzero", sp.get("params_nonzero"))
    if dense_params is not None or nonzero is not None:
        rows.append(_cost_row("parameters (nonzero)", dense_params, nonzero, _si))
    for key, label in (
        ("size_bytes", "model size (dense storage)"),
        ("sparse_size_bytes", "model size (CSR est.)"),
    ):
        if key in d or key in c:
            rows.append(_cost_row(label, d.get(key), c.get(key), _mib))
    return rows


def _flops_rows(m: Mapping[str, Any]) -> list[Row]:
    f = m.get("flops") or {}
    rows = []
    if "dense" in f or "compressed" in f:
        rows.append(_cost_row("FLOPs / sample", f.get("dense"), f.get("compressed"), _si))
    if "effective" in f:
        rows.append(_cost_row("FLOPs / sample, zeros skipped", f.get("dense"), f["effective"], _si))
    return rows


def _speed_rows(m: Mapping[str, Any]) -> list[Row]:
    speed = m.get("speed") or {}
    d, c = speed.get("dense") or {}, speed.get("compressed") or {}
    if not d and not c:
        return []
    bs = speed.get("batch_size")
    rows = [
        _cost_row(
            f"latency, batch {bs} (median)",
            d.get("latency_ms"),
            c.get("latency_ms"),
            _ms,
            speed.get("speedup"),
        ),
        _cost_row("latency p90", d.get("latency_p90_ms"), c.get("latency_p90_ms"), _ms),
        # Throughput: more is better, so the gain is compressed / dense.
        _cost_row(
            "throughput (samples/s)",
            d.get("throughput"),
            c.get("throughput"),
            _si,
            _div(c.get("throughput"), d.get("throughput")),
        ),
        _cost_row(
            "peak memory (inference)",
            d.get("peak_mem_bytes"),
            c.get("peak_mem_bytes"),
            _mib,
            speed.get("memory_ratio"),
        ),
    ]
    if "train_step_ms" in d or "train_step_ms" in c:
        rows.append(
            _cost_row(
                "train step (median)",
                d.get("train_step_ms"),
                c.get("train_step_ms"),
                _ms,
                speed.get("train_speedup"),
            )
        )
    for key, label in (("tokens_per_s", "tokens/s (inference)"), ("train_tokens_per_s", "tokens/s (training)")):
        if key in d or key in c:  # language models: more is better
            rows.append(_cost_row(label, d.get(key), c.get(key), _si, _div(c.get(key), d.get(key))))
    return rows


def _scalar(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int | str):
        return str(v)
    return None  # lists and dicts stay in the json


def _run_rows(m: Mapping[str, Any]) -> list[Row]:
    rows = []
    if "train_time_s" in m:
        rows.append(("train time", "", f"{m['train_time_s']:.1f} s", ""))
    for st in m.get("stages") or []:
        bits = [
            f"{st['time_s']:.1f} s" if st.get("time_s") is not None else "",
            f"val {_pct(st['val_acc'])}" if st.get("val_acc") is not None else "",
            f"test {_pct(st['test_acc'])}" if st.get("test_acc") is not None else "",
            f"val ppl {st['val_ppl']:.2f}" if st.get("val_ppl") is not None else "",
            f"{st['epochs']} ep" if st.get("epochs") is not None else "",
            f"{_pct(st['weights_remaining'])} weights" if st.get("weights_remaining") is not None else "",
        ]
        rows.append((f"stage {st.get('name', '?')}", "", ", ".join(b for b in bits if b), ""))
    for name, rep in (m.get("compressors") or {}).items():
        for key, v in (rep or {}).items():
            if (s := _scalar(v)) is not None:
                rows.append((f"{name}.{key}", "", s, ""))
    for key, v in (m.get("kernels") or {}).items():
        rows.append((f"kernel {key}", "", _kernel_value(key, v), ""))
    return rows


def _kernel_value(key: str, v: Any) -> str:
    """One line per kernel entry: the attention choice with its reason, the layers as counts."""
    if key == "attention":
        return f"{v['kernel']}: {v['reason']}"
    if key in ("layers", "training"):
        counts: dict[str, int] = {}
        for d in v:
            label = d["kernel"] + (" (forced)" if d.get("forced") else "")
            counts[label] = counts.get(label, 0) + 1
        return ", ".join(f"{n} {k}" for k, n in counts.items())
    return str(v)


# --------------------------------------------------------------------------- public API


def _notes(m: Mapping[str, Any]) -> list[str]:
    notes = [*(m.get("notes") or []), *((m.get("speed") or {}).get("notes") or [])]
    return list(dict.fromkeys(notes))  # keep order, drop duplicates


def summary_table(metrics: Mapping[str, Any]) -> Table:
    """One table: metric | dense | compressed | gain, in sections; notes as the caption."""
    m = metrics
    title = " · ".join(str(s) for s in (m.get("recipe"), f"seed {m['seed']}" if "seed" in m else None) if s)
    speed = m.get("speed") or {}
    device = speed.get("device_name") or m.get("device")
    notes = _notes(m)
    caption = "\n".join([*(f"⚠ {n}" for n in notes), *([f"run: {m['run_dir']}"] if m.get("run_dir") else [])])
    # Text, not str: a note with [brackets] must not be read as rich markup.
    table = Table(
        title=title or "effml run", caption=Text(caption) if caption else None, caption_justify="left"
    )
    table.add_column("metric")
    table.add_column(m.get("speed_reference", "dense"), justify="right")  # a distilled student: its teacher
    table.add_column("compressed", justify="right")
    table.add_column("gain", justify="right")
    sections = [
        _accuracy_rows(m) + _language_model_rows(m),
        _weight_rows(m),
        _flops_rows(m),
        [(f"measured on {device}", "", "", "")] + _speed_rows(m) if _speed_rows(m) else [],
        _run_rows(m),
    ]
    for rows in (s for s in sections if s):
        if table.row_count:
            table.add_section()
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))  # Text: brackets in names are not markup
    return table


def print_summary(metrics: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the summary table to `console` (a new stdout Console by default)."""
    (console or Console()).print(summary_table(metrics))


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; floats to 6 significant digits; NaN/inf to null; tensors/arrays to lists."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return _jsonable(obj.tolist())
    return str(obj)  # Path, torch.dtype, torch.device, ...


def write_metrics(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write metrics.json atomically (effml.paths.atomic_file).

    A reader (or a crashed run) never sees half a file.
    """
    return atomic_write_text(Path(path), json.dumps(_jsonable(metrics), indent=2, allow_nan=False) + "\n")


def load_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """Read a metrics.json; a missing or broken file is an EffmlError that says which."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EffmlError(f"{path}: no metrics.json (did the run finish?)") from None
    except json.JSONDecodeError as e:
        raise EffmlError(f"{path}: not valid JSON ({e}); delete it and rerun the run") from None


def runs_table(runs: list[Mapping[str, Any]]) -> Table:
    """One row per finished run: what `effml report outputs/<recipe>` prints for a sweep."""
    table = Table(title=f"{len(runs)} runs")
    for column in ("recipe", "hash", "seed", "test acc | ppl", "sparsity", "FLOPs gain", "speedup", "train time"):
        table.add_column(column, justify="left" if column in ("recipe", "hash") else "right", no_wrap=column == "hash")
    for m in runs:
        flops, speed = m.get("flops") or {}, m.get("speed") or {}
        acc = m.get("test_acc")
        acc = acc.get("compressed") if isinstance(acc, Mapping) else acc
        table.add_row(
            str(m.get("recipe", "")), str(m.get("hash", "")), str(m.get("seed", "")),
            _pct(acc) if acc is not None or "test_ppl" not in m else f"ppl {m['test_ppl']:.2f}",
            _pct((m.get("sparsity") or {}).get("sparsity")),
            _x(_div(flops.get("dense"), flops.get("effective"))), _x(speed.get("speedup")),
            f"{m['train_time_s']:.1f} s" if m.get("train_time_s") is not None else "",
        )
    return table
