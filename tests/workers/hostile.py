#!/usr/bin/env python3
"""A misbehaving roundhouse worker, written from docs/protocol.md alone (Python 3 stdlib).

    hostile.py MODE

The tests in tests/hostile.rs run it in one worker slot beside a good hello-worker, to check
that the primary detects each kind of misbehaviour, kills and replaces the worker, and keeps
serving through the other one. Every mode starts like a real worker (READY, version 1). Most
then wait for their first CONNS frame and keep its connections *unacknowledged*, so that when
the primary kills them it must hand those connections to another worker (promise 1). Then:

| mode            | what it does (section of docs/protocol.md it breaks)                       |
|-----------------|-----------------------------------------------------------------------------|
| garbage         | sends bytes that are no frame: unknown kind, non-zero reserved bytes (3)   |
| oversized       | sends a 100 000-byte frame, above the 65536-byte maximum (2, 5)            |
| ready-twice     | sends READY a second time (5)                                              |
| ack-unknown     | acknowledges a connection id it was never given (4.3, 5)                   |
| refuse-unknown  | refuses a connection id it was never given (4.3, 5)                        |
| fds             | attaches an fd (a connection it was handed) to a HEARTBEAT (3, 5)          |
| many-fds        | attaches 200 fds to a HEARTBEAT: more than the primary's control buffer    |
|                 | holds, so the kernel truncates them (MSG_CTRUNC) (3, 5)                    |
| bad-json        | sends a MESSAGE whose body is not JSON (4.6, 5)                             |
| bad-version     | announces protocol version 2 in its first READY (3, 4.1)                   |
| stats-backwards | reports cumulative STATS that go down (4.4)                                |
| close-channel   | closes its channel but keeps running (5)                                   |
| no-read         | never reads its channel again, but sends HEARTBEAT every 200 ms (2, 7)     |
| silent          | never reads its channel and sends nothing: hung (4.5)                      |
| flood           | sends FLOOD_MB MiB of valid frames as fast as the channel takes them, then  |
|                 | an oversized frame (so the test also sees it detected after the flood).     |
|                 | FLOOD_KIND=small: STATS and HEARTBEAT frames only; FLOOD_KIND=big (default):|
|                 | max-size MESSAGEs (a 65526-byte JSON string) to worker FLOOD_TO (0 = the    |
|                 | primary, the default) with STATS and HEARTBEAT in between. Meanwhile a      |
|                 | thread reads the channel and REFUSEs every CONNS, as a draining worker may, |
|                 | so the flood is the only thing wrong with it.                               |

After misbehaving it sleeps (it never exits by itself): the primary must notice and kill it.
It prints one line to stderr, `hostile worker ID pid PID: MODE: DETAIL`, just before it misbehaves.
"""

import array
import os
import socket
import struct
import sys
import time

READY, ACK, REFUSE, STATS, HEARTBEAT, MESSAGE = 0x81, 0x82, 0x83, 0x84, 0x85, 0x86
CONNS = 0x01
MAX_FRAME = 65536


def header(kind, arg):
    return struct.pack("<B3xI", kind, arg)


def say(mode, detail):
    wid = os.environ.get("ROUNDHOUSE_WORKER_ID", "?")
    sys.stderr.write(f"hostile worker {wid} pid {os.getpid()}: {mode}: {detail}\n")
    sys.stderr.flush()


def sleep_forever():
    while True:
        time.sleep(3600)


def wait_for_conns(ch):
    """Blocks until a CONNS frame arrives; returns (ids, fds) and keeps the fds open."""
    while True:
        data, anc, flags, _ = ch.recvmsg(MAX_FRAME, socket.CMSG_SPACE(64 * 4))
        if not data:
            sys.exit(0)  # the primary is gone
        fds = array.array("i")
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        kind, arg = struct.unpack("<B3xI", data[:8])
        if kind == CONNS:
            ids = [struct.unpack("<Q", data[8 + 32 * i : 16 + 32 * i])[0] for i in range(arg)]
            return ids, list(fds)
        for fd in fds:
            os.close(fd)


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "garbage"
    ch = socket.socket(fileno=int(os.environ["ROUNDHOUSE_FD"]))
    ch.setblocking(True)

    if mode == "bad-version":
        say(mode, "sending READY version 2")
        ch.send(header(READY, 2))
        sleep_forever()

    ch.send(header(READY, 1))

    if mode == "silent":
        say(mode, "online, now silent and not reading")
        sleep_forever()
    if mode == "no-read":
        say(mode, "online, not reading, heartbeating")
        while True:
            ch.send(header(HEARTBEAT, 0))
            time.sleep(0.2)
    if mode == "stats-backwards":
        ch.send(header(STATS, 0) + struct.pack("<QQQ", 0, 0, 5))
    if mode == "flood":
        flood(ch, mode)
        sleep_forever()

    ids, fds = wait_for_conns(ch)
    # Said before misbehaving: the primary may kill us the moment it reads the next frame.
    say(mode, f"misbehaving, holding {len(ids)} unacknowledged connection(s) {ids}")
    if mode == "garbage":
        ch.send(b"\x67arbage!" + os.urandom(200))
    elif mode == "oversized":
        ch.send(header(MESSAGE, 0) + b" " * 100_000)
    elif mode == "ready-twice":
        ch.send(header(READY, 1))
    elif mode == "ack-unknown":
        ch.send(header(ACK, 1) + struct.pack("<Q", max(ids) + 1_000_000))
    elif mode == "refuse-unknown":
        ch.send(header(REFUSE, 1) + struct.pack("<Q", max(ids) + 1_000_000))
    elif mode == "many-fds":
        extra = [os.dup(0) for _ in range(200)]
        ch.sendmsg(
            [header(HEARTBEAT, 0)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", extra))],
        )
    elif mode == "fds":
        ch.sendmsg(
            [header(HEARTBEAT, 0)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds[:1]))],
        )
    elif mode == "bad-json":
        ch.send(header(MESSAGE, 0) + b'{"not": json')
    elif mode == "stats-backwards":
        ch.send(header(STATS, 0) + struct.pack("<QQQ", 0, 0, 1))
    elif mode == "close-channel":
        ch.close()
    else:
        say(mode, "unknown mode")
        sys.exit(2)
    sleep_forever()


def refuse_everything(ch):
    """Reads the channel; REFUSEs every CONNS (closing its fds), ignores everything else."""
    while True:
        data, anc, _, _ = ch.recvmsg(MAX_FRAME, socket.CMSG_SPACE(64 * 4))
        if not data:
            return
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                for fd in fds:
                    os.close(fd)
        kind, arg = struct.unpack("<B3xI", data[:8])
        if kind == CONNS:
            ids = data[8 : 8 + 32 * arg]
            body = b"".join(ids[32 * i : 32 * i + 8] for i in range(arg))
            ch.send(header(REFUSE, arg) + body)


def flood(ch, mode):
    import threading

    threading.Thread(target=refuse_everything, args=(ch,), daemon=True).start()
    total = int(float(os.environ.get("FLOOD_MB", "16")) * 1024 * 1024)
    to = int(os.environ.get("FLOOD_TO", "0"))
    small = os.environ.get("FLOOD_KIND", "big") == "small"
    # Largest valid MESSAGE: a JSON string filling the frame.
    body = b'"' + b"x" * (MAX_FRAME - 8 - 2) + b'"'
    big = header(MESSAGE, to) + body
    stats = [0, 0, 0]
    sent = 0
    frames = 0
    start = time.monotonic()
    while sent < total:
        if not small:
            ch.send(big)
            sent += len(big)
            frames += 1
        for _ in range(16):
            stats[2] += 1
            ch.send(header(STATS, 0) + struct.pack("<QQQ", *stats))
            ch.send(header(HEARTBEAT, 0))
            sent += 40
            frames += 2
    took = time.monotonic() - start
    say(mode, f"flooded {sent} bytes in {frames} frames in {took:.2f} s; now an oversized frame")
    ch.send(header(MESSAGE, 0) + b" " * 100_000)


if __name__ == "__main__":
    try:
        main()
    except (BrokenPipeError, ConnectionResetError):
        sleep_forever()  # the primary closed the channel: still do not exit by ourselves
