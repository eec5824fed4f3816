#!/usr/bin/env python3
"""Numbers for scripts/bench.sh: parse wrk output, build result rows, write the report.

Subcommands (bench.sh drives them; each can be run by hand on the files under target/bench/):

  http METHOD URL                 print the body of an HTTP request (no curl needed)
  parse-wrk FILE                  print what was parsed from one wrk --latency output, as JSON
  row --policy P --workload W [--round N] --wrk FILE --stats FILE [--cpu-ticks-before N
      --cpu-ticks-after N [--worker-cpu-ticks-before N --worker-cpu-ticks-after N] --clk-tck N]
      [--primary-rss-kib N] [--worker-rss-kib LIST]
      --out ROWS.jsonl            append one result row (JSON line) to ROWS.jsonl
  report --rows ROWS.jsonl|--results results.json [--meta meta.json] --out DIR [--no-chart]
                                  write DIR/results.json, DIR/results.md and, when matplotlib
                                  imports, DIR/shares.{png,svg} and DIR/fairness-cost.{png,svg};
                                  rows repeated by --repeat are merged (medians, summed counts)
                                  and the per-round rows kept in DIR/runs.json

Only `report` needs matplotlib (for the chart); everything else is the standard library, so the
script works with any python3 and degrades to "no chart" rather than failing a benchmark run.

A row is:
  policy, workload, rps, p50_ms, p99_ms, requests, errors, error_detail,
  shares (per-worker fraction of connections_total, worker id order), jain, max_min, cv,
  request_shares (per-worker fraction of requests_total), request_jain, round (row files only),
  runs and rps_runs (results.json: rounds merged into the row and each round's req/s),
  connections (handed/accepted during the measurement), primary_cpu_ms,
  primary_cpu_us_per_conn (null when not measurable: fewer than MIN_CONNS_FOR_CPU connections),
  workers_cpu_ms (all workers together; null when not measured or a worker exited meanwhile),
  primary_cpu_us_per_req, workers_cpu_us_per_req, server_cpu_us_per_req (CPU ÷ the requests wrk
  completed; server = primary + workers, null when either part is), jain_runs (each round's
  Jain, results.json), primary_rss_kib, worker_rss_kib (list), workers (the raw per-worker counts)

A row that did not run (reuseport-rr without CAP_BPF) is {policy, workload, round, skipped: why}.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.request
from pathlib import Path

# Per-connection primary CPU is only meaningful over many connections: a keep-alive run opens a
# few dozen, and the primary's housekeeping (stats frames, admin requests) would dominate.
MIN_CONNS_FOR_CPU = 1000

WORKLOAD_ORDER = ["keep-alive", "conn-per-request", "mixed"]
WORKLOAD_TITLES = {
    "keep-alive": "Keep-alive (GET /, persistent connections)",
    "conn-per-request": "Connection per request (GET /, `Connection: close`)",
    "mixed": "Mixed cost (connection per request, ~10% GET /cpu?ms=N)",
}
POLICY_ORDER = [
    "rr",
    "least-conn",
    "sticky",
    "none",
    "reuseport",
    "reuseport-rr",
    "node-rr",
    "node-none",
    "roundhouse-node-rr",
]

# ---------------------------------------------------------------------------------------------
# wrk output

_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}


def time_to_ms(text: str) -> float:
    """'812.00us' -> 0.812, '1.23ms' -> 1.23, '2.00s' -> 2000.0, '1.50m' -> 90000.0."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(us|ms|s|m|h)\s*", text)
    if not m:
        raise ValueError(f"not a wrk time: {text!r}")
    return float(m.group(1)) * _TIME_UNITS_MS[m.group(2)]


def si_number(text: str) -> float:
    """'20.15k' -> 20150.0 (wrk's metric suffixes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKMG]?)\s*", text)
    if not m:
        raise ValueError(f"not a wrk number: {text!r}")
    return float(m.group(1)) * _SI[m.group(2)]


def parse_wrk(text: str) -> dict:
    """Parses `wrk --latency` output: requests/s, percentiles (ms), request count, errors."""
    out: dict = {"percentiles_ms": {}}
    in_dist = False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("Latency Distribution"):
            in_dist = True
            continue
        if in_dist:
            m = re.fullmatch(r"([0-9.]+)%\s+(\S+)", s)
            if m:
                out["percentiles_ms"][float(m.group(1))] = time_to_ms(m.group(2))
                continue
            in_dist = False
        m = re.match(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", s)
        if m:
            out["latency_avg_ms"] = time_to_ms(m.group(1))
            out["latency_max_ms"] = time_to_ms(m.group(3))
            continue
        m = re.match(r"(\d+) requests in ([0-9.]+\w+)", s)
        if m:
            out["requests"] = int(m.group(1))
            out["duration_s"] = time_to_ms(m.group(2)) / 1000.0
            continue
        m = re.match(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", s
        )
        if m:
            for k, v in zip(("connect", "read", "write", "timeout"), m.groups()):
                out.setdefault("socket_errors", {})[k] = int(v)
            continue
        m = re.match(r"Non-2xx or 3xx responses: (\d+)", s)
        if m:
            out["non_2xx"] = int(m.group(1))
            continue
        m = re.match(r"Requests/sec:\s+([0-9.]+)", s)
        if m:
            out["rps"] = float(m.group(1))
            continue
    if "rps" not in out or "requests" not in out:
        raise ValueError("no 'Requests/sec' / 'N requests in' line: is this wrk output?")
    errs = out.get("socket_errors", {})
    out["errors"] = sum(errs.values()) + out.get("non_2xx", 0)
    return out


# ---------------------------------------------------------------------------------------------
# fairness


def fairness(counts: list[float]) -> dict:
    """Jain's index (sum^2 / (n * sum of squares)), max/min ratio and coefficient of variation."""
    n = len(counts)
    total = sum(counts)
    if n == 0 or total == 0:
        return {"shares": [], "jain": None, "max_min": None, "cv": None}
    shares = [c / total for c in counts]
    jain = total * total / (n * sum(c * c for c in counts))
    lo, hi = min(counts), max(counts)
    mean = total / n
    cv = math.sqrt(sum((c - mean) ** 2 for c in counts) / n) / mean
    return {
        "shares": [round(s, 6) for s in shares],
        "jain": round(jain, 6),
        "max_min": round(hi / lo, 4) if lo > 0 else None,
        "cv": round(cv, 6),
    }


def build_row(args) -> dict:
    wrk = parse_wrk(Path(args.wrk).read_text())
    stats = json.loads(Path(args.stats).read_text())
    workers = sorted(stats.get("workers", []), key=lambda w: w.get("id", 0))
    conns = [int(w.get("connections_total", 0)) for w in workers]
    reqs = [int(w.get("requests_total", 0)) for w in workers]
    f = fairness(conns)
    rf = fairness(reqs)
    pct = wrk["percentiles_ms"]
    row = {
        "policy": args.policy,
        "workload": args.workload,
        "round": args.round,
        "rps": round(wrk["rps"], 1),
        "p50_ms": pct.get(50.0),
        "p99_ms": pct.get(99.0),
        "requests": wrk["requests"],
        "errors": wrk["errors"],
        "error_detail": {**wrk.get("socket_errors", {}), "non_2xx": wrk.get("non_2xx", 0)},
        "shares": f["shares"],
        "jain": f["jain"],
        "max_min": f["max_min"],
        "cv": f["cv"],
        "request_shares": rf["shares"],
        "request_jain": rf["jain"],
        "connections": sum(conns),
        "served_requests": sum(reqs),
        "primary_cpu_ms": None,
        "primary_cpu_us_per_conn": None,
        "workers_cpu_ms": None,
        "primary_cpu_us_per_req": None,
        "workers_cpu_us_per_req": None,
        "server_cpu_us_per_req": None,
        "primary_rss_kib": args.primary_rss_kib,
        "worker_rss_kib": [int(x) for x in args.worker_rss_kib.split(",") if x]
        if args.worker_rss_kib
        else [
            int(w["rss_bytes"]) // 1024 for w in workers if w.get("rss_bytes") is not None
        ],
        "workers": [
            {
                "id": w.get("id"),
                "connections_total": c,
                "requests_total": r,
            }
            for w, c, r in zip(workers, conns, reqs)
        ],
    }
    if args.cpu_ticks_before is not None and args.cpu_ticks_after is not None:
        cpu_ms = (args.cpu_ticks_after - args.cpu_ticks_before) * 1000.0 / args.clk_tck
        row["primary_cpu_ms"] = round(cpu_ms, 1)
        if row["connections"] >= MIN_CONNS_FOR_CPU:
            row["primary_cpu_us_per_conn"] = round(cpu_ms * 1000.0 / row["connections"], 2)
    wb = getattr(args, "worker_cpu_ticks_before", None)
    wa = getattr(args, "worker_cpu_ticks_after", None)
    if wb is not None and wa is not None:
        row["workers_cpu_ms"] = round((wa - wb) * 1000.0 / args.clk_tck, 1)
    row.update(cpu_per_request(row["primary_cpu_ms"], row["workers_cpu_ms"], row["requests"]))
    return row


def cpu_per_request(primary_ms, workers_ms, requests) -> dict:
    """µs of CPU per request completed by wrk: primary, workers, and their sum (the server).

    None where a part was not measured: the sum is only given when both parts are.
    """
    def per(ms):
        return round(ms * 1000.0 / requests, 2) if ms is not None and requests else None

    p, w = per(primary_ms), per(workers_ms)
    total = per(primary_ms + workers_ms) if p is not None and w is not None else None
    return {"primary_cpu_us_per_req": p, "workers_cpu_us_per_req": w,
            "server_cpu_us_per_req": total}


# ---------------------------------------------------------------------------------------------
# report


def _order(items, order):
    return sorted(items, key=lambda x: (order.index(x) if x in order else len(order), x))


def _fmt(v, spec="{:.2f}", none="–"):
    return none if v is None else spec.format(v)


def _shares_text(shares):
    return " / ".join(f"{s * 100:.1f}" for s in shares) if shares else "–"


def ratio(rows, workload, a, b, key="rps"):
    ra = next((r for r in rows if r["workload"] == workload and r["policy"] == a), None)
    rb = next((r for r in rows if r["workload"] == workload and r["policy"] == b), None)
    if not ra or not rb or not ra.get(key) or not rb.get(key):
        return None
    return ra[key] / rb[key]


def render_markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# roundhouse benchmark results", ""]
    if meta:
        lines.append(
            "Run {date} on {machine}; {workers} workers per policy, wrk {threads} threads × "
            "{connections} connections, {duration} s per cell after {warmup} s warm-up{rounds}{quick}.".format(
                date=meta.get("date", "?"),
                machine=meta.get("machine", "?"),
                workers=meta.get("workers", "?"),
                threads=meta.get("wrk_threads", "?"),
                connections=meta.get("connections", "?"),
                duration=meta.get("duration_s", "?"),
                warmup=meta.get("warmup_s", "?"),
                quick=" (--quick)" if meta.get("quick") else "",
                rounds=f", {meta['repeat']} rounds" if (meta.get("repeat") or 1) > 1 else "",
            )
        )
        if meta.get("loadavg_start"):
            lines.append("")
            lines.append(
                f"Load average (1/5/15 min) at start {meta['loadavg_start']}, "
                f"at end {meta.get('loadavg_end', '?')}."
            )
        if meta.get("skipped"):
            lines.append("")
            lines.append("Skipped: " + "; ".join(meta["skipped"]) + ".")
        lines.append("")
    lines += [
        "Shares are each worker's fraction of the connections it was handed (worker 1 first);",
        "Jain, max/min and CV are over those counts. Request shares are the same over requests",
        "served. Primary µs/conn is the primary process's user+system time during the measurement",
        f"divided by connections (shown only with ≥ {MIN_CONNS_FOR_CPU} connections). CPU µs/req is",
        "user+system time during the measurement divided by the requests wrk completed, for the",
        "primary, for all workers together (their pids as /stats listed them), and for the server",
        "(both).",
        "",
    ]
    workloads = _order({r["workload"] for r in rows}, WORKLOAD_ORDER)
    repeated = any((r.get("runs") or 1) > 1 for r in rows)
    lines += render_comparison(rows, workloads)
    if repeated:
        lines += [
            "Each cell ran several rounds (all policies once per round, interleaved): req/s and",
            "latency are medians over rounds, with the range of req/s; shares are over the summed",
            "counts.",
            "",
        ]
    for wl in workloads:
        lines.append(f"## {WORKLOAD_TITLES.get(wl, wl)}")
        lines.append("")
        lines.append(
            "| policy | req/s |"
            + (" req/s range (runs) |" if repeated else "")
            + " p50 ms | p99 ms | conn shares % | Jain | max/min | CV "
            "| req shares % | req Jain | primary µs/conn "
            "| CPU µs/req primary | CPU µs/req workers | CPU µs/req server | errors |"
        )
        lines.append(
            "|---|--:|" + ("--:|" if repeated else "")
            + "--:|--:|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|"
        )
        wl_rows = [r for r in rows if r["workload"] == wl]
        for r in sorted(wl_rows, key=lambda r: _order_key(r["policy"])):
            if r.get("skipped"):
                lines.append(f"| {r['policy']} | skipped: {_md_escape(r['skipped'])} |")
                continue
            rng = ""
            if repeated:
                runs = r.get("rps_runs") or [r.get("rps")]
                rng = " {:,.0f}–{:,.0f} ({}) |".format(min(runs), max(runs), len(runs))
            lines.append(
                "| {policy} | {rps} |{rng} {p50} | {p99} | {sh} | {jain} | {mm} | {cv} | {rsh} | {rj} "
                "| {cpu} | {pcpu} | {wcpu} | {scpu} | {err} |".format(
                    policy=r["policy"],
                    rps=_fmt(r.get("rps"), "{:,.0f}"),
                    rng=rng,
                    p50=_fmt(r.get("p50_ms")),
                    p99=_fmt(r.get("p99_ms")),
                    sh=_shares_text(r.get("shares")),
                    jain=_fmt(r.get("jain"), "{:.4f}"),
                    mm=_fmt(r.get("max_min"), "{:.3f}"),
                    cv=_fmt(r.get("cv"), "{:.4f}"),
                    rsh=_shares_text(r.get("request_shares")),
                    rj=_fmt(r.get("request_jain"), "{:.4f}"),
                    cpu=_fmt(r.get("primary_cpu_us_per_conn"), "{:.1f}"),
                    pcpu=_fmt(r.get("primary_cpu_us_per_req"), "{:.1f}"),
                    wcpu=_fmt(r.get("workers_cpu_us_per_req"), "{:.1f}"),
                    scpu=_fmt(r.get("server_cpu_us_per_req"), "{:.1f}"),
                    err=r.get("errors", "–"),
                )
            )
        lines.append("")
    lines += render_targets(rows, meta)
    return "\n".join(lines).rstrip() + "\n"


def _md_escape(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


# The policies the headline comparison is about (issue 15), in this order; the baseline for the
# ratios is `reuseport`: the kernel's hash, no handoff, no program.
COMPARISON_POLICIES = ["rr", "reuseport", "reuseport-rr", "none", "node-rr", "node-none"]
COMPARISON_BASE = "reuseport"


def _worst_jain(r):
    js = [j for j in (r.get("jain_runs") or []) if j is not None]
    return min(js) if js else r.get("jain")


def render_comparison(rows, workloads):
    """One table per workload: fairness and cost of each policy, as ratios to `reuseport`."""
    present = {r["policy"] for r in rows}
    policies = [p for p in COMPARISON_POLICIES if p in present]
    if len(policies) < 2:
        return []
    out = [
        "## Comparison: fairness and cost",
        "",
        f"Ratios are to `{COMPARISON_BASE}` in the same workload of this run. Jain is over the",
        "connections summed across rounds; \"worst round\" is the lowest Jain of a single round.",
        "",
    ]
    for wl in workloads:
        by = {r["policy"]: r for r in rows if r["workload"] == wl}
        base = by.get(COMPARISON_BASE)
        if base and base.get("skipped"):
            base = None
        out += [
            f"### {WORKLOAD_TITLES.get(wl, wl).split(' (')[0]}",
            "",
            "| policy | Jain | worst round | max/min | req/s | req/s ÷ reuseport "
            "| CPU µs/req primary | workers | server | server CPU ÷ reuseport |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for p in policies:
            r = by.get(p)
            if r is None:
                continue
            if r.get("skipped"):
                out.append(f"| {p} | skipped: {_md_escape(r['skipped'])} |")
                continue

            def rel(key):
                if not base or not base.get(key) or r.get(key) is None:
                    return None
                return r[key] / base[key]

            out.append(
                "| {p} | {j} | {wj} | {mm} | {rps} | {rr} | {pc} | {wc} | {sc} | {sr} |".format(
                    p=p,
                    j=_fmt(r.get("jain"), "{:.4f}"),
                    wj=_fmt(_worst_jain(r), "{:.4f}"),
                    mm=_fmt(r.get("max_min"), "{:.3f}"),
                    rps=_fmt(r.get("rps"), "{:,.0f}"),
                    rr=_fmt(rel("rps")),
                    pc=_fmt(r.get("primary_cpu_us_per_req"), "{:.1f}"),
                    wc=_fmt(r.get("workers_cpu_us_per_req"), "{:.1f}"),
                    sc=_fmt(r.get("server_cpu_us_per_req"), "{:.1f}"),
                    sr=_fmt(rel("server_cpu_us_per_req")),
                )
            )
        out.append("")
    return out


def _workload_key(workload):
    return (
        WORKLOAD_ORDER.index(workload) if workload in WORKLOAD_ORDER else len(WORKLOAD_ORDER),
        workload,
    )


def _order_key(policy):
    return (POLICY_ORDER.index(policy) if policy in POLICY_ORDER else len(POLICY_ORDER), policy)


def render_targets(rows, meta=None):
    """The issue's performance targets, computed from this run where the rows exist."""
    checks = []

    def add(name, value, target, ok, fmt="{:.2f}"):
        if value is None:
            return
        verdict = "–" if ok is None else ("met" if ok(value) else "not met")
        checks.append((name, fmt.format(value), target, verdict))

    # Issue 15: reuseport-rr must cost what reuseport costs and be as fair as rr.
    add(
        "reuseport-rr / reuseport req/s, connection per request (#15)",
        ratio(rows, "conn-per-request", "reuseport-rr", "reuseport"),
        "≥ 0.97",
        lambda v: v >= 0.97,
    )
    add(
        "reuseport-rr / reuseport server CPU per request, connection per request (#15)",
        ratio(rows, "conn-per-request", "reuseport-rr", "reuseport", key="server_cpu_us_per_req"),
        "≤ 1.05",
        lambda v: v <= 1.05,
    )
    rrr = [r for r in rows if r["policy"] == "reuseport-rr" and _worst_jain(r) is not None]
    if rrr:
        worst = min(rrr, key=_worst_jain)
        add(
            f"reuseport-rr Jain, worst workload and round ({worst['workload']}) (#15)",
            _worst_jain(worst),
            "≥ 0.9999",
            lambda v: v >= 0.9999,
            "{:.4f}",
        )
    # Issue 18: the handoff's cost, as server CPU per request.
    add(
        "rr / reuseport server CPU per request, connection per request (#18)",
        ratio(rows, "conn-per-request", "rr", "reuseport", key="server_cpu_us_per_req"),
        "≤ 1.15",
        lambda v: v <= 1.15,
    )

    add(
        "rr / reuseport req/s, connection per request",
        ratio(rows, "conn-per-request", "rr", "reuseport"),
        "≥ 0.95",
        lambda v: v >= 0.95,
    )
    add(
        "rr / reuseport req/s, keep-alive",
        ratio(rows, "keep-alive", "rr", "reuseport"),
        "≥ 0.98",
        lambda v: v >= 0.98,
    )
    add(
        "rr / node-rr req/s, connection per request",
        ratio(rows, "conn-per-request", "rr", "node-rr"),
        "≥ 2.5",
        lambda v: v >= 2.5,
    )
    for r in rows:
        if r["policy"] == "rr" and r["workload"] == "conn-per-request":
            add(
                "rr primary CPU µs per handed connection",
                r.get("primary_cpu_us_per_conn"),
                "≤ 10",
                lambda v: v <= 10,
                "{:.1f}",
            )
            floor = _median((meta or {}).get("accept_floor_us_per_conn") or [])
            if floor is not None:
                add(
                    "bare accept4+close loop CPU µs per connection (floor, same run)",
                    floor,
                    "–",
                    None,
                    "{:.1f}",
                )
        if r["policy"] == "node-rr" and r["workload"] == "conn-per-request":
            add(
                "node-rr primary CPU µs per connection (reference)",
                r.get("primary_cpu_us_per_conn"),
                "–",
                None,
                "{:.1f}",
            )
    rr_rows = [r for r in rows if r["policy"] == "rr" and r.get("jain") is not None]
    if rr_rows:
        worst = min(rr_rows, key=lambda r: r["jain"])
        add(
            f"rr Jain, worst workload ({worst['workload']})",
            worst["jain"],
            "≥ 0.999",
            lambda v: v >= 0.999,
            "{:.4f}",
        )
    prim = [r["primary_rss_kib"] for r in rows if r["policy"] == "rr" and r.get("primary_rss_kib")]
    if prim:
        add("rr primary RSS MiB (max over runs)", max(prim) / 1024, "≤ 6", lambda v: v <= 6, "{:.1f}")
    wrss = [
        k
        for r in rows
        if r["policy"] in ("rr", "least-conn", "none", "reuseport")
        for k in r.get("worker_rss_kib") or []
    ]
    if wrss:
        add("hello-worker RSS MiB (max)", max(wrss) / 1024, "≤ 6", lambda v: v <= 6, "{:.1f}")
    lc = ratio(rows, "mixed", "least-conn", "rr", key="p99_ms")
    if lc is not None:
        checks.append(
            (
                "least-conn / rr p99, mixed",
                f"{lc:.2f}",
                "report",
                "least-conn lowers p99" if lc < 1 else "least-conn does not lower p99",
            )
        )
    if not checks:
        return []
    out = ["## Targets (this run)", "", "| target | measured | goal | verdict |", "|---|--:|--:|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in checks]
    out.append("")
    return out


def render_chart(rows: list[dict], meta: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("skipped")]
    workloads = _order({r["workload"] for r in rows}, WORKLOAD_ORDER)
    metrics = [("shares", "connections handed"), ("request_shares", "requests served")]
    fig, axes = plt.subplots(
        len(metrics),
        len(workloads),
        figsize=(4.8 * len(workloads) + 1, 3.6 * len(metrics) + 0.6),
        squeeze=False,
        sharey=True,
    )
    cmap = plt.get_cmap("tab10")
    for col, wl in enumerate(workloads):
        wl_rows = sorted(
            (r for r in rows if r["workload"] == wl), key=lambda r: _order_key(r["policy"])
        )
        for row_i, (key, label) in enumerate(metrics):
            ax = axes[row_i][col]
            n_workers = max((len(r.get(key) or []) for r in wl_rows), default=0)
            width = 0.8 / max(n_workers, 1)
            for i, r in enumerate(wl_rows):
                shares = r.get(key) or []
                for w, s in enumerate(shares):
                    ax.bar(
                        i - 0.4 + width * (w + 0.5),
                        s * 100,
                        width=width * 0.92,
                        color=cmap(w % 10),
                        label=f"worker {w + 1}" if i == 0 else None,
                    )
                jain = r.get("jain" if key == "shares" else "request_jain")
                if jain is not None:
                    ax.text(
                        i,
                        max(shares) * 100 + 1.5 if shares else 1,
                        f"J={jain:.3f}",
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
            if n_workers:
                ax.axhline(100 / n_workers, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xticks(range(len(wl_rows)))
            ax.set_xticklabels([r["policy"] for r in wl_rows], rotation=30, ha="right", fontsize=8)
            if row_i == 0:
                ax.set_title(WORKLOAD_TITLES.get(wl, wl).split(" (")[0], fontsize=10)
            if col == 0:
                ax.set_ylabel(f"% of {label}")
            ax.grid(axis="y", linewidth=0.3)
    top = max(
        (s * 100 for r in rows for k in ("shares", "request_shares") for s in r.get(k) or []),
        default=100,
    )
    axes[0][0].set_ylim(0, min(100, top * 1.2 + 3))
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=min(len(labels), 8))
    subtitle = ""
    if meta:
        subtitle = (
            f" — {meta.get('workers', '?')} workers, {meta.get('duration_s', '?')} s per cell"
            + (f" × {meta['repeat']} rounds" if (meta.get("repeat") or 1) > 1 else "")
            + (" (quick)" if meta.get("quick") else "")
        )
    fig.suptitle(
        f"Per-worker shares by policy (dashed: equal share){subtitle}", fontsize=11, x=0.02,
        ha="left",
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    paths = []
    for ext in ("png", "svg"):
        p = out_dir / f"shares.{ext}"
        fig.savefig(p, dpi=120)
        paths.append(p)
    plt.close(fig)
    return paths


# Jain's index is plotted on a "nines" scale, -log10(1 - J): 0.9 -> 1, 0.99 -> 2, 0.9999 -> 4. The
# index is rounded to 6 decimals, so 1 - J below 1e-6 (an exact split) sits on the top line.
NINES_TOP = 6.0


def nines(jain):
    """Jain's index -> -log10(1 - J), capped at NINES_TOP (exact splits)."""
    if jain is None:
        return None
    return min(NINES_TOP, -math.log10(max(1.0 - jain, 10 ** -NINES_TOP)))


# One colour and marker per policy in the fairness/cost chart: circles hand off through a
# primary, squares are chosen by the kernel, triangles are Node's cluster.
POLICY_STYLE = {
    "rr": ("tab:blue", "o"),
    "least-conn": ("tab:cyan", "o"),
    "none": ("tab:grey", "s"),
    "reuseport": ("tab:orange", "s"),
    "reuseport-rr": ("tab:red", "s"),
    "sticky": ("tab:brown", "o"),
    "node-rr": ("tab:green", "^"),
    "node-none": ("tab:olive", "^"),
    "roundhouse-node-rr": ("tab:purple", "o"),
}


def fairness_cost_points(rows):
    """(workload, policy, cpu µs/req, nines of the worst round's Jain) for the chart.

    The worst round is what a reader should trust: merged counts can hide rounds that were unfair
    in opposite directions. Rows without a server CPU figure or a Jain are left out.
    """
    pts = []
    for r in rows:
        if r.get("skipped"):
            continue
        cpu, j = r.get("server_cpu_us_per_req"), _worst_jain(r)
        if cpu is None or j is None:
            continue
        pts.append((r["workload"], r["policy"], cpu, nines(j)))
    return pts


def _place_labels(fig, ax, points, fontsize=7.5):
    """Labels each (text, x, y) point beside it, trying a few offsets in turn and taking the first
    whose box (estimated from the text length) overlaps no label or point placed so far, so that
    policies at the same place stay readable."""
    scale = fig.dpi / 72.0  # points -> pixels
    char_w, line_h = fontsize * 0.55 * scale, fontsize * 1.25 * scale
    xy = [tuple(ax.transData.transform((x, y))) for _, x, y in points]
    taken = [(px - 4 * scale, py - 4 * scale, px + 4 * scale, py + 4 * scale) for px, py in xy]
    offsets = [(6, 3), (6, -11), (-6, 3), (-6, -11), (6, 13), (-6, 13), (6, -21), (-6, -21),
               (6, 23), (-6, 23), (6, -31), (-6, -31)]
    for (text, x, y), (px, py) in zip(points, xy):
        w = len(text) * char_w
        choice = offsets[0]
        for dx, dy in offsets:
            x0 = px + dx * scale if dx > 0 else px + dx * scale - w
            y0 = py + dy * scale
            box = (x0, y0, x0 + w, y0 + line_h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                       for b in taken):
                choice = (dx, dy)
                taken.append(box)
                break
        else:
            x0 = px + choice[0] * scale
            taken.append((x0, py + choice[1] * scale, x0 + w, py + choice[1] * scale + line_h))
        colour = POLICY_STYLE.get(text, ("black", "x"))[0]
        ax.annotate(text, (x, y), xytext=choice, textcoords="offset points", fontsize=fontsize,
                    color=colour, ha="left" if choice[0] > 0 else "right", va="bottom")


def render_fairness_cost(rows: list[dict], meta: dict, out_dir: Path) -> list[Path]:
    """fairness-cost.{png,svg}: one panel per workload, one point per policy, Jain (worst round,
    nines scale, up is fairer) against server CPU per request (left is cheaper)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = fairness_cost_points(rows)
    workloads = _order({p[0] for p in pts}, WORKLOAD_ORDER)
    if not workloads:
        return []
    fig, axes = plt.subplots(
        1, len(workloads), figsize=(4.6 * len(workloads) + 0.6, 4.4), squeeze=False
    )
    for col, wl in enumerate(workloads):
        ax = axes[0][col]
        wl_pts = sorted((p for p in pts if p[0] == wl), key=lambda p: _order_key(p[1]))
        xs = [p[2] for p in wl_pts]
        lo, hi = min(xs), max(xs)
        pad = max((hi - lo) * 0.15, hi * 0.05, 1.0)
        ax.set_xlim(max(0.0, lo - pad), hi + pad * 2.2)
        y_lo = min(0.5, min(p[3] for p in wl_pts) - 0.4)
        ax.set_ylim(y_lo, NINES_TOP + 0.9)
        ax.axhline(4.0, color="grey", linewidth=0.8, linestyle="--")
        ax.text(ax.get_xlim()[1], 4.0, "0.9999 ", ha="right", va="bottom", fontsize=7,
                color="grey")
        ticks = [t for t in range(0, int(NINES_TOP) + 1) if t >= y_lo]
        labels = {0: "0", 1: "0.9", 2: "0.99", 3: "0.999", 4: "0.9999", 5: "0.99999", 6: "exact"}
        ax.set_yticks(ticks)
        ax.set_yticklabels([labels[t] for t in ticks], fontsize=8)
        for _, policy, x, y in wl_pts:
            colour, marker = POLICY_STYLE.get(policy, ("black", "x"))
            ax.scatter([x], [y], color=colour, marker=marker, s=46, zorder=3)
        _place_labels(fig, ax, [(policy, x, y) for _, policy, x, y in wl_pts])
        ax.set_title(WORKLOAD_TITLES.get(wl, wl).split(" (")[0], fontsize=10)
        ax.set_xlabel("server CPU µs per request, primary + workers (left: cheaper)", fontsize=8)
        if col == 0:
            ax.set_ylabel("Jain's index, worst round (up: fairer)")
        ax.grid(linewidth=0.3)
    subtitle = ""
    if meta:
        subtitle = (
            f" — {meta.get('workers', '?')} workers"
            + (f", {meta['repeat']} rounds" if (meta.get("repeat") or 1) > 1 else "")
            + (" (quick)" if meta.get("quick") else "")
        )
    fig.suptitle(
        f"Fairness against cost, per policy{subtitle}: fair and cheap is top left",
        fontsize=11, x=0.02, ha="left",
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    paths = []
    for ext in ("png", "svg"):
        p = out_dir / f"fairness-cost.{ext}"
        fig.savefig(p, dpi=120)
        paths.append(p)
    plt.close(fig)
    return paths


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def aggregate(rows: list[dict]) -> list[dict]:
    """Merges the rounds of `--repeat` into one row per policy × workload.

    Throughput and latency are the median over rounds (`rps_runs` keeps every round's req/s);
    shares and fairness are recomputed over the per-worker counts summed across rounds, and
    `jain_runs` keeps each round's own Jain; CPU per connection and per request is total CPU over
    the total count (null when a round lacks the figure); memory is the largest seen. A single
    round passes through unchanged apart from `runs`, `rps_runs` and `jain_runs`. Skipped rounds
    (`skipped`) are dropped when another round of the same cell ran; a cell skipped in every round
    stays one skipped row.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["policy"], r["workload"]), []).append(r)
    out = []
    for (policy, workload), rs in groups.items():
        ran = [r for r in rs if not r.get("skipped")]
        if not ran:
            out.append({"policy": policy, "workload": workload, "skipped": rs[0]["skipped"],
                        "runs": 0})
            continue
        rs = ran
        if len(rs) == 1:
            out.append({**rs[0], "runs": 1, "rps_runs": [rs[0]["rps"]],
                        "jain_runs": [rs[0].get("jain")]})
            continue
        by_id: dict = {}
        for r in rs:
            for w in r.get("workers") or []:
                acc = by_id.setdefault(w["id"], {"id": w["id"], "connections_total": 0,
                                                 "requests_total": 0})
                acc["connections_total"] += w["connections_total"]
                acc["requests_total"] += w["requests_total"]
        workers = [by_id[k] for k in sorted(by_id, key=lambda k: (k is None, k))]
        f = fairness([w["connections_total"] for w in workers])
        rf = fairness([w["requests_total"] for w in workers])
        conns = sum(w["connections_total"] for w in workers)
        cpu = [r["primary_cpu_ms"] for r in rs if r.get("primary_cpu_ms") is not None]
        cpu_ms = sum(cpu) if len(cpu) == len(rs) else None
        wcpu = [r["workers_cpu_ms"] for r in rs if r.get("workers_cpu_ms") is not None]
        wcpu_ms = sum(wcpu) if len(wcpu) == len(rs) else None
        requests = sum(r["requests"] for r in rs)
        detail: dict = {}
        for r in rs:
            for k, v in (r.get("error_detail") or {}).items():
                detail[k] = detail.get(k, 0) + v
        rss = [r["primary_rss_kib"] for r in rs if r.get("primary_rss_kib")]
        out.append({
            "policy": policy,
            "workload": workload,
            "rps": _median([r["rps"] for r in rs]),
            "p50_ms": _median([r.get("p50_ms") for r in rs]),
            "p99_ms": _median([r.get("p99_ms") for r in rs]),
            "requests": requests,
            "errors": sum(r["errors"] for r in rs),
            "error_detail": detail,
            "shares": f["shares"],
            "jain": f["jain"],
            "max_min": f["max_min"],
            "cv": f["cv"],
            "request_shares": rf["shares"],
            "request_jain": rf["jain"],
            "connections": conns,
            "served_requests": sum(w["requests_total"] for w in workers),
            "primary_cpu_ms": round(cpu_ms, 1) if cpu_ms is not None else None,
            "primary_cpu_us_per_conn": round(cpu_ms * 1000.0 / conns, 2)
            if cpu_ms is not None and conns >= MIN_CONNS_FOR_CPU * len(rs)
            else None,
            "workers_cpu_ms": round(wcpu_ms, 1) if wcpu_ms is not None else None,
            **cpu_per_request(cpu_ms, wcpu_ms, requests),
            "primary_rss_kib": max(rss) if rss else None,
            "worker_rss_kib": rs[-1].get("worker_rss_kib"),
            "workers": workers,
            "runs": len(rs),
            "rps_runs": [r["rps"] for r in rs],
            "jain_runs": [r.get("jain") for r in rs],
        })
    return out


def cmd_report(args) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.rows:
        rows = [json.loads(l) for l in Path(args.rows).read_text().splitlines() if l.strip()]
    else:
        rows = json.loads(Path(args.results).read_text())
    meta = json.loads(Path(args.meta).read_text()) if args.meta else {}
    if args.rows and any(r.get("runs") is None for r in rows):
        if len({(r["policy"], r["workload"]) for r in rows}) < len(rows):
            (out_dir / "runs.json").write_text(json.dumps(rows, indent=2) + "\n")
        rows = aggregate(rows)
    rows.sort(key=lambda r: (_workload_key(r["workload"]), _order_key(r["policy"])))
    results = out_dir / "results.json"
    if not args.results or Path(args.results).resolve() != results.resolve():
        results.write_text(json.dumps(rows, indent=2) + "\n")
    md = render_markdown(rows, meta)
    (out_dir / "results.md").write_text(md)
    print(f"wrote {results} and {out_dir / 'results.md'}", file=sys.stderr)
    if args.no_chart:
        return 0
    try:
        paths = render_chart(rows, meta, out_dir)
        paths += render_fairness_cost(rows, meta, out_dir)
    except ImportError as e:
        print(f"no chart: matplotlib is not importable ({e})", file=sys.stderr)
        return 0 if args.chart_optional else 1
    print("wrote " + " and ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def cmd_http(args) -> int:
    data = b"" if args.method == "POST" else None
    req = urllib.request.Request(args.url, data=data, method=args.method)
    with urllib.request.urlopen(req, timeout=args.timeout) as resp:
        sys.stdout.write(resp.read().decode())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    h = sub.add_parser("http")
    h.add_argument("method", choices=["GET", "POST"])
    h.add_argument("url")
    h.add_argument("--timeout", type=float, default=10.0)

    pw = sub.add_parser("parse-wrk")
    pw.add_argument("file")

    r = sub.add_parser("row")
    r.add_argument("--policy", required=True)
    r.add_argument("--workload", required=True)
    r.add_argument("--round", type=int, default=1, help="round number under --repeat")
    r.add_argument("--wrk", required=True)
    r.add_argument("--stats", required=True)
    r.add_argument("--cpu-ticks-before", type=int)
    r.add_argument("--cpu-ticks-after", type=int)
    r.add_argument("--worker-cpu-ticks-before", type=int, help="sum over the worker pids")
    r.add_argument("--worker-cpu-ticks-after", type=int)
    r.add_argument("--clk-tck", type=int, default=100)
    r.add_argument("--primary-rss-kib", type=int)
    r.add_argument("--worker-rss-kib", help="comma-separated KiB, overrides /stats rss_bytes")
    r.add_argument("--out", required=True)

    rep = sub.add_parser("report")
    src = rep.add_mutually_exclusive_group(required=True)
    src.add_argument("--rows")
    src.add_argument("--results")
    rep.add_argument("--meta")
    rep.add_argument("--out", required=True)
    rep.add_argument("--no-chart", action="store_true")
    rep.add_argument(
        "--chart-optional", action="store_true", help="exit 0 when matplotlib is missing"
    )

    args = p.parse_args(argv)
    if args.cmd == "http":
        return cmd_http(args)
    if args.cmd == "parse-wrk":
        print(json.dumps(parse_wrk(Path(args.file).read_text()), indent=2))
        return 0
    if args.cmd == "row":
        row = build_row(args)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            "{policy:>12} {workload:<17} {rps:>10,.0f} req/s  p50 {p50} ms  p99 {p99} ms  "
            "jain {jain}  errors {errors}".format(
                policy=row["policy"],
                workload=row["workload"],
                rps=row["rps"],
                p50=_fmt(row["p50_ms"]),
                p99=_fmt(row["p99_ms"]),
                jain=_fmt(row["jain"], "{:.4f}"),
                errors=row["errors"],
            ),
            file=sys.stderr,
        )
        return 0
    return cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
