'use strict';
// An ordinary Fastify app; nothing in it knows about roundhouse.
//
//   (cd examples/node/fastify && npm ci)
//   roundhouse run --node -w 4 -l 127.0.0.1:8000 -- node examples/node/fastify/app.js
const fastify = require('fastify')({ logger: false });

const workerId = Number(process.env.ROUNDHOUSE_WORKER_ID) || 0;

fastify.addHook('onRequest', async (request, reply) => {
  reply.header('x-worker-id', String(workerId));
});

fastify.get('/', async (request, reply) => {
  reply.type('text/plain');
  return 'hello world\n';
});

fastify.get('/whoami', async () => ({ worker_id: workerId, pid: process.pid }));

fastify.get('/users/:name', async (request) => ({ hello: request.params.name }));

const port = Number(process.env.PORT) || 3000;
fastify.listen({ port }, (err) => {
  if (err) {
    console.error(err);
    process.exit(1);
  }
  console.error(`fastify worker ${workerId} (pid ${process.pid}) listening on port ${port}`);
});

// Messages from the supervisor (Node's usual process.on('message')).
process.on('message', (msg) => {
  if (msg !== null && typeof msg === 'object' && 'ping' in msg && process.send) {
    process.send({ pong: msg.ping, worker_id: workerId });
  }
});
