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
--                  W windows, `name:d0.9,name:h60`, A arithmetic of the decay averages
--                  (absent: float64; '64', '32': TensorFlow on a float64 or float32 variable)
--   state          n count, l last raw value, u decay used by the last update, t updated_at
--                  (Redis server time), E newest sample time;
--                  with a decay: v shadow, b zero-started shadow, p product of decays used;
--                  with a halflife: S, Z weighted value and weight sums, weights relative to E;
--                  per window: v:<name>, or S:<name> and Z:<name>;
--                  the spread of the samples (not of rate streams) in two fields, V `q,w` and
--                  M `m,z` (two fields cost far less to write than four, and each value stays
--                  under the 64 bytes that keep a hash a listpack): with a decay, q the biased
--                  variance, w = 1 - sum of squared weights (weights sum to 1), m the mean;
--                  with a halflife, q = sum w (x - S/Z)^2 and w = Z^2 - sum w^2 (relative to
--                  E like S and Z), m empty; z the last value's z-score against the spread
--                  before it, empty when not a finite number
--
-- TensorFlow's update:  decay = min(decay, (1 + num_updates) / (10 + num_updates)) when the
--   sample has num_updates;  shadow -= (1 - decay) * (shadow - value).
-- Arithmetic: by default that update in float64. A = '64' / '32' takes, for the shadows, every
--   rounding step TensorFlow 2.21 takes (moving_averages.py): the decay converted to float32,
--   the min with num_updates (cast to float32) in float32, 1 - decay in float32 then cast to the
--   variable's dtype, `(shadow - value) * (1 - decay)` and the subtraction in that dtype (a float32
--   variable holds each value rounded to float32), subnormal inputs and results flushed to zero
--   as its CPU kernels do. A float32 operation is done in float64 and rounded: exact for
--   + - * / (a double has more than 2 * 24 + 2 bits).
-- Spread: pandas' ewm(alpha = 1 - decay, adjust=False).var() (bias-corrected), a decay per
--   step, in float64 whatever the arithmetic; with a halflife the same bias correction with the
--   time weights, V = q / Z * Z^2 / (Z^2 - sum w^2), updated by weighted Welford steps, so late
--   samples are still exact and the result does not depend on arrival order.
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
-- History entries have the id `<count>-0` and fields t (sample time), l (raw), v (main value),
-- and when defined s (standard deviation after the value) and z (its z-score).

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

local frexp, ldexp = math.frexp, math.ldexp
local FLOAT32_OVERFLOW = 2 ^ 128
local SUBNORMAL32 = 1.5 * 2 ^ -97

-- The float32 nearest to x, ties to even, subnormals included; +-inf past the largest float32.
-- Adding K = 1.5 * 2^(e + 28) (a double whose last bit is worth x's float32 step, 2^(e - 24))
-- makes the float64 addition round x to that step, ties to even; subtracting K is exact.
local function float32(x)
  if x == 0 then
    return x  -- keeps the sign of a zero (0 + K - K would not)
  end
  local _, e = frexp(x)  -- x = m * 2^e, 0.5 <= |m| < 1 (e = 0 for inf and NaN)
  if e > 128 then
    return x * math.huge  -- beyond float32 (and K itself would overflow)
  end
  local k = SUBNORMAL32  -- below 2^-126 the step is 2^-149
  if e > -126 then
    k = ldexp(1.5, e + 28)
  end
  local y = (x + k) - k
  if y >= FLOAT32_OVERFLOW or y <= -FLOAT32_OVERFLOW then
    return y * math.huge
  end
  if y == 0 then
    return x * 0  -- rounded to a zero of x's sign
  end
  return y
end

-- TensorFlow's CPU kernels flush subnormal inputs and results to a zero of the same sign: below
-- these, the smallest normal float64 and float32.
local TINY64, TINY32 = 2.2250738585072014e-308, 1.1754943508222875e-38

-- `shadow -= (shadow - value) * one_minus_decay` as TensorFlow computes it on a float64 variable
-- (flushes written out: this runs for every sample).
local function tensorflow_step64(shadow, x, one_minus_decay)
  if shadow < TINY64 and shadow > -TINY64 then shadow = shadow * 0 end
  if x < TINY64 and x > -TINY64 then x = x * 0 end
  local delta = shadow - x
  if delta < TINY64 and delta > -TINY64 then delta = delta * 0 end
  delta = delta * one_minus_decay
  if delta < TINY64 and delta > -TINY64 then delta = delta * 0 end
  local y = shadow - delta
  if y < TINY64 and y > -TINY64 then y = y * 0 end
  return y
end

-- The same on a float32 variable: x already rounded to float32, each operation rounded to it.
local function tensorflow_step32(shadow, x, one_minus_decay)
  if shadow < TINY32 and shadow > -TINY32 then shadow = shadow * 0 end
  if x < TINY32 and x > -TINY32 then x = x * 0 end
  local delta = float32(shadow - x)
  if delta < TINY32 and delta > -TINY32 then delta = delta * 0 end
  delta = float32(delta * one_minus_decay)
  if delta < TINY32 and delta > -TINY32 then delta = delta * 0 end
  local y = float32(shadow - delta)
  if y < TINY32 and y > -TINY32 then y = y * 0 end
  return y
end

-- TensorFlow's decay tensor, float32 throughout: min(decay, (1 + n) / (10 + n)).
local function tensorflow_decay(decay32, steps)
  -- (1 + n) / (10 + n) computed in float32 is within 2^-22 (relative) of its float64 value:
  -- well above the decay, the min is the decay, and the float32 steps can be skipped.
  if steps and (1 + steps) / (10 + steps) < decay32 * (1 + 2 ^ -20) then
    local n = float32(steps)
    return math.min(decay32, float32(float32(1 + n) / float32(10 + n)))
  end
  return decay32
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
  local dtype = s.A
  if dtype and ((dtype ~= '64' and dtype ~= '32') or not decay) then
    return nil, invalid('the TensorFlow arithmetics need a decay')
  end
  local config = {
    dtype = dtype,
    decay = decay,
    halflife = halflife,
    auto = s.a == '1',
    history = tonumber(s.h) or 0,
    reject_late = s.L == 'r',
    rate = s.k == 'r',
    ttl = tonumber(s.x),
    windows = {{decay = decay, halflife = halflife, v = 'v', S = 'S', Z = 'Z'}},
  }
  config.spread = not config.rate
  if s.W and s.W ~= '' then
    for name, kind, param in string.gmatch(s.W, '([^:,]+):([dh])([^,]+)') do
      local window = {v = 'v:' .. name, S = 'S:' .. name, Z = 'Z:' .. name}
      if kind == 'd' then window.decay = tonumber(param) else window.halflife = tonumber(param) end
      config.windows[#config.windows + 1] = window
    end
  end
  if dtype then
    for _, w in ipairs(config.windows) do
      if w.decay then
        w.decay32 = float32(w.decay)
        w.one_minus_decay32 = float32(1 - w.decay32)
      end
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
    spread = 0,
    spread_weight = 0,
    windows = {},
  }
  if s.V then
    local q, w = string.match(s.V, '^([^,]*),(.*)$')
    state.spread, state.spread_weight = tonumber(q), tonumber(w)
    state.mean = tonumber(string.match(s.M, '^([^,]*)'))
  end
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
          state.spread = state.spread * shrink
          state.spread_weight = state.spread_weight * shrink * shrink
        end
      end
    end
    state.epoch = at
  end
end

-- The bias-corrected variance of the samples so far, nil while undefined.
local function variance(config, state)
  if state.spread_weight <= 0 then
    return nil
  end
  if config.decay then
    return state.spread / state.spread_weight
  end
  return state.spread * state.windows[1].weight / state.spread_weight
end

-- One sample into the spread of the main average, before its own update: with a decay d,
-- pandas' recursion for adjust=False (normalised weights: the old ones times d, the new one
-- 1 - d); with a halflife, a weighted Welford step for a sample of weight `weight`, ws being the
-- main window's sums. Sets state.z (against the spread before the sample) when `want_z`.
-- Returns false if a number of the spread overflows.
local function update_spread(state, x, d, weight, ws, want_z)
  local q, u = state.spread, state.spread_weight
  local before, v, total
  if d then
    before = state.mean
    if before == nil then
      state.mean, state.spread, state.spread_weight = x, 0, 0
      return finite(x)
    end
    if want_z and u > 0 then
      v = q / u
    end
    local a = 1 - d
    local delta = x - before
    state.mean = before + a * delta
    q = d * (q + a * delta * delta)
    -- 1 - sum of squared weights, kept as such: no cancellation when it is small
    u = d * (2 * a + d * u)
    if not finite(state.mean) then
      return false
    end
  else
    total = ws.weight
    if total == 0 then
      state.spread, state.spread_weight = 0, 0
      return true
    end
    before = ws.sum / total
    if want_z and u > 0 then
      v = q * total / u
    end
    local after = (ws.sum + x * weight) / (total + weight)
    q = q + weight * (x - before) * (x - after)
    -- Z^2 - sum w^2 grows by (Z + w)^2 - Z^2 - w^2 = 2 w Z: no cancellation
    u = u + 2 * weight * total
    total = total + weight
  end
  state.spread, state.spread_weight = q, u
  if v and v > 0 then
    local z = (x - before) / math.sqrt(v)
    if finite(z) then
      state.z = z
    end
  end
  -- the variance reported (codec.py), q / u or q * Z / u, is finite like every number reported
  if u > 0 then
    if d then
      return finite(q / u)
    end
    return finite(q * total / u)
  end
  return finite(q)
end

-- One sample into window i; an error if it overflows.
local function apply_window(config, state, i, x, steps, at, where, want_z)
  local w, ws = config.windows[i], state.windows[i]
  if w.decay then
    local d = w.decay
    if steps then
      d = math.min(d, (1 + steps) / (10 + steps))
    end
    if i == 1 and config.spread and not update_spread(state, x, d, nil, nil, want_z) then
      return invalid(where .. 'the variance overflows float64')
    end
    local dtype = config.dtype
    if dtype then
      local decay32 = tensorflow_decay(w.decay32, steps)
      local one_minus_decay = w.one_minus_decay32
      if decay32 ~= w.decay32 then
        one_minus_decay = float32(1 - decay32)
      end
      local step, held = tensorflow_step64, x
      if dtype == '32' then
        step, held = tensorflow_step32, state.x32
      end
      if ws.shadow then
        ws.shadow = step(ws.shadow, held, one_minus_decay)
      else
        ws.shadow = held
      end
      d = decay32
    elseif ws.shadow then
      ws.shadow = ws.shadow - (1 - d) * (ws.shadow - x)
    else
      ws.shadow = x
    end
    if i == 1 then
      -- The bias-corrected value is the service's, not TensorFlow's (zero_debias is off): in
      -- float64 in every arithmetic, with the decay the update used.
      state.biased = state.biased - (1 - d) * (state.biased - x)
    end
    if not finite(ws.shadow) then
      return invalid(where .. 'the update overflows float64')
    end
    if i == 1 then
      if not finite(state.biased) then
        return invalid(where .. 'the update overflows float64')
      end
      state.product = state.product * d
      state.used = d
      local correction = 1 - state.product
      if correction ~= 0 and not finite(state.biased / correction) then
        return invalid(where .. 'the bias-corrected value overflows float64')
      end
    end
  else
    local weight = 2 ^ ((at - state.epoch) / w.halflife)
    if i == 1 and config.spread and not update_spread(state, x, nil, weight, ws, want_z) then
      return invalid(where .. 'the variance overflows float64')
    end
    ws.sum = ws.sum + x * weight
    ws.weight = ws.weight + weight
    if not finite(ws.sum) then
      return invalid(where .. 'the update overflows float64')
    end
    if config.rate and not finite(ws.sum * math.log(2) / w.halflife) then
      return invalid(where .. 'the rate overflows float64')
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
  if config.spread then
    -- %.17g: one format, where exact() may take three and three tonumber
    local m, z = '', ''
    if state.mean then
      m = string.format('%.17g', state.mean)
    end
    if state.z then
      z = string.format('%.17g', state.z)
    end
    changes[#changes + 1] = 'V'
    changes[#changes + 1] = string.format('%.17g,%.17g', state.spread, state.spread_weight)
    changes[#changes + 1] = 'M'
    changes[#changes + 1] = m .. ',' .. z
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
    local fields = {'t', exact(entry[2]), 'l', exact(entry[3]), 'v', exact(entry[4])}
    if entry[5] then
      fields[7], fields[8] = 's', exact(entry[5])
    end
    if entry[6] then
      fields[#fields + 1], fields[#fields + 2] = 'z', exact(entry[6])
    end
    redis.call('XADD', history_key, 'MAXLEN', history, string.format('%d-0', entry[1]),
      unpack(fields))
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
    if config.dtype == '32' then
      state.x32 = float32(x)
      if not finite(state.x32) then
        return invalid(where .. 'the value overflows float32')
      end
    end
    -- z is reported for the last sample, and for each in the history
    local want_z = config.history > 0 or j + 2 == #ARGV
    state.z = nil
    for i = 1, #config.windows do
      local overflow = apply_window(config, state, i, x, steps, at, where, want_z)
      if overflow then
        return overflow
      end
    end
    state.count = state.count + 1
    state.last = x
    if config.history > 0 then
      local v = config.spread and variance(config, state)
      entries[#entries + 1] = {state.count, at, x, main_value(config, state), v and math.sqrt(v),
        state.z}
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
