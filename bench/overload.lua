-- The read workload (read.lua) sent by clients that honour Retry-After: a connection answered
-- 503 with Retry-After waits that many seconds, plus up to a quarter more at random, before its
-- next request, as a well-behaved HTTP client or retrying SDK does (the jitter keeps clients
-- refused in the same instant from all coming back in the same instant). Run by bench/run.py's
-- overload rounds.

dofile(debug.getinfo(1, "S").source:match("^@(.*[/\\])") .. "read.lua")

local retry_after_ms = 0

function response(status, headers, body)
   -- wrk calls delay() for the same connection right after its response() (one thread, one
   -- connection at a time), so this value reaches exactly the connection that was refused.
   retry_after_ms = 0
   if status == 503 then
      local seconds = tonumber(headers["Retry-After"] or headers["retry-after"] or "1") or 1
      retry_after_ms = math.floor(seconds * 1000 * (1 + 0.25 * math.random()))
   end
end

function delay()
   return retry_after_ms
end
