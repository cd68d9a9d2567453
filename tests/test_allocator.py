"""The CPU training allocator setting: the glibc calls made, in order, undone on error, and none when off."""

from __future__ import annotations

import sys

import pytest

from zipkd.recover import allocator


class FakeLibc:
    def __init__(self, ok: int = 1):
        self.calls: list[tuple] = []
        self.ok = ok

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return self.ok

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_thresholds_are_raised_inside_and_memory_handed_back_after():
    libc = FakeLibc()
    with pytest.raises(RuntimeError), allocator.reuse_freed_memory(libc=libc) as tuned:
        assert tuned
        assert libc.calls == [
            ("mallopt", allocator.M_MMAP_THRESHOLD, 32 << 20),
            ("mallopt", allocator.M_TRIM_THRESHOLD, 2**31 - 1),
        ]
        raise RuntimeError("a failed step")
    assert libc.calls[2:] == [("mallopt", allocator.M_TRIM_THRESHOLD, 64 << 20), ("malloc_trim", 0)]


def test_off_or_refused_by_the_allocator():
    libc = FakeLibc()
    with allocator.reuse_freed_memory(enabled=False, libc=libc) as tuned:
        assert not tuned
    assert libc.calls == []
    with allocator.reuse_freed_memory(libc=FakeLibc(ok=0)) as tuned:
        assert not tuned  # mallopt returned 0: the setting was refused


def test_real_glibc_is_found_on_linux():
    libc = allocator._glibc()
    if not sys.platform.startswith("linux"):
        assert libc is None
        return
    if libc is None:
        pytest.skip("not glibc (musl?)")
    with allocator.reuse_freed_memory() as tuned:
        assert tuned
        buf = bytearray(48 << 20)  # a block above the raised threshold still works
        del buf
