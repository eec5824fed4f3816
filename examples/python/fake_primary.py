#!/usr/bin/env python3
"""A fake roundhouse primary: a protocol conformance check for workers, standard library only.

    python3 examples/python/fake_primary.py                    # checks examples/python/worker.py
    python3 examples/python/fake_primary.py -- CMD [ARGS...]   # checks another worker

It plays the primary's side of docs/protocol.md against real worker processes: creates the
SOCK_SEQPACKET channel, spawns the worker with ROUNDHOUSE_FD, accepts TCP connections on
127.0.0.1 and hands them over in CONNS frames, and checks READY, ACK (sent before the client has
sent a byte), REFUSE (under MSG_CTRUNC and while draining), STATS (cumulative, rate limited),
HEARTBEAT, ping/pong MESSAGEs, DRAIN, end-of-file, and serving from LISTEN_FDS listeners.
The HTTP checks assume the hello-worker routes (SPEC). It prints one line per check and exits 1
if any failed.
"""

import array
import json
import os
import queue
import resource
import socket
import struct
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = struct.Struct("<B3sI")
K_CONNS, K_DRAIN, K_MESSAGE = 0x01, 0x02, 0x03
K_READY, K_ACK, K_REFUSE, K_STATS, K_HEARTBEAT, K_MESSAGE_OUT = 0x81, 0x82, 0x83, 0x84, 0x85, 0x86
NAMES = {K_READY: "READY", K_ACK: "ACK", K_REFUSE: "REFUSE", K_STATS: "STATS",
         K_HEARTBEAT: "HEARTBEAT", K_MESSAGE_OUT: "MESSAGE"}
BODY_ALWAYS_ZERO = {K_READY, K_HEARTBEAT}


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def frame(kind, arg, body=b""):
    return HEADER.pack(kind, b"\0\0\0", arg) + body


class Frame:
    def __init__(self, kind, arg, body, nfds, at):
        self.kind, self.arg, self.body, self.nfds, self.at = kind, arg, body, nfds, at

    def ids(self):
        return list(struct.unpack(f"<{self.arg}Q", self.body))

    def stats(self):
        return struct.unpack("<QQQ", self.body)

    def json(self):
        return json.loads(self.body.decode())

    def __repr__(self):
        return f"{NAMES.get(self.kind, hex(self.kind))}({self.arg}, {self.body[:60]!r})"


def validate(kind, arg, body, nfds):
    """The primary's view: is this worker frame well-formed (docs/protocol.md section 3)?"""
    if nfds:
        return "a worker frame carried fds"
    if kind in BODY_ALWAYS_ZERO:
        if body or (kind == K_READY and arg != 1) or (kind == K_HEARTBEAT and arg != 0):
            return "bad READY/HEARTBEAT"
    elif kind in (K_ACK, K_REFUSE):
        if not 1 <= arg <= 1024 or len(body) != 8 * arg:
            return "bad ACK/REFUSE length"
    elif kind == K_STATS:
        if arg != 0 or len(body) != 24:
            return "bad STATS"
    elif kind == K_MESSAGE_OUT:
        try:
            json.loads(body.decode("utf-8"))
        except ValueError:
            return "MESSAGE is not UTF-8 JSON"
    else:
        return f"unknown kind {kind:#x}"
    return None


class Worker:
    """One worker process and our (the primary's) end of its channel."""

    next_conn_id = 1

    def __init__(self, cmd, worker_id=1, env=None, listeners=(), rlimit_nofile=None):
        self.id = worker_id
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ch = ours
        full_env = dict(os.environ, ROUNDHOUSE_WORKER_ID=str(worker_id),
                        ROUNDHOUSE_POLICY="none" if listeners else "rr", **(env or {}))
        for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            full_env.pop(k, None)

        def preexec():
            if rlimit_nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (rlimit_nofile, rlimit_nofile))

        if listeners:
            # systemd layout: listeners at 3.., the channel right after; LISTEN_PID is the
            # worker's own pid, so a tiny trampoline sets it and execs (keeping the pid).
            fds = [s.fileno() for s in listeners] + [theirs.fileno()]
            full_env["ROUNDHOUSE_FD"] = str(3 + len(listeners))
            full_env["LISTEN_FDS"] = str(len(listeners))
            full_env["LISTEN_FDNAMES"] = ":".join(f"listen{i}" for i in range(len(listeners)))
            tramp = ("import fcntl,os,sys\n"
                     "src=[int(x) for x in sys.argv[1].split(',')]\n"
                     "hi=[fcntl.fcntl(f,fcntl.F_DUPFD,100) for f in src]\n"
                     "[os.close(f) for f in src]\n"
                     "[os.dup2(h,3+i) for i,h in enumerate(hi)]\n"
                     "[os.close(h) for h in hi]\n"
                     "os.environ['LISTEN_PID']=str(os.getpid())\n"
                     "os.execvp(sys.argv[2],sys.argv[2:])\n")
            argv = [sys.executable, "-c", tramp, ",".join(map(str, fds)), *cmd]
            self.proc = subprocess.Popen(argv, env=full_env, pass_fds=fds, preexec_fn=preexec)
        else:
            full_env["ROUNDHOUSE_FD"] = str(theirs.fileno())
            self.proc = subprocess.Popen(cmd, env=full_env, pass_fds=[theirs.fileno()],
                                         preexec_fn=preexec)
        theirs.close()
        self.frames = queue.Queue()
        self.all_frames = []
        self.last_stats = None
        self.errors = []
        self.eof = threading.Event()
        self.held = {}  # conn_id -> our copy of the socket, until ACK/REFUSE
        self.lock = threading.Lock()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        while True:
            try:
                data, anc, flags, _ = self.ch.recvmsg(65536, socket.CMSG_SPACE(32 * 4),
                                                       socket.MSG_CMSG_CLOEXEC)
            except OSError:
                break
            nfds = 0
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[: len(cdata) - len(cdata) % 4])
                    nfds += len(a)
                    for fd in a:
                        os.close(fd)
            if not data:
                break
            if flags & socket.MSG_TRUNC or len(data) < 8:
                self.errors.append(f"oversized or short frame ({len(data)} bytes)")
                continue
            kind, reserved, arg = HEADER.unpack_from(data)
            body = data[8:]
            err = validate(kind, arg, body, nfds) or (reserved != b"\0\0\0" and "reserved bytes")
            f = Frame(kind, arg, body, nfds, time.monotonic())
            if err:
                self.errors.append(f"{err}: {f!r}")
            with self.lock:
                if kind == K_READY and any(x.kind == K_READY for x in self.all_frames):
                    self.errors.append("a second READY")
                if kind in (K_ACK, K_REFUSE) and not err:
                    for cid in f.ids():
                        sock = self.held.pop(cid, None)
                        if sock is None:
                            self.errors.append(f"ACK/REFUSE of unknown id {cid}")
                        else:
                            sock.close()  # the primary closes its copy once the worker answered
                if kind == K_STATS and not err:
                    prev = self.last_stats
                    if prev and any(n < p for n, p in zip(f.stats(), prev)):
                        self.errors.append(f"STATS went backwards: {prev} -> {f.stats()}")
                    self.last_stats = f.stats()
            self.all_frames.append(f)
            self.frames.put(f)
        self.eof.set()

    def expect(self, kinds, timeout=3.0, pred=lambda f: True):
        """The next frame of one of ``kinds`` matching ``pred``; other frames are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckFailed(f"no {[NAMES[k] for k in kinds]} frame within {timeout}s")
            try:
                f = self.frames.get(timeout=min(left, 0.1))
            except queue.Empty:
                if self.eof.is_set() and self.frames.empty():
                    status = self.proc.poll()
                    raise CheckFailed(f"channel closed (worker exit status {status}) while waiting "
                                      f"for {[NAMES[k] for k in kinds]}")
                continue
            if f.kind in kinds and pred(f):
                return f

    def drain_queue(self):
        while True:
            try:
                self.frames.get_nowait()
            except queue.Empty:
                return

    def send_conns(self, socks, hold=True):
        body, fds, ids = b"", [], []
        for s in socks:
            cid = Worker.next_conn_id
            Worker.next_conn_id += 1
            host, port = s.getpeername()[:2]
            body += struct.pack("<QHBBHH16s", cid, 0, 4, 0, port, 0, socket.inet_aton(host))
            fds.append(s.fileno())
            ids.append(cid)
            if hold:
                with self.lock:
                    self.held[cid] = s
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        self.ch.sendmsg([frame(K_CONNS, len(socks), body)], anc)
        return ids

    def send(self, kind, arg, body=b""):
        self.ch.send(frame(kind, arg, body))

    def close_channel(self):
        """End-of-file for the worker now. A bare close() would not do: while our reader thread
        is blocked in recvmsg the kernel keeps the socket open until that call returns."""
        try:
            self.ch.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ch.close()

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"worker still running after {timeout}s") from None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close_channel()
        with self.lock:
            for s in self.held.values():
                s.close()
            self.held.clear()


class Front:
    """A TCP listener on 127.0.0.1 whose accepted connections we hand to a worker."""

    def __init__(self):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.addr = self.lsock.getsockname()

    def pair(self):
        """(client socket, accepted server-side socket)."""
        c = socket.create_connection(self.addr, timeout=10)
        s, _ = self.lsock.accept()
        return c, s


def read_response(sock, buf=b""):
    """(status, headers, body, leftover bytes) for one HTTP/1.1 response with Content-Length."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise CheckFailed(f"connection closed before a response head ({buf!r})")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers["content-length"])
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise CheckFailed("connection closed in the middle of a body")
        rest += chunk
    return status, headers, rest[:n], rest[n:]


def get(sock, path, extra=""):
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    status, headers, body, leftover = read_response(sock)
    check(not leftover, f"unexpected bytes after the response to {path}")
    return status, headers, body


def expect_eof(sock, timeout, what):
    sock.settimeout(timeout)
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return
    except socket.timeout:
        raise CheckFailed(f"{what}: still open after {timeout}s") from None
    check(data == b"", f"{what}: got {data!r} instead of end of stream")


# --- the checks ---------------------------------------------------------------------------------


def start(cmd, **kw):
    w = Worker(cmd, **kw)
    f = w.expect([K_READY], timeout=10)
    check(f.arg == 1, "READY carries protocol version 1")
    return w


def check_serve(cmd):
    w, front = start(cmd), Front()
    try:
        c, s = front.pair()
        [cid] = w.send_conns([s])
        ack = w.expect([K_ACK, K_REFUSE], timeout=2)
        check(ack.kind == K_ACK and ack.ids() == [cid], f"ACK of [{cid}] (got {ack!r})")
        status, headers, body = get(c, "/")
        check(status == 200 and body == b"hello world\n", f"GET / (got {status} {body!r})")
        check(headers.get("x-worker-id") == "1", "x-worker-id: 1")
        status, headers, body = get(c, "/whoami")  # same connection: keep-alive
        check(json.loads(body) == {"worker_id": 1, "pid": w.proc.pid}, f"/whoami: {body!r}")
        check(headers.get("content-type", "").startswith("application/json"), "/whoami is JSON")
        status, headers, _ = get(c, "/nope")
        check(status == 404 and headers.get("x-worker-id") == "1", "404 with x-worker-id")
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
        st1, _, b1, rest = read_response(c)
        st2, _, b2, rest = read_response(c, rest)
        check(st1 == st2 == 200 and b1 == b"hello world\n" and b"worker_id" in b2 and not rest,
              "pipelined requests answered in order")
        status, headers, _ = get(c, "/", "Connection: close\r\n")
        check(headers.get("connection", "").lower() == "close", "Connection: close echoed")
        expect_eof(c, 2, "server closes after Connection: close")
        c.close()
        # HTTP/1.0 without keep-alive: one response, then close
        c, s = front.pair()
        w.send_conns([s])
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        status, _, body, _ = read_response(c)
        check(status == 200, "HTTP/1.0 request")
        expect_eof(c, 2, "HTTP/1.0 connection closed")
        c.close()
        # bad ms
        c, s = front.pair()
        w.send_conns([s])
        status, _, _ = get(c, "/sleep?ms=abc")
        check(status == 400, f"/sleep?ms=abc is 400 (got {status})")
        c.close()
        check(not w.errors, f"frame errors: {w.errors}")
    finally:
        w.kill()


def check_ack_before_read(cmd):
    """The ACK must come at once, before the worker has read anything: the client sends nothing."""
    w, front = start(cmd), Front()
    try:
        pairs = [front.pair() for _ in range(3)]
        t0 = time.monotonic()
        ids = w.send_conns([s for _, s in pairs])
        ack = w.expect([K_ACK], timeout=2)
        check(ack.ids() == ids, f"one ACK with the frame's ids in order ({ack.ids()} vs {ids})")
        check(time.monotonic() - t0 < 1.0, "ACK within 1 s although no client sent a byte")
        for c, _ in pairs:
            status, headers, _ = get(c, "/")
            check(status == 200, "each batched connection is served")
            c.close()
    finally:
        w.kill()


def check_concurrency(cmd):
    w, front = start(cmd), Front()
    try:
        pairs = [front.pair() for _ in range(8)]
        w.send_conns([s for _, s in pairs])
        results = []

        def one(c):
            results.append(get(c, "/sleep?ms=400")[0])

        t0 = time.monotonic()
        ts = [threading.Thread(target=one, args=(c,)) for c, _ in pairs]
        [t.start() for t in ts]
        [t.join() for t in ts]
        took = time.monotonic() - t0
        check(results == [200] * 8, f"8 concurrent /sleep?ms=400 all 200 ({results})")
        check(took < 1.6, f"8 x /sleep?ms=400 concurrently in {took:.2f}s (< 1.6 s)")
        c = pairs[0][0]
        t0 = time.monotonic()
        status, _, _ = get(c, "/cpu?ms=100")
        took = time.monotonic() - t0
        check(status == 200 and took >= 0.1, f"/cpu?ms=100 took {took:.3f}s")
        # an idle keep-alive connection must not hold a thread: 150 idle + 1 busy still served
        many = [front.pair() for _ in range(150)]
        for i in range(0, len(many), 32):
            w.send_conns([s for _, s in many[i:i + 32]])
        status, _, _ = get(many[-1][0], "/")
        check(status == 200, "served with 150 other connections open")
        for c, _ in pairs + many:
            c.close()
    finally:
        w.kill()


def check_stats_and_heartbeat(cmd):
    w, front = start(cmd), Front()
    try:
        n_conns, n_req = 5, 0
        socks = []
        for _ in range(n_conns):
            c, s = front.pair()
            w.send_conns([s])
            socks.append(c)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:  # a busy second
            for c in socks:
                get(c, "/")
                n_req += 1
        socks[0].close()
        time.sleep(0.3)
        with w.lock:
            last = w.last_stats
        check(last == (n_conns, 1, n_req), f"cumulative STATS {last} == ({n_conns}, 1, {n_req})")
        busy = [f for f in w.all_frames if f.kind == K_STATS and t0 <= f.at <= t0 + 1.0]
        check(len(busy) <= 14, f"{len(busy)} STATS frames in a busy second (at most ~10)")
        check(len(busy) >= 3, f"{len(busy)} STATS frames in a busy second (some)")
        w.drain_queue()
        t0 = time.monotonic()
        w.expect([K_HEARTBEAT], timeout=2.5)
        check(time.monotonic() - t0 <= 2.2, "HEARTBEAT when idle")
        quiet = [f for f in w.all_frames if f.kind == K_STATS and f.at > t0]
        check(not quiet, f"no STATS when nothing changed ({quiet})")
        check(not w.errors, f"frame errors: {w.errors}")
        [c.close() for c in socks[1:]]
    finally:
        w.kill()


def check_messages(cmd):
    w = start(cmd)
    try:
        w.send(K_MESSAGE, 0, b'{"ping":42}')
        f = w.expect([K_MESSAGE_OUT])
        check(f.arg == 0 and f.json() == {"pong": 42, "worker_id": 1}, f"pong to the primary: {f!r}")
        w.send(K_MESSAGE, 7, b'{"ping":{"n":[1,"two"]},"other":true}')
        f = w.expect([K_MESSAGE_OUT])
        check(f.arg == 7 and f.json() == {"pong": {"n": [1, "two"]}, "worker_id": 1},
              f"pong to worker 7: {f!r}")
        w.send(K_MESSAGE, 0, b'{"hello":1}')
        w.send(K_MESSAGE, 0, b'"just a string"')
        w.send(K_MESSAGE, 0, b'{"ping":"last"}')
        f = w.expect([K_MESSAGE_OUT])
        check(f.json()["pong"] == "last", "messages without ping get no answer")
        check(w.proc.poll() is None and not w.errors, "worker alive, no frame errors")
    finally:
        w.kill()


def check_ctrunc(cmd):
    """At its fd limit the worker sees MSG_CTRUNC and must refuse the whole frame."""
    w, front = start(cmd, rlimit_nofile=20), Front()
    try:
        pairs = [front.pair() for _ in range(32)]
        ids = w.send_conns([s for _, s in pairs])
        f = w.expect([K_ACK, K_REFUSE], timeout=3)
        check(f.kind == K_REFUSE and f.ids() == ids, f"REFUSE of all 32 ids (got {f!r})")
        check(w.proc.poll() is None, "worker still alive")
        c, s = front.pair()
        [cid] = w.send_conns([s])
        f = w.expect([K_ACK, K_REFUSE], timeout=3)
        check(f.kind == K_ACK and f.ids() == [cid], f"a single fd afterwards is ACKed ({f!r})")
        check(get(c, "/")[0] == 200, "and served")
        for a, _ in pairs:
            a.close()
        c.close()
    finally:
        w.kill()


def check_drain(cmd):
    w, front = start(cmd), Front()
    try:
        idle, s1 = front.pair()
        busy, s2 = front.pair()
        late, s3 = front.pair()
        mute, s4 = front.pair()
        again, s6 = front.pair()
        w.send_conns([s1, s2, s3, s4, s6])
        w.expect([K_ACK])
        check(get(idle, "/")[0] == 200, "idle keep-alive connection served once")
        check(get(again, "/")[0] == 200, "another keep-alive connection served once")
        busy.sendall(b"GET /sleep?ms=800 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        t0 = time.monotonic()
        w.send(K_DRAIN, 0)
        c5, s5 = front.pair()  # the busy request keeps the worker around for this one
        [cid5] = w.send_conns([s5])
        f = w.expect([K_ACK, K_REFUSE])
        check(f.kind == K_REFUSE and f.ids() == [cid5], f"CONNS after DRAIN refused ({f!r})")
        # `late` was handed over before DRAIN, its first request still on the way; `again` is an
        # idle keep-alive connection whose client sends its next request just as the drain starts.
        time.sleep(0.3)
        late.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        again.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for conn, what in ((late, "its first"), (again, "a keep-alive connection's next")):
            try:
                status, headers, _, _ = read_response(conn)
            except CheckFailed:
                raise CheckFailed(f"{what} request, sent 0.3 s after DRAIN on a connection "
                                  "acknowledged before it, was not served (section 4.7)") from None
            check(status == 200 and headers.get("connection") == "close",
                  f"{what} request right after DRAIN is served, with Connection: close")
            expect_eof(conn, 1.0, "that connection then closed")
        expect_eof(idle, 2.0, "idle keep-alive connection closed promptly at DRAIN")
        status, headers, _, _ = read_response(busy)
        check(status == 200 and headers.get("connection") == "close",
              "in-flight request finished with Connection: close")
        expect_eof(busy, 1.0, "busy connection closed after its response")
        expect_eof(mute, 4.0, "a connection that never sends is closed after a short grace")
        code = w.wait_exit(3)
        check(code == 0, f"exit status 0 after drain (got {code})")
        took = time.monotonic() - t0
        check(took < 4.5, f"drain took {took:.2f}s")
        w.eof.wait(2)
        check(w.last_stats == (5, 5, 5), f"final STATS (5, 5, 5), got {w.last_stats}")
        check(not w.errors, f"frame errors: {w.errors}")
        for c in (idle, busy, late, mute, again, c5):
            c.close()
    finally:
        w.kill()


def check_drain_idle_exit(cmd):
    w = start(cmd)
    try:
        w.send(K_DRAIN, 0)
        check(w.wait_exit(2) == 0, "a worker with no connection exits 0 at once on DRAIN")
    finally:
        w.kill()


def check_eof(cmd):
    w, front = start(cmd), Front()
    try:
        c, s = front.pair()
        w.send_conns([s])
        w.expect([K_ACK])
        c.sendall(b"GET /sleep?ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        t0 = time.monotonic()
        w.close_channel()
        w.wait_exit(2)
        check(time.monotonic() - t0 < 1.0, "exits at once at channel end-of-file, even when busy")
        c.close()
    finally:
        w.kill()


def check_malformed(cmd):
    w = start(cmd)
    try:
        w.send(0x7F, 0)
        check(w.wait_exit(2) == 70, "a malformed frame from the primary: exit 70")
    finally:
        w.kill()
    w = start(cmd)
    try:
        w.send(K_DRAIN, 0, b"x")
        check(w.wait_exit(2) == 70, "a DRAIN with a body: exit 70")
    finally:
        w.kill()


def check_listen_fds(cmd):
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    addr = lsock.getsockname()
    w = start(cmd, listeners=[lsock])
    try:
        conns = [socket.create_connection(addr, timeout=5) for _ in range(3)]
        for c in conns:
            status, headers, _ = get(c, "/")
            check(status == 200 and headers["x-worker-id"] == "1", "served from LISTEN_FDS")
        conns[0].close()
        w.expect([K_STATS], timeout=2, pred=lambda f: f.stats() == (3, 1, 3))
        check(not w.held, "no CONNS involved")
        busy = conns[1]
        busy.sendall(b"GET /sleep?ms=500 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.1)
        w.send(K_DRAIN, 0)
        expect_eof(conns[2], 2.0, "idle connection closed promptly at drain")
        status, headers, _, _ = read_response(busy)
        check(headers.get("connection") == "close", "busy one gets Connection: close")
        check(w.wait_exit(3) == 0, "exit 0 after drain")
        lsock.setblocking(True)
        lsock.settimeout(0.5)
        c = socket.create_connection(addr, timeout=5)
        s, _ = lsock.accept()  # the worker no longer accepts: the listener is still ours
        s.close()
        c.close()
    finally:
        w.kill()
        lsock.close()


def check_misbehave(cmd):
    w, front = start(cmd, env={"ROUNDHOUSE_PY_MISBEHAVE": "garbage,after=2"}), Front()
    try:
        c, s = front.pair()
        w.send_conns([s])
        get(c, "/")
        time.sleep(0.3)
        check(not w.errors, "well-behaved before `after` requests")
        get(c, "/")
        deadline = time.monotonic() + 2
        while not w.errors and time.monotonic() < deadline:
            time.sleep(0.05)
        check(any("unknown kind 0xee" in e for e in w.errors), f"garbage frame seen: {w.errors}")
        c.close()
    finally:
        w.kill()


CHECKS = [check_serve, check_ack_before_read, check_concurrency, check_stats_and_heartbeat,
          check_messages, check_ctrunc, check_drain, check_drain_idle_exit, check_eof,
          check_malformed, check_listen_fds, check_misbehave]


def main():
    argv = sys.argv[1:]
    only = None
    if argv and argv[0] not in ("--",):
        only = set(argv[0].split(","))
        argv = argv[1:]
    if argv and argv[0] == "--":
        cmd = argv[1:]
    else:
        cmd = [sys.executable, os.path.join(HERE, "worker.py")]
    if only is None:
        checks = CHECKS
    else:
        checks = [c for c in CHECKS if c.__name__[len("check_"):] in only]
    if cmd[-1] != os.path.join(HERE, "worker.py"):
        checks = [c for c in checks if c is not check_misbehave]  # this worker's test hook only
    failed = 0
    for c in checks:
        t0 = time.monotonic()
        try:
            c(cmd)
            print(f"ok    {c.__name__} ({time.monotonic() - t0:.1f}s)", flush=True)
        except CheckFailed as e:
            failed += 1
            print(f"FAIL  {c.__name__}: {e}", flush=True)
        except Exception as e:
            failed += 1
            print(f"FAIL  {c.__name__}: {e!r}", flush=True)
    print(f"{len(checks) - failed}/{len(checks)} checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
