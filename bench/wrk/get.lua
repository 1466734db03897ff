-- GET /v1/streams/<name>, cycling over a handful of stream names (which must exist).
--
-- usage: wrk -s get.lua <url> -- <streams>
--   streams    how many names: s000000000000, s000000000001, ... (redis-benchmark's -r keys)

local requests = {}
local next_index = 0

function init(args)
  local streams = tonumber(args[1])
  for s = 0, streams - 1 do
    local path = string.format("/v1/streams/s%012d", s)
    requests[#requests + 1] = wrk.format("GET", path, {})
  end
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end
