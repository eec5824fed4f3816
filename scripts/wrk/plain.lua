-- Keep-alive and connection-per-request workloads of scripts/bench.sh: wrk's own static request
-- (headers come from the command line), minus one thing. Before a run, wrk's default
-- `wrk.resolve` opens a probe connection to every address it resolved, to test it; against a
-- supervisor that probe is one more connection handed to a worker, which shows up in the
-- per-worker shares (65 connections instead of 64 on keep-alive). Resolve without probing: the
-- address is loopback and the server has already said it is listening.

function wrk.resolve(host, service)
  wrk.addrs = wrk.lookup(host, service)
end
