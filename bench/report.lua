-- Shared by read.lua and batch.lua: per-thread random seeds, and one machine-readable result
-- line (BENCH_RESULT {json}) that run.py parses instead of wrk's human-readable summary.

local threads = 0

function setup(thread)
   threads = threads + 1
   thread:set("thread_number", threads)
end

function seed_random()
   -- Without a per-thread seed every wrk thread would send the same "random" sequence.
   math.randomseed(os.time() * 1000 + (thread_number or 0))
end

function done(summary, latency, requests)
   local e = summary.errors
   -- p99 of the answered requests alone, when the others were refused at once (a 503 from load
   -- shedding takes microseconds, faster than any answered request): with a share f refused,
   -- the answered requests' 99th percentile is the whole distribution's 100 - (1 - f).
   local refused = 0
   if summary.requests > 0 then refused = e.status / summary.requests end
   local accepted_p99 = latency:percentile(math.min(100 - (1 - refused), 100))
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
      '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,' ..
      '"p99_us":%d,"accepted_p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), accepted_p99,
      latency.max, latency.mean))
end
