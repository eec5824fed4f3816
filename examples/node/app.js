'use strict';
// A plain Node.js `http` app, the kind roundhouse runs unchanged with `--node`:
//
//   roundhouse run --node -w 4 -l 127.0.0.1:8000 -- node examples/node/app.js
//
// It listens on $PORT (default 3000) like any app; under roundhouse that listen() is served by
// the primary's listeners instead. Routes mirror hello-worker's: `/`, `/whoami`, `/sleep?ms=N`,
// `/cpu?ms=N`; every response carries `x-worker-id`. It answers a message `{"ping": X}` with
// `{"pong": X, "worker_id": N}` through process.send (to the primary).
const http = require('http');

const workerId = Number(process.env.ROUNDHOUSE_WORKER_ID) || 0;
const port = Number(process.env.PORT) || 3000;

function cpu(ms) {
  const start = process.cpuUsage();
  for (;;) {
    const used = process.cpuUsage(start);
    if ((used.user + used.system) / 1000 >= ms) return;
  }
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  const ms = Math.min(Number(url.searchParams.get('ms')) || 0, 60000);
  res.setHeader('x-worker-id', String(workerId));
  switch (url.pathname) {
    case '/':
      res.end('hello world\n');
      break;
    case '/whoami':
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ worker_id: workerId, pid: process.pid }));
      break;
    case '/sleep':
      setTimeout(() => res.end('slept\n'), ms);
      break;
    case '/cpu':
      cpu(ms);
      res.end('done\n');
      break;
    default:
      res.statusCode = 404;
      res.end('not found\n');
  }
});

server.listen(port, () => {
  console.error(`worker ${workerId} (pid ${process.pid}) listening on port ${server.address().port}`);
});

process.on('message', (msg) => {
  if (msg !== null && typeof msg === 'object' && 'ping' in msg && process.send) {
    process.send({ pong: msg.ping, worker_id: workerId });
  }
});
