import sys

import pytest

from core import allocator


@pytest.fixture
def library_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "LIBRARY_DIRS", (str(tmp_path / "missing"), str(tmp_path)))
    return tmp_path


def test_tcmalloc_is_preloaded_where_it_is_installed(library_dir):
    (library_dir / allocator.TCMALLOC).write_bytes(b"")
    env = allocator.preload_environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "LD_PRELOAD": str(library_dir / allocator.TCMALLOC)}


def test_nothing_changes_without_tcmalloc_or_when_something_is_preloaded(library_dir):
    assert allocator.preload_environment({"PATH": "/bin"}) == {"PATH": "/bin"}
    (library_dir / allocator.TCMALLOC).write_bytes(b"")
    assert allocator.preload_environment({"LD_PRELOAD": "/x/libjemalloc.so.2"}) == {
        "LD_PRELOAD": "/x/libjemalloc.so.2"
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_freed_memory_is_handed_back_on_glibc():
    assert allocator.release_free_memory() is True
