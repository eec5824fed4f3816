"""A tiny ASGI app for uvicorn (or any ASGI server) under `roundhouse run --plain`.

Every request gets 200, the header `x-worker-id` (roundhouse's slot, ROUNDHOUSE_WORKER_ID) and
the body `{"worker_id":N,"pid":P}` — the pid of the process that served it. `GET /sleep?ms=N`
answers after N ms (an in-flight request for drain tests), as `hello-worker` does.
"""

import asyncio
import json
import os
from urllib.parse import parse_qs

WID = os.environ.get("ROUNDHOUSE_WORKER_ID", "0")


async def app(scope, receive, send):
    if scope["type"] != "http":
        return  # lifespan and websocket: nothing to do
    if scope["path"] == "/sleep":
        ms = int(parse_qs(scope["query_string"].decode()).get("ms", ["0"])[0])
        await asyncio.sleep(ms / 1000)
    body = json.dumps({"worker_id": int(WID), "pid": os.getpid()}).encode() + b"\n"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-worker-id", WID.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
