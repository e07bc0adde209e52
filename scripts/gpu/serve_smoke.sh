#!/usr/bin/env bash
# The README's quick start on the GPU machine: the server on the embedded default model, the README's
# request, a chat request, a streamed one, and two bad requests (4xx with an OpenAI-style body); then stop.
PORT=${PORT:-8000}
python -m atom_jax.serve --port "$PORT" >"$OUT/serve_server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
t0=$(date +%s)
until curl -sf "127.0.0.1:$PORT/health" >/dev/null; do
  kill -0 $pid 2>/dev/null || { echo "server exited"; tail -30 "$OUT/serve_server.log"; exit 1; }
  (( $(date +%s) - t0 > ${WAIT_S:-240} )) && { echo "not ready after ${WAIT_S:-240} s"; tail -30 "$OUT/serve_server.log"; exit 1; }
  sleep 2
done
echo "ready after $(( $(date +%s) - t0 )) s"
req() { echo "== $1"; shift; curl -s -w '\nHTTP %{http_code} in %{time_total} s\n' "127.0.0.1:$PORT$@"; }
J='Content-Type: application/json'
req "README completion" /v1/completions -H "$J" -d '{"prompt": "Return the number of ", "max_tokens": 16, "temperature": 0}'
req "chat" /v1/chat/completions -H "$J" -d '{"messages": [{"role": "user", "content": "Split a string"}], "max_tokens": 24}'
req "streamed" /v1/completions -H "$J" -d '{"prompt": "Open the file", "max_tokens": 8, "stream": true}'
req "bad max_tokens (want 400)" /v1/completions -H "$J" -d '{"prompt": "x", "max_tokens": -1}'
req "prompt past the context (want 400)" /v1/completions -H "$J" -d "{\"prompt\": \"$(head -c 70000 /dev/zero | tr '\0' a)\", \"max_tokens\": 4}"
req "after the bad ones" /v1/completions -H "$J" -d '{"prompt": "Return the number of ", "max_tokens": 16, "temperature": 0}'
req "metrics (first lines)" /metrics | head -5
grep -E "compiled|bucket|platform|device" "$OUT/serve_server.log" | head -12
