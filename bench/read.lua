-- The read workload: GET /items with a random min_value across the seeded values [0, 1000)
-- and limit=20. Run by bench/run.py: wrk -t1 -c64 --latency -s bench/read.lua URL

dofile(debug.getinfo(1, "S").source:match("^@(.*[/\\])") .. "report.lua")

local max_value = tonumber(os.getenv("BENCH_MAX_VALUE") or "1000")

function init(args)
   seed_random()
end

function request()
   local threshold = math.random() * max_value
   return wrk.format("GET", string.format("/items?min_value=%.2f&limit=20", threshold))
end
