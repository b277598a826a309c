"""Where Numba keeps the compiled kernels: one directory per version of the kernel sources.

Numba's on-disk cache (``cache=True``) files a function's machine code under the directory of
its source file and checks, before reusing it, only that one file (its content hash in Numba
0.68, its mtime and size in older releases), the function's own bytecode, the Numba version
and the CPU. It does not look at the modules whose functions the kernel inlines or calls
(``kernels/vecmath.py``, ``kernels/simd.py``, ``cpu._accumulate_product`` inlined into the
network kernels): after an edit there, Numba would keep loading the old machine code.
Hence one cache directory per hash of every file under ``elmcore/kernels/`` plus the Numba,
llvmlite and Python versions: any change to the kernel sources starts from an empty cache.
Inside it Numba still keys on the source file's path, so two checkouts with the same kernel
sources share the directory without sharing entries.

Only the standard library here: this runs from ``elmcore/__init__.py`` before Numba loads.
"""

import hashlib
import os
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent / "kernels"
CACHE_PREFIX = "numba-"
# The directory this module chose, exported with it: a child process (MPI ranks, sweep
# workers, a test's subprocess) inherits NUMBA_CACHE_DIR and must still tell elmcore's
# choice, which it recomputes for its own sources, from one the user made.
OWN_CHOICE_VARIABLE = "ELMCORE_NUMBA_CACHE_DIR"
# Other versions' directories are removed once unused for a week, rather than keeping the
# N most recent: a developer switches between branches and worktrees whose kernels differ,
# and a count would make them evict each other and recompile for minutes after each
# switch; a week unused means that version is most likely gone. A directory's mtime is
# its last use (configure() touches it on every import).
MAX_UNUSED_S = 7 * 24 * 3600


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def cache_key(kernels_dir: Path = KERNELS_DIR) -> str:
    """16 hex digits that change with any kernel source file, Numba, llvmlite or Python."""
    digest = hashlib.sha256()
    for part in (_package_version("numba"), _package_version("llvmlite"), sys.version):
        digest.update(part.encode() + b"\0")
    for path in sorted(Path(kernels_dir).rglob("*.py")):
        text = path.read_bytes()
        # Name and length before the text, so that moving code between files or renaming
        # a file changes the key too.
        digest.update(path.relative_to(kernels_dir).as_posix().encode() + b"\0")
        digest.update(str(len(text)).encode() + b"\0" + text)
    return digest.hexdigest()[:16]


def cache_roots() -> list:
    """Where the per-version directories may live, in order of preference."""
    roots = []
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    if os.path.isabs(xdg):
        roots.append(Path(xdg) / "elmcore")
    else:
        try:
            roots.append(Path.home() / ".cache" / "elmcore")
        except RuntimeError:  # no home directory can be determined
            pass
    # A per-user folder, so nobody else can plant cache files this process would load.
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    roots.append(Path(tempfile.gettempdir()) / f"elmcore-{user}")
    return roots


def _usable(directory: Path) -> bool:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Numba unpickles what it finds there, so the folder and its parent must be ours.
        if hasattr(os, "getuid") and any(p.stat().st_uid != os.getuid() for p in (directory, directory.parent)):
            return False
        tempfile.TemporaryFile(dir=directory).close()
        os.utime(directory)  # marks the last use, for prune()
        return True
    except OSError:
        return False


def prune(root: Path, keep: Path, max_unused_s: float = MAX_UNUSED_S) -> list:
    """Remove the other versions' directories under `root` unused for `max_unused_s`."""
    removed = []
    now = time.time()
    for directory in root.glob(CACHE_PREFIX + "*"):
        try:
            if directory == keep or not directory.is_dir() or now - directory.stat().st_mtime < max_unused_s:
                continue
        except OSError:
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


def configure():
    """Point Numba at this kernel version's cache directory unless the user set NUMBA_CACHE_DIR.

    Returns the directory chosen, or None (the user's choice stands, or nothing was writable:
    then Numba falls back to its own locations). Never raises: a cache is not worth a failed import.
    """
    chosen = os.environ.get("NUMBA_CACHE_DIR")
    if chosen and chosen != os.environ.get(OWN_CHOICE_VARIABLE):
        return None
    try:
        name = CACHE_PREFIX + cache_key()
        directory = next((root / name for root in cache_roots() if _usable(root / name)), None)
        if directory is None:
            return None
        prune(directory.parent, keep=directory)
    except Exception:
        return None
    os.environ["NUMBA_CACHE_DIR"] = os.environ[OWN_CHOICE_VARIABLE] = str(directory)
    # Numba reads NUMBA_CACHE_DIR when it loads; if something imported it before elmcore,
    # its config (and numba-cuda's copy) must be told directly, before any kernel is defined.
    for config_module in ("numba.core.config", "numba.cuda.core.config"):
        config = sys.modules.get(config_module)
        if config is not None:
            config.CACHE_DIR = str(directory)
    return directory
