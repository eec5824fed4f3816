#!/usr/bin/env python3
"""Tests for bench_report.py's parsing and arithmetic: `python3 scripts/test_bench_report.py`.

Standard library only (the chart is exercised when matplotlib happens to be importable).
"""

import json
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_report as br  # noqa: E402

WRK_KEEPALIVE = """\
Running 2s test @ http://127.0.0.1:35425/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.79ms    5.05ms 100.39ms   97.47%
    Req/Sec    14.51k     3.70k   19.73k    72.50%
  Latency Distribution
     50%  812.00us
     75%    3.26ms
     90%    4.82ms
     99%    1.20s
  57909 requests in 2.01s, 9.83MB read
Requests/sec:  28813.64
Transfer/sec:      4.89MB
"""

WRK_ERRORS = """\
Running 10s test @ http://127.0.0.1:8000/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    15.81ms    4.00ms   1.50m    90.00%
    Req/Sec     2.00k   100.00     2.20k    70.00%
  Latency Distribution
     50%   15.81ms
     75%   17.00ms
     90%   20.00ms
     99%   26.67ms
  39830 requests in 10.00s, 4.00MB read
  Socket errors: connect 1, read 12, write 3, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:   3983.00
Transfer/sec:    400.00KB
"""


class WrkParsing(unittest.TestCase):
    def test_units(self):
        self.assertAlmostEqual(br.time_to_ms("812.00us"), 0.812)
        self.assertAlmostEqual(br.time_to_ms("1.23ms"), 1.23)
        self.assertAlmostEqual(br.time_to_ms("2.00s"), 2000.0)
        self.assertAlmostEqual(br.time_to_ms("1.50m"), 90000.0)
        with self.assertRaises(ValueError):
            br.time_to_ms("12")
        self.assertAlmostEqual(br.si_number("14.51k"), 14510.0)

    def test_keepalive_output(self):
        w = br.parse_wrk(WRK_KEEPALIVE)
        self.assertAlmostEqual(w["rps"], 28813.64)
        self.assertEqual(w["requests"], 57909)
        self.assertAlmostEqual(w["duration_s"], 2.01)
        self.assertAlmostEqual(w["percentiles_ms"][50.0], 0.812)
        self.assertAlmostEqual(w["percentiles_ms"][99.0], 1200.0)
        self.assertAlmostEqual(w["latency_max_ms"], 100.39)
        self.assertEqual(w["errors"], 0)

    def test_errors_are_summed(self):
        w = br.parse_wrk(WRK_ERRORS)
        self.assertEqual(w["socket_errors"], {"connect": 1, "read": 12, "write": 3, "timeout": 4})
        self.assertEqual(w["non_2xx"], 5)
        self.assertEqual(w["errors"], 25)
        self.assertAlmostEqual(w["latency_max_ms"], 90000.0)

    def test_not_wrk_output(self):
        with self.assertRaises(ValueError):
            br.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


class Fairness(unittest.TestCase):
    def test_equal(self):
        f = br.fairness([100, 100, 100, 100])
        self.assertEqual(f["jain"], 1.0)
        self.assertEqual(f["max_min"], 1.0)
        self.assertEqual(f["cv"], 0.0)
        self.assertEqual(f["shares"], [0.25] * 4)

    def test_skewed(self):
        # One worker gets everything: Jain = 1/n, max/min undefined.
        f = br.fairness([0, 0, 10])
        self.assertAlmostEqual(f["jain"], 1 / 3, places=5)
        self.assertIsNone(f["max_min"])
        f = br.fairness([30, 10])
        self.assertAlmostEqual(f["jain"], 40 * 40 / (2 * (900 + 100)))
        self.assertEqual(f["max_min"], 3.0)
        self.assertAlmostEqual(f["cv"], 0.5)

    def test_empty(self):
        self.assertIsNone(br.fairness([])["jain"])
        self.assertIsNone(br.fairness([0, 0])["jain"])


class RowAndReport(unittest.TestCase):
    def test_row_and_report(self):
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            (d / "wrk.txt").write_text(WRK_ERRORS)
            stats = {
                "policy": "rr",
                "workers": [
                    {"id": 2, "connections_total": 19900, "requests_total": 19900,
                     "rss_bytes": 4 << 20},
                    {"id": 1, "connections_total": 19930, "requests_total": 19930,
                     "rss_bytes": 5 << 20},
                ],
                "totals": {"connections_total": 39830, "requests_total": 39830},
            }
            (d / "stats.json").write_text(json.dumps(stats))
            rows = d / "rows.jsonl"
            for policy in ("rr", "reuseport"):
                br.main([
                    "row", "--policy", policy, "--workload", "conn-per-request",
                    "--wrk", str(d / "wrk.txt"), "--stats", str(d / "stats.json"),
                    "--cpu-ticks-before", "100", "--cpu-ticks-after", "130", "--clk-tck", "100",
                    "--primary-rss-kib", "3000", "--out", str(rows),
                ])
            row = json.loads(rows.read_text().splitlines()[0])
            self.assertEqual(row["policy"], "rr")
            self.assertEqual(row["p99_ms"], 26.67)
            # Worker order follows worker id, not the order /stats listed them in.
            self.assertEqual([w["id"] for w in row["workers"]], [1, 2])
            self.assertAlmostEqual(sum(row["shares"]), 1.0, places=5)
            self.assertGreater(row["shares"][0], row["shares"][1])
            self.assertEqual(row["connections"], 39830)
            # 300 ms of CPU over 39830 connections.
            self.assertAlmostEqual(row["primary_cpu_us_per_conn"], 300_000 / 39830, places=1)
            self.assertEqual(row["worker_rss_kib"], [5120, 4096])
            self.assertEqual(row["errors"], 25)

            out = d / "out"
            br.main(["report", "--rows", str(rows), "--out", str(out), "--no-chart"])
            results = json.loads((out / "results.json").read_text())
            self.assertEqual(len(results), 2)
            md = (out / "results.md").read_text()
            self.assertIn("## Connection per request", md)
            self.assertIn("| rr | 3,983 |", md)
            self.assertIn("rr / reuseport req/s, connection per request | 1.00", md)

    def test_keepalive_cpu_is_null(self):
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            (d / "wrk.txt").write_text(WRK_KEEPALIVE)
            (d / "stats.json").write_text(json.dumps({"workers": [
                {"id": 1, "connections_total": 32, "requests_total": 29000},
                {"id": 2, "connections_total": 32, "requests_total": 28909},
            ]}))
            rows = d / "rows.jsonl"
            br.main([
                "row", "--policy", "rr", "--workload", "keep-alive", "--wrk", str(d / "wrk.txt"),
                "--stats", str(d / "stats.json"), "--cpu-ticks-before", "0",
                "--cpu-ticks-after", "1", "--out", str(rows),
            ])
            row = json.loads(rows.read_text())
            self.assertIsNone(row["primary_cpu_us_per_conn"])
            self.assertEqual(row["primary_cpu_ms"], 10.0)
            self.assertEqual(row["jain"], 1.0)


class Aggregate(unittest.TestCase):
    def row(self, rps, p99, counts, cpu_ms, rnd):
        return {
            "policy": "rr", "workload": "conn-per-request", "round": rnd, "rps": rps,
            "p50_ms": 1.0, "p99_ms": p99, "requests": sum(counts), "errors": 1,
            "error_detail": {"read": 1}, "primary_cpu_ms": cpu_ms, "primary_rss_kib": 4000 + rnd,
            "worker_rss_kib": [1, 2],
            "workers": [{"id": i + 1, "connections_total": c, "requests_total": c}
                        for i, c in enumerate(counts)],
        }

    def test_rounds_merge(self):
        rows = [
            self.row(1000.0, 10.0, [3000, 1000], 40.0, 1),
            self.row(3000.0, 30.0, [1000, 3000], 40.0, 2),
            self.row(2000.0, 20.0, [2000, 2000], 40.0, 3),
        ]
        (m,) = br.aggregate(rows)
        self.assertEqual(m["runs"], 3)
        self.assertEqual(m["rps"], 2000.0)
        self.assertEqual(m["p99_ms"], 20.0)
        self.assertEqual(m["rps_runs"], [1000.0, 3000.0, 2000.0])
        # Summed counts are 6000/6000: perfectly fair overall.
        self.assertEqual(m["shares"], [0.5, 0.5])
        self.assertEqual(m["jain"], 1.0)
        self.assertEqual(m["errors"], 3)
        self.assertEqual(m["error_detail"], {"read": 3})
        self.assertAlmostEqual(m["primary_cpu_us_per_conn"], 120_000 / 12000)
        self.assertEqual(m["primary_rss_kib"], 4003)

    def test_single_round_passes_through(self):
        (m,) = br.aggregate([self.row(1000.0, 10.0, [1, 3], 1.0, 1)])
        self.assertEqual((m["runs"], m["rps_runs"], m["rps"]), (1, [1000.0], 1000.0))


if __name__ == "__main__":
    unittest.main()
