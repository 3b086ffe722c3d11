"""server/infra/allocator.py: glibc malloc settings and statistics through ctypes."""

from __future__ import annotations

import ctypes

import pytest

from server.infra import allocator

glibc = pytest.mark.skipif(allocator.libc() is None, reason="the C library is not glibc")


def test_parse_reads_names_and_integers() -> None:
    assert allocator.parse("arena_max=2, mmap_threshold=0x20000,") == {
        "arena_max": 2, "mmap_threshold": 131072}
    assert allocator.parse("") == {}


@pytest.mark.parametrize("bad", ["arena_max", "arenas=2", "arena_max=two"])
def test_parse_rejects_unknown_names_and_bad_values(bad: str) -> None:
    with pytest.raises(ValueError):
        allocator.parse(bad)


@glibc
def test_mallinfo2_sees_a_large_block_and_its_release() -> None:
    before = allocator.mallinfo2()
    assert before is not None
    # Over the mmap threshold, which glibc raises as mapped blocks are freed (up to 32 MiB on
    # 64-bit): after other tests a 4 MiB block can come from the heap. 64 MiB is always mapped.
    block = ctypes.create_string_buffer(64 << 20)
    during = allocator.mallinfo2()
    assert during is not None
    assert during["hblkhd"] - before["hblkhd"] >= 64 << 20
    del block
    after = allocator.mallinfo2()
    assert after is not None and after["hblkhd"] < during["hblkhd"]


@glibc
def test_malloc_info_lists_the_main_arena_and_totals() -> None:
    info = allocator.malloc_info()
    assert info is not None
    assert info["heaps"] and info["heaps"][0]["nr"] == 0
    assert info["heaps"][0]["system_current"] > 0
    total = info["total"]
    assert total["system_current"] >= info["heaps"][0]["system_current"]
    assert total["free"] == total["fast_bytes"] + total["rest_bytes"]


@glibc
def test_apply_sets_parameters_glibc_accepts() -> None:
    # glibc's own default on 64-bit (8 arenas per core before it checks for more); setting the
    # trim or mmap thresholds would end glibc's dynamic threshold for the rest of this process.
    assert allocator.apply({"arena_test": 8}) == {"arena_test": True}
    assert allocator.trim() in (True, False)
