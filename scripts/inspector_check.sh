#!/usr/bin/env bash
# Lists the tools of a running lorekeeper MCP server with the official MCP Inspector CLI
# (@modelcontextprotocol/inspector from npm), over stdio and over Streamable HTTP with the bearer
# token - the checks a user's client would pass. Needs node/npx and the npm registry (first run).
#
#   scripts/inspector_check.sh            # exits non-zero if any check fails
set -euo pipefail

INSPECTOR="${INSPECTOR:-@modelcontextprotocol/inspector@latest}"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

export LOREKEEPER_HOME="$WORK/home" HF_HUB_OFFLINE=1
mkdir -p "$WORK/docs"
echo "The bicycle chain should be lubricated every 300 kilometres." > "$WORK/docs/bike.txt"
SERVE=("$PYTHON" -m lorekeeper.server.cli --db "$WORK/index.db" serve --watch "$WORK/docs")

expect_tools() {  # $1 = label, stdin = inspector output
  local out
  out="$(cat)"
  for tool in retrieve generate index_status; do
    if ! grep -q "\"name\": *\"$tool\"" <<<"$out"; then
      echo "FAIL $1: tool $tool not listed" >&2
      echo "$out" >&2
      exit 1
    fi
  done
  echo "ok   $1: retrieve, generate, index_status listed"
}

# 1. stdio: the inspector launches the server itself
npx -y "$INSPECTOR" --cli -e "LOREKEEPER_HOME=$LOREKEEPER_HOME" -e HF_HUB_OFFLINE=1 \
  "${SERVE[@]}" --method tools/list 2>"$WORK/stdio.err" | expect_tools "stdio"

# 2. Streamable HTTP with the bearer token
PORT="$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
TOKEN="inspector-check-$RANDOM$RANDOM"
"${SERVE[@]}" --http --port "$PORT" --token "$TOKEN" 2>"$WORK/http.err" &
SERVER_PID=$!
for _ in $(seq 1 600); do
  if curl -s -o /dev/null "http://127.0.0.1:$PORT/mcp"; then break; fi
  kill -0 "$SERVER_PID" || { cat "$WORK/http.err" >&2; exit 1; }
  sleep 0.2
done
URL="http://127.0.0.1:$PORT/mcp"
npx -y "$INSPECTOR" --cli "$URL" --transport http --header "Authorization: Bearer $TOKEN" \
  --method tools/list 2>"$WORK/inspector-http.err" | expect_tools "http with token"

if npx -y "$INSPECTOR" --cli "$URL" --transport http --method tools/list >"$WORK/noauth.out" 2>&1; then
  echo "FAIL http without token: the server answered" >&2
  exit 1
fi
if ! grep -qiE "401|unauthori[sz]ed|auth_required" "$WORK/noauth.out"; then
  echo "FAIL http without token: refused, but not with 401" >&2
  cat "$WORK/noauth.out" >&2
  exit 1
fi
echo "ok   http without token: refused (401, the inspector reports auth_required)"
