-- push.lua: apply values to one EMA stream, atomically, with tf.train.ExponentialMovingAverage's
-- arithmetic in float64 (Lua numbers are doubles).
--
-- KEYS[1]  the stream's hash, `<prefix>{<name>}`
-- KEYS[2]  its history, a Redis Stream `<prefix>{<name>}:history` (written when the cap h > 0)
-- KEYS[3]  optional: the idempotency record `<prefix>{<name>}:idem:<Idempotency-Key>`
-- ARGV[1]  '1': create a missing stream from the defaults ARGV[2..5]; '0': reply EMA_NOT_FOUND
-- ARGV[2]  default decay, in [0, 1]
-- ARGV[3]  default initial shadow value, '' for none (the first value pushed seeds the shadow)
-- ARGV[4]  default auto_num_updates, '1' or '0'
-- ARGV[5]  default history cap, an integer >= 0
-- ARGV[6]  the request's fingerprint when KEYS[3] is given, else ''
-- ARGV[7]  seconds to keep the idempotency record
-- ARGV[8]  the Pub/Sub channel to announce the update on, '' for none
-- ARGV[9..] pairs of (value, num_updates); num_updates '' when the sample carries none
--
-- Numbers cross as decimal strings that round-trip float64 exactly: a Lua number returned to
-- Redis is truncated to an integer, and tostring keeps only 14 digits.
--
-- Hash fields (short, to keep a stream small): d decay, i initial, a auto_num_updates,
-- h history cap, v shadow value, n count, l last raw value, u decay used by the last update,
-- t updated_at (Redis server time, Unix seconds), b zero-started biased shadow,
-- p product of the decays used (b / (1 - p) is the bias-corrected value).
--
-- Reply: those fields in the order d i a h v n l u t b p, false where absent, then '1' if this
-- is the stored reply of an earlier push with the same idempotency key, else '0'.
-- Or an error reply starting with EMA_INVALID, EMA_NOT_FOUND or EMA_IDEMPOTENCY_MISMATCH,
-- having written nothing.
-- The announcement on ARGV[8] is the same fields joined by ',' (absent ones empty).
-- History entries have the id `<count>-0` and fields t, l (raw), v (shadow), one per value.

local FIELDS = {'d', 'i', 'a', 'h', 'v', 'n', 'l', 'u', 't', 'b', 'p'}
local MAX_NUM_UPDATES = 1e15
local FIRST_PAIR = 9

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
  if not string.find(s, '^%-?%d+%.?%d*[eE]?[-+]?%d*$') then
    return nil
  end
  local x = tonumber(s)
  if x == nil or not finite(x) then
    return nil
  end
  return x
end

local function joined(h)
  local parts = {}
  for k = 1, #FIELDS do
    parts[k] = h[k] or ''
  end
  return table.concat(parts, ',')
end

local key, history_key, idempotency_key = KEYS[1], KEYS[2], KEYS[3]
local fingerprint = ARGV[6]

if idempotency_key then
  local record = redis.call('GET', idempotency_key)
  if record then
    local sep = string.find(record, '\n', 1, true)
    if string.sub(record, 1, sep - 1) ~= fingerprint then
      return redis.error_reply('EMA_IDEMPOTENCY_MISMATCH')
    end
    local reply, k = {}, 1
    for part in string.gmatch(string.sub(record, sep + 1) .. ',', '([^,]*),') do
      reply[k] = part ~= '' and part or false
      k = k + 1
    end
    reply[#FIELDS + 1] = '1'
    return reply
  end
end

if #ARGV < FIRST_PAIR + 1 or (#ARGV - FIRST_PAIR + 1) % 2 ~= 0 then
  return redis.error_reply('EMA_INVALID expected one or more (value, num_updates) pairs')
end

local h = redis.call('HMGET', key, unpack(FIELDS))
local creating = not h[1]
if creating then
  if ARGV[1] ~= '1' then
    return redis.error_reply('EMA_NOT_FOUND')
  end
  local initial = ARGV[3] ~= '' and ARGV[3] or false
  -- A history left behind by a deleted hash would refuse the new stream's entry ids.
  redis.call('DEL', history_key)
  h = {ARGV[2], initial, ARGV[4], ARGV[5], initial, '0', false, false, false, '0', '1'}
end

local decay = decimal(h[1])
if decay == nil or decay < 0 or decay > 1 then
  return redis.error_reply('EMA_INVALID decay must be a number in [0, 1]')
end
local auto = h[3] == '1'
local history = tonumber(h[4]) or 0
local shadow = h[5] and tonumber(h[5])
local count = tonumber(h[6])
local last, used
local biased = tonumber(h[10])
local product = tonumber(h[11])
local entries = {}

for j = FIRST_PAIR, #ARGV, 2 do
  local index = (j - FIRST_PAIR) / 2
  local x = decimal(ARGV[j])
  if x == nil then
    return redis.error_reply('EMA_INVALID values[' .. index .. ']: not a finite number')
  end
  local steps
  if ARGV[j + 1] ~= '' then
    steps = decimal(ARGV[j + 1])
    if steps == nil or steps < 0 or steps > MAX_NUM_UPDATES or steps ~= math.floor(steps) then
      return redis.error_reply(
        'EMA_INVALID values[' .. index .. ']: num_updates must be an integer in [0, 1e15]')
    end
  elseif auto then
    steps = count
  end
  local d = decay
  if steps then
    d = math.min(decay, (1 + steps) / (10 + steps))
  end
  if shadow then
    shadow = shadow - (1 - d) * (shadow - x)
  else
    shadow = x
  end
  biased = biased - (1 - d) * (biased - x)
  if not (finite(shadow) and finite(biased)) then
    return redis.error_reply('EMA_INVALID values[' .. index .. ']: the update overflows float64')
  end
  product = product * d
  count = count + 1
  last = x
  used = d
  if history > 0 then
    entries[#entries + 1] = {count, x, shadow}
  end
end

local time = redis.call('TIME')
local now = exact(tonumber(time[1]) + tonumber(time[2]) / 1e6)

h[5] = exact(shadow)
h[6] = string.format('%d', count)
h[7] = exact(last)
h[8] = exact(used)
h[9] = now
h[10] = exact(biased)
h[11] = exact(product)
if creating then
  redis.call('HSET', key, 'd', h[1], 'a', h[3], 'h', h[4])
  if h[2] then
    redis.call('HSET', key, 'i', h[2])
  end
end
redis.call('HSET', key, 'v', h[5], 'n', h[6], 'l', h[7], 'u', h[8], 't', h[9], 'b', h[10],
  'p', h[11])

-- Only the newest `history` entries can survive the cap: skip writing the others.
for k = math.max(1, #entries - history + 1), #entries do
  local entry = entries[k]
  redis.call('XADD', history_key, 'MAXLEN', history, string.format('%d-0', entry[1]),
    't', now, 'l', exact(entry[2]), 'v', exact(entry[3]))
end

if ARGV[8] ~= '' then
  redis.call('PUBLISH', ARGV[8], joined(h))
end
if idempotency_key then
  redis.call('SET', idempotency_key, fingerprint .. '\n' .. joined(h), 'EX', ARGV[7])
end
h[#FIELDS + 1] = '0'
return h
