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

local key, history_key, idempotency_key = KEYS[1], KEYS[2], KEYS[3]
local fingerprint = ARGV[3]

if idempotency_key then
  local record = redis.call('GET', idempotency_key)
  if record then
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
end

if #ARGV < FIRST_SAMPLE + 2 or (#ARGV - FIRST_SAMPLE + 1) % 3 ~= 0 then
  return redis.error_reply('EMA_INVALID expected one or more (value, num_updates, timestamp)')
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

local decay = decimal(s.d)
local halflife = decimal(s.H)
if (decay == nil) == (halflife == nil) or (decay and (decay < 0 or decay > 1))
    or (halflife and halflife <= 0) then
  return redis.error_reply('EMA_INVALID the stream needs a decay in [0, 1] or a halflife > 0')
end
local auto = s.a == '1'
local history = tonumber(s.h) or 0
local reject_late = s.L == 'r'

-- Windows: the main value is window 1; named windows follow. Each has a decay or a halflife.
local windows = {}
windows[1] = {decay = decay, halflife = halflife, v = 'v', S = 'S', Z = 'Z'}
if s.W and s.W ~= '' then
  for name, kind, param in string.gmatch(s.W, '([^:,]+):([dh])([^,]+)') do
    local window = {v = 'v:' .. name, S = 'S:' .. name, Z = 'Z:' .. name}
    if kind == 'd' then window.decay = tonumber(param) else window.halflife = tonumber(param) end
    windows[#windows + 1] = window
  end
end
for _, w in ipairs(windows) do
  if w.decay then
    w.shadow = s[w.v] and tonumber(s[w.v])
  else
    w.sum = tonumber(s[w.S]) or 0
    w.weight = tonumber(s[w.Z]) or 0
  end
end

local count = tonumber(s.n)
local epoch = s.E and tonumber(s.E)
local biased = tonumber(s.b) or 0
local product = tonumber(s.p) or 1
local last, used
local entries = {}

local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1e6
local latest_allowed = now + tonumber(ARGV[6])

local function main_value()
  local w = windows[1]
  if w.decay then
    return w.shadow
  end
  if s.k == 'r' then
    return w.sum * math.log(2) / w.halflife
  end
  return w.sum / w.weight
end

for j = FIRST_SAMPLE, #ARGV, 3 do
  local index = (j - FIRST_SAMPLE) / 3
  local where = 'values[' .. index .. ']: '
  local x = decimal(ARGV[j])
  if x == nil then
    return redis.error_reply('EMA_INVALID ' .. where .. 'not a finite number')
  end
  local steps
  if ARGV[j + 1] ~= '' then
    steps = decimal(ARGV[j + 1])
    if steps == nil or steps < 0 or steps > MAX_NUM_UPDATES or steps ~= math.floor(steps) then
      return redis.error_reply('EMA_INVALID ' .. where .. 'num_updates must be an integer in [0, 1e15]')
    end
  elseif auto then
    steps = count
  end
  local at = now
  if ARGV[j + 2] ~= '' then
    at = decimal(ARGV[j + 2])
    if at == nil or at < 0 or at > latest_allowed then
      return redis.error_reply('EMA_INVALID ' .. where .. 'timestamp must be in [0, ' ..
        exact(latest_allowed) .. '] (Unix seconds; at most ' .. ARGV[6] ..
        ' s past the server clock)')
    end
  end
  if reject_late and epoch and at < epoch then
    return redis.error_reply('EMA_LATE ' .. where .. 'timestamp ' .. exact(at) ..
      ' is older than the newest sample, ' .. exact(epoch))
  end

  -- E is the newest sample's time. Halflife windows: a newer sample moves it forward and
  -- rescales their sums; a late one leaves it, and the sums, as they are.
  if windows[1].halflife then
    used = 1
  end
  if epoch == nil then
    epoch = at
  elseif at > epoch then
    for _, w in ipairs(windows) do
      if w.halflife then
        local shrink = 2 ^ ((epoch - at) / w.halflife)
        w.sum = w.sum * shrink
        w.weight = w.weight * shrink
        if w == windows[1] then
          used = shrink
        end
      end
    end
    epoch = at
  end

  for _, w in ipairs(windows) do
    if w.decay then
      local d = w.decay
      if steps then
        d = math.min(d, (1 + steps) / (10 + steps))
      end
      if w.shadow then
        w.shadow = w.shadow - (1 - d) * (w.shadow - x)
      else
        w.shadow = x
      end
      if not finite(w.shadow) then
        return redis.error_reply('EMA_INVALID ' .. where .. 'the update overflows float64')
      end
      if w == windows[1] then
        biased = biased - (1 - d) * (biased - x)
        if not finite(biased) then
          return redis.error_reply('EMA_INVALID ' .. where .. 'the update overflows float64')
        end
        product = product * d
        used = d
      end
    else
      local weight = 2 ^ ((at - epoch) / w.halflife)
      w.sum = w.sum + x * weight
      w.weight = w.weight + weight
      if not finite(w.sum) then
        return redis.error_reply('EMA_INVALID ' .. where .. 'the update overflows float64')
      end
    end
  end

  count = count + 1
  last = x
  if history > 0 then
    entries[#entries + 1] = {count, at, x, main_value()}
  end
end

local changes = {'n', string.format('%d', count), 'l', exact(last), 't', exact(now)}
if used then
  changes[#changes + 1] = 'u'
  changes[#changes + 1] = exact(used)
end
if epoch then
  changes[#changes + 1] = 'E'
  changes[#changes + 1] = exact(epoch)
end
if decay then
  for _, field in ipairs({{'b', biased}, {'p', product}}) do
    changes[#changes + 1] = field[1]
    changes[#changes + 1] = exact(field[2])
  end
end
for _, w in ipairs(windows) do
  local values = w.decay and {{w.v, w.shadow}} or {{w.S, w.sum}, {w.Z, w.weight}}
  for _, field in ipairs(values) do
    changes[#changes + 1] = field[1]
    changes[#changes + 1] = exact(field[2])
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
redis.call('HSET', key, unpack(changes))

-- Only the newest `history` entries can survive the cap: skip writing the others.
for k = math.max(1, #entries - history + 1), #entries do
  local entry = entries[k]
  redis.call('XADD', history_key, 'MAXLEN', history, string.format('%d-0', entry[1]),
    't', exact(entry[2]), 'l', exact(entry[3]), 'v', exact(entry[4]))
end

local ttl = tonumber(s.x)
if ttl then
  redis.call('EXPIRE', key, ttl)
  if history > 0 then
    redis.call('EXPIRE', history_key, ttl)
  end
end

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
