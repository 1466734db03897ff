-- post.lua at a steady pace: each connection waits `delay-ms` after every response, so that
-- `connections` connections push about connections * 1000 / (delay-ms + latency) times a second.
--
-- usage: wrk -s paced.lua <url> -- <streams> <body-file> <delay-ms>

local requests = {}
local next_index = 0
local pause = 0

function init(args)
  local streams = tonumber(args[1])
  local file = assert(io.open(args[2], "rb"))
  local body = file:read("*a")
  file:close()
  pause = tonumber(args[3])
  for s = 0, streams - 1 do
    local path = string.format("/v1/streams/s%012d/values", s)
    local headers = { ["Content-Type"] = "application/json" }
    requests[#requests + 1] = wrk.format("POST", path, headers, body)
  end
end

function delay()
  return pause
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end
