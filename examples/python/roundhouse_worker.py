"""A roundhouse worker runtime in Python 3, standard library only.

Written from ``docs/protocol.md`` alone, to show that the channel protocol is language-neutral.
It speaks the worker side of the protocol and serves HTTP/1.1 on the connections the primary
hands over; the application is a plain function ``app(request) -> Response``.

Theory of operation (the design of gunicorn's ``gthread`` worker, on a roundhouse channel):

* **channel thread** -- blocks in ``recvmsg`` on the channel.  ``CONNS``: acknowledge the frame's
  ids at once (before any byte of those sockets is read), or refuse them while draining or when
  ``MSG_CTRUNC`` shows fds were lost; then hand the sockets to the I/O thread.  ``DRAIN``: start
  draining.  ``MESSAGE``: answer ``{"ping": X}`` with ``{"pong": X, "worker_id": N}`` to the
  sender, then call the application's message hook.  End-of-file: the primary is gone, exit now.
* **I/O thread** -- one ``selectors`` loop over the *idle* connections (waiting for their next
  request) and, under ``none``/``reuseport``, the inherited listeners.  A connection that becomes
  readable is handed to the thread pool; after its response it comes back here (keep-alive).
  Idle keep-alive connections therefore cost no thread.
* **thread pool** -- a bounded pool of daemon threads; each takes one readable connection, reads
  a request, runs the application, writes the response (``Content-Length``; pipelined requests
  already buffered are served in the same turn) and returns the connection to the I/O thread or
  closes it.  ``/sleep`` or ``/cpu`` occupy a pool thread, not the whole worker.
* **stats thread** -- every 100 ms sends ``STATS`` (cumulative accepted / closed / requests) when
  a figure changed, and ``HEARTBEAT`` when nothing was sent for a second.
* **main thread** -- waits for the exit decision, sends a last ``STATS`` and exits.

Drain (``DRAIN`` frame, or ``SIGTERM``): refuse further ``CONNS``, stop accepting on (and close)
the listeners, answer every response from then on with ``Connection: close``, close a connection
that stays idle for ``DRAIN_IDLE_WAIT`` (1 s, as the Rust library), and exit 0 once no
connection is left.
"""

import array
import errno
import json
import os
import queue
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

# --- protocol constants (docs/protocol.md sections 2, 3, 7) ------------------------------------

PROTOCOL_VERSION = 1
MAX_FRAME = 65536
MAX_FDS_PER_FRAME = 32
MAX_IDS_PER_ACK = 1024
MAX_MESSAGE = MAX_FRAME - 8

# primary -> worker
K_CONNS = 0x01
K_DRAIN = 0x02
K_MESSAGE_IN = 0x03
# worker -> primary
K_READY = 0x81
K_ACK = 0x82
K_REFUSE = 0x83
K_STATS = 0x84
K_HEARTBEAT = 0x85
K_MESSAGE_OUT = 0x86

TO_PRIMARY = 0
TO_ALL = 0xFFFFFFFF

HEADER = struct.Struct("<B3sI")  # kind, reserved (must be zero), arg
RECORD = struct.Struct("<QHBBHH16s")  # conn_id, listener, family, rsvd, port, rsvd, address
STATS_BODY = struct.Struct("<QQQ")
FD_SIZE = array.array("i").itemsize
ANC_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * FD_SIZE)

EX_SOFTWARE = 70  # a malformed frame from the primary (same status as the Rust worker library)

# --- tunables -----------------------------------------------------------------------------------

# Under least-conn the primary picks by open connections: report closes sooner (protocol.md 4.4).
STATS_INTERVAL = 0.01 if os.environ.get("ROUNDHOUSE_POLICY") == "least-conn" else 0.1
# A quarter of the primary's --heartbeat-timeout, when it says so (docs/protocol.md section 1).
HEARTBEAT_INTERVAL = max(0.01, int(os.environ.get("ROUNDHOUSE_HEARTBEAT_MS", "1000")) / 1000.0)
IO_TIMEOUT = 30.0  # a started request, or a response write, must progress within this
DRAIN_IDLE_WAIT = 1.0  # at drain, an idle connection gets this long to send one more request
MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024

_LOG_DEBUG = os.environ.get("ROUNDHOUSE_PY_LOG", "") == "debug"


def log(msg, *, debug=False):
    if debug and not _LOG_DEBUG:
        return
    wid = os.environ.get("ROUNDHOUSE_WORKER_ID", "?")
    sys.stderr.write(f"python-worker[{wid}] pid={os.getpid()}: {msg}\n")
    sys.stderr.flush()


class ProtocolError(Exception):
    """The primary sent something docs/protocol.md does not allow."""


class ChannelClosed(Exception):
    """The primary's end of the channel is gone."""


# --- frames -------------------------------------------------------------------------------------


def encode(kind, arg, body=b""):
    frame = HEADER.pack(kind, b"\0\0\0", arg) + body
    if len(frame) > MAX_FRAME:
        raise ValueError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME}")
    return frame


def encode_ids(kind, ids):
    if not 1 <= len(ids) <= MAX_IDS_PER_ACK:
        raise ValueError(f"{len(ids)} ids in one ACK/REFUSE")
    return encode(kind, len(ids), struct.pack(f"<{len(ids)}Q", *ids))


class ConnRecord:
    __slots__ = ("conn_id", "listener", "family", "port", "addr")

    def __init__(self, raw):
        conn_id, listener, family, r1, port, r2, addr = RECORD.unpack(raw)
        if r1 or r2:
            raise ProtocolError("non-zero reserved bytes in a connection record")
        if family == 4:
            self.addr = socket.inet_ntop(socket.AF_INET, addr[:4])
        elif family == 6:
            self.addr = socket.inet_ntop(socket.AF_INET6, addr)
        else:
            raise ProtocolError(f"connection record with family {family}")
        self.conn_id, self.listener, self.family, self.port = conn_id, listener, family, port

    def __repr__(self):
        return f"conn#{self.conn_id} from {self.addr}:{self.port} on listener {self.listener}"


def decode(data, nfds):
    """Validate one primary -> worker frame; return (kind, arg, body)."""
    if len(data) < HEADER.size:
        raise ProtocolError(f"frame of {len(data)} bytes is shorter than the header")
    kind, reserved, arg = HEADER.unpack_from(data)
    body = data[HEADER.size:]
    if reserved != b"\0\0\0":
        raise ProtocolError("non-zero reserved header bytes")
    if kind == K_CONNS:
        if not 1 <= arg <= MAX_FDS_PER_FRAME:
            raise ProtocolError(f"CONNS with count {arg}")
        if len(body) != arg * RECORD.size:
            raise ProtocolError(f"CONNS({arg}) with a {len(body)}-byte body")
    elif kind == K_DRAIN:
        if arg != 0 or body:
            raise ProtocolError("DRAIN with an argument or a body")
    elif kind == K_MESSAGE_IN:
        pass
    else:
        raise ProtocolError(f"unknown frame kind {kind:#04x}")
    if kind != K_CONNS and nfds:
        raise ProtocolError(f"{nfds} fds on a frame of kind {kind:#04x}")
    return kind, arg, body


# --- the channel --------------------------------------------------------------------------------


class Channel:
    """The worker's end of the AF_UNIX SOCK_SEQPACKET channel: one sendmsg/recvmsg per frame."""

    def __init__(self, fd):
        self.sock = socket.socket(fileno=fd)  # family and type are read from the fd
        if self.sock.type != socket.SOCK_SEQPACKET:
            log(f"warning: ROUNDHOUSE_FD={fd} is not a SOCK_SEQPACKET socket")
        self.sock.setblocking(True)
        self._lock = threading.Lock()
        self.last_send = time.monotonic()

    def send(self, kind, arg, body=b""):
        self.send_raw(encode(kind, arg, body))

    def send_raw(self, frame, fds=(), *, held=False):
        """Send one frame as is; ``held=True`` when the caller already holds the send lock."""
        if held:
            return self._sendmsg(frame, fds)
        with self._lock:
            self._sendmsg(frame, fds)

    def _sendmsg(self, frame, fds):
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            self.sock.sendmsg([frame], anc, socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ChannelClosed(str(e)) from e
        self.last_send = time.monotonic()

    def hold(self):
        """Take the send lock for good: no frame but the holder's (``held=True``) leaves any more.

        A test hook (worker.py's ROUNDHOUSE_PY_MISBEHAVE): once a worker has decided to break the
        protocol, it must not acknowledge another connection before its bad frame."""
        self._lock.acquire()

    def recv(self):
        """One frame: (data, fds, msg_flags). Received fds are close-on-exec."""
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(MAX_FRAME, ANC_SPACE, socket.MSG_CMSG_CLOEXEC)
                break
            except InterruptedError:
                continue
            except ConnectionResetError as e:
                raise ChannelClosed(str(e)) from e
        fds = []
        for level, ctype, cdata in anc:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cdata[: len(cdata) - len(cdata) % FD_SIZE])
                fds.extend(a)
        return data, fds, flags


def close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --- HTTP/1.1 -----------------------------------------------------------------------------------

REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    def __init__(self, status, text):
        super().__init__(text)
        self.status = status


class Request:
    __slots__ = ("method", "target", "path", "query", "version", "headers", "body", "peer")

    def __init__(self, method, target, version, headers, body, peer):
        self.method, self.target, self.version = method, target, version
        self.headers, self.body, self.peer = headers, body, peer
        parts = urlsplit(target)
        self.path = parts.path or "/"
        self.query = parse_qs(parts.query)

    def header_tokens(self, name):
        return {t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()}

    def wants_keep_alive(self):
        conn = self.header_tokens("connection")
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status=200, body=b"", content_type="text/plain; charset=utf-8", headers=()):
        if isinstance(body, str):
            body = body.encode()
        self.status, self.body = status, body
        self.headers = [("content-type", content_type), *headers]


class Connection:
    __slots__ = ("sock", "buf", "served", "peer", "since")

    def __init__(self, sock, peer):
        self.sock, self.peer = sock, peer
        self.buf = bytearray()
        self.served = 0
        self.since = time.monotonic()

    def fill(self):
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def read_request(self):
        """The next request, or None on a clean end of stream between requests."""
        while self.buf[:2] == b"\r\n":  # RFC 9112 2.2: ignore empty lines before a request
            del self.buf[:2]
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buf) > MAX_HEAD:
                raise HttpError(431, "request head too large")
            if not self.fill():
                if self.buf.strip():
                    raise HttpError(400, "connection closed in the middle of a request head")
                return None
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[: end + 4]
        lines = head.split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise HttpError(400, "malformed request line") from None
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HttpError(505 if version.startswith("HTTP/") else 400, "unsupported version")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise HttpError(400, "malformed header line")
            name = name.lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        te = headers.get("transfer-encoding")
        if te is not None:
            if "content-length" in headers or te.lower() != "chunked":
                raise HttpError(501 if "content-length" not in headers else 400, "transfer-encoding")
            body = self._read_chunked()
        else:
            cl = headers.get("content-length", "0")
            if not cl.isdigit():
                raise HttpError(400, "bad content-length")
            if int(cl) > MAX_BODY:
                raise HttpError(413, "body too large")
            body = self._read_exact(int(cl))
        return Request(method, target, version, headers, body, self.peer)

    def _read_exact(self, n):
        while len(self.buf) < n:
            if not self.fill():
                raise HttpError(400, "connection closed in the middle of a body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def _read_line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            if len(self.buf) > MAX_HEAD:
                raise HttpError(400, "chunk line too long")
            if not self.fill():
                raise HttpError(400, "connection closed in the middle of a chunked body")

    def _read_chunked(self):
        body = bytearray()
        while True:
            size_text = self._read_line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpError(400, "bad chunk size") from None
            if size == 0:
                while self._read_line():  # trailers, up to the empty line
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise HttpError(413, "body too large")
            body += self._read_exact(size)
            if self._read_exact(2) != b"\r\n":
                raise HttpError(400, "chunk not followed by CRLF")


def encode_response(resp, *, worker_id, keep_alive, head_only, http10):
    lines = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Unknown')}"]
    lines += [f"{k}: {v}" for k, v in resp.headers]
    lines.append(f"content-length: {len(resp.body)}")
    lines.append(f"x-worker-id: {worker_id}")
    if not keep_alive:
        lines.append("connection: close")
    elif http10:
        lines.append("connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + resp.body


# --- a bounded pool of daemon threads -----------------------------------------------------------


class Pool:
    """Runs callables on at most ``size`` daemon threads, spawned on demand; the rest queue."""

    def __init__(self, size):
        self.size = size
        self._q = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._idle = self._pending = 0

    def submit(self, fn, *args):
        with self._lock:
            self._pending += 1
            spawn = self._pending > self._idle and self._threads < self.size
            if spawn:
                self._threads += 1
        if spawn:
            threading.Thread(target=self._run, name=f"pool-{self._threads}", daemon=True).start()
        self._q.put((fn, args))

    def _run(self):
        while True:
            with self._lock:
                self._idle += 1
            fn, args = self._q.get()
            with self._lock:
                self._idle -= 1
                self._pending -= 1
            try:
                fn(*args)
            except Exception as e:  # a bug in one request must not kill the pool thread
                log(f"error in pool thread: {e!r}")


# --- the worker ---------------------------------------------------------------------------------


class Worker:
    """Speaks the roundhouse protocol on ``ROUNDHOUSE_FD`` and serves ``app`` over HTTP/1.1.

    ``app(request) -> Response`` runs on a pool thread.  Optional hooks: ``on_message(sender,
    value)`` on the channel thread for every MESSAGE (after the built-in ping/pong);
    ``on_tick(worker)`` on the stats thread every 100 ms; ``before_response(worker)`` and
    ``on_response(worker)`` on the pool thread just before a response is written and just after
    it was written and counted.
    """

    def __init__(self, app, *, threads=None, on_message=None, on_tick=None,
                 before_response=None, on_response=None):
        self.app, self.on_message, self.on_tick = app, on_message, on_tick
        self.before_response, self.on_response = before_response, on_response
        try:
            fd = int(os.environ["ROUNDHOUSE_FD"])
            self.worker_id = int(os.environ["ROUNDHOUSE_WORKER_ID"])
        except (KeyError, ValueError):
            raise SystemExit(
                "this program is a roundhouse worker: run it as "
                "`roundhouse run -- python3 worker.py` (ROUNDHOUSE_FD/ROUNDHOUSE_WORKER_ID unset)"
            ) from None
        self.policy = os.environ.get("ROUNDHOUSE_POLICY", "rr")
        self.channel = Channel(fd)
        self.pool = Pool(threads or int(os.environ.get("ROUNDHOUSE_PY_THREADS", "128")))
        self.listeners = self._inherited_listeners()

        self._lock = threading.Lock()  # counters, connection set, draining flag
        self.accepted = self.closed = self.requests = 0
        self.draining = False
        self._conns = set()
        self._exit = threading.Event()
        self._exit_code = 0
        self._last_stats = (0, 0, 0)
        self.muted = False  # test hook: send nothing more on the channel
        self.stall_channel = False  # test hook: stop reading the channel

        self._sel = selectors.DefaultSelector()
        self._cmds = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- setup and main ----------------------------------------------------------------------

    def _inherited_listeners(self):
        """systemd-style listeners (docs/protocol.md section 6), only if LISTEN_PID is ours."""
        n = os.environ.get("LISTEN_FDS")
        if n is None:
            if self.policy in ("none", "reuseport"):
                raise SystemExit(f"policy {self.policy} but no LISTEN_FDS in the environment")
            return []
        if os.environ.get("LISTEN_PID") != str(os.getpid()):
            log(f"ignoring LISTEN_FDS: LISTEN_PID={os.environ.get('LISTEN_PID')} is not this process")
            if self.policy in ("none", "reuseport"):
                raise SystemExit(f"policy {self.policy} but the listeners are not for this process")
            return []
        listeners = []
        for fd in range(3, 3 + int(n)):
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            listeners.append(sock)
        return listeners

    def run(self):
        signal.signal(signal.SIGTERM, lambda *_: self.start_drain("SIGTERM"))
        threading.Thread(target=self._io_loop, name="io", daemon=True).start()
        threading.Thread(target=self._stats_loop, name="stats", daemon=True).start()
        try:
            self.channel.send(K_READY, PROTOCOL_VERSION)
        except ChannelClosed:
            self._die(0, "channel closed before READY")
        log(f"ready: policy {self.policy}, {len(self.listeners)} inherited listener(s)", debug=True)
        threading.Thread(target=self._channel_loop, name="channel", daemon=True).start()
        while not self._exit.wait(3600):
            pass
        try:
            self._send_stats_if_changed()
        except ChannelClosed:
            pass
        log(f"exiting with status {self._exit_code}", debug=True)
        self._die(self._exit_code)

    def _die(self, code, why=None):
        if why:
            log(why)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def finish(self, code):
        self._exit_code = code
        self._exit.set()

    # -- messages ----------------------------------------------------------------------------

    def send_message(self, to, value):
        """Send one JSON value to the primary (0), a worker id, or TO_ALL."""
        payload = json.dumps(value, separators=(",", ":")).encode()
        if len(payload) > MAX_MESSAGE:
            raise ValueError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE}")
        self.channel.send(K_MESSAGE_OUT, to, payload)

    def _handle_message(self, sender, body):
        try:
            value = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            log(f"ignoring a MESSAGE from {sender} that is not UTF-8 JSON: {e}")
            return
        log(f"message from {sender}: {body[:200]!r}", debug=True)
        if isinstance(value, dict) and "ping" in value:
            try:
                self.send_message(sender, {"pong": value["ping"], "worker_id": self.worker_id})
            except ValueError as e:
                log(f"cannot answer ping: {e}")
        if self.on_message:
            self.on_message(sender, value)

    # -- the channel thread ------------------------------------------------------------------

    def _channel_loop(self):
        try:
            while True:
                if self.stall_channel:
                    threading.Event().wait()
                data, fds, flags = self.channel.recv()
                if not data:
                    close_fds(fds)
                    self._die(0, "channel closed: the primary is gone, exiting")
                if flags & socket.MSG_TRUNC:
                    close_fds(fds)
                    raise ProtocolError("oversized frame (MSG_TRUNC)")
                kind, arg, body = decode(data, len(fds) + bool(flags & socket.MSG_CTRUNC))
                if kind == K_CONNS:
                    self._take_conns(arg, body, fds, flags)
                elif kind == K_DRAIN:
                    self.start_drain("DRAIN")
                else:
                    self._handle_message(arg, body)
        except ProtocolError as e:
            self._die(EX_SOFTWARE, f"protocol error from the primary: {e}")
        except ChannelClosed as e:
            self._die(0, f"channel closed ({e}): the primary is gone, exiting")

    def _take_conns(self, n, body, fds, flags):
        try:
            records = [ConnRecord(body[i * RECORD.size:(i + 1) * RECORD.size]) for i in range(n)]
        except ProtocolError:
            close_fds(fds)
            raise
        ids = [r.conn_id for r in records]
        truncated = bool(flags & socket.MSG_CTRUNC)
        if not truncated and len(fds) != n:
            close_fds(fds)
            raise ProtocolError(f"CONNS({n}) carried {len(fds)} fds")
        conns = []
        with self._lock:
            refuse = truncated or self.draining
            if not refuse:
                for rec, fd in zip(records, fds):
                    sock = socket.socket(fileno=fd)  # no byte is read before the ACK below
                    sock.settimeout(IO_TIMEOUT)
                    conns.append(Connection(sock, (rec.addr, rec.port)))
                self._conns.update(conns)
                self.accepted += n
        if refuse:
            # Close our copies unread; the primary re-sends them to another worker.
            close_fds(fds)
            self.channel.send_raw(encode_ids(K_REFUSE, ids))
            log(f"refused {ids} ({'fds lost: MSG_CTRUNC' if truncated else 'draining'})", debug=True)
            return
        self.channel.send_raw(encode_ids(K_ACK, ids))  # before any byte of them is read
        for conn in conns:
            self._command("idle", conn)

    # -- connections -------------------------------------------------------------------------

    def _adopt(self, conn):
        """A connection accepted on an inherited listener (none/reuseport)."""
        with self._lock:
            self.accepted += 1
            self._conns.add(conn)
        self._command("idle", conn)

    def _close(self, conn):
        try:
            conn.sock.close()
        except OSError:
            pass
        with self._lock:
            if conn not in self._conns:
                return
            self._conns.remove(conn)
            self.closed += 1
            done = self.draining and not self._conns
        if done:
            self.finish(0)

    def _serve(self, conn):
        """Pool thread: serve the requests available on ``conn``, then hand it back or close."""
        try:
            while True:
                try:
                    req = conn.read_request()
                except HttpError as e:
                    self._respond(conn, Response(e.status, f"{e}\n"), False, False, False)
                    return self._close(conn)
                if req is None:
                    return self._close(conn)
                try:
                    resp = self.app(req)
                except Exception as e:
                    log(f"application error on {req.method} {req.target}: {e!r}")
                    resp = Response(500, "internal error\n")
                keep = req.wants_keep_alive()
                if not self._respond(conn, resp, keep, req.method == "HEAD", req.version == "HTTP/1.0"):
                    return self._close(conn)
                if not conn.buf:
                    break
            self._command("idle", conn)
        except OSError as e:  # includes socket.timeout
            log(f"connection from {conn.peer} ended: {e!r}", debug=True)
            self._close(conn)

    def _respond(self, conn, resp, keep, head_only, http10):
        """Write one response; count it; return whether the connection stays open."""
        with self._lock:
            keep = keep and not self.draining  # busy connections learn of a drain here
        if self.before_response:
            self.before_response(self)
        conn.sock.sendall(encode_response(
            resp, worker_id=self.worker_id, keep_alive=keep, head_only=head_only, http10=http10))
        conn.served += 1
        with self._lock:
            self.requests += 1
        if self.on_response:
            self.on_response(self)
        return keep

    # -- the I/O thread ----------------------------------------------------------------------

    def _command(self, *cmd):
        self._cmds.put(cmd)
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the waker is already full of wake-ups

    def start_drain(self, why):
        with self._lock:
            if self.draining:
                return
            self.draining = True
        log(f"draining ({why})", debug=True)
        self._command("drain")

    def _io_loop(self):
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        for i, lsock in enumerate(self.listeners):
            self._sel.register(lsock, selectors.EVENT_READ, ("listener", i))
        idle_deadline = {}  # during a drain: idle connection -> when to close it
        while True:
            timeout = 0.2 if idle_deadline else None
            for key, _ in self._sel.select(timeout):
                if key.data == "wake":
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                elif isinstance(key.data, tuple):
                    self._accept(key.fileobj)
                else:
                    conn = key.data
                    self._sel.unregister(conn.sock)
                    idle_deadline.pop(conn, None)
                    self.pool.submit(self._serve, conn)
            while True:
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == "idle":
                    self._park(cmd[1], idle_deadline)
                elif cmd[0] == "drain":
                    self._io_drain(idle_deadline)
            if idle_deadline:
                now = time.monotonic()
                for conn in [c for c, t in idle_deadline.items() if t <= now]:
                    del idle_deadline[conn]
                    self._sel.unregister(conn.sock)
                    self._close(conn)

    def _accept(self, lsock):
        while True:
            if self.draining:
                return
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log(f"accept failed: {e}")
                    time.sleep(0.05)  # back off rather than spin; the backlog holds the rest
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            sock.settimeout(IO_TIMEOUT)
            self._adopt(Connection(sock, addr[:2]))

    def _park(self, conn, idle_deadline):
        """An idle connection waits here (no thread) for its next request.

        During a drain it waits DRAIN_IDLE_WAIT at most: closing it the instant the drain starts
        would race a client already sending its next request (or, on a connection handed over
        just before the DRAIN, its first one), and that request would fail."""
        if self.draining:
            state = self._peek(conn)
            if state == "data":
                return self.pool.submit(self._serve, conn)  # answered with Connection: close
            if state == "eof":
                return self._close(conn)
            idle_deadline[conn] = time.monotonic() + DRAIN_IDLE_WAIT
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _io_drain(self, idle_deadline):
        for lsock in self.listeners:
            self._sel.unregister(lsock)
            lsock.close()
        self.listeners = []
        for key in list(self._sel.get_map().values()):
            if isinstance(key.data, Connection):
                self._sel.unregister(key.fileobj)
                self._park(key.data, idle_deadline)
        with self._lock:
            done = not self._conns
        if done:
            self.finish(0)

    @staticmethod
    def _peek(conn):
        """Whether an idle connection has its next request waiting ("data"), hit EOF or neither.

        Only the I/O thread touches an idle connection, so the timeout can be lifted for the peek
        (with a timeout set, Python waits for readability before calling recv)."""
        conn.sock.settimeout(0)
        try:
            data = conn.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return "idle"
        except OSError:
            return "eof"
        finally:
            conn.sock.settimeout(IO_TIMEOUT)
        return "data" if data else "eof"

    # -- the stats thread --------------------------------------------------------------------

    def _stats_loop(self):
        try:
            while not self._exit.wait(STATS_INTERVAL):
                if self.muted:
                    continue
                if not self._send_stats_if_changed():
                    if time.monotonic() - self.channel.last_send >= HEARTBEAT_INTERVAL:
                        self.channel.send(K_HEARTBEAT, 0)
                if self.on_tick:
                    self.on_tick(self)
        except ChannelClosed as e:
            self._die(0, f"channel closed ({e}): the primary is gone, exiting")

    def stats(self):
        with self._lock:
            return (self.accepted, self.closed, self.requests)

    def _send_stats_if_changed(self):
        snap = self.stats()
        if snap == self._last_stats:
            return False
        self.channel.send(K_STATS, 0, STATS_BODY.pack(*snap))
        self._last_stats = snap
        return True
