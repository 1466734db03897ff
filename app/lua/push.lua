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
-- ARGV[7]  the samples' width: '1' values alone; '3' triples (value, num_updates, timestamp),
--          '' for what a sample lacks (values alone: a third of the arguments to send and read)
-- ARGV[8..] the samples
--
-- Numbers cross as decimal strings that round-trip float64 exactly (a Lua number returned to
-- Redis is truncated to an integer, and tostring keeps only 14 digits), or packed as float64s.
--
-- Hash fields (short, to keep a stream small):
--   configuration  decimal text: d decay | H halflife (seconds), i initial, a auto_num_updates
--                  ('1'; absent: off), h history cap (absent: 0), k kind ('r': rate), L late
--                  samples ('r': reject), x ttl (seconds), W windows, `name:d0.9,name:h60`,
--                  A arithmetic of the decay averages (absent: float64; '64', '32': TensorFlow
--                  on a float64 or float32 variable)
--   n              the count, an integer
--   s              the state, packed little-endian (struct '<d': float64s, bit for bit), in order:
--                  with a decay b zero-started shadow, p product of decays used; unless a rate,
--                  the spread's q, w, z (below; z NaN when there is none); per window, the main
--                  value first, then W's: v its shadow, or with a halflife S, Z its weighted
--                  value and weight sums (weights relative to E); t updated_at (Redis server
--                  time), l last raw value; then u decay used by the last update (default: the
--                  decay, or 1 with a halflife), E newest sample time (default: t), m the
--                  spread's mean (default: v), as many of these three as needed for the last
--                  one that differs from its default. Split in fields of at most 64 bytes, s,
--                  s1, s2, ... (a longer value would turn the hash from a listpack into a
--                  hashtable, several times larger): a fixed-decay stream pushed without
--                  num_updates, timestamps or initial holds 8 doubles, one field of 64 bytes.
--   the spread of the samples (not of rate streams): with a decay, m its mean, q its biased
--   variance, w = 1 - sum of squared weights (weights sum to 1); with a halflife, q = sum w (x -
--   S/Z)^2 and w = Z^2 - sum w^2 (relative to E like S and Z); z the last value's z-score
--   against the spread before it.
--   Until a stream's first push, and in streams written before s existed, the state is decimal
--   text fields: l t u E b p, the spread as V `q,w` and M `m,z` (or q w m z), and v or S Z per
--   window (v:<name>, S:<name>, Z:<name> for named ones). A push reads either and writes s,
--   deleting the text fields.
--
-- TensorFlow's update:  decay = min(decay, (1 + num_updates) / (10 + num_updates)) when the
--   sample has num_updates;  shadow -= (1 - decay) * (shadow - value).
-- Arithmetic: by default that update in float64. A = '64' / '32' takes every rounding step
--   TensorFlow 2.21 takes (moving_averages.py): the decay converted to float32, the min with
--   num_updates (cast to float32) in float32, 1 - decay in float32 then cast to the variable's
--   dtype, `(shadow - value) * (1 - decay)` and the subtraction in that dtype (a float32
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
-- Reply: the stream after the update as one string, `f=v;f=v;...;n=<count>;s=<s>`: its
-- configuration fields, its count, and last its packed state, as stored (binary, but always the
-- last field, after the first `;s=`: configuration values never hold a `;`). The same text
-- prefixed with `replayed\n` when it is the stored reply of an earlier push with the same
-- idempotency key (nothing applied). The announcement on ARGV[5] and the idempotency record hold
-- the same text. (One string, not a list: each element of a reply costs Redis a conversion.)
-- Errors, having written nothing: EMA_INVALID <why>, EMA_NOT_FOUND, EMA_LATE <why>,
-- EMA_IDEMPOTENCY_MISMATCH.
-- History entries have the id `<count>-0` and one field p: '<ddddd', the sample's time, its raw
-- value, the main value, the standard deviation after the value and its z-score (NaN when not
-- defined). Entries written before hold decimal text fields t, l, v, and s and z when defined.
-- The history is the entries with an id above n - h: the Redis Stream, trimmed by whole nodes,
-- may hold up to a node (stream-node-max-entries, 100 by default) of older ones.
--
-- Why the shape: Redis runs this whole chunk on every call, and what costs it most is what the
-- script allocates (each table, closure and string, then collecting them) and each redis.call,
-- more than any arithmetic: hence one read, one packed write, one string reply, few tables.
-- A call costs too (a Lua function call about as much as ten arithmetic operations): `x - x ==
-- 0` is how the script asks whether x is finite (inf - inf and NaN - NaN are NaN).

-- TensorFlow's arithmetic, made only for a stream that uses it (A): a closure costs every call
-- of the script that makes it.
local function tensorflow()
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

  -- A decay window's shadow after x (x32: x in float32, for dtype '32'), from its decay and 1 -
  -- decay in float32; and the decay the update used.
  local function tensorflow_update(dtype, decay32, one_minus_decay32, shadow, x, x32, steps)
    local decay = tensorflow_decay(decay32, steps)
    local one_minus_decay = one_minus_decay32
    if decay ~= decay32 then
      one_minus_decay = float32(1 - decay)
    end
    local step, held = tensorflow_step64, x
    if dtype == '32' then
      step, held = tensorflow_step32, x32
    end
    if shadow then
      return step(shadow, held, one_minus_decay), decay
    end
    return held, decay
  end

  -- (windows: the named windows' decays in float32, set by read_config; named here so that the
  -- table is made at its size)
  return {float32 = float32, update = tensorflow_update, windows = nil}
end

-- tonumber also takes 'nan', 'inf', '0x10' and ' 5 ': accept plain decimals only (digits, a
-- point, an exponent: just what strtod reads to the end), and finite.
local function decimal(s)
  if not s or not (string.find(s, '^%-?%d+%.?%d*$') or
      string.find(s, '^%-?%d+%.?%d*[eE][-+]?%d+$')) then
    return nil
  end
  -- A plain decimal, so arithmetic reads it exactly as tonumber would (which reads a string
  -- twice: whether it is a number, then the number).
  local x = s * 1
  if x - x ~= 0 then
    return nil
  end
  return x
end

-- Checked with the arguments' count below; here for `refuse`, which names a sample by index.
local width = tonumber(ARGV[7])

-- The error about the sample at ARGV[j], named as in the request (values[i]); `why` may hold
-- a %s per number that follows, shown exactly (the shortest decimal that reads back the same).
local function refuse(code, j, why, ...)
  local function exact(x)
    local s = string.format('%.15g', x)
    if tonumber(s) ~= x then
      s = string.format('%.16g', x)
      if tonumber(s) ~= x then
        s = string.format('%.17g', x)
      end
    end
    return s
  end
  local numbers = {...}
  for i = 1, #numbers do
    numbers[i] = exact(numbers[i])
  end
  return redis.error_reply(code .. ' values[' .. (j - 8) / width .. ']: ' ..
    string.format(why, unpack(numbers)))
end

-- The configuration, parsed once from the hash's text fields; nil and the error if invalid. The
-- main value is a window too: config holds its decay or halflife and its slot in the state
-- array r. The named windows (W), when there are any, are config.windows: a flat list, two
-- entries per window in W's order, its halflife and its decay (false for the one it has not);
-- their numbers follow the main value's in r, in the same order. (A table per window, and the
-- list of them grown, cost a fifth of a three-window push's excess over a fixed-decay one:
-- every table, every field added past a table's size, every captured string is an allocation.)
local function read_config(s)
  -- Written by the service (validated), so tonumber without decimal's pattern; x - x is NaN
  -- for an infinite or NaN x.
  local decay, halflife = tonumber(s.d), s.H and tonumber(s.H)
  if (decay == nil) == (halflife == nil) or (decay and not (decay >= 0 and decay <= 1))
      or (halflife and not (halflife > 0 and halflife - halflife == 0)) then
    return nil, 'the stream needs a decay in [0, 1] or a halflife > 0'
  end
  local dtype = s.A
  if dtype and ((dtype ~= '64' and dtype ~= '32') or not decay) then
    return nil, 'the TensorFlow arithmetics need a decay'
  end
  local rate = s.k == 'r'
  -- r's slots: b p with a decay, q w z unless a rate, then the windows' numbers.
  local size = (decay and 2 or 0) + (rate and 0 or 3)
  local windows = false
  local last = size + (decay and 1 or 2)  -- the last slot taken
  if s.W and s.W ~= '' then
    -- Made at the size of the most windows there may be (8): a list that grows is rehashed at
    -- each power of two. Nils, so that #windows is twice the count.
    windows = {nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil}
    local i = 0
    -- Names are only needed to read the text layout (read_state): not captured here. A name
    -- holds no ':', so each ':' starts a kind.
    for kind, param in string.gmatch(s.W, ':([dh])([^,]+)') do
      -- (the service wrote param: arithmetic reads it once, tonumber twice)
      if kind == 'd' then
        windows[i + 1], windows[i + 2] = false, param * 1
        last = last + 1
      else
        windows[i + 1], windows[i + 2] = param * 1, false
        last = last + 2
      end
      i = i + 2
    end
  end
  -- Eight fields at most, so that the table is made at its size and no larger; a stream with A
  -- gets `tensorflow` too (the helpers) and the main decay in float32.
  local config = {
    dtype = dtype,
    decay = decay,
    halflife = halflife,
    rate = rate,
    spread = not rate,
    slot = size + 1,
    size = last,
    windows = windows,
  }
  if dtype then
    local tf = tensorflow()
    local float32 = tf.float32
    config.tensorflow = tf
    config.decay32 = float32(decay)
    config.one_minus_decay32 = float32(1 - config.decay32)
    -- the named windows' decays as float32, at the same places in tf.windows as in windows
    if windows then
      tf.windows = {}
      for i = 2, #windows, 2 do
        if windows[i] then
          local decay32 = float32(windows[i])
          tf.windows[i - 1], tf.windows[i] = decay32, float32(1 - decay32)
        end
      end
    end
  end
  return config
end

-- The state: r, the array of the windows' numbers at their slots (and b p q w, as s packs them),
-- and `state`, the other numbers by name. Unpacked from s, or read from the text fields (a
-- stream before its first push, or written before s existed; absent numbers stay nil). Also
-- the struct format s was unpacked with (nil from text fields).
local function read_state(s, config)
  local r, last, used, epoch, mean, format
  local size = config.size
  if s.s then
    local blob = s.s
    if s.s1 then
      -- One concatenation: three windows' state takes s and s1; at most eight, s to s3 (216
      -- bytes). Building the names ('s' .. chunk) cost more than the rest of the read.
      blob = blob .. s.s1 .. (s.s2 or '') .. (s.s3 or '')
      local chunk = 4
      while s.s3 and s['s' .. chunk] do
        blob = blob .. s['s' .. chunk]
        chunk = chunk + 1
      end
    end
    local stored = #blob / 8
    -- (cut from a constant, one call where building it takes two operations; s holds 27
    -- numbers at most)
    format = string.sub('<dddddddddddddddddddddddddddddddd', 1, stored + 1)
    if stored > 32 then
      format = '<' .. string.rep('d', stored)
    end
    r = {struct.unpack(format, blob)}
    local extra = stored - size - 2
    last = r[size + 2]
    used = extra >= 1 and r[size + 3] or (config.decay or 1)
    epoch = extra >= 2 and r[size + 4] or r[size + 1]
    mean = extra >= 3 and r[size + 5] or (config.decay and r[config.slot])
    -- (r still holds t l, u E m and unpack's position past `size`: `packed` overwrites what it
    -- packs, and packs no more)
  else
    r = {}
    last, used, epoch = tonumber(s.l), tonumber(s.u), tonumber(s.E)
    if config.decay then
      r[1], r[2] = tonumber(s.b) or 0, tonumber(s.p) or 1
    end
    if config.spread then
      local q, w, m = s.q, s.w, s.m
      if s.V then
        q, w = string.match(s.V, '^([^,]*),(.*)$')
        m = string.match(s.M or '', '^([^,]*)')
      end
      r[config.slot - 3], r[config.slot - 2] = tonumber(q) or 0, tonumber(w) or 0
      mean = tonumber(m)
    end
    local slot = config.slot
    if config.decay then
      r[slot] = tonumber(s.v)
    else
      r[slot], r[slot + 1] = tonumber(s.S) or 0, tonumber(s.Z) or 0
    end
    local windows = config.windows
    if windows then
      slot = slot + (config.decay and 1 or 2)
      local i = 1
      for name in string.gmatch(s.W, '([^:,]+):') do
        if windows[i] then
          r[slot], r[slot + 1] = tonumber(s['S:' .. name]) or 0, tonumber(s['Z:' .. name]) or 0
          slot = slot + 2
        else
          r[slot] = tonumber(s['v:' .. name])
          slot = slot + 1
        end
        i = i + 2
      end
    end
  end
  -- Every field named here, nil ones too, so that the table is made at its full size (eight:
  -- one more would double it; latest_allowed, set when a sample has a timestamp, is one more).
  local state = {
    used = used,
    epoch = epoch,
    biased = config.decay and r[1],
    product = config.decay and r[2],
    mean = mean,
    spread = config.spread and r[config.slot - 3],
    spread_weight = config.spread and r[config.slot - 2],
    z = nil,
  }
  return r, state, last, format
end

-- Whether x must be stored to stand for itself rather than `default` (bit for bit: 0 and -0
-- differ, as 1/0 and 1/-0 do).
local function differs(x, default)
  return x ~= default or (x == 0 and 1 / x ~= 1 / default)
end

-- s packed from r and state, in the order the header gives; `format` is the one s was read
-- with, used again when s keeps its length (building one costs as much as a call).
local function packed(config, r, state, now, last, format)
  local size = config.size
  if config.decay then
    r[1], r[2] = state.biased, state.product
  end
  if config.spread then
    r[config.slot - 3], r[config.slot - 2] = state.spread, state.spread_weight
    r[config.slot - 1] = state.z or 0 / 0
  end
  r[size + 1], r[size + 2] = now, last
  local k = size + 2
  local mean = config.decay and config.spread and state.mean
  if mean and differs(mean, r[config.slot]) then
    k = k + 3
  elseif differs(state.epoch, now) then
    k = k + 2
  elseif differs(state.used, config.decay or 1) then
    k = k + 1
  end
  if k > size + 2 then
    r[size + 3] = state.used
    if k > size + 3 then
      r[size + 4], r[size + 5] = state.epoch, mean  -- (m is packed only when k reaches it)
    end
  end
  if not format or #format ~= k + 1 then
    format = string.sub('<dddddddddddddddddddddddddddddddd', 1, k + 1)  -- (as read_state's)
    if k > 32 then
      format = '<' .. string.rep('d', k)
    end
  end
  return struct.pack(format, unpack(r, 1, k))
end

-- The sample at ARGV[j] as (value, num_updates or nil, time), or nil and the error. `auto`: a
-- sample without num_updates uses the count; `reject_late`: one older than the epoch is refused.
local function parse_sample(j, auto, reject_late, count, state, now)
  local x = decimal(ARGV[j])
  if x == nil then
    return nil, refuse('EMA_INVALID', j, 'not a finite number')
  end
  local steps_text, at_text = '', ''
  if width == 3 then
    steps_text, at_text = ARGV[j + 1], ARGV[j + 2]
  end
  local steps
  if steps_text ~= '' then
    steps = decimal(steps_text)
    if steps == nil or steps < 0 or steps > 1e15 or steps ~= math.floor(steps) then
      return nil, refuse('EMA_INVALID', j, 'num_updates must be an integer in [0, 1e15]')
    end
  elseif auto then
    steps = count
  end
  local at = now
  if at_text ~= '' then
    at = decimal(at_text)
    -- ARGV[6] parsed once, when a sample first has a timestamp (most pushes have none)
    local latest_allowed = state.latest_allowed or now + tonumber(ARGV[6])
    state.latest_allowed = latest_allowed
    if at == nil or at < 0 or at > latest_allowed then
      return nil, refuse('EMA_INVALID', j, 'timestamp must be in [0, %s] (Unix seconds; at most '
        .. string.gsub(ARGV[6], '%%', '%%%%') .. ' s past the server clock)', latest_allowed)
    end
  end
  if reject_late and state.epoch and at < state.epoch then
    return nil, refuse('EMA_LATE', j, 'timestamp %s is older than the newest sample, %s', at,
      state.epoch)
  end
  return x, steps, at
end

-- E is the newest sample's time. Halflife windows: a newer sample moves it forward and
-- rescales their sums; a late one leaves it, and the sums, as they are. Rescales the main
-- value's sums here; the named windows' are rescaled by apply_sample, given E before (as
-- rescaling cannot fail, doing it there changes no outcome).
local function move_epoch(config, r, state, at)
  if config.halflife then
    state.used = 1
  end
  if state.epoch == nil then
    state.epoch = at
  elseif at > state.epoch then
    if config.halflife then
      local slot = config.slot
      local shrink = 2 ^ ((state.epoch - at) / config.halflife)
      r[slot] = r[slot] * shrink
      r[slot + 1] = r[slot + 1] * shrink
      state.used = shrink
      if config.spread then
        state.spread = state.spread * shrink
        state.spread_weight = state.spread_weight * shrink * shrink
      end
    end
    state.epoch = at
  end
end

-- The bias-corrected variance of the samples so far, nil while undefined.
local function variance(config, r, state)
  if state.spread_weight <= 0 then
    return nil
  end
  if config.decay then
    return state.spread / state.spread_weight
  end
  return state.spread * r[config.slot + 1] / state.spread_weight
end

-- One sample into the spread of the main average, before its own update: with a decay d,
-- pandas' recursion for adjust=False (normalised weights: the old ones times d, the new one
-- 1 - d); with a halflife, a weighted Welford step for a sample of weight `weight`, sum and total
-- being the main window's sums. Sets state.z (against the spread before the sample) when
-- `want_z`. Returns false if a number of the spread overflows.
local function update_spread(state, x, d, weight, sum, total, want_z)
  local q, u = state.spread, state.spread_weight
  local before, v
  if d then
    before = state.mean
    if before == nil then
      state.mean, state.spread, state.spread_weight = x, 0, 0
      return x - x == 0
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
    if state.mean - state.mean ~= 0 then
      return false
    end
  else
    if total == 0 then
      state.spread, state.spread_weight = 0, 0
      return true
    end
    before = sum / total
    if want_z and u > 0 then
      v = q * total / u
    end
    local after = (sum + x * weight) / (total + weight)
    q = q + weight * (x - before) * (x - after)
    -- Z^2 - sum w^2 grows by (Z + w)^2 - Z^2 - w^2 = 2 w Z: no cancellation
    u = u + 2 * weight * total
    total = total + weight
  end
  state.spread, state.spread_weight = q, u
  if v and v > 0 then
    local z = (x - before) / math.sqrt(v)
    if z - z == 0 then
      state.z = z
    end
  end
  -- the variance reported (codec.py), q / u or q * Z / u, is finite like every number reported
  local reported = q
  if u > 0 then
    reported = d and q / u or q * total / u
  end
  return reported - reported == 0
end

-- One sample into every window, the main value first, then the named ones (config.windows) in
-- W's order; the error if one overflows. `before`: E before this sample (move_epoch has moved it
-- to `at` if the sample is newer: then each named halflife window's sums are rescaled here,
-- 2^((before - at) / halflife), before the sample is added). One function for all of them, with
-- no table and no call per window: a call costs as much as ten arithmetic operations, and each
-- function the script defines costs a closure on every call of the script.
local function apply_sample(config, r, state, x, x32, steps, at, want_z, before)
  local slot = config.slot
  -- the most a decay may be when the sample has num_updates
  local cap = steps and (1 + steps) / (10 + steps)
  local halflife = config.halflife
  if halflife then
    -- 2^(0 / halflife) is exactly 1: a sample at E (the newest, most are) skips the power.
    local weight = 1
    if at ~= state.epoch then
      weight = 2 ^ ((at - state.epoch) / halflife)
    end
    if config.spread
        and not update_spread(state, x, nil, weight, r[slot], r[slot + 1], want_z) then
      return 'the variance overflows float64'
    end
    r[slot] = r[slot] + x * weight
    r[slot + 1] = r[slot + 1] + weight
    if r[slot] - r[slot] ~= 0 then
      return 'the update overflows float64'
    end
    if config.rate then
      local rate = r[slot] * math.log(2) / halflife
      if rate - rate ~= 0 then
        return 'the rate overflows float64'
      end
    end
    slot = slot + 2
  else
    local d = config.decay
    if cap and cap < d then  -- (math.min(d, cap), without the call)
      d = cap
    end
    if config.spread and not update_spread(state, x, d, nil, nil, nil, want_z) then
      return 'the variance overflows float64'
    end
    local shadow = r[slot]
    if config.dtype then
      shadow, d = config.tensorflow.update(config.dtype, config.decay32,
        config.one_minus_decay32, shadow, x, x32, steps)
    elseif shadow then
      shadow = shadow - (1 - d) * (shadow - x)
    else
      shadow = x
    end
    -- The bias-corrected value is the service's, not TensorFlow's (zero_debias is off): in
    -- float64 in every arithmetic, with the decay the update used.
    state.biased = state.biased - (1 - d) * (state.biased - x)
    r[slot] = shadow
    if shadow - shadow ~= 0 or state.biased - state.biased ~= 0 then
      return 'the update overflows float64'
    end
    state.product = state.product * d
    state.used = d
    local correction = 1 - state.product
    local corrected = state.biased / correction
    if correction ~= 0 and corrected - corrected ~= 0 then
      return 'the bias-corrected value overflows float64'
    end
    slot = slot + 1
  end

  local windows = config.windows
  if not windows then
    return nil
  end
  local epoch, span = at, nil  -- E after this sample; before - at, when the sample moved E
  if before and at > before then
    span = before - at
  elseif before then
    epoch = before
  end
  for i = 1, #windows, 2 do
    halflife = windows[i]
    if halflife then
      local sum, total = r[slot], r[slot + 1]
      if span then
        local shrink = 2 ^ (span / halflife)
        sum, total = sum * shrink, total * shrink
      end
      if at == epoch then
        sum, total = sum + x, total + 1
      else
        local weight = 2 ^ ((at - epoch) / halflife)
        sum, total = sum + x * weight, total + weight
      end
      r[slot], r[slot + 1] = sum, total
      if sum - sum ~= 0 then
        return 'the update overflows float64'
      end
      if config.rate then
        local rate = sum * math.log(2) / halflife
        if rate - rate ~= 0 then
          return 'the rate overflows float64'
        end
      end
      slot = slot + 2
    else
      local shadow = r[slot]
      if config.dtype then
        local tf = config.tensorflow
        shadow = tf.update(config.dtype, tf.windows[i], tf.windows[i + 1], shadow, x, x32, steps)
      elseif shadow then
        local d = windows[i + 1]
        if cap and cap < d then
          d = cap
        end
        shadow = shadow - (1 - d) * (shadow - x)
      else
        shadow = x
      end
      r[slot] = shadow
      if shadow - shadow ~= 0 then
        return 'the update overflows float64'
      end
      slot = slot + 1
    end
  end
  return nil
end

-- Writes the count n and the packed state in fields of at most 64 bytes (deleting chunks left
-- over from a longer one), the configuration too when creating, and deletes the text layout's
-- state fields (l t u E b p V M q w m z v S Z, and <field>:<window>) of an older stream.
-- `hash`: the stream's fields and values in turn, as HGETALL lists them. Returns the stream as
-- the reply's text.
local function write_fields(key, hash, creating, n, blob)
  local text = ''
  local fields, old
  local chunks = 0  -- s1, s2, ... stored
  local needed = 1  -- s, s1, ... the blob takes
  if #blob > 64 then
    needed = math.ceil(#blob / 64)
  end
  -- A list of the fields only when creating or for more than two chunks: s and s1 (up to
  -- three windows) are written without one (a table, and naming a chunk, 's' .. c, cost more
  -- than the rest of the write).
  if creating or needed > 2 then
    fields = {'n', n, 's', string.sub(blob, 1, 64)}
    for c = 1, needed - 1 do
      fields[#fields + 1] = 's' .. c
      fields[#fields + 1] = string.sub(blob, 64 * c + 1, 64 * c + 64)
    end
  end
  -- Configuration fields are one letter; so are the text layout's state fields, and the rest
  -- are chunks of s (s1, ...) or a window's text state (v:<name>, ...).
  for i = 1, #hash, 2 do
    local field, value = hash[i], hash[i + 1]
    if field == 'n' or field == 's' then
      -- written here
    elseif field == 's1' then
      chunks = chunks + 1  -- (the usual chunk, without the pattern below)
    elseif field == 'd' or field == 'H' or field == 'W' -- (the usual ones, without a call)
        or #field == 1 and not string.find('ltuEbpVMqwmzvSZ', field, 1, true) then
      text = text .. field .. '=' .. value .. ';'
      if creating then
        fields[#fields + 1] = field
        fields[#fields + 1] = value
      end
    elseif string.find(field, '^s%d+$') then
      chunks = chunks + 1
    elseif not creating then
      old = old or {}
      old[#old + 1] = field
    end
  end
  if chunks >= needed then
    for c = needed, chunks do
      old = old or {}
      old[#old + 1] = 's' .. c
    end
  end
  if fields then
    redis.call('HSET', key, unpack(fields))
  elseif needed == 2 then
    redis.call('HSET', key, 'n', n, 's', string.sub(blob, 1, 64), 's1', string.sub(blob, 65))
  else
    redis.call('HSET', key, 'n', n, 's', blob)
  end
  if old then
    redis.call('HDEL', key, unpack(old))
  end
  return text .. 'n=' .. n .. ';s=' .. blob
end

local key, history_key, idempotency_key = KEYS[1], KEYS[2], KEYS[3]

if idempotency_key then
  local record = redis.call('GET', idempotency_key)
  if record then
    local sep = string.find(record, '\n', 1, true)
    if string.sub(record, 1, sep - 1) ~= ARGV[3] then
      return redis.error_reply('EMA_IDEMPOTENCY_MISMATCH')
    end
    return 'replayed\n' .. string.sub(record, sep + 1)
  end
end

if (width ~= 1 and width ~= 3) or #ARGV < 7 + width or (#ARGV - 7) % width ~= 0 then
  return redis.error_reply('EMA_INVALID expected a width, 1 or 3, and one or more samples of it')
end

local stored = redis.call('HGETALL', key)
-- Sized for a fixed-decay stream's fields up front: a table that grows is rehashed each time.
local s = {n = false, s = false, d = false}
for i = 1, #stored, 2 do
  s[stored[i]] = stored[i + 1]
end
local creating = not s.n
if creating then
  if ARGV[1] ~= '1' then
    return redis.error_reply('EMA_NOT_FOUND')
  end
  -- A history left behind by a deleted hash would refuse the new stream's entry ids.
  redis.call('DEL', history_key)
  for field, value in string.gmatch(ARGV[2], '([^=;]+)=([^;]*)') do
    s[field] = value
  end
  -- the hash as it will be, listed as HGETALL would (ARGV[2]'s fields win)
  stored = {}
  for field, value in pairs(s) do
    if value then
      stored[#stored + 1] = field
      stored[#stored + 1] = value
    end
  end
end

local config, refused = read_config(s)
if not config then
  return redis.error_reply('EMA_INVALID ' .. refused)
end
local r, state, last, format = read_state(s, config)
local count = s.n * 1  -- (arithmetic reads the integer once, tonumber twice)
local history = s.h and tonumber(s.h) or 0
local auto, reject_late = s.a == '1', s.L == 'r'
local entries = history > 0 and {}  -- per sample, with a history: its entry, packed

local time = redis.call('TIME')
local now = time[1] + time[2] / 1e6  -- (two integers, as strings: arithmetic reads them)

local final = #ARGV - width + 1  -- the last sample's index in ARGV
for j = 8, final, width do
  local x, steps, at = parse_sample(j, auto, reject_late, count, state, now)
  if x == nil then
    return steps
  end
  local before = state.epoch
  move_epoch(config, r, state, at)
  local x32
  if config.dtype == '32' then
    x32 = config.tensorflow.float32(x)
    if x32 - x32 ~= 0 then
      return refuse('EMA_INVALID', j, 'the value overflows float32')
    end
  end
  -- z is reported for the last sample, and for each in the history
  local want_z = history > 0 or j == final
  state.z = nil
  local why = apply_sample(config, r, state, x, x32, steps, at, want_z, before)
  if why then
    return refuse('EMA_INVALID', j, why)
  end
  count = count + 1
  last = x
  if entries then
    local value, slot = r[config.slot], config.slot
    if config.halflife then
      value = config.rate and value * math.log(2) / config.halflife or value / r[slot + 1]
    end
    local v = config.spread and variance(config, r, state)
    local nan = 0 / 0
    entries[#entries + 1] = struct.pack('<ddddd', at, x, value, v and math.sqrt(v) or nan,
      state.z or nan)
  end
end

local n = string.format('%d', count)
local text = write_fields(key, stored, creating, n, packed(config, r, state, now, last, format))

-- Only the newest `history` entries can survive the cap: skip writing the others. The last
-- entry's id is n's (formatting a number costs as much as a call). Trimmed by whole nodes
-- (`~`): trimming exactly walks the deleted entries of the first node on every XADD, a third
-- of a push at the cap; readers skip what is older than the newest `history` (store.history).
if entries then
  for e = math.max(1, #entries - history + 1), #entries do
    local id = e == #entries and n .. '-0' or string.format('%d-0', count - #entries + e)
    redis.call('XADD', history_key, 'MAXLEN', '~', s.h, id, 'p', entries[e])
  end
end
if s.x then
  redis.call('EXPIRE', key, s.x)
  if history > 0 then
    redis.call('EXPIRE', history_key, s.x)
  end
end

if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], text)
end
if idempotency_key then
  redis.call('SET', idempotency_key, ARGV[3] .. '\n' .. text, 'EX', ARGV[4])
end
return text
