# Shared by the benchmark drivers; sourced after scripts/env.sh.
# shellcheck shell=bash
#
#   bench_example NAME     the path of examples/NAME built in $VIDTUNE_BENCH_PROFILE (default
#                          release; the smoke run uses debug), building it where cargo is at hand
#   bench_init NAME        work dir ($work), cleanup trap, a private copy of $VIDTUNE_BIN ($bin),
#                          a fresh database in the embedded PostgreSQL target/bench-postgres-NAME
#                          (port ${VIDTUNE_BENCH_PG_PORT:-54333}; dropped again on exit), an API key ($key)
#   server_start DIR [VAR=value...]   a `vidtune serve` on a free port ($srv, $port, $url), log in $work
#   server_stop            SIGTERM, then SIGKILL after 20 s; its children too
#   api CURL-ARGS...       curl with the key; prints the body, dies on HTTP >= 400
#   wait_dataset ID [S]    until the dataset leaves receiving/processing; prints the status
#   wait_job ID [S]        until the job ends; prints the state
#   gen_video OUT SIZE FPS SECONDS [VF]   an H.264 test video (testsrc2)
#   malloc_preload NAME    the LD_PRELOAD value that gives a process the allocator NAME: glibc (empty),
#                          jemalloc or tcmalloc (Debian's libjemalloc2, libtcmalloc-minimal4)
# Everything runs under `nice -n ${BENCH_NICE:-10}` when BENCH_NICE is not 0 (set by the drivers).

BENCH_PY="$VIDTUNE_ROOT/scripts/bench/_bench.py"
export PYTHONDONTWRITEBYTECODE=1 # keep __pycache__ out of scripts/bench
pybench() { python3 "$BENCH_PY" "$@"; }

# The PyTorch references' decoder (scripts/bench/requirements.txt) in the setup venv, installed
# once: each benchmark that runs a torchcodec reference calls this itself.
need_torchcodec() {
  "$VIDTUNE_TORCH_VENV/bin/python" -c 'import torchcodec' 2>/dev/null ||
    "$VIDTUNE_TORCH_VENV/bin/python" -m pip install --quiet -r "$VIDTUNE_ROOT/scripts/bench/requirements.txt"
}

bench_cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  [ -n "${sampler_stop:-}" ] && touch "$sampler_stop" 2>/dev/null
  [ -n "${srv:-}" ] && server_stop
  for p in ${bench_pids:-}; do kill "$p" 2>/dev/null; done
  if [ -n "${bench_db:-}" ]; then
    "$(pg_bindir)/dropdb" -h 127.0.0.1 -p "$bench_pg_port" -U vidtune --if-exists --force "$bench_db" 2>/dev/null
  fi
  if [ "${bench_pg_started:-0}" = 1 ]; then
    local run=()
    [ "$(id -u)" -eq 0 ] && run=(runuser -u postgres --)
    "${run[@]}" "$(pg_bindir)/pg_ctl" -D "$bench_pg_dir" stop -m fast >/dev/null 2>&1
  fi
  if [ "${BENCH_KEEP:-0}" = 1 ]; then say "kept $work"; else rm -rf "$work"; fi
  exit "$rc"
}

bench_init() {
  local name="$1" run=()
  work="$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/vidtune-bench-$name.XXXXXX")"
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
  local src="${VIDTUNE_BIN:-$VIDTUNE_ROOT/target/release/vidtune}"
  [ -x "$src" ] || die "no vidtune binary at $src (build it, or set VIDTUNE_BIN)"
  # A private copy: a rebuild during the run must not swap the binary under a restart.
  bin="$work/vidtune"
  cp "$src" "$bin"
  if [ -z "${DATABASE_URL:-}" ]; then
    bench_pg_dir="$VIDTUNE_ROOT/target/bench-postgres-$name"
    [ "$(id -u)" -eq 0 ] && run=(runuser -u postgres --)
    if ! { [ -f "$bench_pg_dir/PG_VERSION" ] && "${run[@]}" "$(pg_bindir)/pg_ctl" -D "$bench_pg_dir" status >/dev/null 2>&1; }; then
      bench_pg_started=1
    fi
    local base
    base="$(pg_embedded_start "$bench_pg_dir" "${VIDTUNE_BENCH_PG_PORT:-54333}")"
    bench_pg_port="${base##*:}"; bench_pg_port="${bench_pg_port%%/*}"
    bench_db="vtbench_${name//-/_}_$$"
    "$(pg_bindir)/createdb" -h 127.0.0.1 -p "$bench_pg_port" -U vidtune "$bench_db" || die "createdb failed"
    DATABASE_URL="${base%/*}/$bench_db"
  fi
  export DATABASE_URL
  "$bin" migrate >/dev/null
  key=$("$bin" keys create --tenant "bench-$name" | tail -n 1)
}

bench_example() {
  local profile="${VIDTUNE_BENCH_PROFILE:-release}"
  if command -v cargo >/dev/null; then
    cargo build $([ "$profile" = release ] && echo --release) --quiet --example "$1" >&2 || return 1
  fi
  echo "$VIDTUNE_ROOT/target/$profile/examples/$1"
}

malloc_preload() {
  local lib
  case "$1" in
    glibc) return 0 ;;
    jemalloc) lib=libjemalloc.so.2 ;;
    tcmalloc) lib=libtcmalloc_minimal.so.4 ;;
    *) die "unknown allocator $1 (glibc, jemalloc, tcmalloc)" ;;
  esac
  lib=$(ls /usr/lib/*-linux-gnu/"$lib" 2>/dev/null | head -n 1)
  [ -n "$lib" ] || die "no $1 library (scripts/setup installs it)"
  echo "$lib"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

server_start() {
  local dir="$1"; shift
  port=$(free_port)
  url="http://127.0.0.1:$port"
  srv_log="$work/server-$port.log"
  env "$@" "$bin" serve --listen "127.0.0.1:$port" --data-dir "$dir" >"$srv_log" 2>&1 &
  srv=$!
  local i
  for i in $(seq 150); do
    curl -fs "$url/healthz" >/dev/null 2>&1 && return 0
    kill -0 "$srv" 2>/dev/null || { tail -n 30 "$srv_log" >&2; srv=; die "the server exited at start"; }
    sleep 0.2
  done
  tail -n 30 "$srv_log" >&2
  die "the server did not answer /healthz within 30 s"
}

server_stop() {
  [ -n "${srv:-}" ] || return 0
  local kids i
  kids=$(cat /proc/"$srv"/task/*/children 2>/dev/null || true)
  kill -TERM "$srv" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$srv" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$srv" 2>/dev/null || true
  wait "$srv" 2>/dev/null || true
  for i in $kids; do kill "$i" 2>/dev/null || true; done
  srv=
}

api() {
  local out code
  out=$(curl -sS -w '\n%{http_code}' -H "Authorization: Bearer $key" "$@") || die "curl failed: $*"
  code="${out##*$'\n'}"; out="${out%$'\n'*}"
  [ "$code" -lt 400 ] || die "HTTP $code from curl $*: $out"
  printf '%s\n' "$out"
}

wait_dataset() {
  local id="$1" limit="${2:-600}" st t0=$SECONDS
  while :; do
    st=$(api "$url/v1/datasets/$id" | jq -r .status)
    case "$st" in processing) ;; *) echo "$st"; return 0 ;; esac
    [ $((SECONDS - t0)) -lt "$limit" ] || die "dataset $id still $st after $limit s"
    sleep 0.3
  done
}

wait_job() {
  local id="$1" limit="${2:-1800}" st t0=$SECONDS
  while :; do
    st=$(api "$url/v1/jobs/$id" | jq -r .state)
    case "$st" in succeeded|failed|canceled) echo "$st"; return 0 ;; esac
    [ $((SECONDS - t0)) -lt "$limit" ] || die "job $id still $st after $limit s"
    sleep 1
  done
}

gen_video() {
  local out="$1" size="$2" fps="$3" secs="$4" vf="${5:-null}" preset="${6:-ultrafast}"
  mkdir -p "$(dirname "$out")"
  ffmpeg -nostdin -loglevel error -y -f lavfi -i "testsrc2=size=$size:rate=$fps:duration=$secs" \
    -vf "$vf" -c:v libx264 -preset "$preset" -g 250 -pix_fmt yuv420p "$out"
}

# A two-class training set of N distinct short videos under DIR/<class>/: class `plain` is
# testsrc2 with a hue shift per video, class `inverted` the same negated and mirrored.
gen_two_class() {
  local dir="$1" n="$2" size="$3" secs="$4" i
  for i in $(seq 1 "$n"); do
    if [ $((i % 2)) -eq 0 ]; then
      gen_video "$dir/plain/v$i.mp4" "$size" 30 "$secs" "hue=h=$((i * 5))"
    else
      gen_video "$dir/inverted/v$i.mp4" "$size" 30 "$secs" "hue=h=$((i * 5)),negate,hflip"
    fi
  done
}

zip_dir() { (cd "$1" && python3 -c 'import shutil,sys; shutil.make_archive(sys.argv[1], "zip", ".")' "${2%.zip}"); }

# POST /v1/datasets with JSON $2 (name added), upload zip $1, wait; prints the dataset id.
dataset_from_zip() {
  local zip="$1" extra="${2:-}" id st
  id=$(api -H 'Content-Type: application/json' \
    -d "{\"name\":\"bench-$(date +%s%N)\"${extra:+,$extra}}" "$url/v1/datasets" | jq -r .id)
  api -H 'Content-Type: application/zip' --data-binary @"$zip" "$url/v1/datasets/$id/uploads" >/dev/null
  st=$(wait_dataset "$id")
  [ "$st" = ready ] || die "dataset $id ended $st: $(api "$url/v1/datasets/$id/report" | head -c 2000)"
  echo "$id"
}

# POST /v1/jobs for dataset $1 with hyperparameters JSON $2 on r3d_18; prints the job id.
job_create() {
  api -H 'Content-Type: application/json' \
    -d "{\"dataset_id\":\"$1\",\"base_model\":\"${3:-r3d_18}\",\"hyperparameters\":$2}" "$url/v1/jobs" | jq -r .id
}

job_must_succeed() {
  local id="$1" st
  st=$(wait_job "$id")
  if [ "$st" != succeeded ]; then
    api "$url/v1/jobs/$id" >&2 || true
    api "$url/v1/jobs/$id/logs" | tail -n 30 >&2 || true
    die "job $id ended $st"
  fi
}

# Re-exec under nice once (the machine is shared).
bench_nice() {
  if [ "${BENCH_NICE:-10}" != 0 ] && [ -z "${BENCH_NICED:-}" ]; then
    export BENCH_NICED=1
    exec nice -n "${BENCH_NICE:-10}" bash "$@"
  fi
}
