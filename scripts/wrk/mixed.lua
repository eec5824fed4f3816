-- Mixed-cost workload for scripts/bench.sh: about 1 request in 10 asks for CPU work
-- (`/cpu?ms=N`, N from the env variable BENCH_CPU_MS, default 5), the rest for `/`.
--
-- Every request carries `Connection: close` (unless BENCH_MIXED_KEEPALIVE=1), so each request is
-- a new connection and the dispatch policy decides where every one of them goes: that is what
-- lets `least-conn` steer around a worker busy with a costly request, and what makes the
-- comparison of p99 between policies meaningful. Over keep-alive connections the policy acts only
-- once per connection, at the start of the run.
--
-- The choice is a deterministic pattern, not random, so every run sends the same mix and the
-- fraction is exact: each wrk thread sends one costly request in every BENCH_CPU_EVERY
-- (default 10), offset per thread so that the threads do not all send theirs at once.

local cpu_ms = tonumber(os.getenv("BENCH_CPU_MS") or "5")
local every = tonumber(os.getenv("BENCH_CPU_EVERY") or "10")
local keepalive = os.getenv("BENCH_MIXED_KEEPALIVE") == "1"

-- No probe connection before the run (see plain.lua).
function wrk.resolve(host, service)
  wrk.addrs = wrk.lookup(host, service)
end

local cheap, costly
local counter = 0
local thread_no = 0

function setup(thread)
  thread:set("thread_no", thread_no)
  thread_no = thread_no + 1
end

function init(args)
  local headers = {}
  if not keepalive then
    headers["Connection"] = "close"
  end
  cheap = wrk.format("GET", "/", headers)
  costly = wrk.format("GET", "/cpu?ms=" .. cpu_ms, headers)
  counter = (thread_no or 0) * 3
end

-- The `sticky` row: X-Forwarded-For from a pool of BENCH_XFF_POOL addresses (see plain.lua).
local pool = tonumber(os.getenv("BENCH_XFF_POOL") or "0")

function request()
  counter = counter + 1
  if pool > 0 then
    local k = counter % pool
    local headers = { ["X-Forwarded-For"] = "10.0." .. math.floor(k / 256) % 256 .. "." .. k % 256 }
    if not keepalive then
      headers["Connection"] = "close"
    end
    if counter % every == 0 then
      return wrk.format("GET", "/cpu?ms=" .. cpu_ms, headers)
    end
    return wrk.format("GET", "/", headers)
  end
  if counter % every == 0 then
    return costly
  end
  return cheap
end
