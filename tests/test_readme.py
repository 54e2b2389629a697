"""Every ```python block of README.md runs as written, on CPU, each in a fresh process and folder.

Blocks are found anew on every run, so a block added to the README is tested without touching this
file. The one opt-out is a visible marker on the line just above a block, with its reason:
``<!-- readme-test: skip (why it cannot run here) -->`` (e.g. a SLURM submission). A marker
without a reason, or one that is not followed by a python block, fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"^<!-- readme-test: skip \((?P<reason>[^)]+)\) -->$")
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(first line number, code, skip reason or None)`` for every ```python block of ``text``.

    Example:
        >>> python_blocks("a\\n<!-- readme-test: skip (needs SLURM) -->\\n```python\\nx = 1\\n```\\n```bash\\nls\\n```")
        [(3, 'x = 1\\n', 'needs SLURM')]
    """
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            if lines[index].startswith("<!-- readme-test"):
                follows = index + 1 < len(lines) and lines[index + 1].strip() == "```python"
                if SKIP.match(lines[index]) is None or not follows:
                    raise ValueError(f"README.md:{index + 1}: a readme-test marker must read '<!-- readme-test: skip "
                                     "(reason) -->' directly above a ```python block")  # fmt: skip
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        if fence["lang"] == "python":
            marker = SKIP.match(lines[index - 1]) if index else None
            blocks.append((index + 1, "\n".join(lines[index + 1 : end]) + "\n", marker["reason"] if marker else None))
        index = end + 1
    return blocks


BLOCKS = python_blocks((ROOT / "README.md").read_text())


def test_the_readme_has_python_blocks_and_few_opt_outs():
    assert len(BLOCKS) >= 5
    assert sum(reason is not None for _, _, reason in BLOCKS) <= len(BLOCKS) // 2


@pytest.mark.slow  # a fresh interpreter per block (torch, transformers imports): ~5-25 s each
@pytest.mark.parametrize("line, code, skip", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(line, code, skip, tmp_path):
    if skip is not None:
        pytest.skip(f"README.md:{line} opted out: {skip}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # this checkout's mkopt, on CPU
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README.md:{line} failed:\n{code}\n--- stderr ---\n{done.stderr[-3000:]}"
