"""A tiny WSGI app for gunicorn (or any WSGI server) under `roundhouse run --plain`.

Every request gets 200, the header `x-worker-id` (roundhouse's slot, ROUNDHOUSE_WORKER_ID) and
the body `{"worker_id":N,"pid":P}` — the pid of the process that served it (one of gunicorn's
own workers, not the gunicorn master roundhouse started). `GET /sleep?ms=N` answers after N ms
(an in-flight request for drain tests), as `hello-worker` does.
"""

import json
import os
import time
from urllib.parse import parse_qs

WID = os.environ.get("ROUNDHOUSE_WORKER_ID", "0")


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/sleep":
        ms = int(parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["0"])[0])
        time.sleep(ms / 1000)
    body = json.dumps({"worker_id": int(WID), "pid": os.getpid()}).encode() + b"\n"
    start_response(
        "200 OK",
        [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("x-worker-id", WID),
        ],
    )
    return [body]
