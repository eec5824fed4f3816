#!/usr/bin/env python3
"""How long does a new connection wait while the primary starts many workers?

    scripts/accept-stall.py [--roundhouse BIN] [--worker BIN] [--from N] [--to N] [--rounds R]

Starts `roundhouse run -w FROM` with the example worker on 127.0.0.1 (port 0), opens a new
connection and sends `GET /` every 5 ms from a thread, asks `roundhouse scale TO`, waits until
`status` shows TO workers online, then stops the probe and prints the worst and 99th-percentile
latency of a probe (connect to full response). Loopback only; the primary is stopped with
SIGTERM at the end of each round. Standard library only.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status(rh, ctl):
    out = subprocess.run([rh, "status", "--json", "--control", ctl], capture_output=True, timeout=60)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)


def probe(port, stop, lat):
    while not stop.is_set():
        t = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while s.recv(4096):
                    pass
            lat.append(time.monotonic() - t)
        except OSError as e:
            lat.append(float("inf"))
            print(f"probe failed: {e}", file=sys.stderr)
        time.sleep(0.005)


def one_round(rh, worker, n_from, n_to):
    with tempfile.TemporaryDirectory() as d:
        ctl = os.path.join(d, "ctl.sock")
        log = open(os.path.join(d, "log"), "wb")
        p = subprocess.Popen([rh, "run", "-l", "127.0.0.1:0", "-w", str(n_from), "--control", ctl, "--", worker],
                             stderr=log, stdout=log)
        try:
            deadline = time.monotonic() + 30
            st = None
            while time.monotonic() < deadline:
                st = status(rh, ctl) if os.path.exists(ctl) else None
                if st and sum(w["state"] == "online" for w in st["workers"]) == n_from:
                    break
                time.sleep(0.05)
            port = int(st["listeners"][0].rsplit(":", 1)[1])
            stop, lat = threading.Event(), []
            t = threading.Thread(target=probe, args=(port, stop, lat))
            t.start()
            time.sleep(0.2)
            t0 = time.monotonic()
            subprocess.run([rh, "scale", str(n_to), "--control", ctl], capture_output=True, timeout=600)
            answered = time.monotonic() - t0
            while time.monotonic() - t0 < 600:
                st = status(rh, ctl)
                if st and sum(w["state"] == "online" for w in st["workers"]) == n_to:
                    break
                time.sleep(0.05)
            all_online = time.monotonic() - t0
            time.sleep(0.2)
            stop.set()
            t.join()
            lat.sort()
            p99 = lat[int(len(lat) * 0.99) - 1] if lat else float("nan")
            return answered, all_online, len(lat), lat[-1], p99
        finally:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--roundhouse", default=os.path.join(ROOT, "target/release/roundhouse"))
    ap.add_argument("--worker", default=os.path.join(ROOT, "target/release/hello-worker"))
    ap.add_argument("--from", dest="n_from", type=int, default=2)
    ap.add_argument("--to", dest="n_to", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    for r in range(a.rounds):
        answered, online, n, worst, p99 = one_round(a.roundhouse, a.worker, a.n_from, a.n_to)
        print(f"scale {a.n_from}->{a.n_to}: scale answered {answered:.2f}s, all online {online:.2f}s; "
              f"{n} probes, worst {worst * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")


if __name__ == "__main__":
    main()
