# Sourced by the other scripts: where vidtune's build finds libtorch, and shared defaults.
# shellcheck shell=bash
VIDTUNE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VIDTUNE_ROOT
TORCH_VERSION=2.11.0
TORCHVISION_VERSION=0.26.0
SAFETENSORS_VERSION=0.8.0
# The contract check (scripts/contract) generates requests from openapi.yaml with schemathesis.
SCHEMATHESIS_VERSION=4.32.5
# A dedicated venv outside the checkout, so every clone on the machine shares one 4.7 GB install.
export VIDTUNE_TORCH_VENV="${VIDTUNE_TORCH_VENV:-$HOME/.cache/vidtune/torch-$TORCH_VERSION}"

if [ -n "${LIBTORCH:-}" ]; then
  # A user-provided libtorch 2.11 wins; torch-sys reads LIBTORCH itself.
  :
else
  export LIBTORCH_USE_PYTORCH=1
  # torch-sys runs `python` from the active venv to find the libtorch inside the torch wheel.
  export VIRTUAL_ENV="$VIDTUNE_TORCH_VENV"
  export PATH="$VIDTUNE_TORCH_VENV/bin:$PATH"
fi

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Directory holding initdb/pg_ctl of the newest installed PostgreSQL, or nothing.
pg_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ] && pg_config --bindir
}

# The embedded PostgreSQL: a private cluster under $1 (data dir), loopback only, on port $2.
# Prints the DATABASE_URL. PostgreSQL refuses to run as root, so as root the cluster belongs to
# the `postgres` system user (created by Debian's package).
pg_embedded_start() {
  local dir="$1" port="$2" bin run=()
  bin="$(pg_bindir)" || true
  [ -n "$bin" ] || die "PostgreSQL is not installed (run scripts/setup)"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    chown -R postgres "$dir"
    run=(runuser -u postgres --)
  fi
  if [ ! -f "$dir/PG_VERSION" ]; then
    say "initialising embedded PostgreSQL in $dir"
    "${run[@]}" "$bin/initdb" -D "$dir" -U vidtune --auth=trust -E UTF8 >"$dir.initdb.log" 2>&1 \
      || { cat "$dir.initdb.log" >&2; die "initdb failed"; }
  fi
  if ! "${run[@]}" "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    # Another server on the port (another checkout's cluster, say): take the next free one.
    local tries=0
    while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
      tries=$((tries + 1)); [ $tries -lt 50 ] || die "no free port near $port for PostgreSQL"
      port=$((port + 1))
    done
    say "starting embedded PostgreSQL on 127.0.0.1:$port"
    "${run[@]}" "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200" start >/dev/null \
      || { tail -n 20 "$dir/server.log" >&2; die "PostgreSQL did not start"; }
  fi
  # The port the running cluster listens on (it may have been started earlier on another one).
  port=$("${run[@]}" cat "$dir/postmaster.pid" 2>/dev/null | sed -n 4p)
  echo "postgres://vidtune@127.0.0.1:${port}/postgres"
}
