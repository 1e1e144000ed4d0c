-- The clients of the overload rounds (bench/overload.py): the read or the batch workload
-- (BENCH_WORKLOAD=read|batch), each request tagged with an X-Request-ID that the service echoes,
-- so that every answer is timed against its own request. (wrk's own latency histogram mixes
-- answers with refusals, and a refusal the service holds back is slower than any answer.)
--
-- Requests sent in the first BENCH_WARMUP_SECONDS of the run are not counted, whenever they are
-- answered: the warm-up runs on the same connections as the measured seconds, so these measure
-- the steady state, not the arrival of every connection at once (a burst of its own). The warm-up's
-- requests answered after the timeout are counted apart (warmup_client_timeouts).
--
-- BENCH_HONOUR_RETRY_AFTER=1: a connection answered 503 waits its Retry-After, plus up to a
-- quarter more at random, before its next request, as a well-behaved HTTP client or retrying SDK
-- does (the jitter keeps clients refused in the same instant from coming back in the same
-- instant). Otherwise it sends the next request at once, as plain wrk and most clients do.

local here = debug.getinfo(1, "S").source:match("^@(.*[/\\])")
dofile(here .. (os.getenv("BENCH_WORKLOAD") or "read") .. ".lua")

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock, bench_timespec *now);
]]
local CLOCK_MONOTONIC = 1
local clock_now = ffi.new("bench_timespec")

local function now_us()
   ffi.C.clock_gettime(CLOCK_MONOTONIC, clock_now)
   return tonumber(clock_now.tv_sec) * 1e6 + tonumber(clock_now.tv_nsec) / 1e3
end

-- Latencies as counts in buckets 1 % wide (bucket k holds e^(k/100) microseconds); globals, so
-- that done() can read every thread's with thread:get().
answered, refused = {}, {}
answered_count, refused_count, other_count, late_count, warmup_late_count = 0, 0, 0, 0, 0
-- Requests sent and not answered yet, by id: their send times (a global, for done()).
sent_at = {}
-- A client timeout: a request answered after BENCH_TIMEOUT_SECONDS, or not answered at all. (wrk's
-- own count is of connections whose last request began that long ago, every two seconds: it
-- counts a connection waiting out a Retry-After, or between two requests, as timed out.)
local timeout_us = tonumber(os.getenv("BENCH_TIMEOUT_SECONDS") or "2") * 1e6

local function record(histogram, us)
   local bucket = math.floor(math.log(math.max(us, 1)) * 100)
   histogram[bucket] = (histogram[bucket] or 0) + 1
end

local workload_request = request
local sequence = 0
local warmup_us = tonumber(os.getenv("BENCH_WARMUP_SECONDS") or "0") * 1e6
-- When the warm-up ends (a global, for done()).
counting_from = nil

local workload_init = init
function init(args)
   workload_init(args)
   counting_from = now_us() + warmup_us
end

function request()
   sequence = sequence + 1
   local id = "bench-" .. (thread_number or 0) .. "-" .. sequence
   local raw = workload_request()
   -- The first thread's first request is wrk's own check of the script, never sent.
   if sequence > 1 or thread_number ~= 1 then sent_at[id] = now_us() end
   -- After the request line: "GET /items?… HTTP/1.1\r\nX-Request-ID: …\r\n…"
   return (raw:gsub("\r\n", "\r\nX-Request-ID: " .. id .. "\r\n", 1))
end

local honour_retry_after = os.getenv("BENCH_HONOUR_RETRY_AFTER") == "1"
-- The delays of answered connections, oldest first, for delay() (see response()).
local delays, delays_first, delays_last = {}, 1, 0

function response(status, headers, body)
   local id = headers["x-request-id"] or headers["X-Request-ID"]
   local started = id and sent_at[id]
   local now = now_us()
   if started and started < counting_from then
      sent_at[id] = nil
      if now - started > timeout_us then warmup_late_count = warmup_late_count + 1 end
   elseif started then
      sent_at[id] = nil
      local us = now - started
      if us > timeout_us then late_count = late_count + 1 end
      if status < 300 then
         answered_count = answered_count + 1
         record(answered, us)
      elseif status == 503 then
         refused_count = refused_count + 1
         record(refused, us)
      else
         other_count = other_count + 1
      end
   elseif now >= counting_from then
      other_count = other_count + 1
   end
   -- wrk asks delay() for the next request of a connection not here but when that connection
   -- is next writable, in the following turn of its event loop, after the responses of other
   -- connections (src/wrk.c: response_complete arms the writable event, socket_writeable calls
   -- delay()). So each response's delay joins a queue, and delay() takes the oldest: the event
   -- loop hands writable connections over in the order their responses were read. (One value
   -- shared by all connections handed the last response's delay to every connection answered
   -- in the same turn: answered clients went quiet for a second, refused ones came back at once.)
   if not honour_retry_after then return end -- no delay() to take them
   local wait_ms = 0
   if status == 503 then
      local seconds = tonumber(headers["retry-after"] or headers["Retry-After"] or "1") or 1
      wait_ms = math.floor(seconds * 1000 * (1 + 0.25 * math.random()))
   end
   delays_last = delays_last + 1
   delays[delays_last] = wait_ms
end

if honour_retry_after then
   -- Defined only for these clients: with a delay() at all, wrk sends every request from a timer.
   function delay()
      if delays_first > delays_last then return 0 end -- a connection's first request
      local wait_ms = delays[delays_first]
      delays[delays_first] = nil
      delays_first = delays_first + 1
      return wait_ms
   end
end

local threads = {}

function setup(thread)
   threads[#threads + 1] = thread
   thread:set("thread_number", #threads)
end

local function merged(name)
   local total = {}
   for _, thread in ipairs(threads) do
      for bucket, count in pairs(thread:get(name)) do
         total[bucket] = (total[bucket] or 0) + count
      end
   end
   return total
end

local function percentile(histogram, share)
   local buckets, count = {}, 0
   for bucket, n in pairs(histogram) do
      buckets[#buckets + 1] = bucket
      count = count + n
   end
   if count == 0 then return 0 end
   table.sort(buckets)
   local seen, wanted = 0, share * count
   for _, bucket in ipairs(buckets) do
      seen = seen + histogram[bucket]
      if seen >= wanted then return math.exp((bucket + 0.5) / 100) end
   end
   return math.exp((buckets[#buckets] + 0.5) / 100)
end

local function summed(name)
   local total = 0
   for _, thread in ipairs(threads) do total = total + thread:get(name) end
   return total
end

local function unanswered(in_warmup)
   -- Requests still waiting for an answer at the end, longer than the timeout already; those
   -- sent in the warm-up, or the others.
   local count, now = 0, now_us()
   for _, thread in ipairs(threads) do
      local from = thread:get("counting_from")
      for _, started in pairs(thread:get("sent_at")) do
         if now - started > timeout_us and (started < from) == in_warmup then
            count = count + 1
         end
      end
   end
   return count
end

function done(summary, latency, requests)
   local e = summary.errors
   local ok, no = merged("answered"), merged("refused")
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
      '"write_errors":%d,"status_errors":%d,"timeouts":%d,"answered":%d,"refused":%d,' ..
      '"other":%d,"client_timeouts":%d,"answered_p50_us":%d,"answered_p99_us":%d,' ..
      '"answered_max_us":%d,"refused_p50_us":%d,"refused_max_us":%d,' ..
      '"warmup_client_timeouts":%d}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      summed("answered_count"), summed("refused_count"), summed("other_count"),
      summed("late_count") + unanswered(false), percentile(ok, 0.50), percentile(ok, 0.99),
      percentile(ok, 1.0), percentile(no, 0.50), percentile(no, 1.0),
      summed("warmup_late_count") + unanswered(true)))
end
