-- POST {"value": 1.5} to a stream drawn at random among the first N names s000000000000,
-- s000000000001, ... (a million of them, say): every push a different key, as far as Redis'
-- caches are concerned.
--
-- usage: wrk -s spread.lua <url> -- <streams> <seed>

local streams
local headers = { ["Content-Type"] = "application/json" }
local body = '{"value": 1.5}'
local seed_offset = 0

function setup(thread)
  seed_offset = seed_offset + 1
  thread:set("thread_seed", seed_offset)
end

function init(args)
  streams = tonumber(args[1])
  math.randomseed(tonumber(args[2]) * 1000 + (thread_seed or 0))
end

function request()
  local path = string.format("/v1/streams/s%012d/values", math.random(0, streams - 1))
  return wrk.format("POST", path, headers, body)
end
