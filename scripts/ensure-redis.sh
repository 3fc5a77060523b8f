#!/usr/bin/env bash
# Make sure a Redis answers at $REDIS_URL's host and port (default 127.0.0.1:6379):
# reuse a running one, else start redis-server (installing Debian's package if needed),
# else fail with a clear message. Tests never skip for want of Redis.
set -euo pipefail
url=${REDIS_URL:-redis://127.0.0.1:6379/0}
hostport=${url#redis://}; hostport=${hostport%%/*}; hostport=${hostport##*@}
host=${hostport%%:*}; port=${hostport##*:}
ping() { (exec 3<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG) 2>/dev/null; }
if ping; then echo "==> Redis answers at $host:$port"; exit 0; fi
if [ "$host" != "127.0.0.1" ] && [ "$host" != "localhost" ]; then
  echo "error: Redis at $host:$port does not answer, and it is not local, so it cannot be started here" >&2
  exit 1
fi
if ! command -v redis-server >/dev/null; then
  echo "==> installing redis-server (Debian package)"
  if ! { apt-get update -qq && apt-get install -y -qq redis-server; } >/dev/null; then
    echo "error: no Redis at $host:$port and redis-server could not be installed; start one and set REDIS_URL" >&2
    exit 1
  fi
fi
echo "==> starting redis-server on $host:$port"
mkdir -p .cache/redis
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
  --dir "$PWD/.cache/redis" --logfile "$PWD/.cache/redis/redis.log"
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "error: redis-server did not come up on $host:$port (see .cache/redis/redis.log)" >&2
exit 1
