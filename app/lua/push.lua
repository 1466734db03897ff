-- push.lua: apply values to one EMA stream, atomically, with tf.train.ExponentialMovingAverage's
-- arithmetic in float64 (Lua numbers are doubles).
--
-- KEYS[1]  the stream's hash, `<prefix>{<name>}`
-- ARGV[1]  '1': create a missing stream from the defaults ARGV[2..4]; '0': reply EMA_NOT_FOUND
-- ARGV[2]  default decay, in [0, 1]
-- ARGV[3]  default initial shadow value, '' for none (the first value pushed seeds the shadow)
-- ARGV[4]  default auto_num_updates, '1' or '0'
-- ARGV[5..] pairs of (value, num_updates); num_updates '' when the sample carries none
--
-- Numbers cross as decimal strings that round-trip float64 exactly: a Lua number returned to
-- Redis is truncated to an integer, and tostring keeps only 14 digits.
--
-- Hash fields (short, to keep a stream small): d decay, i initial, a auto_num_updates,
-- v shadow value, n count, l last raw value, u decay used by the last update,
-- t updated_at (Redis server time, Unix seconds), b zero-started biased shadow,
-- p product of the decays used (b / (1 - p) is the bias-corrected value).
--
-- Reply: those fields in the order d i a v n l u t b p, false where absent;
-- or an error reply starting with EMA_INVALID or EMA_NOT_FOUND, having written nothing.

local MAX_NUM_UPDATES = 1e15

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

local function finite(x)
  return x == x and x ~= math.huge and x ~= -math.huge
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

local key = KEYS[1]
if #ARGV < 6 or #ARGV % 2 ~= 0 then
  return redis.error_reply('EMA_INVALID expected one or more (value, num_updates) pairs')
end

local h = redis.call('HMGET', key, 'd', 'i', 'a', 'v', 'n', 'l', 'u', 't', 'b', 'p')
local creating = not h[1]
if creating then
  if ARGV[1] ~= '1' then
    return redis.error_reply('EMA_NOT_FOUND')
  end
  h = {ARGV[2], ARGV[3] ~= '' and ARGV[3] or false, ARGV[4], ARGV[3] ~= '' and ARGV[3] or false,
       '0', false, false, false, '0', '1'}
end

local decay = decimal(h[1])
if decay == nil or decay < 0 or decay > 1 then
  return redis.error_reply('EMA_INVALID decay must be a number in [0, 1]')
end
local auto = h[3] == '1'
local shadow = h[4] and tonumber(h[4])
local count = tonumber(h[5])
local last, used
local biased = tonumber(h[9])
local product = tonumber(h[10])

for j = 5, #ARGV, 2 do
  local index = (j - 5) / 2
  local x = decimal(ARGV[j])
  if x == nil then
    return redis.error_reply('EMA_INVALID values[' .. index .. ']: not a finite number')
  end
  local steps
  if ARGV[j + 1] ~= '' then
    steps = decimal(ARGV[j + 1])
    if steps == nil or steps < 0 or steps > MAX_NUM_UPDATES or steps ~= math.floor(steps) then
      return redis.error_reply('EMA_INVALID values[' .. index .. ']: num_updates must be an integer in [0, 1e15]')
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
end

local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1e6

h[4] = exact(shadow)
h[5] = string.format('%d', count)
h[6] = exact(last)
h[7] = exact(used)
h[8] = exact(now)
h[9] = exact(biased)
h[10] = exact(product)
if creating then
  redis.call('HSET', key, 'd', h[1], 'a', h[3])
  if h[2] then
    redis.call('HSET', key, 'i', h[2])
  end
end
redis.call('HSET', key, 'v', h[4], 'n', h[5], 'l', h[6], 'u', h[7], 't', h[8], 'b', h[9], 'p', h[10])
return h
