"""
Tiny helpers shared by the data scripts (data/*.py) only; training stages never import this file.

    base_dir()    where a run keeps everything: $FLATCHAT_HOME, default ~/.cache/flatchat
    mirror()      the offline mirror folder ($FLATCHAT_DATA_MIRROR, set by each script's --mirror flag),
                  None = download from the canonical URLs
    fetch(...)    get one file: download it (retries, resume, checks, progress) or copy it from the mirror
    write_jsonl() write rows as JSON lines atomically

Every file is written under a temporary name, fsynced, then renamed into place, so a file that exists
under its final name is complete; that is also why a second run skips it.
"""
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

# -----------------------------------------------------------------------------
# Where things live


def base_dir():
    return Path(os.environ.get("FLATCHAT_HOME") or Path.home() / ".cache" / "flatchat")


def mirror():
    path = os.environ.get("FLATCHAT_DATA_MIRROR")
    if not path:
        return None
    if not Path(path).is_dir():
        sys.exit(f"mirror folder {path} does not exist: fix --mirror / FLATCHAT_DATA_MIRROR "
                 "(a folder laid out like ../shared/data)")
    return Path(path)


def say(msg):
    print(msg, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Atomic writes: temp name in the same folder, fsync, rename


def _commit(tmp, dest):
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    _commit(tmp, path)
    return n


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# Download with retries, HTTP Range resume, size/sha256 checks and a progress line


def _progress(name, done, total, t0, start):
    mb = done / 1e6
    speed = (done - start) / 1e6 / max(time.time() - t0, 1e-6)
    pct = f" {100 * done / total:5.1f}%" if total else ""
    of = f"/{total / 1e6:.1f}" if total else ""
    print(f"\r  {name}: {mb:.1f}{of} MB{pct} {speed:.1f} MB/s ", end="", file=sys.stderr, flush=True)


def _download_once(url, part, timeout):
    import requests  # imported here so that offline runs and tests never need the network stack

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # nothing left to fetch: the partial file is already whole
            return
        r.raise_for_status()
        if have and r.status_code != 206:  # the server ignored Range: start over
            have = 0
        length = int(r.headers.get("Content-Length", 0))
        total = have + length if length else None
        t0 = time.time()
        with open(part, "ab" if have else "wb") as f:
            done, last = have, time.time()
            for chunk in r.iter_content(chunk_size=1 << 20):
                f.write(chunk)
                done += len(chunk)
                if time.time() - last > 0.5:
                    _progress(part.name[:-5], done, total, t0, have)
                    last = time.time()
        _progress(part.name[:-5], done, total, t0, have)
        print(file=sys.stderr)


def _download(url, dest, sha256, size, retries, timeout):
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries):
        try:
            _download_once(url, part, timeout)
            break
        except Exception as e:  # network hiccups, 5xx, truncated streams: wait and resume
            status = getattr(getattr(e, "response", None), "status_code", None) or 0
            if attempt == retries - 1 or (400 <= status < 500 and status != 429):  # 404 etc. will not heal
                sys.exit(f"download of {url} failed ({e}; {attempt + 1} tries); rerun to resume from {part}")
            wait = 2 ** attempt
            say(f"  {url}: {e}; retry {attempt + 2}/{retries} in {wait}s")
            time.sleep(wait)
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        sys.exit(f"size mismatch for {url}: got {got} bytes, expected {size}; removed {part}, rerun to download again")
    if sha256 is not None and sha256_file(part) != sha256:
        part.unlink()
        sys.exit(f"sha256 mismatch for {url}; removed {part}, rerun to download again")
    _commit(part, dest)


def fetch(url, dest, mirror_path=None, sha256=None, size=None, retries=5, timeout=60):
    """Get `url` into `dest`; with a mirror, copy `mirror_path` (relative to the mirror) instead.
    sha256/size describe the online file and are checked on downloads only (the mirror's copies may
    differ, e.g. MMLU's CSV header). Returns dest, or None when offline and the mirror lacks the file."""
    dest = Path(dest)
    root = mirror()
    if dest.exists() and (root is not None or size is None or dest.stat().st_size == size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if root is None:
        say(f"downloading {url}")
        _download(url, dest, sha256, size, retries, timeout)
        return dest
    src = root / mirror_path if mirror_path else None
    if src is None or not src.is_file():
        say(f"skipping {dest.name}: not in the mirror (online only)")
        return None
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(src, tmp)
    _commit(tmp, dest)
    return dest
