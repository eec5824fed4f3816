#!/usr/bin/env python3
"""What does an in-place upgrade cost a client? Ten upgrades under load, measured.

    scripts/upgrade-soak.py [--roundhouse BIN] [--worker BIN] [--workers N] [--upgrades N]
                            [--mode close|keepalive] [--policy P] [--control-round]

Copies the roundhouse binary into a temp dir and starts it from there (`run -w N` with the
example worker on 127.0.0.1, port 0), puts `wrk` load on it (2 threads x 32 connections,
`Connection: close` or keep-alive), probes with a new connection and `GET /` every 5 ms from a
thread, and every 0.5 s installs a fresh copy of the binary (copy + rename, as a package manager
does) and runs `roundhouse upgrade`. It prints what wrk served and what failed (socket errors,
non-2xx), the worst and 99th-percentile probe latency (the longest a new connection waited, the
accept gap), each upgrade's time from exec to serving (from the log), and the primary's pid,
worker pids and open fds before and after. `--control-round` runs the same load without
upgrades first, for comparison. Loopback only; everything started is stopped at the end.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status(rh, ctl):
    out = subprocess.run([rh, "status", "--json", "--control", ctl], capture_output=True, timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 else None


def probe(port, stop, lat, starts):
    while not stop.is_set():
        t = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            if not data.startswith(b"HTTP/1.1 200"):
                raise OSError(f"bad answer {data[:40]!r}")
            lat.append(time.monotonic() - t)
            starts.append(t)
        except OSError as e:
            lat.append(float("inf"))
            starts.append(t)
            print(f"probe failed: {e}", file=sys.stderr)
        time.sleep(0.005)


def wrk_figures(out):
    served = int(re.search(r"(\d+) requests in", out).group(1))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(m.group(1)) if m else 0
    return served, errors, non2xx, (m.group(0) if m else "")


def install(src, dst):
    tmp = dst + ".new"
    shutil.copy2(src, tmp)
    os.rename(tmp, dst)


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid):
    last, since = fds(pid), time.monotonic()
    while time.monotonic() - since < 0.3:
        time.sleep(0.02)
        now = fds(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last


def one_round(args, upgrades):
    with tempfile.TemporaryDirectory() as d:
        rh = os.path.join(d, "roundhouse")
        install(args.roundhouse, rh)
        ctl = os.path.join(d, "ctl.sock")
        logpath = os.path.join(d, "log")
        log = open(logpath, "wb")
        p = subprocess.Popen([rh, "run", "-l", "127.0.0.1:0", "-w", str(args.workers), "--policy", args.policy,
                              "--control", ctl, "--", args.worker], stderr=log, stdout=log)
        try:
            deadline = time.monotonic() + 30
            st = None
            while time.monotonic() < deadline:
                st = status(rh, ctl) if os.path.exists(ctl) else None
                if st and sum(w["state"] == "online" for w in st["workers"]) == args.workers:
                    break
                time.sleep(0.05)
            else:
                sys.exit("the primary did not get ready")
            port = int(st["listeners"][0].rsplit(":", 1)[1])
            pids_before = {w["id"]: w["pid"] for w in st["workers"]}
            fds_before = settled_fds(p.pid)
            duration = 2 + upgrades * 0.5 + 2
            wrk = ["wrk", "-t2", "-c32", f"-d{duration:.0f}s"]
            if args.mode == "close":
                wrk += ["-H", "Connection: close"]
            w = subprocess.Popen(wrk + [f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, text=True)
            stop, lat, starts, ups = threading.Event(), [], [], []
            t = threading.Thread(target=probe, args=(port, stop, lat, starts))
            t.start()
            time.sleep(2)
            done = 0
            for _ in range(upgrades):
                install(args.roundhouse, rh)
                ups.append(time.monotonic())
                out = subprocess.run([rh, "upgrade", "--control", ctl], capture_output=True, text=True, timeout=60)
                if out.returncode != 0:
                    print(f"upgrade failed: {out.stderr.strip()}", file=sys.stderr)
                else:
                    done += 1
                time.sleep(0.5)
            wout, _ = w.communicate(timeout=duration + 30)
            stop.set()
            t.join()
            st = status(rh, ctl)
            pids_after = {w["id"]: w["pid"] for w in st["workers"]}
            fds_after = settled_fds(p.pid)
            pid_after = st["pid"]
        finally:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        text = open(logpath, encoding="utf-8", errors="replace").read()
    served, errors, non2xx, _ = wrk_figures(wout)
    # The owner's own gap: from the pre-flight's answer (the owner stops everything else to
    # describe, exec and come back) to the new image serving; and the exec alone.
    stamps = re.findall(r"^(\S+Z) .*?(upgrade: ok|upgrade: executing|upgraded: roundhouse)", text, re.M)

    def ts(s):
        return time.mktime(time.strptime(s[:19], "%Y-%m-%dT%H:%M:%S")) + float("0" + s[19:-1])

    windows, gaps = [], []
    for i, (t, what) in enumerate(stamps):
        if what == "upgraded: roundhouse":
            before = [(t0, w0) for t0, w0 in stamps[:i]]
            ex = [t0 for t0, w0 in before if w0 == "upgrade: executing"]
            ok = [t0 for t0, w0 in before if w0 == "upgrade: ok"]
            if ex:
                windows.append((ts(t) - ts(ex[-1])) * 1000)
            if ok:
                gaps.append((ts(t) - ts(ok[-1])) * 1000)
    finite = sorted(x for x in lat if x != float("inf"))
    worst = sorted(zip(lat, starts), reverse=True)[:5]
    # Where the worst probes fell: ms after the `upgrade` command that preceded them.
    where = [(round(l * 1000, 1), round((s - max([u for u in ups if u <= s], default=s)) * 1000)) for l, s in worst]
    return {
        "upgrades": done,
        "served": served,
        "failed": errors + non2xx,
        "wrk_errors": errors,
        "non2xx": non2xx,
        "probes": len(lat),
        "probe_failures": sum(1 for x in lat if x == float("inf")),
        "probe_worst_ms": round(max(finite) * 1000, 1) if finite else None,
        "probe_p99_ms": round(finite[int(len(finite) * 0.99)] * 1000, 1) if finite else None,
        "probe_median_ms": round(statistics.median(finite) * 1000, 2) if finite else None,
        "exec_to_serving_ms": [round(x, 1) for x in windows],
        "owner_gap_ms": [round(x, 1) for x in gaps],
        "worst_probes_ms_and_ms_after_upgrade_command": where,
        "pid_same": pid_after == p.pid,
        "workers_same": pids_after == pids_before,
        "fds_before": fds_before,
        "fds_after": fds_after,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--roundhouse", default=os.path.join(ROOT, "target/release/roundhouse"))
    ap.add_argument("--worker", default=os.path.join(ROOT, "target/release/hello-worker"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--upgrades", type=int, default=10)
    ap.add_argument("--mode", choices=["close", "keepalive"], default="close")
    ap.add_argument("--policy", default="rr")
    ap.add_argument("--control-round", action="store_true")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed")
    if args.control_round:
        print("without upgrades:", json.dumps(one_round(args, 0)))
    print(f"{args.upgrades} upgrades:", json.dumps(one_round(args, args.upgrades)))


if __name__ == "__main__":
    main()
