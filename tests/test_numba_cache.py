"""The Numba cache directory follows the kernel sources (elmcore/numba_cache.py)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numba
import pytest

from elmcore import numba_cache

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def kernels_copy(tmp_path):
    copy = tmp_path / "kernels"
    shutil.copytree(numba_cache.KERNELS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_the_key_depends_on_the_kernel_sources_not_their_location(kernels_copy):
    assert numba_cache.cache_key(kernels_copy) == numba_cache.cache_key()


@pytest.mark.parametrize("module", ["vecmath.py", "simd.py", "cpu.py"])
def test_editing_an_inlined_module_changes_the_directory(kernels_copy, module):
    before = numba_cache.cache_key(kernels_copy)
    path = kernels_copy / module
    path.write_text(path.read_text() + "\n# an edit Numba's own cache check would not see in the caller\n")
    assert numba_cache.cache_key(kernels_copy) != before


def test_a_new_kernel_module_changes_the_directory(kernels_copy):
    before = numba_cache.cache_key(kernels_copy)
    (kernels_copy / "pointwise.py").write_text("")
    assert numba_cache.cache_key(kernels_copy) != before


def test_numba_versions_are_part_of_the_key(kernels_copy, monkeypatch):
    before = numba_cache.cache_key(kernels_copy)
    monkeypatch.setattr(numba_cache, "_package_version", lambda name: "0.0-" + name)
    assert numba_cache.cache_key(kernels_copy) != before


def test_prune_removes_only_other_versions_unused_for_a_week(tmp_path):
    week_ago = time.time() - numba_cache.MAX_UNUSED_S - 60
    current, stale, recent = (tmp_path / f"numba-{name}" for name in ("current", "stale", "recent"))
    unrelated = tmp_path / "notes"
    for directory in (current, stale, recent, unrelated):
        directory.mkdir()
        (directory / "entry.nbi").write_bytes(b"x")
    for directory in (current, stale, unrelated):
        os.utime(directory, (week_ago, week_ago))
    assert numba_cache.prune(tmp_path, keep=current) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "numba-current", "numba-recent"]


def test_configure_never_raises_and_leaves_numba_alone_when_nothing_is_writable(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.delenv(numba_cache.OWN_CHOICE_VARIABLE, raising=False)
    monkeypatch.setattr(numba.core.config, "CACHE_DIR", "unchanged")
    monkeypatch.setattr(numba_cache, "cache_roots", lambda: [blocker / "elmcore"])
    assert numba_cache.configure() is None
    assert "NUMBA_CACHE_DIR" not in os.environ
    assert numba.core.config.CACHE_DIR == "unchanged"


def test_configure_survives_an_unreadable_kernel_tree(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(numba.core.config, "CACHE_DIR", "unchanged")

    def broken(kernels_dir=None):
        raise PermissionError("kernels unreadable")

    monkeypatch.setattr(numba_cache, "cache_key", broken)
    assert numba_cache.configure() is None
    assert numba.core.config.CACHE_DIR == "unchanged"


# A fresh interpreter: where elmcore points Numba, and where the files of a cached function land
# (COMPILE: whether to compile one and so write them).
PROBE = """
import json, elmcore, numba
from elmcore.kernels.cpu import scan_forward
import probe_module
if COMPILE:
    probe_module.increment(1)
print(json.dumps({"config": numba.config.CACHE_DIR, "kernel": scan_forward._cache.cache_path,
                  "probe": probe_module.increment._cache.cache_path}))
"""
PROBE_MODULE = """
from numba import njit

@njit(cache=True)
def increment(x):
    return x + 1
"""


def probe(tmp_path, compile=False, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", numba_cache.OWN_CHOICE_VARIABLE)}
    env.update({"XDG_CACHE_HOME": str(tmp_path / "xdg"), "TMPDIR": str(tmp_path / "tmp"), **env_changes})
    (tmp_path / "tmp").mkdir(exist_ok=True)
    (tmp_path / "probe_module.py").write_text(PROBE_MODULE)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(tmp_path), str(REPO), env.get("PYTHONPATH")] if p)
    code = PROBE.replace("COMPILE", str(compile))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_numba_caches_into_the_directory_of_these_kernel_sources(tmp_path):
    expected = tmp_path / "xdg" / "elmcore" / f"numba-{numba_cache.cache_key()}"
    seen = probe(tmp_path, compile=True)
    assert seen["config"] == str(expected)
    assert Path(seen["kernel"]).parent == expected
    assert Path(seen["probe"]).parent == expected
    assert list(Path(seen["probe"]).glob("probe_module.increment-*.nbi"))


@pytest.mark.slow
def test_the_users_numba_cache_dir_wins(tmp_path):
    mine = tmp_path / "mine"
    seen = probe(tmp_path, NUMBA_CACHE_DIR=str(mine))
    assert seen["config"] == str(mine)
    assert Path(seen["kernel"]).parent == mine
    assert not (tmp_path / "xdg").exists()


@pytest.mark.slow
def test_a_choice_inherited_from_a_parent_process_is_recomputed(tmp_path):
    inherited = str(tmp_path / "xdg" / "elmcore" / "numba-0000000000000000")
    seen = probe(tmp_path, NUMBA_CACHE_DIR=inherited, **{numba_cache.OWN_CHOICE_VARIABLE: inherited})
    assert seen["config"] == str(tmp_path / "xdg" / "elmcore" / f"numba-{numba_cache.cache_key()}")


@pytest.mark.slow
def test_an_unwritable_cache_home_falls_back_to_a_private_temp_folder(tmp_path):
    (tmp_path / "xdg-is-a-file").write_text("")
    seen = probe(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg-is-a-file"))
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    assert seen["config"] == str(tmp_path / "tmp" / f"elmcore-{user}" / f"numba-{numba_cache.cache_key()}")
