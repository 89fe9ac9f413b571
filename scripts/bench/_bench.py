"""Helpers for the bash benchmark drivers (stdlib only; any python3 runs it).

  rss      --pid P | --parent P --match TEXT   sample VmRSS/VmHWM until --stop FILE exists
  load     --url U --key K --file F --concurrency C --duration S   closed-loop POST load
  stats    read numbers (one a line) on stdin, print {"n","p50","p99","min","max","mean"}

Percentiles are nearest-rank (p50 of 20 runs is the 10th smallest, p99 is the largest).
"""
import argparse
import http.client
import json
import math
import os
import sys
import threading
import time
import urllib.parse


def nearest_rank(xs, q):
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)] if xs else None


def summary(xs):
    return {
        "n": len(xs),
        "p50": nearest_rank(xs, 50),
        "p99": nearest_rank(xs, 99),
        "min": min(xs) if xs else None,
        "max": max(xs) if xs else None,
        "mean": sum(xs) / len(xs) if xs else None,
    }


def proc_status(pid):
    """VmRSS, VmHWM and the RSS parts (anonymous, file-backed, shmem) in KiB, or None when gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            d = {}
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    d[k] = int(v.split()[0])
            return d if "VmRSS" in d else None
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def children(parent, match):
    """Direct children of `parent` whose command line contains `match` (any thread's children:
    /proc/P/task/*/children, since tokio spawns from its worker threads)."""
    out, kids = [], []
    try:
        for t in os.listdir(f"/proc/{parent}/task"):
            try:
                kids += open(f"/proc/{parent}/task/{t}/children").read().split()
            except OSError:
                pass
    except OSError:
        pass
    for k in kids:
        try:
            cmd = open(f"/proc/{k}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if match in cmd:
            out.append(int(k))
    return out


def cmd_rss(a):
    """Samples until the stop file appears (or, with --pid, the process ends). Writes JSON."""
    per = {}  # pid -> {"peak_rss_kib", "peak_hwm_kib", "first_rss_kib", "samples", "first_t", "last_t"}
    samples = []  # (t, total rss of the sampled processes)
    t0 = time.monotonic()
    while not os.path.exists(a.stop):
        pids = [a.pid] if a.pid else children(a.parent, a.match)
        total, alive = 0, 0
        now = time.monotonic() - t0
        for p in pids:
            st = proc_status(p)
            if st is None:
                continue
            alive += 1
            total += st["VmRSS"]
            e = per.setdefault(p, {"first_rss_kib": st["VmRSS"], "peak_rss_kib": 0, "peak_hwm_kib": 0,
                                   "peak_anon_kib": 0, "peak_file_kib": 0, "peak_shmem_kib": 0,
                                   "samples": 0, "first_t": round(now, 3)})
            e["peak_rss_kib"] = max(e["peak_rss_kib"], st["VmRSS"])
            e["peak_hwm_kib"] = max(e["peak_hwm_kib"], st.get("VmHWM", 0))
            e["peak_anon_kib"] = max(e["peak_anon_kib"], st.get("RssAnon", 0))
            e["peak_file_kib"] = max(e["peak_file_kib"], st.get("RssFile", 0))
            e["peak_shmem_kib"] = max(e["peak_shmem_kib"], st.get("RssShmem", 0))
            e["samples"] += 1
            e["last_t"] = round(now, 3)
        if alive:
            samples.append((round(now, 3), total))
        if a.pid and not alive:
            break
        time.sleep(a.interval)
    res = {
        "interval_s": a.interval,
        "samples": len(samples),
        "peak_rss_kib": max((s for _, s in samples), default=0),
        "processes": {str(k): v for k, v in per.items()},
    }
    if a.trace:
        res["trace"] = samples
    with open(a.out, "w") as f:
        json.dump(res, f)


def cmd_load(a):
    """`concurrency` threads, each with its own keep-alive connection, POST the file back to back
    until `duration` has passed; only requests that started in the window are counted."""
    u = urllib.parse.urlsplit(a.url)
    body = open(a.file, "rb").read()
    path = u.path + ("?" + u.query if u.query else "")
    headers = {"Authorization": f"Bearer {a.key}", "Content-Type": a.content_type,
               "Content-Length": str(len(body))}
    lock = threading.Lock()
    codes, lat, errors, batch_clips = {}, [], [], []
    start = time.monotonic() + 0.2
    end = start + a.duration

    def client():
        conn = None
        while time.monotonic() < start:
            time.sleep(0.001)
        while True:
            t = time.monotonic()
            if t >= end:
                break
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
                conn.request("POST", path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                dt = time.monotonic() - t
                with lock:
                    codes[r.status] = codes.get(r.status, 0) + 1
                    if r.status == 200:
                        lat.append(dt * 1e3)
                    elif len(errors) < 5:
                        errors.append({"status": r.status, "body": data[:300].decode(errors="replace")})
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
                if r.status == 429 or r.status == 503:
                    time.sleep(float(r.getheader("retry-after", "0.1") or 0.1) if a.honor_retry else 0.0)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    codes["error"] = codes.get("error", 0) + 1
                    if len(errors) < 5:
                        errors.append({"error": repr(e)})
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    ok = codes.get(200, 0)
    s = summary(lat)
    print(json.dumps({
        "concurrency": a.concurrency, "duration_s": round(elapsed, 3), "ok": ok,
        "codes": {str(k): v for k, v in codes.items()},
        "rps": round(ok / elapsed, 3),
        "latency_p50_ms": s["p50"] and round(s["p50"], 1), "latency_p99_ms": s["p99"] and round(s["p99"], 1),
        "errors": errors,
    }))


def cmd_stats(_a):
    xs = [float(x) for x in sys.stdin.read().split()]
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary(xs).items()}))


p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
sub = p.add_subparsers(dest="cmd", required=True)
r = sub.add_parser("rss")
r.add_argument("--pid", type=int)
r.add_argument("--parent", type=int)
r.add_argument("--match", default="")
r.add_argument("--interval", type=float, default=0.1)
r.add_argument("--stop", required=True)
r.add_argument("--out", required=True)
r.add_argument("--trace", action="store_true")
r.set_defaults(fn=cmd_rss)
l = sub.add_parser("load")
l.add_argument("--url", required=True)
l.add_argument("--key", required=True)
l.add_argument("--file", required=True)
l.add_argument("--content-type", default="video/mp4")
l.add_argument("--concurrency", type=int, default=8)
l.add_argument("--duration", type=float, default=30)
l.add_argument("--honor-retry", action="store_true")
l.set_defaults(fn=cmd_load)
s = sub.add_parser("stats")
s.set_defaults(fn=cmd_stats)
args = p.parse_args()
if args.cmd == "rss" and not (args.pid or args.parent):
    p.error("rss needs --pid or --parent")
args.fn(args)
