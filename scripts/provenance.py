"""Where a benchmark's figures came from, for the meta block of its JSON.

    from scripts.provenance import source_commit
    source_commit()   # RINGFLASH_COMMIT's value, or "3e9beff", "3e9beff+changes" (tracked files edited), or None
    source_commit(Path("/tmp/base"))   # another checkout's (a git worktree), or None
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_commit(root: Path | None = None) -> str | None:
    """The commit the benchmarked code came from. This checkout: the RINGFLASH_COMMIT environment variable where set
    (a copy of the tree, whose .git, if it has one, is not its own), else `git rev-parse --short HEAD` ("+changes"
    when tracked files differ from it). The checkout at root: its HEAD, only where root is the top of a git work
    tree (a folder inside another checkout names nothing). Else None."""
    if root is None and os.environ.get("RINGFLASH_COMMIT"):
        return os.environ["RINGFLASH_COMMIT"]
    cwd = Path(ROOT if root is None else root)
    git = lambda *args: subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,  # noqa: E731
                                       timeout=10)
    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != cwd.resolve():
            return None
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode == 0 and head.stdout.strip():
            changed = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            return head.stdout.strip() + ("+changes" if changed else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None
