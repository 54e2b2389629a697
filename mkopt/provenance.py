"""Where a result came from: the commit of the code that produced it."""

from __future__ import annotations

import subprocess
from pathlib import Path


def commit_of_tree(short: bool = True) -> str:
    """The git commit of the mkopt checkout, with "-dirty" when tracked files differ from it.

    A result made from a dirty tree was not produced by that commit alone, so the mark travels with
    every recorded result. "unknown" outside a git checkout (an installed wheel).

    Example:
        >>> commit_of_tree() != ""
        True
    """
    repo = Path(__file__).resolve().parent
    head_args = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
    try:
        head = subprocess.run(head_args, capture_output=True, text=True, check=True, cwd=repo).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True, cwd=repo
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")
