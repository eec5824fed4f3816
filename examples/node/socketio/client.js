'use strict';
// socket.io clients for app.js: each connects, waits for the transport upgrade when websocket is
// allowed, sends one `echo` and waits for the answer. Prints one JSON line per client and a last
// summary line; exits 0 when every client got its echo, else 1.
//
//   node client.js URL [--clients N] [--from ADDR,ADDR,...] [--xff ADDR,ADDR,...]
//                      [--transports polling|websocket|default] [--timeout-ms MS]
//
// --from     source addresses: client i connects from the i-th (cycling), e.g. 127.0.0.2,127.0.0.3
//            (any 127.x.y.z is a local address on Linux): what `--sticky-key ip` keys on.
// --xff      client i sends `X-Forwarded-For: <i-th>` on every request (as a proxy would): what
//            `--sticky-key header:X-Forwarded-For` keys on.
// --clients  how many clients (default: the longer of the two lists, else 1).
// Clients never reconnect (`reconnection: false`), so a failure shows as a failure.
const http = require('http');
const { io } = require('socket.io-client');

function usage(msg) {
  console.error(`client.js: ${msg}`);
  console.error('usage: node client.js URL [--clients N] [--from A,B] [--xff A,B] [--transports polling|websocket|default] [--timeout-ms MS]');
  process.exit(2);
}

const args = process.argv.slice(2);
let url = null;
const opt = { clients: 0, from: [], xff: [], transports: 'default', timeoutMs: 10000 };
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  const value = () => {
    if (i + 1 >= args.length) usage(`${a} needs a value`);
    return args[++i];
  };
  if (a === '--clients') opt.clients = Number(value());
  else if (a === '--from') opt.from = value().split(',').filter(Boolean);
  else if (a === '--xff') opt.xff = value().split(',').filter(Boolean);
  else if (a === '--transports') opt.transports = value();
  else if (a === '--timeout-ms') opt.timeoutMs = Number(value());
  else if (a.startsWith('--')) usage(`unknown option ${a}`);
  else if (url === null) url = a;
  else usage(`unexpected argument ${a}`);
}
if (url === null) usage('no URL');
if (!['polling', 'websocket', 'default'].includes(opt.transports)) usage(`bad --transports ${opt.transports}`);
const n = opt.clients || Math.max(opt.from.length, opt.xff.length, 1);

// What made a connection fail, as specific as socket.io lets us see it (for polling, the server's
// answer: `400 {"code":1,"message":"Session ID unknown"}`).
function describe(err) {
  if (!err) return 'unknown error';
  let s = err.message || String(err);
  const d = err.description;
  if (d !== undefined) s += ` ${d && d.message ? d.message : d}`;
  const body = err.context && err.context.responseText;
  if (body) s += ` ${String(body).slice(0, 200)}`;
  return s;
}

function runClient(i) {
  const from = opt.from.length ? opt.from[i % opt.from.length] : undefined;
  const xff = opt.xff.length ? opt.xff[i % opt.xff.length] : undefined;
  const result = { client: i, from: from || null, xff: xff || null, ok: false };
  // The agent carries the source address for the polling requests (keep-alive, as a browser);
  // `localAddress` does for the websocket.
  const agent = new http.Agent({ keepAlive: true, localAddress: from });
  const options = { forceNew: true, reconnection: false, timeout: opt.timeoutMs, agent };
  if (from) options.localAddress = from;
  if (xff) options.extraHeaders = { 'X-Forwarded-For': xff };
  if (opt.transports !== 'default') options.transports = [opt.transports];
  const socket = io(url, options);
  return new Promise((resolve) => {
    let done = false;
    const finish = (error) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (error) result.error = error;
      result.transport = socket.io.engine ? socket.io.engine.transport && socket.io.engine.transport.name : null;
      // No socket.disconnect() here: it would send the close packet on a new polling request
      // while other clients still run, and the process exits once all are done anyway.
      resolve(result);
    };
    const timer = setTimeout(() => finish(`no echo within ${opt.timeoutMs} ms`), opt.timeoutMs);
    const echo = () => {
      socket.emit('echo', { client: i }, (reply) => {
        if (!reply || !reply.payload || reply.payload.client !== i) return finish(`bad echo ${JSON.stringify(reply)}`);
        result.ok = true;
        result.worker_id = reply.worker_id;
        result.pid = reply.pid;
        finish();
      });
    };
    socket.on('connect', () => {
      result.connected = true;
      const engine = socket.io.engine;
      // With websocket allowed, wait until the upgrade is done (or has failed), so that the
      // echo travels on the transport the client will keep.
      if (opt.transports === 'default' && engine.transport.name === 'polling') {
        engine.once('upgrade', echo);
        engine.once('upgradeError', (e) => {
          result.upgrade_error = describe(e);
          echo();
        });
      } else echo();
    });
    socket.on('connect_error', (e) => finish(`connect_error: ${describe(e)}`));
    socket.on('disconnect', (reason, details) => finish(`disconnect: ${reason}${details ? ' ' + describe(details) : ''}`));
  });
}

Promise.all(Array.from({ length: n }, (_, i) => runClient(i))).then((results) => {
  for (const r of results) console.log(JSON.stringify(r));
  const ok = results.filter((r) => r.ok);
  const workers = [...new Set(ok.map((r) => r.worker_id))].sort((a, b) => a - b);
  console.log(JSON.stringify({ summary: true, clients: n, connected: ok.length, workers, transports: opt.transports }));
  process.exit(ok.length === n ? 0 : 1);
});
