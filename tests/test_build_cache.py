"""The build cache stays within its disk budget without evicting what is still in use."""
import io
import os
import time

import pytest

from llama_aot.compiler import build_cache
from llama_aot.compiler.build import Progress, build_artifact, input_hash
from llama_aot.compiler.checkpoint import open_checkpoint
from llama_aot.compiler.errors import BuildError

MB = 2**20


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_AOT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "builds"


def make_entry(builds, key, size, age_s):
    """An entry holding `size` bytes, last used `age_s` seconds ago."""
    entry = builds / key
    entry.mkdir(parents=True)
    (entry / "weights.safetensors").write_bytes(b"\0" * size)
    stamp = time.time() - age_s
    os.utime(entry, (stamp, stamp))
    return entry


def test_least_recently_used_entries_go_first(cache):
    for key, age in (("old", 300), ("mid", 200), ("new", 100)):
        make_entry(cache, key, MB, age)
    assert build_cache.prune(keep="new", max_bytes=int(1.5 * MB)) == ["old", "mid"]
    assert sorted(p.name for p in cache.iterdir()) == ["new"]


def test_the_entry_in_use_survives_a_budget_of_zero(cache):
    make_entry(cache, "current", MB, 500)
    make_entry(cache, "other", MB, 100)
    assert build_cache.prune(keep="current", max_bytes=0) == ["other"]
    assert (cache / "current").is_dir()


def test_an_entry_whose_artifact_exists_costs_nothing(cache, tmp_path):
    shared = make_entry(cache, "shared", 4 * MB, 500)
    build_cache.link_tree(shared, tmp_path / "artifact")
    make_entry(cache, "orphan", MB, 100)
    assert build_cache.prune(keep="none", max_bytes=2 * MB) == []
    assert build_cache.prune(keep="none", max_bytes=0) == ["orphan"]
    assert (cache / "shared").is_dir()


def test_killed_builds_staging_is_removed_once_stale(cache):
    stale = make_entry(cache, build_cache.STAGING_PREFIX + "stale", MB, build_cache.STALE_STAGING_S + 60)
    fresh = make_entry(cache, build_cache.STAGING_PREFIX + "fresh", MB, 60)
    build_cache.prune(keep="none", max_bytes=0)
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize("raw", ["lots", "-1", "nan", "inf"])
def test_a_bad_budget_is_refused_before_building(raw, monkeypatch, tiny_checkpoint, tiny_build, tmp_path):
    monkeypatch.setenv(build_cache.MAX_GB_ENV, raw)
    with pytest.raises(BuildError, match=build_cache.MAX_GB_ENV):
        build_artifact(tiny_checkpoint, tiny_build, tmp_path / "out", Progress(io.StringIO()))
    assert not (tmp_path / "out").exists()


def test_a_build_evicts_orphans_over_budget(monkeypatch, tiny_checkpoint, tiny_build, tiny_artifact, tmp_path):
    """A private cache holds the tiny build and the entry an older compiler built into `again`.
    Rebuilding `again` with a budget of zero is a cache hit, and the entry of the artifact it
    replaced goes in the same build."""
    ckpt = open_checkpoint(tiny_checkpoint)
    key = input_hash(ckpt, tiny_build.resolved(ckpt.config))
    session_entry = build_cache.entry_path(key)
    monkeypatch.setenv("LLAMA_AOT_CACHE", str(tmp_path / "cache"))
    build_cache.link_tree(session_entry, build_cache.entry_path(key))
    older = make_entry(build_cache.cache_root() / "builds", "from-an-older-compiler", MB, 1000)
    (older / "manifest.json").write_text("{}")
    build_cache.link_tree(older, tmp_path / "again")
    monkeypatch.setenv(build_cache.MAX_GB_ENV, "0")
    progress = Progress(io.StringIO())
    build_artifact(tiny_checkpoint, tiny_build, tmp_path / "again", progress)
    log = progress.stream.getvalue()
    assert "cache hit" in log and "evicted from-an-olde" in log
    assert sorted(p.name for p in (build_cache.cache_root() / "builds").iterdir()) == [key]


def test_a_read_only_cache_still_serves_hits(monkeypatch, tiny_checkpoint, tiny_build, tiny_artifact, tmp_path):
    """A cache shared read-only (a team's, or a container's baked-in one) cannot be marked as used
    or written, and must still give hits."""
    ckpt = open_checkpoint(tiny_checkpoint)
    key = input_hash(ckpt, tiny_build.resolved(ckpt.config))
    assert build_cache.lookup(key, tiny_build.target) is not None

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(build_cache.os, "utime", refuse)
    assert build_cache.lookup(key, tiny_build.target) == build_cache.entry_path(key)
