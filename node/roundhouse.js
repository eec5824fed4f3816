'use strict';
// roundhouse's Node.js shim. The `roundhouse` binary embeds this file and preloads it into every
// worker started with `--node` (NODE_OPTIONS=--require <path>), so an unmodified Node app
// (`http`, Express, Fastify, Koa, ws, an app written for `cluster`) is served by the roundhouse
// primary. It speaks Node's own IPC channel (NODE_CHANNEL_FD, JSON lines); the mapping to the
// roundhouse protocol is documented in node/README.md.
//
// What it does, in short:
// - `cluster`: inside a roundhouse worker the app sees what a Node `cluster` worker sees
//   (`cluster.isPrimary` false, `cluster.isWorker` true, `cluster.worker` = this worker, its id
//   the roundhouse slot): roundhouse is the primary.
// - every TCP `listen()` of a net.Server (http, https, Express, ...) is served by the primary:
//   under `rr`/`least-conn` the server gets a handle that does not bind; the primary hands each
//   accepted connection over the channel and the shim feeds it to Node's own `onconnection`,
//   exactly like a Node `cluster` worker under SCHED_RR. Under `none`/`reuseport` the server
//   listens on the inherited listener fd (LISTEN_FDS, fd 3 onwards) instead of binding.
// - reports ready once the app listens, acknowledges (or, draining, refuses) each handed
//   connection at once, sends batched stats and a heartbeat, drains on request the way
//   `hello-worker` does, then tells the app (`disconnect`, its SIGTERM listeners), and exits
//   when the channel to the primary closes.
// - says so, in one WARN line in the primary's log, when the app does something roundhouse will
//   not serve (a listen it does not get connections for, a `cluster.fork()`, no listen at all).
// Nothing here is visible to the app: the shim's messages use `cmd: "NODE_ROUNDHOUSE_*"`, which
// Node delivers as `internalMessage`, never as `message`.
(function roundhouseShim() {
  const env = process.env;
  // Only the worker roundhouse started, not node processes the app spawns (they inherit
  // NODE_OPTIONS but not this marker, which is removed here).
  if (env.ROUNDHOUSE_NODE !== '1') {
    if (env.ROUNDHOUSE_WORKER_ID) watchDescendant(env.ROUNDHOUSE_WORKER_ID);
    return;
  }
  delete env.ROUNDHOUSE_NODE;
  if (typeof process.send !== 'function') {
    process.emitWarning('roundhouse: no IPC channel (NODE_CHANNEL_FD); the shim is inactive');
    return;
  }

  const net = require('net');
  const http = require('http');
  const EventEmitter = require('events');

  const workerId = Number(env.ROUNDHOUSE_WORKER_ID) || 0;
  const policy = env.ROUNDHOUSE_POLICY || 'rr';
  const handoff = policy === 'rr' || policy === 'least-conn' || policy === 'sticky';
  // Under least-conn the primary picks by open connections: report closes sooner.
  const STATS_EVERY_MS = policy === 'least-conn' ? 10 : 100;
  const HEARTBEAT_EVERY_MS = Math.max(10, Number(process.env.ROUNDHOUSE_HEARTBEAT_MS) || 1000);
  // hello-worker's KEEPALIVE_GRACE: once a drain began, a keep-alive connection silent this long
  // is closed; one that sends a request first gets `Connection: close` on its response.
  const KEEPALIVE_GRACE_MS = 1000;
  // The app is told (disconnect, SIGTERM) once its HTTP connections are done, or this long after
  // the drain began if some are still busy (a long download, server-sent events): 5 s, or half
  // of the primary's --grace (ROUNDHOUSE_GRACE_MS) when that is shorter, so that the app's own
  // SIGTERM handlers always get time to run before the worker is killed.
  const GRACE_MS = Number(env.ROUNDHOUSE_GRACE_MS) || 0;
  const TELL_APP_AFTER_MS = GRACE_MS > 0 ? Math.min(5000, Math.floor(GRACE_MS / 2)) : 5000;
  // A worker whose app has not listened by then is warned about (it is not online).
  const LISTEN_WARN_AFTER_MS = 5000;
  const SWEEP_EVERY_MS = 100;

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
  const listenerCount = handoff ? listenerAddrs.length || 1 : listenFds;

  // --- channel --------------------------------------------------------------------------------

  const sendOpts = { swallowErrors: true };
  function send(msg) {
    if (!process.connected) return false;
    return process.send(msg, undefined, sendOpts);
  }

  // One WARN line in the primary's log, naming this worker (node/README.md, section 4).
  const warned = new Set();
  function warn(key, message) {
    if (warned.has(key)) return;
    warned.add(key);
    if (!send({ cmd: 'NODE_ROUNDHOUSE_WARN', worker: workerId, pid: process.pid, message })) {
      process.emitWarning(`roundhouse worker ${workerId}: ${message}`);
    }
  }

  // --- state ----------------------------------------------------------------------------------

  const servers = []; // every TCP server the app listened, in first-listen order (slot = index)
  const served = new WeakSet(); // the servers roundhouse serves (handoff or inherited listener)
  const hooked = new WeakSet();
  // Every socket of every hooked server, until its 'close': what the drain waits for. `seen` and
  // `last` are the sweep's: the socket's byte counts when it last looked, and when they changed.
  // For HTTPS, `tls` is the TLSSocket over the counted TCP socket: HTTP state lives there.
  const sockets = new Map(); // socket -> { http, upgraded, seen, last, tls }
  let ready = false;
  // Drain phases: 0 serving; 1 draining HTTP (no new connections, keep-alive connections
  // closed by hello-worker's rule); 2 the app has been told; exiting once done.
  let phase = 0;
  let drainStart = 0;
  let appOwnsExit = false; // the app has SIGTERM listeners: it decides when to exit
  let byApp = false; // the app called cluster.worker.disconnect() itself
  let exiting = false;
  let sweepTimer = null;
  const stats = { accepted: 0, closed: 0, requests: 0 };
  let statsTimer = null;
  let lastSent = '';

  function statsChanged() {
    if (statsTimer !== null) return;
    statsTimer = setTimeout(flushStats, STATS_EVERY_MS);
    statsTimer.unref();
  }
  function statsMsg() {
    // A destroyed socket whose 'close' event has not run yet is closed for the primary: the
    // app may exit (server.close(() => process.exit())) before that event.
    let closed = stats.closed;
    for (const s of sockets.keys()) if (s.destroyed) closed++;
    return {
      cmd: 'NODE_ROUNDHOUSE_STATS',
      accepted: stats.accepted,
      closed,
      requests: stats.requests,
    };
  }
  function flushStats(cb) {
    if (statsTimer !== null) clearTimeout(statsTimer);
    statsTimer = null;
    const msg = statsMsg();
    lastSent = JSON.stringify(msg);
    if (typeof cb !== 'function') return send(msg);
    if (!process.connected) return cb();
    process.send(msg, undefined, sendOpts, () => cb());
  }
  // However the process ends (the app's own process.exit() included), the last counters go
  // out: a small write on the channel is done synchronously when the socket has room.
  process.on('exit', () => {
    const msg = statsMsg();
    if (JSON.stringify(msg) !== lastSent) send(msg);
  });

  // The heartbeat timer doubles as the keep-alive: a server served by the primary owns no
  // libuv handle, so while one is listening (and not unref()'d) this timer is ref()'d, as a
  // bound server's handle would be. Draining, it lets go: the app's own handles decide.
  const heartbeat = setInterval(() => send({ cmd: 'NODE_ROUNDHOUSE_HEARTBEAT' }), HEARTBEAT_EVERY_MS);
  heartbeat.unref();
  function updateKeepAlive() {
    const alive =
      phase === 0 &&
      servers.some((s) => s._handle instanceof PrimaryHandle && s._handle.refed && !s._handle.closed);
    if (alive) heartbeat.ref();
    else heartbeat.unref();
  }

  // Not listening after a while: say so (the worker is not online, gets no connection, and the
  // primary kills it at --ready-timeout).
  setTimeout(() => {
    if (!ready && phase === 0) {
      warn(
        'no-listen',
        `the app has not listened on TCP after ${LISTEN_WARN_AFTER_MS / 1000} s: the worker ` +
          'is not online and is handed no connection (--ready-timeout stops it)',
      );
    }
  }, LISTEN_WARN_AFTER_MS).unref();

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

  // Under none/reuseport a drain stops the accepting without the app seeing its server
  // close: the real listener handle is closed and this one takes its place, so the app's own
  // `server.close(cb)` later works as usual (no ERR_SERVER_NOT_RUNNING).
  class StoppedHandle {
    constructor(sockname) {
      this.sockname = sockname;
      this.closed = false;
      this.onconnection = null;
      this.fd = -1;
    }
    listen() {
      return 0;
    }
    getsockname(out) {
      Object.assign(out, this.sockname);
      return 0;
    }
    close(cb) {
      this.closed = true;
      if (typeof cb === 'function') process.nextTick(cb);
    }
    ref() {}
    unref() {}
    hasRef() {
      return false;
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
    if (!tcp) {
      if (!this._handle) {
        const what = addressType === -1 && typeof address === 'string' ? address : `fd ${fd}`;
        warn(
          `pipe:${what}`,
          `the app listens on ${what} itself: roundhouse serves TCP listens only, it hands this ` +
            'server no connection',
        );
      }
      return Reflect.apply(origListen2, this, arguments);
    }
    let slot = servers.indexOf(this);
    const first = slot < 0;
    if (first) slot = servers.push(this) - 1;
    hookServer(this);
    if (handoff) {
      this._roundhousePort = port | 0;
      if (first && slot >= listenerCount && !aliasOfEarlier(this, slot)) {
        warn(
          `slot:${slot}`,
          `the app's server #${slot + 1} (port ${port | 0}) has no roundhouse listener of its ` +
            `own (roundhouse has ${listenerCount}; add -l): it gets connections only while ` +
            'the servers before it are closed',
        );
      }
      served.add(this);
      this._handle = new PrimaryHandle(slot, address, port, addressType);
      const r = Reflect.apply(origListen2, this, arguments);
      updateKeepAlive();
      return r;
    }
    if (slot < listenFds && !this._roundhouseFdUsed) {
      // Each inherited listener is used once: after close() its fd number is gone.
      this._roundhouseFdUsed = true;
      served.add(this);
      return Reflect.apply(origListen2, this, [null, null, null, backlog || backlogDefault, 3 + slot, flags]);
    }
    warn(
      `bind:${slot}`,
      `the app's server #${slot + 1} binds port ${port | 0} itself: roundhouse passed ` +
        `${listenFds} listener(s), this server is not one of them (add -l)`,
    );
    return Reflect.apply(origListen2, this, arguments);
  };

  // Fastify and others listen one server per address of `localhost`, all on one port: the
  // later ones are aliases of the first, not servers missing a listener.
  function aliasOfEarlier(server, slot) {
    for (let i = 0; i < slot; i++) {
      if (served.has(servers[i]) && servers[i]._roundhousePort === server._roundhousePort) return true;
    }
    return false;
  }

  // https.Server by its methods (requiring 'https' would load TLS into every worker): a TLS
  // server with Node's HTTP/1 connection tracking. An HTTP/2 server has no closeIdleConnections.
  function isTls(server) {
    return typeof server.addContext === 'function';
  }
  function isHttp(server) {
    return (
      server instanceof http.Server ||
      (isTls(server) && typeof server.closeIdleConnections === 'function')
    );
  }

  function hookServer(server) {
    if (hooked.has(server)) return;
    hooked.add(server);
    const httpServer = isHttp(server);
    server.on('listening', () => onListening(server));
    server.on('connection', (socket) => {
      stats.accepted++;
      statsChanged();
      sockets.set(socket, { http: httpServer, upgraded: false, seen: -1, last: 0, tls: null });
      socket.once('close', () => {
        sockets.delete(socket);
        stats.closed++;
        statsChanged();
        checkDrained();
      });
    });
    server.on('close', () => {
      checkDrained();
      // Checked a second later: a server opened and closed at start-up (a port probe) is not
      // the app giving up on serving.
      if (phase === 0 && served.has(server)) setTimeout(checkStillServing, 1000).unref();
    });
    if (!httpServer) {
      // HTTP/2 (and anything else that emits 'request'): counted; its sessions are the app's.
      server.prependListener('request', () => {
        stats.requests++;
        statsChanged();
      });
      return;
    }
    // Before the app's handler, so a draining worker's `Connection: close` is in time. Nothing
    // else per request: the drain finds what it needs on the sockets.
    server.prependListener('request', (req, res) => {
      stats.requests++;
      if (statsTimer === null) statsChanged();
      if (phase > 0 && !res.headersSent) res.setHeader('Connection', 'close');
    });
    if (httpServer && isTls(server)) {
      server.on('secureConnection', (tls) => {
        const rec = sockets.get(tls._parent);
        if (rec) rec.tls = tls;
      });
    }
    // An upgraded connection (websocket) or a CONNECT tunnel is the app's from now on: the drain
    // does not close it; the app's SIGTERM listeners do.
    const owned = (req, socket) => {
      const rec = sockets.get(socket) || sockets.get(socket._parent);
      if (rec) rec.upgraded = true;
    };
    server.prependListener('upgrade', owned);
    server.prependListener('connect', owned);
    // Node >= 19 closes idle keep-alive connections as soon as the server closes: during a
    // drain that races every keep-alive client's next request. The sweep closes them instead,
    // by hello-worker's rule.
    const origCloseIdle = server.closeIdleConnections;
    if (typeof origCloseIdle === 'function') {
      server.closeIdleConnections = function roundhouseCloseIdleConnections() {
        if (phase > 0) return undefined;
        return Reflect.apply(origCloseIdle, this, arguments);
      };
    }
  }

  function checkStillServing() {
    if (phase === 0 && !servers.some((s) => served.has(s) && s.listening)) {
      warn(
        'closed',
        'the app closed every server roundhouse serves without being drained: the worker ' +
          'stays online but takes no connection (they go to other workers)',
      );
    }
  }

  function onListening(server) {
    if (ready || !served.has(server)) return;
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
    const server = phase > 0 ? null : route(msg.listener | 0);
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
  //
  // Phase 1, like hello-worker: no new connection; every response not started yet says
  // `Connection: close` (and Node closes the connection after it); a response already under
  // way is left alone, the connection's next one says `Connection: close`; a keep-alive
  // connection idle for KEEPALIVE_GRACE is closed. No request a client has sent is cut.
  // Phase 2, once no HTTP connection is left (or after TELL_APP_AFTER_MS): the app is told the
  // way Node tells a cluster worker, `disconnect` on cluster.worker and process, then its SIGTERM
  // listeners run. An app with none gets its servers closed for it and the worker exits once
  // its servers and connections are done. An app with SIGTERM listeners owns its exit, as it
  // would under any process manager; roundhouse no longer keeps its event loop alive.

  function drain(appInitiated) {
    if (phase > 0) return;
    phase = 1;
    byApp = appInitiated === true;
    drainStart = Date.now();
    updateKeepAlive();
    for (const server of servers) stopAccepting(server);
    // The response each connection is writing (Node's `socket._httpMessage`, which its own
    // closeIdleConnections() reads too): `Connection: close` if its head is not out yet.
    for (const [socket, rec] of sockets) {
      const res = rec.http ? (rec.tls || socket)._httpMessage : null;
      if (res && !res.headersSent) res.setHeader('Connection', 'close');
    }
    sweepTimer = setInterval(sweep, SWEEP_EVERY_MS);
    sweepTimer.unref();
    sweep();
  }

  function stopAccepting(server) {
    const h = server._handle;
    if (!h || h instanceof PrimaryHandle || h instanceof StoppedHandle || !served.has(server)) return;
    const name = {};
    if (typeof h.getsockname === 'function') h.getsockname(name);
    const stopped = new StoppedHandle(name);
    h.close();
    server._handle = stopped;
  }

  // The sockets Node's HTTP parser sees as between requests (no request begun).
  function idleSockets() {
    const idle = new Set();
    for (const server of servers) {
      if (!isHttp(server)) continue;
      const sym = Object.getOwnPropertySymbols(server).find(
        (s) => s.description === 'http.server.connections',
      );
      const list = sym && server[sym];
      if (!list || typeof list.idle !== 'function') return null;
      for (const parser of list.idle()) if (parser.socket) idle.add(parser.socket);
    }
    return idle;
  }

  function sweep() {
    if (phase === 0) return;
    const now = Date.now();
    let idle; // computed once, when needed
    let httpLeft = 0;
    for (const [socket, rec] of sockets) {
      if (!rec.http || rec.upgraded || socket.destroyed) continue;
      httpLeft++;
      // Silent = no byte in or out since the sweep before, and no response being written.
      const bytes = socket.bytesRead + socket.bytesWritten;
      const conn = rec.tls || socket; // where Node's HTTP server keeps its state
      const res = conn._httpMessage;
      if (bytes !== rec.seen || (res && !res.finished)) {
        rec.seen = bytes;
        rec.last = now;
      }
      if (now - Math.max(drainStart, rec.last) < KEEPALIVE_GRACE_MS) continue;
      if (idle === undefined) idle = idleSockets();
      if (idle !== null && !idle.has(conn)) continue; // a request is arriving
      conn.destroy();
      httpLeft--;
    }
    if (phase === 1 && (httpLeft === 0 || now - drainStart >= TELL_APP_AFTER_MS)) tellApp();
    checkDrained();
  }

  function tellApp() {
    phase = 2;
    worker.state = 'disconnected';
    worker.exitedAfterDisconnect = true;
    appDisconnected = true;
    // Roundhouse no longer holds the loop open: like a disconnected cluster worker, the app
    // exits when its own handles are done.
    if (process.channel && typeof process.channel.unref === 'function') process.channel.unref();
    worker.emit('disconnect');
    emitDisconnect();
    appOwnsExit = !byApp && process.listenerCount('SIGTERM') > 0;
    if (appOwnsExit) {
      process.emit('SIGTERM', 'SIGTERM');
    } else {
      for (const server of servers) if (server.listening) server.close();
    }
    checkDrained();
  }

  function checkDrained() {
    if (phase < 2 || exiting) return;
    if (servers.some((s) => s.listening || s._connections > 0)) return;
    for (const s of sockets.keys()) if (!s.destroyed) return;
    if (appOwnsExit) return;
    exiting = true;
    setImmediate(() => {
      const bye = () => process.exit(0);
      setTimeout(bye, 1000).unref();
      flushStats(bye);
    });
  }

  // 'disconnect' on process: emitted by the shim when the app is told to drain (the channel
  // stays open for the shim's last stats), and by Node when the channel closes (the primary is
  // gone: exit at once). The app sees it once. Watched by wrapping emit rather than with a
  // listener, because a 'disconnect' listener would ref() the channel and keep an app that
  // never listens alive.
  let appDisconnected = false;
  let emittingDisconnect = false;
  function emitDisconnect() {
    emittingDisconnect = true;
    try {
      process.emit('disconnect');
    } finally {
      emittingDisconnect = false;
    }
  }
  const origEmit = process.emit;
  process.emit = function roundhouseEmit(event) {
    if (event === 'disconnect' && !emittingDisconnect) {
      if (!exiting) {
        exiting = true;
        setImmediate(() => process.exit(0));
      }
      if (appDisconnected) return false; // the app was told already
      appDisconnected = true;
      worker.state = 'disconnected';
      worker.emit('disconnect');
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
        drain(false);
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

  // --- cluster: this process is a worker, roundhouse its primary ------------------------------
  //
  // `require('cluster')` gives every module one object (Node's primary module here, as there
  // is no NODE_UNIQUE_ID); it is turned into what a cluster worker sees before the app runs.

  const cluster = require('cluster');
  const workerProto = Object.create(cluster.Worker.prototype);
  Object.assign(workerProto, {
    send(...args) {
      return process.send(...args);
    },
    isConnected() {
      return !appDisconnected && process.connected;
    },
    isDead() {
      return false; // this is the worker's own process, and it is running
    },
    // Node: close the servers, wait for their connections, then disconnect. Roundhouse drains
    // the same way it drains on its own request (minus the SIGTERM, which the app did not get);
    // the primary sees the exit and starts a new worker in the slot.
    disconnect() {
      if (this.state !== 'disconnecting' && this.state !== 'destroying') {
        this.state = 'disconnecting';
        drain(true);
      }
      return this;
    },
    // Node: exit now (`kill()` is the same in a worker).
    destroy() {
      if (this.state === 'destroying') return;
      this.state = 'destroying';
      this.exitedAfterDisconnect = true;
      flushStats(() => process.exit(0));
    },
    kill() {
      this.destroy();
    },
  });
  const worker = Object.create(workerProto);
  EventEmitter.call(worker);
  worker.id = workerId;
  worker.process = process;
  worker.state = 'online';
  worker.exitedAfterDisconnect = undefined;
  // Node's worker relays process 'message' events; relayed here only once the app listens for
  // them on the worker, because a process 'message' listener keeps the channel (and so the
  // process) alive.
  let relaying = false;
  worker.on('newListener', (event) => {
    if (event !== 'message' || relaying) return;
    relaying = true;
    process.on('message', (message, handle) => worker.emit('message', message, handle));
  });

  function noOwnCluster(what) {
    return function roundhouseNoCluster() {
      warn(
        'cluster',
        `the app called cluster.${what}() in a roundhouse worker: roundhouse is the primary ` +
          '(cluster.isPrimary is false), no process is forked',
      );
      throw new Error(
        `roundhouse: cluster.${what}() in a worker: roundhouse is the cluster primary, ` +
          'run the worker code directly (see cluster.isPrimary)',
      );
    };
  }

  cluster.isWorker = true;
  cluster.isPrimary = false;
  cluster.isMaster = false;
  cluster.worker = worker;
  cluster.fork = noOwnCluster('fork');
  cluster.setupPrimary = noOwnCluster('setupPrimary');
  cluster.setupMaster = noOwnCluster('setupMaster');
  // Not on a worker's cluster object in Node either.
  delete cluster.workers;
  delete cluster.settings;
  delete cluster.disconnect;
  // With isPrimary false, net's listen() asks the cluster for the server's handle, as a cluster
  // worker asks its primary. Listen as a standalone process would instead: `_listen2` above
  // serves it.
  cluster._getServer = function roundhouseGetServer(obj, options, cb) {
    if (obj instanceof net.Server) {
      obj._listen2(options.address, options.port, options.addressType, options.backlog, options.fd, options.flags);
      return;
    }
    cb(-22 /* UV_EINVAL */, null);
  };
  // dgram sockets of a cluster worker bind through the primary too: roundhouse does not serve
  // UDP, so they bind in this process (Node's `exclusive`).
  const dgram = require('dgram');
  const origBind = dgram.Socket.prototype.bind;
  dgram.Socket.prototype.bind = function roundhouseBind(port, address) {
    const args = Array.prototype.slice.call(arguments);
    if (port !== null && typeof port === 'object') {
      if (typeof port.recvStart !== 'function') args[0] = Object.assign({}, port, { exclusive: true });
    } else {
      const cb = typeof args[args.length - 1] === 'function' ? args.pop() : undefined;
      const opts = { exclusive: true };
      if (typeof port === 'number' || typeof port === 'string') opts.port = port;
      if (typeof address === 'string') opts.address = address;
      args.length = 0;
      args.push(opts);
      if (cb) args.push(cb);
    }
    return Reflect.apply(origBind, this, args);
  };
  // `import { isPrimary } from 'node:cluster'` reads the builtin's ESM exports: resync them.
  require('module').syncBuiltinESMExports();

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

  // A node process the app started (it inherited NODE_OPTIONS, not the marker): roundhouse
  // serves none of its listens, and it has no channel to the primary. If it binds a TCP port
  // itself (a cluster of the app's own, a copy of the app), say so once on stderr, which the
  // primary logs as the worker's output.
  function watchDescendant(id) {
    const netModule = require('net');
    const orig = netModule.Server.prototype._listen2;
    let said = false;
    netModule.Server.prototype._listen2 = function roundhouseChildListen2(
      address,
      port,
      addressType,
      backlog,
      fd,
    ) {
      const tcp = !this._handle && typeof fd !== 'number' && (addressType === 4 || addressType === 6);
      if (tcp && !said) {
        said = true;
        process.stderr.write(
          `roundhouse: WARN worker ${id}: its child process ${process.pid} ` +
            `(${process.argv.slice(1).join(' ')}) listens on port ${port | 0} itself: ` +
            'roundhouse hands it no connection\n',
        );
      }
      return Reflect.apply(orig, this, arguments);
    };
  }

  function parseAddr(s) {
    const m = /^\[(.*)\]:(\d+)$/.exec(s) || /^(.*):(\d+)$/.exec(s);
    if (!m) return null;
    return { address: m[1], family: m[1].includes(':') ? 'IPv6' : 'IPv4', port: Number(m[2]) };
  }
})();
