"""Where a benchmark's figures came from, for the meta block of its JSON.

    from scripts.provenance import source_commit
    source_commit()   # "3e9beff", "3e9beff+changes" (tracked files edited), or RINGFLASH_COMMIT's value, or None
    source_commit(Path("/tmp/base"))   # another checkout's (a git worktree), or None
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_commit(root: Path | None = None) -> str | None:
    """The commit the benchmarked code came from: `git rev-parse --short HEAD` of this checkout, or of the one at
    root ("+changes" when tracked files differ from it), else, for this checkout, the RINGFLASH_COMMIT environment
    variable (for a copy of the tree without .git), else None."""
    cwd = ROOT if root is None else root
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0 and head.stdout.strip():
            changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                     capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + ("+changes" if changed else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return (os.environ.get("RINGFLASH_COMMIT") or None) if root is None else None
