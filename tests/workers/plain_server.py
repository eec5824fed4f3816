#!/usr/bin/env python3
"""A socket-activated HTTP server that knows nothing of roundhouse (Python 3 stdlib only).

It serves on the listening socket it inherits the systemd way (LISTEN_FDS=1, LISTEN_PID, fd 3),
answers every GET with 200 and `x-worker-id` (from ROUNDHOUSE_WORKER_ID) and a body
`{"worker_id":N,"pid":P}`, and on SIGTERM stops accepting, finishes what it serves and exits 0.
With PLAIN_CHILD_PIDFILE set it first starts a child of its own (`sleep 1000`, as gunicorn starts
its workers) and writes that child's pid to the file: the supervisor must not let it outlive us.
"""

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading

if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
    sys.exit(f"plain_server: no socket activation (LISTEN_PID={os.environ.get('LISTEN_PID')})")

WID = os.environ.get("ROUNDHOUSE_WORKER_ID", "0")

pidfile = os.environ.get("PLAIN_CHILD_PIDFILE")
if pidfile:
    child = subprocess.Popen(["sleep", "1000"])
    with open(f"{pidfile}.{WID}.{os.getpid()}", "w") as f:
        f.write(str(child.pid))


HELD = []


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        # /grow?mb=N: keep N MiB more (touched, so it is resident) - for --max-memory tests.
        if self.path.startswith("/grow?mb="):
            HELD.append(bytearray(b"x" * (int(self.path.split("=", 1)[1]) << 20)))
        body = json.dumps({"worker_id": int(WID), "pid": os.getpid()}).encode() + b"\n"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-worker-id", WID)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True


server = Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=3)


def stop(*_):
    threading.Thread(target=server.shutdown).start()


signal.signal(signal.SIGTERM, stop)
server.serve_forever(poll_interval=0.05)
server.server_close()
sys.exit(0)
