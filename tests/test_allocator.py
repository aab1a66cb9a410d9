"""reuse_freed_memory: applies on glibc Linux and refuses thresholds it cannot set."""

import platform
import subprocess
import sys

import pytest


def test_applies_on_glibc_linux_and_refuses_bad_thresholds():
    from ssmblocks.allocator import reuse_freed_memory

    assert reuse_freed_memory(0) is False and reuse_freed_memory(2**31) is False
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        # in a child process: the setting is process-wide and lasting
        code = "from ssmblocks.allocator import reuse_freed_memory as r; print(r())"
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"
    else:
        pytest.skip("not glibc Linux")
