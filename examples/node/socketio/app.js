'use strict';
// An ordinary socket.io 4.8 app: every client's `echo` event is answered (acknowledgement, or an
// `echo` event back when the client asked for none) with the same payload plus the worker that
// served it. Nothing in it knows about roundhouse. socket.io keeps each client's session in the
// worker that opened it, so several workers need sticky sessions:
//
//   (cd examples/node/socketio && npm ci)
//   roundhouse run --node -w 4 -l 127.0.0.1:8000 --policy sticky -- node examples/node/socketio/app.js
//   # behind a proxy that sets X-Forwarded-For:
//   roundhouse run --node -w 4 -l 127.0.0.1:8000 --policy sticky \
//       --sticky-key header:X-Forwarded-For -- node examples/node/socketio/app.js
//   node examples/node/socketio/client.js http://127.0.0.1:8000 --clients 10 --transports polling
const http = require('http');
const { Server } = require('socket.io');

const workerId = Number(process.env.ROUNDHOUSE_WORKER_ID) || 0;

// Requests that are not socket.io's (socket.io answers everything under /socket.io/ itself).
const server = http.createServer((req, res) => {
  res.setHeader('x-worker-id', String(workerId));
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ worker_id: workerId, pid: process.pid }) + '\n');
});

const io = new Server(server);
io.on('connection', (socket) => {
  socket.on('echo', (payload, ack) => {
    const reply = { payload, worker_id: workerId, pid: process.pid };
    if (typeof ack === 'function') ack(reply);
    else socket.emit('echo', reply);
  });
});

// The usual graceful shutdown: disconnect every client (they reconnect, to another worker if this
// one is gone) and close the server.
process.on('SIGTERM', () => {
  console.error(`socket.io worker ${workerId}: SIGTERM, closing ${io.engine.clientsCount} client(s)`);
  io.close();
});

const port = Number(process.env.PORT) || 3000;
server.listen(port, () => {
  console.error(`socket.io worker ${workerId} (pid ${process.pid}) listening on port ${port}`);
});
