"""``python -m harness.report``: paper-style tables and plots from a results store.

    python -m harness.report --results results                         # markdown on stdout, files in results/report/
    python -m harness.report --results results --study default --format latex --out paper/

For each model and evaluation protocol it prints, per dataset, a pivot of the chosen metric (rows:
method × bits, columns: group size × act-order, the unquantized baseline on top, the best value of
each column within a bit width in bold) and one trade-off table (the metric against bits per weight
including the scale/zero overhead, weight memory and latency where measured). Into ``--out`` it
writes the same tables and PNG plots: the metric against bits per weight with the Pareto front, and
a per-module error heatmap of one run. Only successful runs count; the latest run of a config wins.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

MISSING = "–"
FORMATS = ("md", "latex", "csv")
DECIMALS = {"ppl": 2, "perplexity": 2, "nll": 3, "acc": 4, "acc_norm": 4, "exact_match": 4}
METRIC_NAMES = {"ppl": "perplexity", "nll": "NLL", "acc": "accuracy", "acc_norm": "normalised accuracy"}
ERROR_DIAGNOSTICS = ("output_rel_err", "weight_rel_err", "loss")  # what the heatmap shows, first found
GROUP_BY = ["_model", "_dtype", "_eval"]  # one set of tables per model, dtype and evaluation protocol


@dataclass
class Table:
    """A rendered-ready table: cell strings, ``bold`` cells as (row, column) pairs."""

    name: str  # file stem
    title: str
    columns: list[str]
    rows: list[list[str]]
    label_columns: int = 2  # left-aligned leading columns; the rest are numbers
    bold: set[tuple[int, int]] = field(default_factory=set)
    rule_after: int | None = None  # a rule under this row (the baseline)
    notes: list[str] = field(default_factory=list)


def select(df: pd.DataFrame, study: str | None = None) -> pd.DataFrame:
    """The successful runs (of ``study``), the latest of each result-relevant config, with helper
    columns ``_model``, ``_dtype``, ``_eval``, ``_method``, ``_bits``, ``_group``, ``_act`` and ``_label``."""
    import pandas as pd

    if df.empty:
        return df
    df = df[df["status"] == "ok"]
    if study is not None:
        df = df[df["study"] == study]
    df = df.drop_duplicates("relevant", keep="last").copy()
    df["_model"] = _col(df, "model.name", "?")
    df["_dtype"] = _col(df, "model.dtype", "?")
    df["_eval"] = _col(df, "protocol.eval", "?")
    df["_method"] = _col(df, "relevant.quantizer.method", "?")
    bits, group, act = (_col(df, f"relevant.quantizer.{k}", None) for k in ("bits", "group_size", "desc_act"))
    # a loaded GPTQ checkpoint evaluated as is: its setting comes from its quantization_config
    ckpt = [fmt == "gptq" for fmt in _col(df, "model.checkpoint_format", None)]
    if any(ckpt):
        qc = {k: list(_col(df, f"model.quantization_config.{k}", None)) for k in ("bits", "group_size", "desc_act")}
        df["_method"] = ["gptq checkpoint" if c else m for c, m in zip(ckpt, df["_method"], strict=True)]
        bits = [qc["bits"][i] if c else b for i, (c, b) in enumerate(zip(ckpt, bits, strict=True))]
        group = [(None if qc["group_size"][i] == -1 else qc["group_size"][i]) if c else g
                 for i, (c, g) in enumerate(zip(ckpt, group, strict=True))]
        act = [qc["desc_act"][i] if c else a for i, (c, a) in enumerate(zip(ckpt, act, strict=True))]
    # object columns: pandas would turn whole numbers with gaps into floats and None into NaN
    df["_bits"] = pd.Series([_int(b) for b in bits], index=df.index, dtype=object)
    df["_group"] = pd.Series([_int(g) for g in group], index=df.index, dtype=object)
    # act-order: True/False for methods that have it, None for those that do not (RTN, fp16)
    df["_act"] = pd.Series([_flag(v) for v in act], index=df.index, dtype=object)
    df["_label"] = _labels(df)
    return df


def pivot_tables(df: pd.DataFrame, metric: str = "ppl") -> list[Table]:
    """Per model (and dtype), evaluation protocol and dataset: rows method × bits, columns group size ×
    act-order, the baseline on top."""
    tables = []
    for (model, dtype, ev), part in df.groupby(GROUP_BY, sort=False, dropna=False):
        quant = part[part["_method"] != "fp16"]
        base = part[part["_method"] == "fp16"]
        columns = sorted({(g, a is True) for g, a in zip(quant["_group"], quant["_act"], strict=True)},
                         key=lambda c: (c[0] is not None, -(c[0] or 0), c[1]))
        columns = columns or [(None, False)]
        for ds in _datasets(part, metric):
            key = f"{ds}/{metric}"
            rows, bold, values = [], set(), []
            for _, b in base.iterrows():
                rows.append(["fp16", str(_dtype_bits(b))] + [_fmt(b.get(key), metric)] * len(columns))
            row_keys = list(dict.fromkeys(zip(quant["_label"], quant["_bits"], strict=True)))
            row_keys.sort(key=lambda k: (-(k[1] or 0), _method_rank(quant, k[0])))
            for label, bits in row_keys:
                cells, nums = [], []
                for g, a in columns:
                    hit = quant[(quant["_label"] == label) & (quant["_bits"] == bits)
                                & (quant["_group"].map(lambda x, g=g: x == g))
                                & (quant["_act"].map(lambda x, a=a: (x is True) == a))]
                    v = hit.iloc[-1].get(key) if len(hit) else None
                    cells.append(_fmt(v, metric))
                    nums.append(None if v is None or v != v else float(v))
                rows.append([label, str(bits)] + cells)
                values.append((bits, nums))
            bold = _best_cells(values, len(base), metric)
            title = f"{model} ({dtype}) · {ds} {METRIC_NAMES.get(metric, metric)} · evaluation: {ev}"
            tables.append(Table(name=_slug(f"pivot_{model}_{dtype}_{ds}_{metric}"), title=title,
                                columns=["Method", "Bits"] + [_column_name(g, a) for g, a in columns], rows=rows,
                                bold=bold, rule_after=len(base) - 1 if len(base) else None,
                                notes=_notes(part, metric)))
    return tables


def tradeoff_tables(df: pd.DataFrame, metric: str = "ppl") -> list[Table]:
    """Per model (and dtype) and evaluation protocol: every run's metric against its storage cost and latency."""
    tables = []
    for (model, dtype, ev), part in df.groupby(GROUP_BY, sort=False, dropna=False):
        datasets = _datasets(part, metric)
        # decode ms/token with a KV cache at the smallest measured batch (eval.latency=true)
        pattern = re.compile(r"latency/decode_bs(\d+)_ms_per_token")
        decode = sorted((int(m.group(1)), c) for c in part.columns
                        if (m := pattern.fullmatch(str(c))) and part[c].notna().any())
        latency = decode[0][1] if decode else None
        part = part.sort_values("bits_per_weight", ascending=False, na_position="last", kind="stable")
        rows = []
        for _, r in part.iterrows():
            group = MISSING if r["_method"] == "fp16" else _column_name(r["_group"], False)
            act = {True: "yes", False: "no"}.get(r["_act"], MISSING)
            bits = str(_dtype_bits(r)) if r["_method"] == "fp16" else str(r["_bits"])
            mib = r.get("weight_bytes")
            rows.append([r["_label"], bits, group, act, _fmt(r.get("bits_per_weight"), "bpw"),
                         _fmt(None if mib is None else mib / 2**20, "mib"),
                         _fmt(r.get(latency) if latency else None, "ms")]
                        + [_fmt(r.get(f"{ds}/{metric}"), metric) for ds in datasets])
        columns = ["Method", "Bits", "Group", "Act-order", "Bits/weight", "Weights (MiB)", "Latency (ms)"]
        columns += [f"{ds} {metric}" for ds in datasets]
        notes = ["bits/weight counts one 16-bit scale and one bits-bit zero per group and row; weights (MiB) adds "
                 "the unquantized parameters at the model's dtype"] + _notes(part, metric, bold=False)
        if latency:
            notes.append(f"latency: decode ms/token with a KV cache at batch {decode[0][0]} "
                         "(the record's latency/*_path names the kernel that ran)")
        tables.append(Table(name=_slug(f"tradeoff_{model}_{dtype}"), title=f"{model} ({dtype}) · trade-off · "
                            f"evaluation: {ev}",
                            columns=columns, rows=rows, label_columns=4, notes=notes))
    return tables


def render(table: Table, fmt: str = "md") -> str:
    """One table as Markdown (``md``), LaTeX (booktabs) or CSV (plain values, no marks)."""
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(table.columns)
        writer.writerows([["" if c == MISSING else c for c in row] for row in table.rows])
        return buf.getvalue().rstrip("\n")
    if fmt == "latex":
        return _latex(table)
    from tabulate import tabulate

    rows = [[f"**{c}**" if (i, j) in table.bold else c for j, c in enumerate(row)] for i, row in enumerate(table.rows)]
    align = ["left"] * table.label_columns + ["right"] * (len(table.columns) - table.label_columns)
    body = tabulate(rows, headers=table.columns, tablefmt="github", disable_numparse=True, colalign=align)
    notes = "".join(f"\n- {n}" for n in table.notes)
    return f"#### {table.title}\n\n{body}\n{notes}".rstrip("\n")


def plot_pareto(df: pd.DataFrame, out: Path, metric: str = "ppl") -> list[Path]:
    """Per model, protocol and dataset: the metric against bits per weight, the Pareto front drawn."""
    plt = _pyplot()
    written = []
    for (model, dtype, _ev), part in df.groupby(GROUP_BY, sort=False, dropna=False):
        for ds in _datasets(part, metric):
            key = f"{ds}/{metric}"
            pts = part[part["bits_per_weight"].notna() & part[key].notna()]
            if pts.empty:
                continue
            lower = _lower_is_better(metric)
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            for method, group in pts.groupby("_method", sort=False):
                ax.scatter(group["bits_per_weight"], group[key], label=method, zorder=3)
                for _, r in group.iterrows():
                    ax.annotate(_point_label(r), (r["bits_per_weight"], r[key]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
            front = pareto_front(list(zip(pts["bits_per_weight"], pts[key], strict=True)), lower)
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=1, ls="--",
                    label="Pareto front", zorder=2)
            if pts[key].min() > 0 and pts[key].max() / pts[key].min() > 10:
                ax.set_yscale("log")
            ax.set(xlabel="bits per weight (incl. scale/zero)", ylabel=f"{ds} {metric}",
                   title=f"{model} ({dtype}): {ds} {metric}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            path = out / f"{_slug(f'pareto_{model}_{dtype}_{ds}_{metric}')}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool = True) -> list[tuple[float, float]]:
    """The points (cost, metric) not beaten by a cheaper-or-equal point, by increasing cost."""
    front: list[tuple[float, float]] = []
    for cost, value in sorted(points, key=lambda p: (p[0], p[1] if lower_is_better else -p[1])):
        if not front or (value < front[-1][1] if lower_is_better else value > front[-1][1]):
            front.append((cost, value))
    return front


def plot_module_errors(record: dict[str, Any], out: Path) -> Path | None:
    """Heatmap of one run's per-module error: decoder layers × linear modules (log colour scale)."""
    modules = record.get("modules") or []
    # the first error measure the run has with a non-zero value (a float32 run may report zeros)
    stat = next((s for s in ERROR_DIAGNOSTICS if any(m.get(s) for m in modules)), None)
    if stat is None:
        return None
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    names = list(dict.fromkeys(m["name"] for m in modules))
    layers = sorted({m["layer"] for m in modules})
    grid = np.full((len(layers), len(names)), np.nan)
    for m in modules:
        if m.get(stat) is not None:
            grid[layers.index(m["layer"]), names.index(m["name"])] = m[stat]
    positive = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(positive.min(), positive.max()) if positive.size and positive.max() > positive.min() else None
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(names), 1.5 + 0.28 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax.set(ylabel="decoder layer", title=f"{_record_label(record)}: {stat}")
    fig.colorbar(im, ax=ax, label=stat)
    if grid.size <= 120:  # small grids get their numbers written in
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="white")
    path = out / f"module_errors_{str(record.get('run_id', 'run'))[:8]}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- helpers ---------------------------------------------------------------------------------------

def _col(df: pd.DataFrame, name: str, default: Any) -> list[Any]:
    return list(df[name]) if name in df else [default] * len(df)


def _int(v: Any) -> int | None:
    return None if v is None or v != v else int(v)


def _flag(v: Any) -> bool | None:
    """A boolean cell as True/False, a gap (None or NaN) as None."""
    return None if v is None or (isinstance(v, float) and v != v) else bool(v)


def _dtype_bits(row: Any) -> int | str:
    from harness.results import DTYPE_BITS

    return DTYPE_BITS.get(str(row.get("model.dtype")), 16)


def _labels(df: pd.DataFrame) -> list[str]:
    """Method names, with the settings that tell apart runs of one method in one table (``gptq sym``)."""
    skip = {"method", "bits", "group_size", "desc_act"}
    fields = [c for c in df.columns if (c.startswith("relevant.quantizer.") and c.split(".")[-1] not in skip)
              or c.startswith("relevant.calib.")]
    labels = []
    for _, r in df.iterrows():
        same = df[(df["_model"] == r["_model"]) & (df["_dtype"] == r["_dtype"]) & (df["_eval"] == r["_eval"])
                  & (df["_method"] == r["_method"])]
        parts = [r["_method"]]
        for f in fields:
            if same[f].astype(str).nunique() > 1:
                name, v = f.split(".", 2)[-1], r[f]
                if v is not False:  # a switch shows when on: "gptq" and "gptq sym"
                    parts.append(name if v is True else f"{name}={_plain(v)}")
        labels.append(" ".join(parts))
    return labels


def _plain(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v == v and v.is_integer() else str(v)


def _method_rank(df: pd.DataFrame, label: str) -> int:
    order = list(dict.fromkeys(df["_label"]))
    return order.index(label)


def _datasets(df: pd.DataFrame, metric: str) -> list[str]:
    return [c[: -len(metric) - 1] for c in df.columns if c.endswith(f"/{metric}") and not c.startswith("modules/")
            and df[c].notna().any()]


def _column_name(group: int | None, act: bool) -> str:
    return ("per-channel" if group is None else f"g{group}") + (" act-order" if act else "")


def _lower_is_better(metric: str) -> bool:
    from harness.regress import DEFAULT_TOLERANCES, tolerance_for

    tol = tolerance_for(metric, DEFAULT_TOLERANCES)
    return True if tol is None else tol.lower_is_better


def _best_cells(values: list[tuple[Any, list[float | None]]], offset: int, metric: str) -> set[tuple[int, int]]:
    """Bold cells: per column and bit width, the best value when at least two rows have one."""
    bold = set()
    pick = min if _lower_is_better(metric) else max
    for bits in {b for b, _ in values}:
        idx = [i for i, (b, _) in enumerate(values) if b == bits]
        for j in range(len(values[idx[0]][1])):
            col = [(i, values[i][1][j]) for i in idx if values[i][1][j] is not None]
            if len(col) < 2:
                continue
            best = pick(v for _, v in col)
            bold |= {(offset + i, 2 + j) for i, v in col if v == best}
    return bold


def _fmt(v: Any, kind: str) -> str:
    if v is None or v != v:
        return MISSING
    decimals = {"bpw": 2, "mib": 2, "ms": 2}.get(kind, DECIMALS.get(kind, 4))
    return f"{float(v):.{decimals}f}"


def _notes(part: pd.DataFrame, metric: str, bold: bool = True) -> list[str]:
    notes = []
    reduced = part[_col_series(part, "protocol.label") == "reduced"]
    if len(reduced):
        calib = sorted({c for c in _col(reduced, "protocol.calib", "none") if c and c != "none"})
        notes.append("reduced protocol (not the paper's)" + (f": calibration {', '.join(calib)}" if calib else ""))
    if (part["_method"] == "fp16").any():
        dtypes = sorted({str(d) for d in _col(part[part["_method"] == "fp16"], "model.dtype", "?")})
        if dtypes != ["float16"]:
            notes.append(f"fp16 = the unquantized model at {', '.join(dtypes)}")
    pre = sorted({str(p) for p in _col(part, "model.weights_prequantized", None) if p and p == p})
    notes += [f"weights already quantized once ({p}) before this study" for p in pre]
    if bold and len(part[part["_method"] != "fp16"]) > 1:
        notes.append(f"bold: best {metric} per column within a bit width")
    return notes


def _col_series(df: pd.DataFrame, name: str) -> Any:
    import pandas as pd

    return df[name] if name in df else pd.Series([None] * len(df), index=df.index)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _point_label(r: Any) -> str:
    if r["_method"] == "fp16":
        return "fp16"
    return f"w{r['_bits']}" + ("" if r["_group"] is None else f" g{r['_group']}") + (" act" if r["_act"] else "")


def _record_label(rec: dict[str, Any]) -> str:
    from harness.tables import setting

    s = setting(rec)
    act = " act-order" if s["act-order"] == "yes" else ""
    return f"{(rec.get('model') or {}).get('name', '?')} {s['method']} w{s['bits']} {s['group']}{act}"


def _latex(table: Table) -> str:
    def esc(text: str) -> str:
        text = text.replace("\\", r"\textbackslash{}")
        text = re.sub(r"([&%$#_{}])", r"\\\1", text)
        text = text.replace("~", r"\textasciitilde{}").replace("^", r"\^{}").replace(MISSING, "--")
        return text.replace("×", r"$\times$").replace("·", "--")

    spec = "l" * table.label_columns + "r" * (len(table.columns) - table.label_columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(table.title)}}}", rf"\begin{{tabular}}{{{spec}}}",
             r"\toprule", " & ".join(esc(c) for c in table.columns) + r" \\", r"\midrule"]
    for i, row in enumerate(table.rows):
        cells = [rf"\textbf{{{esc(c)}}}" if (i, j) in table.bold else esc(c) for j, c in enumerate(row)]
        lines.append(" & ".join(cells) + r" \\")
        if table.rule_after == i and i < len(table.rows) - 1:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par\footnotesize {esc(n)}" for n in table.notes]
    lines.append(r"\end{table}")
    return "\n".join(lines)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _find_record(results_dir: Path, run_id: str) -> dict[str, Any] | None:
    from harness import results

    hits = [r for r in results.iter_records(results_dir) if str(r.get("run_id", "")).startswith(run_id)]
    return hits[-1] if hits else None


def run(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status."""
    from harness import results

    p = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True, type=Path, help="a results_dir (holds runs.jsonl)")
    p.add_argument("--study", help="only the runs of this study")
    p.add_argument("--format", choices=FORMATS, default="md", help="table format (default md)")
    p.add_argument("--out", type=Path, help="where tables and PNG plots go (default <results>/report)")
    p.add_argument("--metric", default="ppl", help="the metric of the tables, per dataset (default ppl)")
    p.add_argument("--heatmap-run", metavar="RUN_ID", help="run (id or prefix) of the module heatmap "
                   "(default: the latest quantized run)")
    args = p.parse_args(argv)

    if not results.store_path(args.results).exists():
        raise UserError("--results", f"no {results.STORE} in {args.results}", "give the results_dir of harness runs")
    problems: list[str] = []
    df = results.load(args.results, problems)
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    runs = select(df, args.study)
    if runs.empty:
        studies = sorted({str(s) for s in df.get("study", []) if s and s == s}) if not df.empty else []
        where = f" of study {args.study!r}" if args.study else ""
        raise UserError("--study" if args.study else "--results", f"no successful run{where} in {args.results}",
                        f"known studies: {', '.join(studies)}" if studies else "run `python -m harness` first")
    tables = pivot_tables(runs, args.metric) + tradeoff_tables(runs, args.metric)
    print("\n\n".join((f"# {t.title}\n" if args.format == "csv" else "") + render(t, args.format) for t in tables))

    out = args.out or args.results / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = _write_tables(tables, args.format, out)
    # how a pooled sweep used its GPUs: an operational table, kept apart from the paper tables
    pooled = [r for r in results.iter_records(args.results) if not args.study or r.get("study") == args.study]
    devices = device_table(pooled)
    if devices:
        (out / "devices.md").write_text(render(devices, "md") + "\n")
        written.append(out / "devices.md")
    written += plot_pareto(runs, out, args.metric)
    quantized = runs[runs["_method"] != "fp16"]
    run_id = args.heatmap_run or (str(quantized.iloc[-1]["run_id"]) if len(quantized) else None)
    if run_id:
        rec = _find_record(args.results, run_id)
        if rec is None:
            raise UserError("--heatmap-run", f"no run {run_id!r} in {args.results}", "give a run_id from runs.jsonl")
        heat = plot_module_errors(rec, out)
        written += [heat] if heat else []
    print(f"wrote {len(written)} files to {out}: {', '.join(p.name for p in written)}", file=sys.stderr)
    return 0


def device_table(records: list[dict]) -> Table | None:
    """How the runs of a pooled sweep used the devices (:func:`harness.slots.occupancy`): per GPU its
    device, slots, jobs and busy seconds, and as notes the span and any jobs that overlapped on one
    GPU. None when no record holds a slot (runs outside a pooled sweep)."""
    from harness.slots import occupancy

    occ = occupancy(records)
    if not occ["jobs"]:
        return None
    rows = [[gpu, ", ".join(info["device"]), ", ".join(map(str, info["slots"])), str(info["jobs"]),
             f"{info['busy_s']:.1f}", f"{info['busy_s'] / occ['span_s']:.0%}" if occ["span_s"] else MISSING]
            for gpu, info in occ["gpus"].items()]
    overlaps = (f"{len(occ['overlaps'])} pairs of jobs overlapped on one GPU: "
                + ", ".join(f"{a[:8]}/{b[:8]}" for a, b in occ["overlaps"][:5])) if occ["overlaps"] else \
        "no two jobs overlapped on one GPU"
    return Table("devices", "Devices of the sweep", ["GPU", "device", "slots", "jobs", "busy s", "busy / span"], rows,
                 label_columns=3, notes=[f"{occ['jobs']} jobs from the first start to the last finish: "
                                         f"{occ['span_s']:.1f} s; the jobs' own times add up to {occ['job_s']:.1f} s",
                                         overlaps])


def _write_tables(tables: list[Table], fmt: str, out: Path) -> list[Path]:
    if fmt == "csv":
        paths = []
        for t in tables:
            path = out / f"{t.name}.csv"
            path.write_text(render(t, "csv") + "\n")
            paths.append(path)
        return paths
    path = out / ("tables.tex" if fmt == "latex" else "tables.md")
    path.write_text("\n\n".join(render(t, fmt) for t in tables) + "\n")
    return [path]


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line and exit status 2."""
    try:
        sys.exit(run(argv))
    except UserError as exc:
        print(f"error: {exc.line()}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

