"""Tests of shared.memory: freed heap memory goes back to the operating system."""

from __future__ import annotations

import subprocess
import sys

import orjson

from devnet.process import REPO_ROOT

# In a fresh interpreter: 48 MiB of 64 KiB blocks (below glibc's mmap threshold, so they come
# from the heap), all freed but the last, which pins the heap's top so that free() alone
# cannot shrink it; private RSS is read before and after release_free_memory().
SCRIPT = """
import orjson, sys
from shared.memory import release_free_memory

def private_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

blocks = [bytearray(64 * 1024) for _ in range(768)]
pinned = blocks[-1]
del blocks
freed = private_kib()
released = release_free_memory()
result = {"freed": freed, "after": private_kib(), "released": released}
sys.stdout.write(orjson.dumps(result).decode())
"""


def test_release_gives_freed_heap_pages_back() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, capture_output=True, check=True, timeout=60
    ).stdout
    result = orjson.loads(out)
    assert result["released"] is True
    # The 47 MiB freed were still counted as the process's memory, and no longer are.
    assert result["freed"] - result["after"] > 40 * 1024, result
