"""``/health`` and ``/metrics`` of a Ray Serve deployment: every replica's own report, and their total.

Each replica sends its health (the body of the single server's ``/health`` plus its pid and node) and its
Prometheus exposition to the shared registry actor every ``report_interval`` seconds. Whichever replica
answers ``/health`` or ``/metrics`` combines its own live report with the others' recent ones: a replica that
stopped reporting (dead, or being replaced) is left out after ``stale_after_s``. No Ray import here.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["merge_expositions", "merge_health"]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)$")


def merge_health(own: str, reports: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The aggregated ``/health`` body and its HTTP status (503 only when no replica is ``ok``).

    ``reports``: replica id -> that replica's health dict (``own`` is the answering replica's id).
    """
    replicas = []
    for rid in sorted(reports):
        h = dict(reports[rid])
        h["replica"] = rid
        replicas.append(h)
    ok = [h for h in replicas if h.get("status") == "ok"]
    model = next((h.get("model") for h in replicas if h.get("model")), None)
    body = {
        "status": "ok" if ok else ("draining" if replicas else "unavailable"),
        "model": model,
        "sessions_open": sum(int(h.get("sessions_open", 0)) for h in replicas),
        "max_sessions": sum(int(h.get("max_sessions", 0)) for h in ok),
        "replica": own,
        "replicas_ok": len(ok),
        "replicas": replicas,
    }
    return body, 200 if ok else 503


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def merge_expositions(texts: dict[str, str]) -> str:
    """One exposition: every sample once as the total over replicas (its own labels), then once per replica
    with a ``replica`` label added. Counters, gauges and histogram buckets, sums and counts add up; a
    ``*_timestamp_seconds`` gauge totals to the latest of the replicas' values."""
    meta: dict[str, list[str]] = {}  # metric family -> its HELP/TYPE lines
    families: dict[str, list[str]] = {}  # family -> its sample keys (name + labels), in first-seen order
    totals: dict[str, float] = {}
    per_replica: dict[str, list[tuple[str, str, float]]] = {}
    family = ""
    for rid in sorted(texts):
        for line in texts[rid].splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                lines = meta.setdefault(family, [])
                if line not in lines and len(lines) < 2:
                    lines.append(line)
                continue
            m = _SAMPLE.match(line)
            if m is None:
                continue
            name, labels, value = m.group(1), m.group(2) or "", m.group(3)
            try:
                v = float(value)
            except ValueError:
                continue
            key = name + labels
            if key not in totals:
                families.setdefault(family if name.startswith(family) else name, []).append(key)
                totals[key] = v
            elif name.endswith("_timestamp_seconds"):  # a moment, not an amount: the latest one
                totals[key] = max(totals[key], v)
            else:
                totals[key] += v
            per_replica.setdefault(key, []).append((rid, labels, v))
    out: list[str] = []
    for fam, keys in families.items():  # a family's samples stay together, as the format requires
        out.extend(meta.get(fam, []))
        for key in keys:
            out.append(f"{key} {_fmt(totals[key])}")
        for key in keys:
            for rid, labels, v in per_replica[key]:
                name = key[: len(key) - len(labels)]
                rl = f'replica="{rid}"'
                lab = "{" + rl + "}" if not labels else labels[:-1] + "," + rl + "}"
                out.append(f"{name}{lab} {_fmt(v)}")
    return "\n".join(out) + "\n"
