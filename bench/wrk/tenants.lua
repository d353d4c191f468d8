-- wrk script of the hit-path benchmark (scripts/bench). Arguments after `--`:
--   <count> <tenant or prefix>
-- count 1: every request names the tenant; count N: requests go round-robin over
-- <prefix>0 .. <prefix>(N-1). Every configuration runs this same script, so wrk does
-- the same work per request whatever is measured. Requests are built once, in init.
local requests = {}
local count = 1
local index = 0

function init(args)
  count = tonumber(args[1]) or 1
  local name = args[2] or "acme"
  for n = 0, count - 1 do
    local tenant = name
    if count > 1 then tenant = name .. n end
    requests[n + 1] = wrk.format("GET", "/api/conversations", { ["x-tenant-id"] = tenant })
  end
end

function request()
  index = index + 1
  if index > count then index = 1 end
  return requests[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'TGBENCH {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
