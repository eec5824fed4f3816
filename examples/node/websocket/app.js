'use strict';
// An ordinary http + ws (WebSocket) app with the graceful shutdown such apps usually have: on
// SIGTERM it closes every open websocket (1001, "going away") and its server. Nothing in it knows
// about roundhouse, which tells it to shut down the way a platform does: SIGTERM.
//
//   (cd examples/node/websocket && npm ci)
//   roundhouse run --node -w 2 -l 127.0.0.1:8000 -- node examples/node/websocket/app.js
const http = require('http');
const { WebSocketServer } = require('ws');

const workerId = Number(process.env.ROUNDHOUSE_WORKER_ID) || 0;

const server = http.createServer((req, res) => {
  res.setHeader('x-worker-id', String(workerId));
  res.end('hello world\n');
});

// Every websocket gets a greeting naming the worker, then its messages echoed back.
const wss = new WebSocketServer({ server });
wss.on('connection', (ws) => {
  ws.send(`hello from worker ${workerId}`);
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
});

process.on('SIGTERM', () => {
  console.error(`worker ${workerId}: SIGTERM, closing ${wss.clients.size} websocket(s)`);
  for (const ws of wss.clients) ws.close(1001, 'server going away');
  server.close();
});

const port = Number(process.env.PORT) || 3000;
server.listen(port, () => {
  console.error(`websocket worker ${workerId} (pid ${process.pid}) listening on port ${port}`);
});
