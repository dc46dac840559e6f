"""
Helpers of the data scripts (data/*.py) only; training stages never import this file.

Every file is written under a temporary name, fsynced, then renamed into place: a file under its final
name is complete, which is why a second run can skip it.
"""
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tokenizer.py
from tokenizer import (Parser, UserError, base_dir, check_home, exit_on_user_error, iter_documents,  # noqa: E402,F401
                       ranged)  # argparse, one-line errors, and the reader of .jsonl / .parquet corpora

def data_dir():
    """$FLATCHAT_HOME/data, default ~/.cache/flatchat/data."""
    return base_dir() / "data"

def mirror():
    """The offline mirror folder ($FLATCHAT_DATA_MIRROR, set by --mirror); None = download."""
    path = os.environ.get("FLATCHAT_DATA_MIRROR")
    if path and not Path(path).is_dir():
        raise UserError(f"mirror folder {path} does not exist: fix --mirror / FLATCHAT_DATA_MIRROR "
                        "(a folder laid out like ../shared/data)")
    return Path(path) if path else None

def parse_args(parser):
    """The script's arguments plus --mirror, which sets $FLATCHAT_DATA_MIRROR (a wrong path stops here)."""
    parser.add_argument("--mirror", default=None, help="offline mirror folder laid out like ../shared/data "
                        "(default: $FLATCHAT_DATA_MIRROR; unset = download)")
    args = parser.parse_args()
    exit_on_user_error()  # a UserError: one line, exit 2
    check_home()
    if args.mirror:
        os.environ["FLATCHAT_DATA_MIRROR"] = args.mirror
    mirror()
    return args

def say(msg):
    print(msg, file=sys.stderr, flush=True)

def _commit(tmp, dest):
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)

def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    _commit(tmp, path)

# -----------------------------------------------------------------------------
# Download with retries, HTTP Range resume, size/sha256 checks and a progress line

def _download_once(url, part):
    import requests  # here, so that offline runs and tests never need the network stack
    have = part.stat().st_size if part.exists() else 0
    with requests.get(url, headers={"Range": f"bytes={have}-"} if have else {}, stream=True, timeout=60) as r:
        if r.status_code == 416:  # nothing left to fetch: the partial file is already whole
            return
        r.raise_for_status()
        if r.status_code != 206:  # the server ignored Range: start over
            have = 0
        length = int(r.headers.get("Content-Length", 0))
        of = f"/{(have + length) / 1e6:.1f}" if length else ""
        done, t0, shown = have, time.time(), 0
        with open(part, "ab" if have else "wb") as f:
            for chunk in r.iter_content(chunk_size=1 << 20):
                f.write(chunk)
                done += len(chunk)
                if time.time() - shown > 0.5 or done == have + length:  # redraw twice a second, and at the end
                    shown = time.time()
                    speed = (done - have) / 1e6 / max(shown - t0, 1e-6)
                    print(f"\r  {part.stem}: {done / 1e6:.1f}{of} MB {speed:.1f} MB/s ",
                          end="", file=sys.stderr, flush=True)
        say("")

def _download(url, dest, sha256, size, retries=5):
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries):
        try:
            _download_once(url, part)
            break
        except Exception as e:  # network hiccups, 5xx, truncated streams: wait and resume
            status = getattr(getattr(e, "response", None), "status_code", None) or 0
            if attempt == retries - 1 or (400 <= status < 500 and status != 429):  # 404 etc. will not heal
                raise UserError(f"download of {url} failed ({e}; {attempt + 1} tries); rerun to resume from {part}")
            say(f"  {url}: {e}; retry {attempt + 2}/{retries} in {2 ** attempt}s")
            time.sleep(2 ** attempt)
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise UserError(f"size mismatch for {url}: got {got} bytes, expected {size}; removed {part}, rerun to download again")
    if sha256 is not None:
        with open(part, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != sha256:
                part.unlink()
                raise UserError(f"sha256 mismatch for {url}; removed {part}, rerun to download again")
    _commit(part, dest)

def fetch(url, dest, mirror_path=None, sha256=None, size=None):
    """Get `url` into `dest`, or with a mirror copy `mirror_path` (relative to it). sha256/size describe the
    online file and are checked on downloads only (a mirror's copy may differ, e.g. MMLU's CSV header).
    Returns dest, or None when the mirror lacks the file."""
    dest, root = Path(dest), mirror()
    if dest.exists() and (root is not None or size is None or dest.stat().st_size == size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if root is None:
        say(f"downloading {url}")
        _download(url, dest, sha256, size)
        return dest
    if not mirror_path or not (root / mirror_path).is_file():
        say(f"skipping {dest.name}: not in the mirror (online only)")
        return None
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(root / mirror_path, tmp)
    _commit(tmp, dest)
    return dest
