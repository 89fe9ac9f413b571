"""Fixtures for scripts/contract: real resources, created through the API, whose ids schemathesis
puts into the path of every operation that takes one (scripts/contract.toml), so that those
operations reach their logic instead of answering 404 to random ids.

  contract_fixtures.py train URL KEY ZIP      a ready dataset and a model trained on it (needs a worker)
  contract_fixtures.py rest URL KEY ZIP MODEL DATASET BACKBONE
                                              everything else (on a server without workers)

Each step prints `NAME=value` lines for the shell to export. Destructive operations get their own
fixtures, so that whatever order they run in, every other operation still finds its own:
`*_DOOMED` ids are created only to be deleted, revoked or canceled.
"""

import hashlib
import json
import sys
import time
import urllib.error
import urllib.request


class Api:
    def __init__(self, url, key):
        self.url = url.rstrip("/")
        self.key = key

    def call(self, method, path, body=None, content_type=None, expect=(200, 201, 202)):
        headers = {"Authorization": f"Bearer {self.key}"}
        data = None
        if body is not None:
            if isinstance(body, bytes):
                data = body
                headers["Content-Type"] = content_type or "application/octet-stream"
                if not headers["Content-Type"].startswith("multipart/"):
                    headers["x-content-sha256"] = hashlib.sha256(body).hexdigest()
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read()
        if status not in expect:
            sys.exit(f"contract fixtures: {method} {path} answered {status}: {text[:500]!r}")
        return json.loads(text) if text else None

    def wait(self, path, field, done, failed, seconds):
        deadline = time.monotonic() + seconds
        while True:
            value = self.call("GET", path)
            if value[field] in done:
                return value
            if value[field] in failed or time.monotonic() > deadline:
                sys.exit(f"contract fixtures: {path} is {value[field]}: {json.dumps(value)[:800]}")
            time.sleep(0.5)


# A small cache (frames decoded once at ingest) keeps ingest and training to seconds.
CACHE = {"short_side": 40, "fps": 8}
# One epoch of a linear probe on a few short clips: a model in seconds, on two cores.
TINY = {
    "epochs": 1,
    "batch_size": 2,
    "frames": 4,
    "frame_stride": 1,
    "crop": 32,
    "eval_clips": 1,
    "warmup_epochs": 0,
    "freeze": {"policy": "head_only"},
}


def ready_dataset(api, name, archive):
    dataset = api.call("POST", "/v1/datasets", {"name": name, "cache": CACHE})
    api.call("POST", f"/v1/datasets/{dataset['id']}/uploads", archive, "application/zip")
    return api.wait(f"/v1/datasets/{dataset['id']}", "status", {"ready"}, {"failed"}, 120)


def train(api, archive):
    dataset = ready_dataset(api, "contract", archive)
    body = {"dataset_id": dataset["id"], "base_model": "r3d_18", "hyperparameters": TINY}
    # Two models: one for every operation on a model, one that only model_delete may delete.
    jobs = [api.call("POST", "/v1/jobs", body) for _ in range(2)]
    job, doomed = (api.wait(f"/v1/jobs/{j['id']}", "state", {"succeeded"}, {"failed", "canceled"}, 180) for j in jobs)
    return {
        "CONTRACT_DATASET_ID": dataset["id"],
        "CONTRACT_JOB_ID": job["id"],
        "CONTRACT_MODEL_ID": job["model_id"],
        "CONTRACT_MODEL_ID_DOOMED": doomed["model_id"],
    }


def multipart(fields, file_name, file_bytes):
    boundary = "contract-fixture-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + file_bytes
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def rest(api, archive, model_id, dataset_id, backbone):
    out = {}
    # A TorchScript backbone that only base_model_delete may delete.
    with open(backbone, "rb") as f:
        body, content_type = multipart({"name": "contract-doomed"}, "backbone.pt", f.read())
    out["CONTRACT_BASE_MODEL_ID_DOOMED"] = api.call("POST", "/v1/base-models", body, content_type)["id"]
    tenant = api.call("POST", "/v1/tenants", {"name": "contract-fixture"})
    out["CONTRACT_TENANT_ID"] = tenant["id"]
    out["CONTRACT_TENANT_ID_DOOMED"] = api.call("POST", "/v1/tenants", {"name": "contract-doomed"})["id"]
    # Keys of the caller's own tenant: key_view shows no other tenant's key, even to an operator.
    own = api.call("GET", "/v1/me")["tenant"]["id"]
    out["CONTRACT_KEY_ID"] = api.call("POST", f"/v1/tenants/{own}/keys", {"name": "fixture"})["id"]
    out["CONTRACT_KEY_ID_DOOMED"] = api.call("POST", f"/v1/tenants/{own}/keys", {"name": "doomed"})["id"]

    # A dataset that only dataset_delete may delete, and a deletion to look at.
    out["CONTRACT_DATASET_ID_DOOMED"] = ready_dataset(api, "contract-doomed", archive)["id"]
    gone = api.call("POST", "/v1/datasets", {"name": "contract-gone"})
    out["CONTRACT_DELETION_ID"] = api.call("DELETE", f"/v1/datasets/{gone['id']}")["id"]

    # A job that stays queued (the server has no workers), for job_cancel.
    queued = {"dataset_id": dataset_id, "base_model": "r3d_18", "hyperparameters": TINY}
    out["CONTRACT_JOB_ID_DOOMED"] = api.call("POST", "/v1/jobs", queued)["id"]

    # Batch predictions run in the server: one to look at (finished), one to cancel.
    batch = {"dataset_id": dataset_id, "split": "test"}
    first = api.call("POST", f"/v1/models/{model_id}/batch-predictions", batch)
    out["CONTRACT_BATCH_ID"] = api.wait(
        f"/v1/batch-predictions/{first['id']}", "state", {"succeeded"}, {"failed", "canceled"}, 120
    )["id"]
    out["CONTRACT_BATCH_ID_DOOMED"] = api.call("POST", f"/v1/models/{model_id}/batch-predictions", batch)["id"]
    return out


def main():
    step, url, key, zip_path = sys.argv[1:5]
    api = Api(url, key)
    with open(zip_path, "rb") as f:
        archive = f.read()
    if step == "train":
        out = train(api, archive)
    else:
        out = rest(api, archive, *sys.argv[5:8])
    for name, value in out.items():
        print(f"{name}={value}")


if __name__ == "__main__":
    main()
