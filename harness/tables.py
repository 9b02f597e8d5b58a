"""Short run tables for the terminal (the report module builds the paper-style ones)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tabulate import tabulate


def setting(rec: dict[str, Any]) -> dict[str, Any]:
    """Readable quantizer setting of a record: method, bits, group, act-order, sym."""
    q = rec.get("relevant", {}).get("quantizer", {})
    method = q.get("method", "?")
    model = rec.get("model") or {}
    if model.get("checkpoint_format") == "gptq":  # a loaded GPTQ checkpoint, evaluated as is
        qc = model.get("quantization_config") or {}
        q = {**qc, "group_size": None if qc.get("group_size") == -1 else qc.get("group_size")}
        method = "gptq checkpoint"
    if method == "fp16":
        return {"method": "fp16", "bits": 16, "group": "–", "act-order": "–", "sym": "–"}
    gs = q.get("group_size")
    return {
        "method": method,
        "bits": q.get("bits"),
        "group": "per-channel" if gs is None else f"g{gs}",
        "act-order": "yes" if q.get("desc_act") else ("no" if "desc_act" in q else "–"),
        "sym": "sym" if q.get("sym") else "asym",
    }


def run_table(records: Iterable[dict[str, Any]], fmt: str = "github") -> str:
    """One row per record: the setting, each dataset's perplexity, and the time spent."""
    records = list(records)
    datasets: list[str] = []
    for r in records:
        for k in r.get("metrics", {}):
            if k.endswith("/ppl") and k[:-4] not in datasets:
                datasets.append(k[:-4])
    rows = []
    for r in records:
        row = {"model": r.get("model", {}).get("name", "?"), **setting(r)}
        for ds in datasets:
            v = r.get("metrics", {}).get(f"{ds}/ppl")
            row[f"{ds} ppl"] = "–" if v is None else f"{v:.2f}" if v < 1e4 else f"{v:.2e}"
        t = r.get("timings", {})
        row["quantize s"] = f"{t['quantize_s']:.1f}" if "quantize_s" in t else "–"
        row["total s"] = f"{t['total_s']:.1f}" if "total_s" in t else "–"
        row["status"] = r.get("status", "?")
        rows.append(row)
    table = tabulate(rows, headers="keys", tablefmt=fmt, disable_numparse=True)
    notes = _notes(records)
    return table + ("\n" + "\n".join(notes) if notes else "")


def _notes(records: list[dict[str, Any]]) -> list[str]:
    notes = []
    protocols = {(r.get("protocol") or {}).get("label") for r in records}
    reduced = [r.get("protocol") or {} for r in records if (r.get("protocol") or {}).get("label") == "reduced"]
    if reduced:
        calib = sorted({p.get("calib") for p in reduced} - {"none", None})
        evals = sorted({p.get("eval") for p in reduced} - {None})
        notes.append(f"reduced protocol (not the paper's): calibration {', '.join(calib) or 'none'}; "
                     f"evaluation {', '.join(evals)}")
    if protocols == {"paper"}:
        notes.append("paper protocol: 128×2048 calibration tokens, every evaluation window of 2048")
    pre = {r.get("model", {}).get("weights_prequantized") for r in records} - {None}
    for p in sorted(pre):
        notes.append(f"weights already quantized once ({p}) before this study: low-bit results look better than "
                     "on the original weights")
    return notes
