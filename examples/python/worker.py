#!/usr/bin/env python3
"""hello-worker in Python: the roundhouse example worker, standard library only.

Run it under roundhouse:

    roundhouse run -w 2 -- python3 examples/python/worker.py

Routes (the same as the Rust `hello-worker`):

    GET /            200 "hello world\\n"
    GET /whoami      200 {"worker_id":N,"pid":P}
    GET /cpu?ms=N    spins N ms of this thread's CPU time (time.thread_time), then 200
    GET /sleep?ms=N  waits N ms, then 200
    anything else    404

Every response carries `x-worker-id: N`.  A message with a `ping` field is answered with
`{"pong": <ping>, "worker_id": N}` to its sender (done by roundhouse_worker).

For tests only, ROUNDHOUSE_PY_MISBEHAVE makes the worker break the protocol on purpose so that a
test can watch the primary kill and replace it:

    ROUNDHOUSE_PY_MISBEHAVE=MODE[,after=N][,worker=ID][,once=PATH]

    MODE      garbage   a 16-byte frame of unknown kind 0xEE
              oversize  a 70000-byte frame (over the 65536-byte limit)
              fds       a HEARTBEAT carrying an fd (worker frames carry none)
              badjson   a MESSAGE to the primary that is not JSON
              ready     a second READY
              badack    an ACK for a connection id it was never given
              silent    stops sending anything (no STATS, no HEARTBEAT)
              hang      stops reading the channel
    after=N   right after the Nth response is written; from just before that response the
              channel is held, so no later connection is acknowledged before the bad frame
              (default 0: within 100 ms of READY)
    worker=ID only the worker with this id misbehaves (default: every worker)
    once=PATH only one process misbehaves: the one that creates PATH (O_EXCL); its replacement
              finds PATH and behaves
"""

import json
import os
import sys
import threading
import time

sys.dont_write_bytecode = True  # keep the source tree clean of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import roundhouse_worker as rw  # noqa: E402

MAX_MS = 60_000


def ms_param(req):
    """The `ms` query parameter, 0..=60000; None when it is malformed."""
    values = req.query.get("ms", ["0"])
    try:
        ms = int(values[-1])
    except ValueError:
        return None
    return ms if 0 <= ms <= MAX_MS else None


def make_app(worker_id):
    def app(req):
        if req.method not in ("GET", "HEAD"):
            if req.path in ("/", "/whoami", "/cpu", "/sleep"):
                return rw.Response(405, "method not allowed\n", headers=[("allow", "GET, HEAD")])
            return rw.Response(404, "not found\n")
        if req.path == "/":
            return rw.Response(200, "hello world\n")
        if req.path == "/whoami":
            body = json.dumps({"worker_id": worker_id, "pid": os.getpid()}, separators=(",", ":"))
            return rw.Response(200, body, content_type="application/json")
        if req.path == "/cpu":
            ms = ms_param(req)
            if ms is None:
                return rw.Response(400, f"ms must be an integer in 0..={MAX_MS}\n")
            # Thread CPU time, not wall time: the cost is the same however crowded the cores are.
            end = time.thread_time() + ms / 1000
            while time.thread_time() < end:
                pass
            return rw.Response(200, f"spun {ms} ms of cpu\n")
        if req.path == "/sleep":
            ms = ms_param(req)
            if ms is None:
                return rw.Response(400, f"ms must be an integer in 0..={MAX_MS}\n")
            time.sleep(ms / 1000)
            return rw.Response(200, f"slept {ms} ms\n")
        return rw.Response(404, "not found\n")

    return app


class Misbehaviour:
    """ROUNDHOUSE_PY_MISBEHAVE (see the module doc): break the protocol once, on purpose.

    For the frame-writing modes the worker takes the channel's send lock just before its Nth
    response and never gives it back: the bad frame, written right after that response, is
    then the last frame the primary gets, and no connection handed over meanwhile is
    acknowledged (the primary re-sends it), so a sequential client sees no failure.
    """

    MODES = ("garbage", "oversize", "fds", "badjson", "ready", "badack", "silent", "hang")
    WRITES = ("garbage", "oversize", "fds", "badjson", "ready", "badack")

    def __init__(self, spec, worker_id):
        mode, *opts = spec.split(",")
        if mode not in self.MODES:
            raise SystemExit(f"ROUNDHOUSE_PY_MISBEHAVE: unknown mode {mode!r} (one of {self.MODES})")
        self.mode, self.after, self.claimed = mode, 0, False
        self.once = None
        self._lock = threading.Lock()
        self._armed_by = None  # the pool thread writing the Nth response
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "after":
                self.after = int(value)
            elif key == "worker":
                self.claimed = int(value) != worker_id  # not this worker: never misbehave
            elif key == "once":
                self.once = value
            else:
                raise SystemExit(f"ROUNDHOUSE_PY_MISBEHAVE: unknown option {opt!r}")

    def _claim(self):
        """True for the one call that gets to misbehave (in this process, and per `once`)."""
        with self._lock:
            if self.claimed:
                return False
            self.claimed = True
        if self.once is not None:
            try:
                os.close(os.open(self.once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                return False  # an earlier process of this slot already misbehaved
        return True

    def on_tick(self, w):
        if self.after == 0 and self._claim():
            if self.mode in self.WRITES:
                w.channel.hold()
            self._act(w)

    def before_response(self, w):
        if self.after and not self.claimed and w.stats()[2] + 1 >= self.after and self._claim():
            if self.mode in self.WRITES:
                w.channel.hold()
            self._armed_by = threading.get_ident()

    def on_response(self, w):
        if self._armed_by is not None and self._armed_by == threading.get_ident():
            self._armed_by = None
            self._act(w)

    def _act(self, w):
        rw.log(f"misbehaving on purpose: {self.mode} (ROUNDHOUSE_PY_MISBEHAVE)")
        ch = w.channel
        if self.mode == "garbage":
            ch.send_raw(bytes([0xEE]) + b"garbage!garbage", held=True)
        elif self.mode == "oversize":
            ch.send_raw(rw.HEADER.pack(rw.K_MESSAGE_OUT, b"\0\0\0", 0) + b"x" * 70_000, held=True)
        elif self.mode == "fds":
            fd = os.open(os.devnull, os.O_RDONLY)
            ch.send_raw(rw.encode(rw.K_HEARTBEAT, 0), fds=[fd], held=True)
            os.close(fd)
        elif self.mode == "badjson":
            ch.send_raw(rw.encode(rw.K_MESSAGE_OUT, rw.TO_PRIMARY, b"{not json"), held=True)
        elif self.mode == "ready":
            ch.send_raw(rw.encode(rw.K_READY, rw.PROTOCOL_VERSION), held=True)
        elif self.mode == "badack":
            ch.send_raw(rw.encode_ids(rw.K_ACK, [2**63 + 12345]), held=True)
        elif self.mode == "silent":
            w.muted = True
        elif self.mode == "hang":
            w.stall_channel = True


def main():
    worker_id = int(os.environ.get("ROUNDHOUSE_WORKER_ID", "0"))
    spec = os.environ.get("ROUNDHOUSE_PY_MISBEHAVE")
    misbehaviour = Misbehaviour(spec, worker_id) if spec else None
    hooks = {}
    if misbehaviour:
        hooks = {
            "on_tick": misbehaviour.on_tick,
            "before_response": misbehaviour.before_response,
            "on_response": misbehaviour.on_response,
        }
    worker = rw.Worker(make_app(worker_id), **hooks)
    worker.run()


if __name__ == "__main__":
    main()
