-- wrk script for bench/hook.py and bench/footprint.py: cycles through pre-signed GoTrue Send SMS
-- events (one per line: webhook-id TAB webhook-timestamp TAB webhook-signature TAB body), each
-- wrk thread taking every n-th line, so no request is sent twice unless the file runs out
-- (reported as "wrapped"). A response other than 200 with body {} counts as "bad"; with
-- BENCH_ACCEPT=gotrue (for a hook target that answers success with another body), a response other
-- than 200, or one with an "error" member (what GoTrue >= 2.187 reads as a failure), does.

local path = os.getenv("BENCH_REQUESTS")
local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
local gotrue_rule = os.getenv("BENCH_ACCEPT") == "gotrue"
local threads = {}
local counter = 0

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local reqs = {}
local n = 0
local i = 0
bad = 0
wrapped = 0

function init(args)
   local f = assert(io.open(path, "r"))
   local lineno = 0
   for line in f:lines() do
      if lineno % nthreads == tid then
         local id, ts, sig, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
         n = n + 1
         reqs[n] = wrk.format("POST", wrk.path, {
            ["User-Agent"] = "Go-http-client/1.1",
            ["Accept-Encoding"] = "identity",
            ["Content-Type"] = "application/json",
            ["Webhook-Id"] = id,
            ["Webhook-Signature"] = sig,
            ["Webhook-Timestamp"] = ts,
         }, body)
      end
      lineno = lineno + 1
   end
   f:close()
end

function request()
   i = i + 1
   if i > n then
      i = 1
      wrapped = 1
   end
   return reqs[i]
end

function response(status, headers, body)
   if status ~= 200 then
      bad = bad + 1
   elseif gotrue_rule then
      if body:find('"error"%s*:') then
         bad = bad + 1
      end
   elseif body ~= "{}" then
      bad = bad + 1
   end
end

function done(summary, latency, requests)
   local total_bad, any_wrapped = 0, 0
   for _, t in ipairs(threads) do
      total_bad = total_bad + t:get("bad")
      any_wrapped = math.max(any_wrapped, t:get("wrapped"))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests": %d, "duration_us": %d, "p50": %d, "p90": %d, "p99": %d, "max": %d, '
         .. '"bad": %d, "errors": %d, "wrapped": %d}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max, total_bad, e.connect + e.read + e.write + e.timeout, any_wrapped))
end
