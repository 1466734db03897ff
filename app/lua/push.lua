-- push.lua: apply samples to one EMA stream, atomically, in float64 (Lua numbers are doubles).
--
-- KEYS[1]  the stream's hash, `<prefix>{<name>}`
-- KEYS[2]  its history, a Redis Stream `<prefix>{<name>}:history` (written when the cap h > 0)
-- KEYS[3]  optional: the idempotency record `<prefix>{<name>}:idem:<Idempotency-Key>`
-- ARGV[1]  '1': create a missing stream from ARGV[2]; '0': reply EMA_NOT_FOUND
-- ARGV[2]  a new stream's hash fields, `field=value;field=value`
-- ARGV[3]  the request's fingerprint when KEYS[3] is given, else ''
-- ARGV[4]  seconds to keep the idempotency record
-- ARGV[5]  the Pub/Sub channel to announce the update on, '' for none
-- ARGV[6]  how far in the future (seconds, by Redis server time) a timestamp may be
-- ARGV[7..] triples (value, num_updates, timestamp); '' where the sample has none
--
-- Numbers cross as decimal strings that round-trip float64 exactly: a Lua number returned to
-- Redis is truncated to an integer, and tostring keeps only 14 digits.
--
-- Hash fields (short, to keep a stream small):
--   configuration  d decay | H halflife (seconds), i initial, a auto_num_updates, h history cap,
--                  k kind ('r': rate), L late samples ('r': reject), x ttl (seconds),
--                  W windows, `name:d0.9,name:h60`
--   state          n count, l last raw value, u decay used by the last update, t updated_at
--                  (Redis server time), E newest sample time;
--                  with a decay: v shadow, b zero-started shadow, p product of decays used;
--                  with a halflife: S, Z weighted value and weight sums, weights relative to E;
--                  per window: v:<name>, or S:<name> and Z:<name>
--
-- TensorFlow's update:  decay = min(decay, (1 + num_updates) / (10 + num_updates)) when the
--   sample has num_updates;  shadow -= (1 - decay) * (shadow - value).
-- Halflife: a sample at time t weighs 2^((t - E) / halflife). A newer sample moves E forward and
--   rescales S and Z, so every weight stays <= 1 (float64 holds over any span) and a late
--   sample is simply added with its own weight: the sums do not depend on arrival order.
--   Mean: S / Z. Rate (kind r): S * ln 2 / halflife events per second as of E.
--
-- Reply: the hash after the update as a flat list field, value, ..., then '1' if this is the
-- stored reply of an earlier push with the same idempotency key (nothing applied), else '0'.
-- The announcement on ARGV[5] and the idempotency record hold the same list as `f=v;f=v`.
-- Errors, having written nothing: EMA_INVALID <why>, EMA_NOT_FOUND, EMA_LATE <why>,
-- EMA_IDEMPOTENCY_MISMATCH.
-- History entries have the id `<count>-0` and fields t (sample time), l (raw), v (main value).

local MAX_NUM_UPDATES = 1e15
local FIRST_SAMPLE = 7

local function finite(x)
  return x == x and x ~= math.huge and x ~= -math.huge
end

local function exact(x)
  -- the shortest of %.15g, %.16g, %.17g that reads back as the same double
  local s = string.format('%.15g', x)
  if tonumber(s) ~= x then
    s = string.format('%.16g', x)
    if tonumber(s) ~= x then
      s = string.format('%.17g', x)
    end
  end
  return s
end

-- tonumber also takes 'nan', 'inf', '0x10' and ' 5 ': accept plain decimals only, and finite.
local function decimal(s)
  if not s or not string.find(s, '^%-?%d+%.?%d*[eE]?[-+]?%d*$') then
    return nil
  end
  local x = tonumber(s)
  if x == nil or not finite(x) then
    return nil
  end
  return x
end

local function parse_fields(text)
  local fields = {}
  for field, value in string.gmatch(text, '([^=;]+)=([^;]*)') do
    fields[field] = value
  end
  return fields
end

local function encoded(list)
  local parts = {}
  for i = 1, #list, 2 do
    parts[#parts + 1] = list[i] .. '=' .. list[i + 1]
  end
  return table.concat(parts, ';')
end

local function invalid(why)
  return redis.error_reply('EMA_INVALID ' .. why)
end

-- The stored reply of an earlier push with this idempotency key, an error if the key was used
-- for a different push, or nil when there is none.
local function replayed(idempotency_key, fingerprint)
  local record = redis.call('GET', idempotency_key)
  if not record then
    return nil
  end
  local sep = string.find(record, '\n', 1, true)
  if string.sub(record, 1, sep - 1) ~= fingerprint then
    return redis.error_reply('EMA_IDEMPOTENCY_MISMATCH')
  end
  local reply = {}
  for field, value in string.gmatch(string.sub(record, sep + 1), '([^=;]+)=([^;]*)') do
    reply[#reply + 1] = field
    reply[#reply + 1] = value
  end
  reply[#reply + 1] = '1'
  return reply
end

-- The configuration, parsed once from the hash: the main value is window 1, named windows
-- follow; each has a decay or a halflife and the names of its fields.
local function read_config(s)
  local decay = decimal(s.d)
  local halflife = decimal(s.H)
  if (decay == nil) == (halflife == nil) or (decay and (decay < 0 or decay > 1))
      or (halflife and halflife <= 0) then
    return nil, invalid('the stream needs a decay in [0, 1] or a halflife > 0')
  end
  local config = {
    decay = decay,
    halflife = halflife,
    auto = s.a == '1',
    history = tonumber(s.h) or 0,
    reject_late = s.L == 'r',
    rate = s.k == 'r',
    ttl = tonumber(s.x),
    windows = {{decay = decay, halflife = halflife, v = 'v', S = 'S', Z = 'Z'}},
  }
  if s.W and s.W ~= '' then
    for name, kind, param in string.gmatch(s.W, '([^:,]+):([dh])([^,]+)') do
      local window = {v = 'v:' .. name, S = 'S:' .. name, Z = 'Z:' .. name}
      if kind == 'd' then window.decay = tonumber(param) else window.halflife = tonumber(param) end
      config.windows[#config.windows + 1] = window
    end
  end
  return config
end

-- The numbers a push updates, read from the hash: per window its shadow, or its sums.
local function read_state(s, config)
  local state = {
    count = tonumber(s.n),
    epoch = s.E and tonumber(s.E),
    biased = tonumber(s.b) or 0,
    product = tonumber(s.p) or 1,
    windows = {},
  }
  for i, w in ipairs(config.windows) do
    if w.decay then
      state.windows[i] = {shadow = s[w.v] and tonumber(s[w.v])}
    else
      state.windows[i] = {sum = tonumber(s[w.S]) or 0, weight = tonumber(s[w.Z]) or 0}
    end
  end
  return state
end

local function main_value(config, state)
  local w, ws = config.windows[1], state.windows[1]
  if w.decay then
    return ws.shadow
  end
  if config.rate then
    return ws.sum * math.log(2) / w.halflife
  end
  return ws.sum / ws.weight
end

-- ARGV[j..j+2] as (value, num_updates or nil, time), or nil and the error.
local function parse_sample(j, config, state, now, latest_allowed)
  local where = 'values[' .. (j - FIRST_SAMPLE) / 3 .. ']: '
  local x = decimal(ARGV[j])
  if x == nil then
    return nil, invalid(where .. 'not a finite number')
  end
  local steps
  if ARGV[j + 1] ~= '' then
    steps = decimal(ARGV[j + 1])
    if steps == nil or steps < 0 or steps > MAX_NUM_UPDATES or steps ~= math.floor(steps) then
      return nil, invalid(where .. 'num_updates must be an integer in [0, 1e15]')
    end
  elseif config.auto then
    steps = state.count
  end
  local at = now
  if ARGV[j + 2] ~= '' then
    at = decimal(ARGV[j + 2])
    if at == nil or at < 0 or at > latest_allowed then
      return nil, invalid(where .. 'timestamp must be in [0, ' .. exact(latest_allowed) ..
        '] (Unix seconds; at most ' .. ARGV[6] .. ' s past the server clock)')
    end
  end
  if config.reject_late and state.epoch and at < state.epoch then
    return nil, redis.error_reply('EMA_LATE ' .. where .. 'timestamp ' .. exact(at) ..
      ' is older than the newest sample, ' .. exact(state.epoch))
  end
  return x, steps, at
end

-- E is the newest sample's time. Halflife windows: a newer sample moves it forward and
-- rescales their sums; a late one leaves it, and the sums, as they are.
local function move_epoch(config, state, at)
  if config.halflife then
    state.used = 1
  end
  if state.epoch == nil then
    state.epoch = at
  elseif at > state.epoch then
    for i, w in ipairs(config.windows) do
      if w.halflife then
        local ws = state.windows[i]
        local shrink = 2 ^ ((state.epoch - at) / w.halflife)
        ws.sum = ws.sum * shrink
        ws.weight = ws.weight * shrink
        if i == 1 then
          state.used = shrink
        end
      end
    end
    state.epoch = at
  end
end

-- One sample into window i; an error if it overflows float64.
local function apply_window(config, state, i, x, steps, at, where)
  local w, ws = config.windows[i], state.windows[i]
  if w.decay then
    local d = w.decay
    if steps then
      d = math.min(d, (1 + steps) / (10 + steps))
    end
    if ws.shadow then
      ws.shadow = ws.shadow - (1 - d) * (ws.shadow - x)
    else
      ws.shadow = x
    end
    if not finite(ws.shadow) then
      return invalid(where .. 'the update overflows float64')
    end
    if i == 1 then
      state.biased = state.biased - (1 - d) * (state.biased - x)
      if not finite(state.biased) then
        return invalid(where .. 'the update overflows float64')
      end
      state.product = state.product * d
      state.used = d
    end
  else
    local weight = 2 ^ ((at - state.epoch) / w.halflife)
    ws.sum = ws.sum + x * weight
    ws.weight = ws.weight + weight
    if not finite(ws.sum) then
      return invalid(where .. 'the update overflows float64')
    end
  end
end

-- The state's fields as HSET arguments.
local function state_fields(config, state, now)
  local changes = {'n', string.format('%d', state.count), 'l', exact(state.last), 't', exact(now)}
  local function add(field, x)
    changes[#changes + 1] = field
    changes[#changes + 1] = exact(x)
  end
  if state.used then
    add('u', state.used)
  end
  if state.epoch then
    add('E', state.epoch)
  end
  if config.decay then
    add('b', state.biased)
    add('p', state.product)
  end
  for i, w in ipairs(config.windows) do
    local ws = state.windows[i]
    if w.decay then
      add(w.v, ws.shadow)
    else
      add(w.S, ws.sum)
      add(w.Z, ws.weight)
    end
  end
  return changes
end

local function write_history(history_key, history, entries)
  -- Only the newest `history` entries can survive the cap: skip writing the others.
  for k = math.max(1, #entries - history + 1), #entries do
    local entry = entries[k]
    redis.call('XADD', history_key, 'MAXLEN', history, string.format('%d-0', entry[1]),
      't', exact(entry[2]), 'l', exact(entry[3]), 'v', exact(entry[4]))
  end
end

-- The hash as field, value, ...; announced and recorded for idempotency as `f=v;f=v`.
local function build_reply(key, idempotency_key, fingerprint)
  local reply = redis.call('HGETALL', key)
  if ARGV[5] ~= '' or idempotency_key then
    local text = encoded(reply)
    if ARGV[5] ~= '' then
      redis.call('PUBLISH', ARGV[5], text)
    end
    if idempotency_key then
      redis.call('SET', idempotency_key, fingerprint .. '\n' .. text, 'EX', ARGV[4])
    end
  end
  reply[#reply + 1] = '0'
  return reply
end

local function push(key, history_key, idempotency_key)
  local fingerprint = ARGV[3]
  if idempotency_key then
    local reply = replayed(idempotency_key, fingerprint)
    if reply then
      return reply
    end
  end

  if #ARGV < FIRST_SAMPLE + 2 or (#ARGV - FIRST_SAMPLE + 1) % 3 ~= 0 then
    return invalid('expected one or more (value, num_updates, timestamp)')
  end

  local stored = redis.call('HGETALL', key)
  local s = {}
  for i = 1, #stored, 2 do
    s[stored[i]] = stored[i + 1]
  end
  local creating = s.n == nil
  if creating then
    if ARGV[1] ~= '1' then
      return redis.error_reply('EMA_NOT_FOUND')
    end
    -- A history left behind by a deleted hash would refuse the new stream's entry ids.
    redis.call('DEL', history_key)
    s = parse_fields(ARGV[2])
  end

  local config, refused = read_config(s)
  if not config then
    return refused
  end
  local state = read_state(s, config)
  local entries = {}

  local time = redis.call('TIME')
  local now = tonumber(time[1]) + tonumber(time[2]) / 1e6
  local latest_allowed = now + tonumber(ARGV[6])

  for j = FIRST_SAMPLE, #ARGV, 3 do
    local x, steps, at = parse_sample(j, config, state, now, latest_allowed)
    if x == nil then
      return steps
    end
    move_epoch(config, state, at)
    local where = 'values[' .. (j - FIRST_SAMPLE) / 3 .. ']: '
    for i = 1, #config.windows do
      local overflow = apply_window(config, state, i, x, steps, at, where)
      if overflow then
        return overflow
      end
    end
    state.count = state.count + 1
    state.last = x
    if config.history > 0 then
      entries[#entries + 1] = {state.count, at, x, main_value(config, state)}
    end
  end

  if creating then
    local fields = {}
    for field, value in pairs(s) do
      fields[#fields + 1] = field
      fields[#fields + 1] = value
    end
    redis.call('HSET', key, unpack(fields))
  end
  redis.call('HSET', key, unpack(state_fields(config, state, now)))
  write_history(history_key, config.history, entries)
  if config.ttl then
    redis.call('EXPIRE', key, config.ttl)
    if config.history > 0 then
      redis.call('EXPIRE', history_key, config.ttl)
    end
  end
  return build_reply(key, idempotency_key, fingerprint)
end

return push(KEYS[1], KEYS[2], KEYS[3])
