-- POST one JSON body to /v1/streams/<name>/values, cycling over a handful of stream names so
-- that no single hot key dominates.
--
-- usage: wrk -s post.lua <url> -- <streams> <body-file>
--   streams    how many names: s000000000000, s000000000001, ... (redis-benchmark's -r keys)
--   body-file  the JSON body, e.g. {"value": 1.5} or {"values": [...]}
--
-- The requests are formatted once in init(); request() only hands them out in turn.

local requests = {}
local next_index = 0

function init(args)
  local streams = tonumber(args[1])
  local file = assert(io.open(args[2], "rb"))
  local body = file:read("*a")
  file:close()
  for s = 0, streams - 1 do
    local path = string.format("/v1/streams/s%012d/values", s)
    local headers = { ["Content-Type"] = "application/json" }
    requests[#requests + 1] = wrk.format("POST", path, headers, body)
  end
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end
