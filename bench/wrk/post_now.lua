-- POST {"value": <value>, "timestamp": <now>} to /v1/streams/<name>/values, cycling over the
-- stream names as post.lua does. The timestamp is this machine's clock (Unix seconds, to the
-- microsecond) when wrk builds the request, so every request has a body of its own.
--
-- usage: wrk -s post_now.lua <url> -- <streams> <value>
--   streams    how many names: s000000000000, s000000000001, ... (redis-benchmark's -r keys)
--   value      the value, as JSON (e.g. 1.5)

local paths = {}
local headers = { ["Content-Type"] = "application/json" }
local value = "1.5"
local next_index = 0

-- wrk runs LuaJIT: its FFI reads gettimeofday. Without it, whole seconds from os.time(), so
-- that most samples would share their stream's newest time.
local now = os.time
local ok, ffi = pcall(require, "ffi")
if ok then
  ffi.cdef([[
    typedef struct { long tv_sec; long tv_usec; } bench_timeval;
    int gettimeofday(bench_timeval *tv, void *tz);
  ]])
  local tv = ffi.new("bench_timeval")
  now = function()
    ffi.C.gettimeofday(tv, nil)
    return tonumber(tv.tv_sec) + tonumber(tv.tv_usec) / 1e6
  end
end

function init(args)
  local streams = tonumber(args[1])
  value = args[2]
  for s = 0, streams - 1 do
    paths[#paths + 1] = string.format("/v1/streams/s%012d/values", s)
  end
end

function request()
  next_index = next_index % #paths + 1
  local body = string.format('{"value": %s, "timestamp": %.6f}', value, now())
  return wrk.format("POST", paths[next_index], headers, body)
end
