-- POST one fixed JSON body to /v1/values (a bulk push across streams), over and over.
--
-- usage: wrk -s bulk.lua <url> -- <body-file>
--   body-file  the JSON body, e.g. {"entries": [{"stream": "b000000000000", "value": 1.5}, ...]}

local request_text

function init(args)
  local file = assert(io.open(args[1], "rb"))
  local body = file:read("*a")
  file:close()
  request_text = wrk.format("POST", "/v1/values", { ["Content-Type"] = "application/json" }, body)
end

function request()
  return request_text
end
