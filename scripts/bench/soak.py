"""The soak's load driver: concurrent uploads, predictions, event streams and jobs against one
server for a fixed time, while the server's RSS, open descriptors and threads are sampled.

    soak.py --url URL --key KEY --pid PID --seconds S --zip DATASET.zip --video CLIP.mp4
            --model MODEL_ID --job-json HYPER --streams N --out RESULT.json

Each worker loops until the time is up and counts answers by status; an exception or an
unexpected status is an error (the first few are kept with their bodies). Samples are taken
every second; `before` is the median of the 5 s before the load starts (after a warm-up round of
every kind of request), `quarters` the medians of each quarter of the load, `after` the median of
5 s after the load stopped and the server went idle.
Only the standard library, so that it runs with any python3.
"""

import argparse
import http.client
import json
import os
import statistics
import threading
import time
import urllib.parse
import uuid


class Api:
    def __init__(self, url, key):
        u = urllib.parse.urlsplit(url)
        self.host, self.port, self.key = u.hostname, u.port, key

    def conn(self, timeout=120):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def call(self, method, path, body=None, ctype=None, headers=None, timeout=120):
        h = {"Authorization": f"Bearer {self.key}"}
        if ctype:
            h["Content-Type"] = ctype
        h.update(headers or {})
        c = self.conn(timeout)
        try:
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            return r.status, data
        finally:
            c.close()

    def json(self, method, path, obj=None, **kw):
        body = None if obj is None else json.dumps(obj).encode()
        st, data = self.call(method, path, body, "application/json" if body else None, **kw)
        try:
            return st, json.loads(data) if data else None
        except ValueError:
            return st, {"raw": data[:300].decode(errors="replace")}


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.errors = []

    def add(self, what, status, ok, detail=None):
        with self.lock:
            key = f"{what} {status}"
            self.counts[key] = self.counts.get(key, 0) + 1
            if not ok:
                self.counts[f"{what} errors"] = self.counts.get(f"{what} errors", 0) + 1
                if len(self.errors) < 20:
                    self.errors.append({"what": what, "status": status, "detail": str(detail)[:400]})


def proc_sample(pid):
    s = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "Threads"):
                s[k] = int(v.split()[0])
    fds = os.listdir(f"/proc/{pid}/fd")
    sockets = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                sockets += 1
        except OSError:
            pass
    return {"t": time.time(), "rss_kib": s.get("VmRSS", 0), "threads": s.get("Threads", 0),
            "fds": len(fds), "sockets": sockets}


def sampler(pid, stop, out):
    while not stop.is_set():
        try:
            out.append(proc_sample(pid))
        except OSError:
            return
        stop.wait(1.0)


def dataset_round(api, zip_bytes, tally):
    st, ds = api.json("POST", "/v1/datasets", {"name": f"soak-{uuid.uuid4()}"})
    tally.add("dataset_create", st, st == 201, ds)
    if st != 201:
        return
    did = ds["id"]
    st, body = api.call("POST", f"/v1/datasets/{did}/uploads", zip_bytes, "application/zip")
    tally.add("upload", st, st == 202, body)
    deadline = time.time() + 300
    while time.time() < deadline:
        st, d = api.json("GET", f"/v1/datasets/{did}")
        if st != 200 or d.get("status") not in ("uploading", "processing"):
            break
        time.sleep(0.5)
    tally.add("dataset_ready", d.get("status") if st == 200 else st, st == 200 and d.get("status") == "ready", d)
    st, body = api.call("DELETE", f"/v1/datasets/{did}")
    tally.add("dataset_delete", st, st in (202, 204), body)


def predict_round(api, model, video, i, tally):
    q = "?timeline=true&window=1s&stride=1s" if i % 3 == 2 else ""
    st, body = api.call("POST", f"/v1/models/{model}/predict{q}", video, "video/mp4")
    # 429 is the server's rate limit doing its job, not a failure.
    tally.add("predict_timeline" if q else "predict", st, st in (200, 429), body)


def stream_round(api, job, hold_s, tally):
    # A live stream is quiet between events: the socket timeout ends the hold, which is a success.
    c = api.conn(timeout=hold_s)
    try:
        c.request("GET", f"/v1/jobs/{job}/events", headers={"Authorization": f"Bearer {api.key}"})
        r = c.getresponse()
        if r.status != 200:
            tally.add("events", r.status, r.status == 429, r.read())
            return
        end = time.time() + hold_s
        while time.time() < end and r.fp.readline():
            pass
        tally.add("events", 200, True)
    except TimeoutError:
        tally.add("events", 200, True)
    except OSError as e:
        tally.add("events", "error", False, e)
    finally:
        c.close()


def job_round(api, dataset, hyper, tally):
    st, job = api.json("POST", "/v1/jobs", {"dataset_id": dataset, "base_model": "r3d_18", "hyperparameters": hyper})
    tally.add("job_create", st, st in (201, 202), job)
    if st not in (201, 202):
        return None
    jid = job["id"]
    deadline = time.time() + 900
    while time.time() < deadline:
        st, j = api.json("GET", f"/v1/jobs/{jid}")
        if st == 200 and j["state"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(1)
    tally.add("job_end", j.get("state"), j.get("state") == "succeeded", j)
    if j.get("model_id"):
        st, body = api.call("DELETE", f"/v1/models/{j['model_id']}")
        tally.add("model_delete", st, st in (202, 204), body)
    return jid


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--zip", required=True)
    p.add_argument("--video", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True, help="a ready dataset the job loop trains on")
    p.add_argument("--job-json", required=True)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    api = Api(a.url, a.key)
    zip_bytes = open(a.zip, "rb").read()
    video = open(a.video, "rb").read()
    hyper = json.loads(a.job_json)
    tally = Tally()

    # Warm-up: one round of each, so lazily built state is part of the baseline.
    dataset_round(api, zip_bytes, tally)
    for i in range(3):
        predict_round(api, a.model, video, i, tally)
    last_job = job_round(api, a.dataset, hyper, tally)
    stream_round(api, last_job, 1, tally)

    samples, stop = [], threading.Event()
    t = threading.Thread(target=sampler, args=(a.pid, stop, samples), daemon=True)
    t.start()
    time.sleep(5)
    t_load = time.time()
    end = t_load + a.seconds
    state = {"job": last_job}

    def loop(body):
        i = 0
        while time.time() < end:
            try:
                body(i)
            except Exception as e:  # noqa: BLE001 - a soak counts every failure and goes on
                tally.add(getattr(body, "__name__", "worker"), "exception", False, repr(e))
                time.sleep(0.5)
            i += 1

    def uploads(_i):
        dataset_round(api, zip_bytes, tally)

    def predictions(i):
        predict_round(api, a.model, video, i, tally)

    def streams(_i):
        stream_round(api, state["job"], 3, tally)

    def jobs(_i):
        state["job"] = job_round(api, a.dataset, hyper, tally) or state["job"]

    workers = [uploads, predictions, predictions, jobs] + [streams] * a.streams
    threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in workers]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t_quiet = time.time()
    time.sleep(10)  # let in-flight work settle before the "after" figures
    t_after = time.time()
    time.sleep(5)
    stop.set()
    t.join()

    def window(lo, hi, k):
        xs = [s[k] for s in samples if lo <= s["t"] < hi]
        return statistics.median(xs) if xs else None

    def peak(k):
        return max((s[k] for s in samples), default=None)

    fig = {}
    q = (t_quiet - t_load) / 4
    for k in ("rss_kib", "fds", "sockets", "threads"):
        fig[k] = {"before": window(t_load - 5, t_load, k), "peak": peak(k),
                  "after": window(t_after, t_after + 5, k),
                  # Medians of each quarter of the load: a leak climbs through them, warm-up
                  # (pools filling, allocator arenas) levels off after the first.
                  "quarters": [window(t_load + i * q, t_load + (i + 1) * q, k) for i in range(4)]}
    json.dump({"seconds": a.seconds, "load_seconds": round(t_quiet - t_load, 1), "samples": len(samples),
               "server": fig, "counts": dict(sorted(tally.counts.items())), "errors": tally.errors},
              open(a.out, "w"))


if __name__ == "__main__":
    main()
