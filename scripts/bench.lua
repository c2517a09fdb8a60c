-- wrk script for scripts/bench: picks the request, prints a JSON summary line at the end.
--
-- BENCH_MODE=read   GET /services/usermanagement/api/users/<random user of BENCH_USERS>/climate-field-view-credentials<BENCH_SUFFIX>
-- BENCH_MODE=create POST a new credential for a fresh random user (JSON body as scripts/bench documents)
-- BENCH_MODE=fixed  the URL given on the command line, unchanged (static: no per-request Lua)
-- Headers (Authorization, Content-Type) come from wrk's -H options.
local mode = os.getenv("BENCH_MODE") or "fixed"
local suffix = os.getenv("BENCH_SUFFIX") or ""
local base = "/services/usermanagement/api/users/"
local segment = "/climate-field-view-credentials"

local users = {}
if mode == "read" then
  local file = os.getenv("BENCH_USERS")
  for line in io.lines(file) do
    if #line > 0 then users[#users + 1] = line end
  end
  if #users == 0 then error("BENCH_USERS is empty") end
end

local counter = 1
function setup(thread)
  thread:set("thread_id", counter)
  counter = counter + 1
end

function init(args)
  local id = thread_id or 0
  math.randomseed(os.time() * 1000 + id * 7919 + math.floor(os.clock() * 1000000))
end

local function uuid4()
  return (string.gsub("xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx", "[xy]", function(c)
    local v = (c == "x") and math.random(0, 15) or math.random(8, 11)
    return string.format("%x", v)
  end))
end

if mode == "read" then
  request = function()
    return wrk.format("GET", base .. users[math.random(#users)] .. segment .. suffix)
  end
elseif mode == "create" then
  request = function()
    local n = math.random(0, 999999999)
    local body = string.format(
      '{"clientId":"bench-client-id-%09d","clientSecret":"bench-client-secret-0123456789abcdef",' ..
      '"apiKey":"bench-api-key-0123456789abcdef","refreshToken":"bench-refresh-token-0123456789abcdef"}', n)
    return wrk.format("POST", base .. uuid4() .. segment, nil, body)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"secs":%.3f,"rps":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f,"non2xx":%d,"socket_errors":%d}\n',
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, e.status, e.connect + e.read + e.write + e.timeout))
end
