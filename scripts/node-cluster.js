#!/usr/bin/env node
// Node.js `cluster` baseline for scripts/bench.sh: the same routes as roundhouse's hello-worker,
// served by Node's own cluster module, so both can be loaded with the same workloads.
//
// Usage:
//   node scripts/node-cluster.js [--workers N] [--listen HOST:PORT] [--admin HOST:PORT]
//                                [--sched SCHED_RR|SCHED_NONE]
//   node scripts/node-cluster.js --standalone [--listen HOST:PORT]
//
// Cluster mode (the default): the primary forks N workers with `cluster.schedulingPolicy` set from
// `--sched` (also accepted: `rr`/`none`; without the flag, Node's own env variable
// NODE_CLUSTER_SCHED_POLICY=rr|none, else SCHED_RR). Under SCHED_RR the primary accepts every
// connection and passes the handle to a worker round-robin; under SCHED_NONE every worker accepts
// on the shared listening socket itself and the kernel decides who wakes.
//
// The primary logs to stderr in the same shape as roundhouse, so bench.sh reads both alike:
//   listening listener.addr=127.0.0.1:PORT
//   admin listening admin.addr=127.0.0.1:PORT
//   worker online worker.id=1 worker.pid=PID
//   ready workers=N
//
// The admin endpoint (in the primary, not shared with workers) mirrors roundhouse's:
//   GET  /stats        -> {"policy":"node-rr","workers":[{"id":1,"pid":..,"state":"online",
//                          "connections_total":..,"connections_active":..,"requests_total":..,
//                          "rss_bytes":..}],"totals":{..},"fairness":{"metric":"connections_total",
//                          "jain":..,"max_min_ratio":..,"cv":..}}
//   POST /stats/reset  -> zeroes every worker's counters
// The primary collects the counts by asking each worker over cluster IPC (`worker.send`) and
// waiting for its reply, so the figures are the workers' own.
//
// Standalone mode (`--standalone`) is a plain single-process server with the same routes and no
// cluster: the unmodified "app" that `roundhouse run --node` can run as its workers (the
// `roundhouse-node-rr` row of bench.sh). Its worker id is ROUNDHOUSE_WORKER_ID when set.
//
// SIGTERM/SIGINT stop the primary: workers are disconnected (they exit when their server closes)
// and the primary exits once they are gone, or after 5 s.

'use strict';

const cluster = require('node:cluster');
const http = require('node:http');

function parseArgs(argv) {
  const opts = {
    workers: 2,
    listen: '127.0.0.1:0',
    admin: '127.0.0.1:0',
    sched: null,
    standalone: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--workers' || a === '-w') opts.workers = Number(next());
    else if (a === '--listen' || a === '-l') opts.listen = next();
    else if (a === '--admin') opts.admin = next();
    else if (a === '--sched') opts.sched = next();
    else if (a === '--standalone') opts.standalone = true;
    else if (a === '--help' || a === '-h') usage(null);
    else usage(`unknown argument ${a}`);
  }
  if (!Number.isInteger(opts.workers) || opts.workers < 1 || opts.workers > 1024) {
    usage('--workers must be an integer in 1..=1024');
  }
  return opts;
}

function usage(err) {
  const text =
    'usage: node-cluster.js [--workers N] [--listen HOST:PORT] [--admin HOST:PORT] ' +
    '[--sched SCHED_RR|SCHED_NONE] | --standalone [--listen HOST:PORT]';
  if (err) {
    process.stderr.write(`node-cluster: ${err}\n${text}\n`);
    process.exit(2);
  }
  process.stdout.write(`${text}\n`);
  process.exit(0);
}

function splitHostPort(s) {
  const m = /^\[?([^\]]*?)\]?:(\d+)$/.exec(s);
  if (!m) usage(`bad address ${s} (want HOST:PORT)`);
  return { host: m[1], port: Number(m[2]) };
}

function fmtAddr(a) {
  return a.family === 'IPv6' || a.family === 6 ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`;
}

function log(line) {
  process.stderr.write(`${new Date().toISOString()}  INFO node_cluster: ${line}\n`);
}

// Resolves SCHED_RR / SCHED_NONE from the flag, else Node's own env variable, else RR.
function schedPolicy(flag) {
  const v = (flag ?? process.env.NODE_CLUSTER_SCHED_POLICY ?? 'rr').toLowerCase();
  if (v === 'sched_rr' || v === 'rr') return { value: cluster.SCHED_RR, name: 'rr' };
  if (v === 'sched_none' || v === 'none') return { value: cluster.SCHED_NONE, name: 'none' };
  usage(`unknown scheduling policy ${v} (want SCHED_RR or SCHED_NONE)`);
}

// ---------------------------------------------------------------------------------------------
// The worker side: hello-worker's routes plus per-worker counters.

// Busy-spins `ms` milliseconds of this process's CPU time (not wall time, like hello-worker's
// /cpu, so the cost is the same however crowded the cores are). Node 20 has no per-thread CPU
// clock; the process clock is close enough, as the event-loop thread is the one spinning.
function spinCpu(ms) {
  const start = process.cpuUsage();
  const budget = ms * 1000;
  let x = 0;
  for (;;) {
    for (let i = 0; i < 1000; i++) x = (x * 31 + i) | 0;
    const d = process.cpuUsage(start);
    if (d.user + d.system >= budget) return x;
  }
}

function queryMs(url) {
  const q = url.indexOf('?');
  if (q < 0) return 0;
  const params = new URLSearchParams(url.slice(q + 1));
  const ms = Number(params.get('ms') ?? 0);
  return Number.isFinite(ms) && ms > 0 ? Math.min(ms, 60000) : 0;
}

function makeServer(workerId, counters) {
  const server = http.createServer((req, res) => {
    counters.requests_total++;
    const path = req.url.split('?', 1)[0];
    const send = (status, type, body) => {
      res.writeHead(status, {
        'content-type': type,
        'content-length': Buffer.byteLength(body),
        'x-worker-id': String(workerId),
      });
      res.end(body);
    };
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      send(405, 'text/plain', 'method not allowed\n');
    } else if (path === '/') {
      send(200, 'text/plain', 'hello world\n');
    } else if (path === '/whoami') {
      send(200, 'application/json', JSON.stringify({ worker_id: workerId, pid: process.pid }));
    } else if (path === '/cpu') {
      spinCpu(queryMs(req.url));
      send(200, 'text/plain', 'ok\n');
    } else if (path === '/sleep') {
      setTimeout(() => send(200, 'text/plain', 'ok\n'), queryMs(req.url));
    } else {
      send(404, 'text/plain', 'not found\n');
    }
  });
  server.keepAliveTimeout = 65000;
  server.on('connection', (sock) => {
    counters.connections_total++;
    counters.connections_active++;
    sock.once('close', () => counters.connections_active--);
  });
  return server;
}

function newCounters() {
  return { connections_total: 0, connections_active: 0, requests_total: 0 };
}

function runWorker() {
  const workerId = Number(process.env.BENCH_WORKER_ID || cluster.worker.id);
  const listen = splitHostPort(process.env.BENCH_LISTEN);
  const counters = newCounters();
  const server = makeServer(workerId, counters);
  process.on('message', (msg) => {
    if (!msg || typeof msg !== 'object') return;
    if (msg.cmd === 'stats') {
      process.send({
        cmd: 'stats',
        seq: msg.seq,
        stats: {
          id: workerId,
          pid: process.pid,
          state: 'online',
          ...counters,
          rss_bytes: process.memoryUsage.rss(),
        },
      });
    } else if (msg.cmd === 'reset') {
      counters.connections_total = 0;
      counters.requests_total = 0;
      process.send({ cmd: 'reset', seq: msg.seq });
    }
  });
  server.listen({ host: listen.host, port: listen.port, backlog: 4096 });
}

function runStandalone(opts) {
  const workerId = Number(process.env.ROUNDHOUSE_WORKER_ID || 1);
  const listen = splitHostPort(opts.listen);
  const server = makeServer(workerId, newCounters());
  server.listen({ host: listen.host, port: listen.port, backlog: 4096 }, () => {
    log(`listening listener.addr=${fmtAddr(server.address())}`);
  });
  const stop = () => server.close(() => process.exit(0));
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

// ---------------------------------------------------------------------------------------------
// The primary: forks workers, logs like roundhouse, serves the admin endpoint.

function fairness(counts) {
  const n = counts.length;
  const sum = counts.reduce((a, b) => a + b, 0);
  const sumSq = counts.reduce((a, b) => a + b * b, 0);
  if (n === 0 || sum === 0) return { jain: 1, max_min_ratio: 1, cv: 0 };
  const mean = sum / n;
  const variance = counts.reduce((a, b) => a + (b - mean) ** 2, 0) / n;
  const min = Math.min(...counts);
  const max = Math.max(...counts);
  return {
    jain: (sum * sum) / (n * sumSq),
    max_min_ratio: min > 0 ? max / min : null,
    cv: Math.sqrt(variance) / mean,
  };
}

function runPrimary(opts) {
  const sched = schedPolicy(opts.sched);
  cluster.schedulingPolicy = sched.value;
  cluster.setupPrimary({ silent: false });
  const policyName = `node-${sched.name}`;
  const started = Date.now();
  const slots = new Map(); // slot id -> cluster.Worker
  let listenLogged = false;
  let online = 0;
  let stopping = false;
  let seq = 0;
  const pending = new Map(); // seq -> {left, results, done, timer}

  function fork(slot) {
    const w = cluster.fork({ BENCH_WORKER_ID: String(slot), BENCH_LISTEN: opts.listen });
    w.slot = slot;
    w.isOnline = false;
    slots.set(slot, w);
    log(`worker started worker.id=${slot} worker.pid=${w.process.pid}`);
    w.on('listening', (address) => {
      if (!listenLogged) {
        listenLogged = true;
        const a = { ...address };
        if (a.address === null || a.address === undefined) a.address = splitHostPort(opts.listen).host;
        log(`listening listener.addr=${fmtAddr(a)}`);
      }
      w.isOnline = true;
      online++;
      log(`worker online worker.id=${slot} worker.pid=${w.process.pid}`);
      if (online === opts.workers) log(`ready workers=${opts.workers} policy=${policyName}`);
    });
    w.on('message', (msg) => {
      const p = msg && pending.get(msg.seq);
      if (!p) return;
      p.results.push(msg.stats ?? null);
      if (--p.left === 0) finish(msg.seq);
    });
    w.on('exit', (code, signal) => {
      log(`worker exited worker.id=${slot} worker.pid=${w.process.pid} status=${signal ?? code}`);
      if (slots.get(slot) === w) slots.delete(slot);
      if (!stopping) {
        // A benchmark baseline should not silently lose a worker: replace it, as cluster users do.
        log(`restarting worker worker.id=${slot} delay_ms=0`);
        fork(slot);
      } else if (slots.size === 0) {
        process.exit(0);
      }
    });
  }

  function finish(s) {
    const p = pending.get(s);
    if (!p) return;
    pending.delete(s);
    clearTimeout(p.timer);
    p.done(p.results);
  }

  // Sends `cmd` to every live worker and calls `done` with their replies (or what arrived in 2 s).
  function broadcast(cmd, done) {
    const s = ++seq;
    const workers = [...slots.values()].filter((w) => w.isConnected());
    if (workers.length === 0) return done([]);
    const p = { left: workers.length, results: [], done };
    p.timer = setTimeout(() => finish(s), 2000);
    pending.set(s, p);
    for (const w of workers) w.send({ cmd, seq: s });
  }

  const admin = http.createServer((req, res) => {
    const reply = (status, body) => {
      const text = typeof body === 'string' ? body : JSON.stringify(body);
      res.writeHead(status, {
        'content-type': typeof body === 'string' ? 'text/plain' : 'application/json',
        'content-length': Buffer.byteLength(text),
      });
      res.end(text);
    };
    const path = req.url.split('?', 1)[0];
    if (req.method === 'GET' && path === '/stats') {
      broadcast('stats', (results) => {
        const workers = results.filter(Boolean).sort((a, b) => a.id - b.id);
        const totals = { connections_total: 0, requests_total: 0, connections_lost: 0 };
        for (const w of workers) {
          totals.connections_total += w.connections_total;
          totals.requests_total += w.requests_total;
        }
        reply(200, {
          policy: policyName,
          uptime_s: (Date.now() - started) / 1000,
          primary_pid: process.pid,
          listeners: [],
          workers,
          totals,
          fairness: {
            metric: 'connections_total',
            ...fairness(workers.map((w) => w.connections_total)),
          },
        });
      });
    } else if (req.method === 'POST' && path === '/stats/reset') {
      broadcast('reset', (results) => reply(200, { reset: results.length }));
    } else if (req.method === 'GET' && path === '/healthz') {
      reply(online > 0 ? 200 : 503, online > 0 ? 'ok\n' : 'no worker online\n');
    } else {
      reply(404, 'not found\n');
    }
  });
  const adminAddr = splitHostPort(opts.admin);
  admin.listen({ host: adminAddr.host, port: adminAddr.port }, () => {
    log(`admin listening admin.addr=${fmtAddr(admin.address())}`);
    for (let slot = 1; slot <= opts.workers; slot++) fork(slot);
  });

  const stop = (sig) => {
    if (stopping) process.exit(1); // a second signal stops at once
    stopping = true;
    log(`stopping signal=${sig}`);
    admin.close();
    for (const w of slots.values()) w.disconnect();
    if (slots.size === 0) process.exit(0);
    setTimeout(() => {
      for (const w of slots.values()) w.process.kill('SIGKILL');
      process.exit(0);
    }, 5000).unref();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

// `--standalone` first: under `roundhouse run --node` this process is a cluster worker too
// (cluster.isPrimary is false there, roundhouse being the primary), and it must stay standalone.
if (process.argv.includes('--standalone')) {
  runStandalone(parseArgs(process.argv.slice(2)));
} else if (cluster.isPrimary) {
  runPrimary(parseArgs(process.argv.slice(2)));
} else {
  runWorker();
}
