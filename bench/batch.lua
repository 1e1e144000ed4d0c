-- The batch workload: PATCH /items with 50 distinct random existing ids (1..BENCH_ROWS) in
-- random order, each with a random new value in [0, 1000), sent with the bearer token from
-- BENCH_TOKEN. Run by bench/run.py: wrk -t1 -c64 --latency -s bench/batch.lua URL
-- With BENCH_IDEMPOTENCY_KEYS=1 (bench/run.py's keyed rounds) every request carries a new
-- Idempotency-Key, so each one is applied and its answer stored.

dofile(debug.getinfo(1, "S").source:match("^@(.*[/\\])") .. "report.lua")

local rows = tonumber(os.getenv("BENCH_ROWS") or "10000")
local batch_size = tonumber(os.getenv("BENCH_BATCH") or "50")
local keyed = os.getenv("BENCH_IDEMPOTENCY_KEYS") == "1"
local key_prefix, sent = "", 0
local headers = {
   ["Authorization"] = "Bearer " .. (os.getenv("BENCH_TOKEN") or ""),
   ["Content-Type"] = "application/json",
}

function init(args)
   seed_random()
   -- Unique per wrk run: the warm-up and the measured run start in the same second with the same
   -- seed, and a key sent again with another body would be a 422, not a new write.
   local urandom = io.open("/dev/urandom", "rb")
   key_prefix = "bench-" .. urandom:read(8):gsub(".", function(c)
      return string.format("%02x", c:byte())
   end)
   urandom:close()
end

function request()
   -- Ids are kept in the order they are drawn: random, so the server has to sort them.
   local seen, entries = {}, {}
   while #entries < batch_size do
      local id = math.random(rows)
      if not seen[id] then
         seen[id] = true
         entries[#entries + 1] = string.format('{"id":%d,"value":%.2f}', id, math.random() * 1000)
      end
   end
   if keyed then
      sent = sent + 1
      headers["Idempotency-Key"] = key_prefix .. "-" .. sent
   end
   return wrk.format("PATCH", "/items", headers, "[" .. table.concat(entries, ",") .. "]")
end
