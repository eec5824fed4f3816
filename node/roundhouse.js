'use strict';
// roundhouse's Node.js shim. The `roundhouse` binary embeds this file and preloads it into every
// worker started with `--node` (NODE_OPTIONS=--require <path>), so an unmodified `http`/Express
// app is served by the roundhouse primary. It speaks Node's own IPC channel (NODE_CHANNEL_FD,
// JSON lines); the mapping to the roundhouse protocol is documented in node/README.md.
//
// What it does, in short:
// - every TCP `listen()` of a net.Server (http, https, Express, ...) is served by the primary:
//   under `rr`/`least-conn` the server gets a handle that does not bind; the primary hands each
//   accepted connection over the channel and the shim feeds it to Node's own `onconnection`,
//   exactly like a Node `cluster` worker under SCHED_RR. Under `none`/`reuseport` the server
//   listens on the inherited listener fd (LISTEN_FDS, fd 3 onwards) instead of binding.
// - reports ready once the app listens, acknowledges (or, draining, refuses) each handed
//   connection at once, sends batched stats and a heartbeat, drains on request, and exits when
//   the channel to the primary closes.
// Nothing here is visible to the app: the shim's messages use `cmd: "NODE_ROUNDHOUSE_*"`, which
// Node delivers as `internalMessage`, never as `message`.
(function roundhouseShim() {
  const env = process.env;
  // Only the worker roundhouse started, not node processes the app spawns (they inherit
  // NODE_OPTIONS but not this marker, which is removed here).
  if (env.ROUNDHOUSE_NODE !== '1') return;
  delete env.ROUNDHOUSE_NODE;
  if (typeof process.send !== 'function') {
    process.emitWarning('roundhouse: no IPC channel (NODE_CHANNEL_FD); the shim is inactive');
    return;
  }

  const net = require('net');

  const workerId = Number(env.ROUNDHOUSE_WORKER_ID) || 0;
  const policy = env.ROUNDHOUSE_POLICY || 'rr';
  const handoff = policy === 'rr' || policy === 'least-conn';
  // Under least-conn the primary picks by open connections: report closes sooner.
  const STATS_EVERY_MS = policy === 'least-conn' ? 10 : 100;
  const HEARTBEAT_EVERY_MS = Math.max(10, Number(process.env.ROUNDHOUSE_HEARTBEAT_MS) || 1000);

  // Listener addresses in `-l` order ("127.0.0.1:8000,[::1]:8001"), for `server.address()`.
  const listenerAddrs = (env.ROUNDHOUSE_LISTENERS || '')
    .split(',')
    .filter(Boolean)
    .map(parseAddr);

  // Under none/reuseport: the listeners, systemd style.
  let listenFds = 0;
  if (!handoff && env.LISTEN_FDS) {
    if (!env.LISTEN_PID || Number(env.LISTEN_PID) === process.pid) {
      listenFds = Number(env.LISTEN_FDS) || 0;
    }
    delete env.LISTEN_FDS;
    delete env.LISTEN_PID;
    delete env.LISTEN_FDNAMES;
  }
  const backlogDefault = Number(env.ROUNDHOUSE_BACKLOG) || 4096;

  // --- channel --------------------------------------------------------------------------------

  const sendOpts = { swallowErrors: true };
  function send(msg) {
    if (!process.connected) return false;
    return process.send(msg, undefined, sendOpts);
  }

  // --- state ----------------------------------------------------------------------------------

  const servers = []; // every TCP server the app listened, in first-listen order (slot = index)
  const hooked = new WeakSet();
  const inflight = new Set(); // ServerResponses not finished yet
  let ready = false;
  let draining = false;
  let exiting = false;
  const stats = { accepted: 0, closed: 0, requests: 0 };
  let statsTimer = null;

  function statsChanged() {
    if (statsTimer !== null) return;
    statsTimer = setTimeout(flushStats, STATS_EVERY_MS);
    statsTimer.unref();
  }
  function flushStats(cb) {
    if (statsTimer !== null) clearTimeout(statsTimer);
    statsTimer = null;
    const msg = {
      cmd: 'NODE_ROUNDHOUSE_STATS',
      accepted: stats.accepted,
      closed: stats.closed,
      requests: stats.requests,
    };
    if (typeof cb !== 'function') return send(msg);
    if (!process.connected) return cb();
    process.send(msg, undefined, sendOpts, () => cb());
  }

  // The heartbeat timer doubles as the keep-alive: a server served by the primary owns no
  // libuv handle, so while one is listening (and not unref()'d) this timer is ref()'d, as a
  // bound server's handle would be.
  const heartbeat = setInterval(() => send({ cmd: 'NODE_ROUNDHOUSE_HEARTBEAT' }), HEARTBEAT_EVERY_MS);
  heartbeat.unref();
  function updateKeepAlive() {
    const alive = servers.some((s) => s._handle instanceof PrimaryHandle && s._handle.refed);
    if (alive) heartbeat.ref();
    else heartbeat.unref();
  }

  // --- the handle of a server served by the primary -----------------------------------------

  // Stands in for a TCP listen handle, like the handle Node's cluster gives a SCHED_RR worker:
  // net.Server sets `onconnection` on it and calls listen/close/getsockname/ref/unref.
  class PrimaryHandle {
    constructor(slot, address, port, addressType) {
      this.slot = slot;
      this.requested = {
        address: address || (addressType === 6 ? '::' : '0.0.0.0'),
        family: addressType === 6 ? 'IPv6' : 'IPv4',
        port: port | 0,
      };
      this.refed = true;
      this.closed = false;
      this.onconnection = null;
      this.fd = -1; // no socket of its own (read by some tooling, as on a TCP handle)
    }
    listen() {
      return 0;
    }
    getsockname(out) {
      Object.assign(out, listenerAddrs[this.slot] || this.requested);
      return 0;
    }
    close(cb) {
      this.closed = true;
      updateKeepAlive();
      if (typeof cb === 'function') process.nextTick(cb);
    }
    ref() {
      this.refed = true;
      updateKeepAlive();
    }
    unref() {
      this.refed = false;
      updateKeepAlive();
    }
    hasRef() {
      return this.refed && !this.closed;
    }
  }

  // net.Server.prototype.listen() normalises its arguments, resolves the host, then calls
  // `_listen2` (Node keeps that name "to avoid breaking code that wraps this method"). Wrapping
  // it catches every TCP listen of every net.Server subclass with Node's own argument handling.
  const origListen2 = net.Server.prototype._listen2;
  net.Server.prototype._listen2 = function roundhouseListen2(
    address,
    port,
    addressType,
    backlog,
    fd,
    flags,
  ) {
    // Pipes, explicit fds and handles passed in by the app are left alone.
    const tcp = !this._handle && typeof fd !== 'number' && (addressType === 4 || addressType === 6);
    if (!tcp) return Reflect.apply(origListen2, this, arguments);
    let slot = servers.indexOf(this);
    if (slot < 0) slot = servers.push(this) - 1;
    hookServer(this);
    if (handoff) {
      this._handle = new PrimaryHandle(slot, address, port, addressType);
      const r = Reflect.apply(origListen2, this, arguments);
      updateKeepAlive();
      return r;
    }
    if (slot < listenFds && !this._roundhouseFdUsed) {
      // Each inherited listener is used once: after close() its fd number is gone.
      this._roundhouseFdUsed = true;
      return Reflect.apply(origListen2, this, [null, null, null, backlog || backlogDefault, 3 + slot, flags]);
    }
    return Reflect.apply(origListen2, this, arguments);
  };

  function hookServer(server) {
    if (hooked.has(server)) return;
    hooked.add(server);
    server.on('listening', onListening);
    server.on('connection', (socket) => {
      stats.accepted++;
      statsChanged();
      socket.once('close', () => {
        stats.closed++;
        statsChanged();
        checkDrained();
      });
    });
    // Before the app's handler, so a draining worker's `Connection: close` is in time.
    server.prependListener('request', (req, res) => {
      stats.requests++;
      statsChanged();
      if (draining) {
        closeAfter(res);
        return;
      }
      inflight.add(res);
      res.once('close', () => inflight.delete(res));
    });
    server.on('close', checkDrained);
  }

  function onListening() {
    if (ready) return;
    ready = true;
    send({ cmd: 'NODE_ROUNDHOUSE_READY', version: 1 });
  }

  // The server that takes connections from primary listener `listener`: the app's server of
  // the same slot, else its first server still listening.
  function route(listener) {
    const own = servers[listener];
    if (own && own._handle instanceof PrimaryHandle && !own._handle.closed) return own;
    return servers.find((s) => s._handle instanceof PrimaryHandle && !s._handle.closed) || null;
  }

  function onConn(msg, handle) {
    const ids = [msg.id];
    const server = draining ? null : route(msg.listener | 0);
    if (
      server === null ||
      (server.maxConnections != null && server._connections >= server.maxConnections)
    ) {
      // Closing our copy sends no FIN: the primary still holds its own and hands it elsewhere.
      handle.close();
      send({ cmd: 'NODE_ROUNDHOUSE_REFUSE', ids });
      return;
    }
    send({ cmd: 'NODE_ROUNDHOUSE_ACK', ids });
    // Node's own net `onconnection`: builds the Socket with the server's options, counts it in
    // server._connections (so close() waits for it), emits 'connection'.
    server._handle.onconnection(0, handle);
  }

  // --- drain and exit -------------------------------------------------------------------------

  function closeAfter(res) {
    if (!res.headersSent) res.setHeader('Connection', 'close');
    else res._last = true; // headers gone: close the connection once this response is done
  }

  function drain() {
    if (draining) return;
    draining = true;
    for (const res of inflight) closeAfter(res);
    inflight.clear();
    for (const server of servers) {
      if (!server.listening) continue;
      server.close(); // http.Server.close() also closes idle keep-alive connections (Node >= 19)
      if (typeof server.closeIdleConnections === 'function') server.closeIdleConnections();
    }
    checkDrained();
  }

  function checkDrained() {
    if (!draining || exiting) return;
    if (servers.some((s) => s.listening || s._connections > 0)) return;
    // A socket's 'close' event comes after the server's (libuv's close phase): wait for it so
    // the last stats are complete.
    if (stats.closed < stats.accepted) return;
    exiting = true;
    setImmediate(() => {
      const bye = () => process.exit(0);
      setTimeout(bye, 1000).unref();
      flushStats(bye);
    });
  }

  // The primary is gone (channel EOF): exit at once. Watching 'disconnect' by wrapping emit
  // rather than with a listener, because a 'disconnect' listener would ref() the channel and
  // keep an app that never listens alive.
  const origEmit = process.emit;
  process.emit = function roundhouseEmit(event) {
    if (event === 'disconnect' && !exiting) {
      exiting = true;
      setImmediate(() => process.exit(0));
    }
    return Reflect.apply(origEmit, this, arguments);
  };

  // --- messages from the primary --------------------------------------------------------------

  process.on('internalMessage', (msg, handle) => {
    if (msg === null || typeof msg !== 'object') return;
    switch (msg.cmd) {
      case 'NODE_ROUNDHOUSE_CONN':
        if (handle) onConn(msg, handle);
        break;
      case 'NODE_ROUNDHOUSE_DRAIN':
        drain();
        break;
      case 'NODE_ROUNDHOUSE_MSG':
        // A message whose value Node would take for an internal one (an object with a
        // `cmd: "NODE_..."`) arrives wrapped; unwrap it for the app.
        process.emit('message', msg.message, undefined);
        break;
      default:
        break;
    }
  });

  // --- the app-facing API -----------------------------------------------------------------------

  // process.send(x) reaches the primary (as with Node's cluster). To reach other workers:
  // process.roundhouse.send(to, x) with to = 0 (the primary), a worker id, or 'all'.
  Object.defineProperty(process, 'roundhouse', {
    value: Object.freeze({
      workerId,
      policy,
      send(to, message) {
        if (message === undefined) throw new TypeError('roundhouse.send: message is required');
        if (!(to === 'all' || (Number.isInteger(to) && to >= 0 && to < 0xffffffff))) {
          throw new TypeError("roundhouse.send: `to` must be 0, a worker id or 'all'");
        }
        return send({ cmd: 'NODE_ROUNDHOUSE_SEND', to, message });
      },
    }),
    enumerable: false,
  });

  function parseAddr(s) {
    const m = /^\[(.*)\]:(\d+)$/.exec(s) || /^(.*):(\d+)$/.exec(s);
    if (!m) return null;
    return { address: m[1], family: m[1].includes(':') ? 'IPv6' : 'IPv4', port: Number(m[2]) };
  }
})();
