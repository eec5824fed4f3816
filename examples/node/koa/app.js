'use strict';
// An ordinary Koa app; nothing in it knows about roundhouse.
//
//   (cd examples/node/koa && npm ci)
//   roundhouse run --node -w 4 -l 127.0.0.1:8000 -- node examples/node/koa/app.js
const Koa = require('koa');

const app = new Koa();
const workerId = Number(process.env.ROUNDHOUSE_WORKER_ID) || 0;

app.use(async (ctx, next) => {
  ctx.set('x-worker-id', String(workerId));
  await next();
});

app.use(async (ctx) => {
  const user = /^\/users\/([^/]+)$/.exec(ctx.path);
  if (ctx.path === '/') {
    ctx.type = 'text/plain';
    ctx.body = 'hello world\n';
  } else if (ctx.path === '/whoami') {
    ctx.body = { worker_id: workerId, pid: process.pid };
  } else if (user) {
    ctx.body = { hello: decodeURIComponent(user[1]) };
  }
  // Anything else: Koa's own 404.
});

const port = Number(process.env.PORT) || 3000;
app.listen(port, () => {
  console.error(`koa worker ${workerId} (pid ${process.pid}) listening on port ${port}`);
});

// Messages from the supervisor (Node's usual process.on('message')).
process.on('message', (msg) => {
  if (msg !== null && typeof msg === 'object' && 'ping' in msg && process.send) {
    process.send({ pong: msg.ping, worker_id: workerId });
  }
});
