-- Keep-alive and connection-per-request workloads of scripts/bench.sh: wrk's own static request
-- (headers come from the command line), minus one thing. Before a run, wrk's default
-- `wrk.resolve` opens a probe connection to every address it resolved, to test it; against a
-- supervisor that probe is one more connection handed to a worker, which shows up in the
-- per-worker shares (65 connections instead of 64 on keep-alive). Resolve without probing: the
-- address is loopback and the server has already said it is listening.

function wrk.resolve(host, service)
  wrk.addrs = wrk.lookup(host, service)
end

-- The `sticky` row (--sticky-key header:X-Forwarded-For): with BENCH_XFF_POOL=N every request
-- carries `X-Forwarded-For` from a pool of N client addresses, as if behind a proxy, so that
-- the keys spread over the workers (from wrk's one source address, `ip` keys would all land on
-- one worker). The command line's headers (-H) are kept.
local pool = tonumber(os.getenv("BENCH_XFF_POOL") or "0")
if pool > 0 then
  local n, thread_no = 0, 0
  function setup(thread)
    thread:set("thread_no", thread_no)
    thread_no = thread_no + 1
  end
  function init(args)
    n = (thread_no or 0) * 7919
  end
  function request()
    n = n + 1
    local k = n % pool
    local headers = {}
    for name, value in pairs(wrk.headers) do
      headers[name] = value
    end
    headers["X-Forwarded-For"] = "10." .. math.floor(k / 65536) % 256 .. "." .. math.floor(k / 256) % 256 .. "." .. k % 256
    return wrk.format(nil, nil, headers)
  end
end
