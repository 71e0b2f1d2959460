"""whmae.data.worker_pool: freed exam-sized buffers are reused, not mapped afresh."""

import subprocess
import sys

import pytest

_PROBE = """
import resource, sys
from whmae.data.worker_pool import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(6):  # an inflated short-axis stack is ~40 MB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = b"x" * (40 << 20)  # malloc + fill, like an inflated file
    del buffer
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[1:]))
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_reuses_large_buffers():
    pages = (40 << 20) // 4096
    assert _page_faults("default") > pages // 2  # glibc maps >32 MiB blocks afresh
    assert _page_faults("keep") < pages // 20  # the freed block comes back
