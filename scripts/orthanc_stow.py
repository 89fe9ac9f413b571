#!/usr/bin/env python3
"""Uploads DICOM files to a DICOMweb server by STOW-RS (standard library only).

    python3 scripts/orthanc_stow.py DIR_OR_FILE [DIR_OR_FILE ...] URL USER PASS

URL is the DICOMweb root (e.g. http://127.0.0.1:8042/dicom-web, as printed by
`scripts/orthanc start`); the files are POSTed to URL/studies as multipart/related;
type="application/dicom" with HTTP basic auth, in batches. Directories are walked recursively and
every file with the Part-10 "DICM" marker is sent. Prints a JSON summary
{"stored": [SOPInstanceUID...], "failed": [{"sop_uid", "reason"}...], "files": N} and exits 1 when
anything failed.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request
import uuid

BATCH_FILES = 32
BATCH_BYTES = 32 << 20


def dicom_files(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    fp = os.path.join(root, f)
                    if is_part10(fp):
                        out.append(fp)
        elif os.path.isfile(p):
            if not is_part10(p):
                raise SystemExit(f"not a DICOM Part-10 file: {p}")
            out.append(p)
        else:
            raise SystemExit(f"no such file or directory: {p}")
    return out


def is_part10(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def stow(url: str, auth: str, files: list[str]) -> dict:
    boundary = "vidtune-" + uuid.uuid4().hex
    body = bytearray()
    for fp in files:
        with open(fp, "rb") as f:
            data = f.read()
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=bytes(body), method="POST", headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
        "Authorization": "Basic " + auth,
    })
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            text = r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:  # 409 etc. still carry the STOW response body
        text = e.read().decode("utf-8", "replace")
        if not text.strip().startswith("{"):
            raise SystemExit(f"STOW-RS {url}: HTTP {e.code}: {text[:500]}")
    return json.loads(text) if text.strip() else {}


def values(ds: dict, tag: str) -> list:
    return (ds.get(tag) or {}).get("Value") or []


def main() -> int:
    if len(sys.argv) < 5 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    *paths, url, user, password = sys.argv[1:]
    url = url.rstrip("/")
    if not url.endswith("/studies"):
        url += "/studies"
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    files = dicom_files(paths)
    if not files:
        raise SystemExit("no DICOM files found")
    stored, failed = [], []
    batch, size = [], 0
    batches = []
    for fp in files:
        n = os.path.getsize(fp)
        if batch and (len(batch) >= BATCH_FILES or size + n > BATCH_BYTES):
            batches.append(batch)
            batch, size = [], 0
        batch.append(fp)
        size += n
    batches.append(batch)
    for b in batches:
        resp = stow(url, auth, b)
        for item in values(resp, "00081199"):  # ReferencedSOPSequence
            stored += values(item, "00081155")
        for item in values(resp, "00081198"):  # FailedSOPSequence
            failed.append({"sop_uid": (values(item, "00081155") or [None])[0],
                           "reason": (values(item, "00081197") or [None])[0]})
    print(json.dumps({"files": len(files), "stored": stored, "failed": failed}, indent=1))
    return 1 if failed or len(stored) < len(files) else 0


if __name__ == "__main__":
    sys.exit(main())
