"""Which commit a GPU run measured, also where the tree arrives without its .git.

A lent GPU machine gets a copy of the working tree (tracked files and untracked ones git does not
ignore), not necessarily the repository. So, just before sending the tree:

    python benchmarks/run_stamp.py write   # records HEAD, whether the tree differs from it, and a
                                           # hash of every file, in benchmarks/results/run-stamp.json

and there (``benchmarks/run_gpu.sh`` does it) ``python benchmarks/run_stamp.py label`` prints
``<short sha>`` or ``<short sha>+dirty``: from git when .git came along, else from the stamp once
every file it lists hashes the same (a file changed since the stamp gives
``<sha>+dirty (N files differ from the stamp)``), else ``unknown``. The stamp itself is left
out of its hashes and of the dirty check.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = os.path.join("benchmarks", "results", "run-stamp.json")


def _git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def _tree_files() -> Optional[List[str]]:
    """Tracked files and untracked ones git does not ignore: what travels to the GPU machine."""
    listing = _git("ls-files", "--cached", "--others", "--exclude-standard", "-z")
    if listing is None:
        return None
    return sorted({path for path in listing.split("\0") if path and path != STAMP and os.path.isfile(os.path.join(ROOT, path))})


def _digest(path: str) -> str:
    with open(os.path.join(ROOT, path), "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _git_label() -> Optional[str]:
    head = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=all")
    if head is None or status is None:
        return None
    changed = [line for line in status.splitlines() if line[3:].strip() != STAMP]
    return head.strip() + ("+dirty" if changed else "")


def write_stamp() -> Dict[str, object]:
    files = _tree_files()
    label = _git_label()
    if files is None or label is None:
        raise SystemExit("run_stamp: not a git checkout (or git is missing): nothing to stamp")
    stamp = {
        "label": label,
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
        "files": {path: _digest(path) for path in files},
    }
    target = os.path.join(ROOT, STAMP)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".tmp", "w") as handle:
        json.dump(stamp, handle, indent=0, sort_keys=True)
    os.replace(target + ".tmp", target)
    return stamp


def stamp_label(stamp: Dict[str, object]) -> str:
    """The stamp's label, marked dirty when a file it lists is missing or differs."""
    differing = [path for path, digest in stamp["files"].items()
                 if not os.path.isfile(os.path.join(ROOT, path)) or _digest(path) != digest]
    label = str(stamp["label"])
    if not differing:
        return label
    base = label.split("+", 1)[0]
    return f"{base}+dirty ({len(differing)} files differ from the stamp of {stamp['written']})"


def commit_label() -> str:
    label = _git_label()
    if label is not None:
        return label
    try:
        with open(os.path.join(ROOT, STAMP)) as handle:
            stamp = json.load(handle)
    except (OSError, ValueError):
        return "unknown"
    return stamp_label(stamp)


def main(argv: List[str]) -> int:
    if argv[1:] == ["write"]:
        stamp = write_stamp()
        print(f"{STAMP}: {stamp['label']}, {len(stamp['files'])} files")
        return 0
    if argv[1:] == ["label"]:
        print(commit_label())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
