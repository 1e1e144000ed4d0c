-- The read workload (read.lua) sent by clients that honour Retry-After: a connection answered
-- 503 with Retry-After waits that many seconds before its next request, as a well-behaved
-- HTTP client (or a retrying SDK) does. Run by bench/run.py's overload rounds.

dofile(debug.getinfo(1, "S").source:match("^@(.*[/\\])") .. "read.lua")

local retry_after_ms = 0

function response(status, headers, body)
   -- wrk calls delay() for the same connection right after its response() (one thread, one
   -- connection at a time), so this value reaches exactly the connection that was refused.
   retry_after_ms = 0
   if status == 503 then
      retry_after_ms = (tonumber(headers["Retry-After"] or headers["retry-after"] or "1") or 1) * 1000
   end
end

function delay()
   return retry_after_ms
end
