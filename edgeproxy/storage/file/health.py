"""Whether a file storage root is safe and tidy: the checks behind ``check`` and start-up.

Owns what makes a root unsafe (``root_problems``), wrong modes on what lies below it, and
finding temp files an interrupted writer left. Must not know what the files hold beyond
spotting a PEM private key. Blocking.

Theory of operation
-------------------
*The root must be ours alone.* Whoever can replace the root, or plant entries in it, can read
or swap private keys whatever the modes below it. ``root_problems`` names what makes a root
unsafe: a symbolic link, a folder others may write to or owned by someone else, or a parent
folder others may write to without the sticky bit (they could rename the root away and put
their own in its place). The process refuses such a root at start; ``check`` reports it.

*Temp files.* A writer killed between create and rename leaves its temp file behind; ``check``
reports it and ``clean`` removes it once it is older than the grace (younger ones may belong to
a writer still at work in another process).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from edgeproxy.storage.file.atomic import is_temp_name, read_file

__all__ = ["old_temp_files", "permission_problems", "root_problems"]

# A PEM private key anywhere in a file marks it as secret for ``check`` (storage records no
# per-file flag; the mode *is* the record, so a wrong mode can only be spotted by content).
_PEM_KEY_MARK = b"PRIVATE KEY-----"
_SECRET_SNIFF_LIMIT = 1 << 20


def old_temp_files(
    entries: Iterable[os.DirEntry[str]], now: float, grace: float
) -> list[tuple[Path, float]]:
    """Of ``entries`` (``FileTree.entries``, whole or a page of it), the temp files older than
    ``grace``. Judged by name first: only a temp file's name costs a ``stat`` or a ``Path``."""
    found = []
    for entry in entries:
        if not is_temp_name(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # renamed into place (or cleaned) meanwhile
        if stat.S_ISREG(st.st_mode) and now - st.st_mtime > grace:
            found.append((Path(entry.path), now - st.st_mtime))
    return found


def root_problems(root: Path) -> list[str]:
    """What lets someone other than us (or root) replace ``root`` or write into it.

    A root that does not exist yet is judged by the folders it would be created in.
    """
    problems: list[str] = []
    trusted = {os.geteuid(), 0}
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        return [f"storage root {root}: a parent is not a folder (fix storage.path)"]
    if st is not None:
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            problems.append(
                f"storage root {root} is a symbolic link (to {os.readlink(root)}): whoever can "
                "change the link can swap the storage (point storage.path at the real folder)"
            )
        elif not stat.S_ISDIR(st.st_mode):
            problems.append(f"storage root {root} is not a folder (fix storage.path)")
        else:
            if mode & 0o002:
                problems.append(
                    f"storage root {root} is writable by everyone (mode {mode:04o}): anyone "
                    f"can plant or swap entries in it (chmod 700 {root})"
                )
            if st.st_uid not in trusted:
                problems.append(
                    f"storage root {root} belongs to uid {st.st_uid}, not to this process "
                    f"(uid {os.geteuid()}) or root: its owner can swap it (chown it)"
                )
    # Every existing folder above: others must not be able to rename the root away.
    parent = Path(os.path.realpath(root.parent if st is not None else root))
    for folder in (parent, *parent.parents):
        try:
            pst = os.stat(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue  # created on demand, 0700, by us
        pmode = stat.S_IMODE(pst.st_mode)
        sticky = bool(pst.st_mode & stat.S_ISVTX)
        if (pmode & 0o002 and not sticky) or pst.st_uid not in trusted:
            problems.append(
                f"storage root {root}: parent folder {folder} (mode {pmode:04o}, uid "
                f"{pst.st_uid}) lets others rename the root and put their own in its place "
                "(keep the storage under folders only root or this user can write to)"
            )
    return problems


def permission_problems(path: Path, st: os.stat_result) -> list[str]:
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        if mode & 0o077:
            return [f"folder {path} has mode {mode:04o}; expected 0700 (chmod 700)"]
        return []
    if not stat.S_ISREG(st.st_mode):
        return []
    if mode & 0o022:
        return [f"file {path} is writable by group/others (mode {mode:04o})"]
    if mode & 0o044 and st.st_size <= _SECRET_SNIFF_LIMIT and _holds_private_key(path):
        return [f"secret file {path} has mode {mode:04o}; expected 0600 (chmod 600)"]
    return []


def _holds_private_key(path: Path) -> bool:
    raw = read_file(path)
    return raw is not None and _PEM_KEY_MARK in raw
