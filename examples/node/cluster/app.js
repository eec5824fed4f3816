// The program from Node.js's own `cluster` documentation (the first example of
// https://nodejs.org/docs/latest-v20.x/api/cluster.html, CommonJS version), unchanged down to
// the end of the `if`; then, after it,
// the messaging half (the only lines that are not the tutorial's): a worker answers a
// `{"ping": X}` message with `process.send`.
//
//   node examples/node/cluster/app.js                     # Node's own cluster, port 8000
//   roundhouse run --node -w 2 -l 127.0.0.1:8000 -- node examples/node/cluster/app.js
//
// Under roundhouse, `cluster.isPrimary` is false: each roundhouse worker runs the `else` branch,
// and roundhouse is the primary.
const cluster = require('node:cluster');
const http = require('node:http');
const numCPUs = require('node:os').availableParallelism();
const process = require('node:process');

if (cluster.isPrimary) {
  console.log(`Primary ${process.pid} is running`);

  // Fork workers.
  for (let i = 0; i < numCPUs; i++) {
    cluster.fork();
  }

  cluster.on('exit', (worker, code, signal) => {
    console.log(`worker ${worker.process.pid} died`);
  });
} else {
  // Workers can share any TCP connection
  // In this case it is an HTTP server
  http.createServer((req, res) => {
    res.writeHead(200);
    res.end('hello world\n');
  }).listen(8000);

  console.log(`Worker ${process.pid} started`);
}

// --- The messaging half (not in the tutorial) ----------------------------------------------
// `roundhouse send --to 1 '{"ping":"hi"}'` reaches the worker's process.on('message'); the
// answer goes to the primary (roundhouse logs it), as a cluster worker's process.send does.
if (cluster.isWorker) {
  process.on('message', (msg) => {
    if (msg !== null && typeof msg === 'object' && 'ping' in msg) {
      process.send({ pong: msg.ping, worker_id: cluster.worker.id, pid: process.pid });
    }
  });
}
