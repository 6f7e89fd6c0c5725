-- wrk reporter: one JSON line with the exact counters, so nothing is parsed from wrk's text.
done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      '{"requests": %d, "bytes": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
      '"max_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, ' ..
      '"timeout": %d}}\n',
      summary.requests, summary.bytes, summary.duration,
      latency:percentile(50.0), latency:percentile(99.0), latency.max,
      e.connect, e.read, e.write, e.status, e.timeout))
end
