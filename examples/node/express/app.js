'use strict';
// An ordinary Express app; nothing in it knows about roundhouse.
//
//   (cd examples/node/express && npm ci)
//   roundhouse run --node -w 4 -l 127.0.0.1:8000 -- node examples/node/express/app.js
const express = require('express');

const app = express();
const workerId = Number(process.env.ROUNDHOUSE_WORKER_ID) || 0;

app.use((req, res, next) => {
  res.set('x-worker-id', String(workerId));
  next();
});

app.get('/', (req, res) => {
  res.type('text/plain').send('hello world\n');
});

app.get('/whoami', (req, res) => {
  res.json({ worker_id: workerId, pid: process.pid });
});

app.get('/users/:name', (req, res) => {
  res.json({ hello: req.params.name });
});

const port = Number(process.env.PORT) || 3000;
app.listen(port, () => {
  console.error(`express worker ${workerId} (pid ${process.pid}) listening on port ${port}`);
});

// Messages from the supervisor (Node's usual process.on('message')).
process.on('message', (msg) => {
  if (msg !== null && typeof msg === 'object' && 'ping' in msg && process.send) {
    process.send({ pong: msg.ping, worker_id: workerId });
  }
});
