"""Finding data files below a folder, safely: what ``glob('**/PATTERN', recursive=True)`` finds,
but finite when symbolic links form loops (glob follows ``a -> .`` and ``b -> .``
into 2**depth paths and never returns)."""

import fnmatch
import os


def find_files(directory, pattern, first_only=False):
    """Files below ``directory`` at any depth whose name matches ``pattern``, unsorted.

    Links to folders are followed, each folder is visited once (by device and
    inode), and names starting with ``.`` are skipped, as glob does.
    """
    found, seen = [], set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in fnmatch.filter(files, pattern):
            if not name.startswith("."):
                found.append(os.path.join(root, name))
                if first_only:
                    return found
    return found
