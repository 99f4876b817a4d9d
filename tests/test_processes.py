"""engine/processes.py helpers that the process tests do not reach on their own."""

from __future__ import annotations

import subprocess
import sys

_FRAGMENTED_HEAP = """
from voxrelay.engine.processes import trim_heap

def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

# What a burst of call setups leaves: many C-heap blocks (over pymalloc's 512 B), most
# freed again, a few kept alive between them, so no free run reaches the heap's top.
blocks = [bytearray(1500) for _ in range(40_000)]
kept = blocks[::16]
del blocks
before = resident()
assert trim_heap()
print(before - resident())
"""


def test_trim_heap_returns_the_free_pages_between_live_blocks() -> None:
    released = int(
        subprocess.run(
            [sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, check=True
        ).stdout
    )
    # ~60 MB were allocated and 15/16 freed; glibc kept them until the trim.
    assert released > 20 * 2**20, released
