"""Private files and folders whatever the umask, and the check for ones left open to others.

Everything Postroom creates holds mail, credentials or the key that decrypts them: folders are
made 0700 and files 0600. The mode given to ``mkdir``/``open`` is only an upper bound (the
umask removes bits from it, and a umask of 022 or 000 is common under service managers and
containers), so what is created is ``chmod``-ed to the exact mode.

What already exists is never changed: an operator may share the data folder with a group on
purpose (``postroom-sendmail`` run by another user writes the store), or it may be a mounted
volume. :func:`open_to_others` names such paths so that ``postroom serve`` can warn about them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, TextIO, overload

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600

# "w": create or replace the whole content; "x": create, FileExistsError if it exists.
_FLAGS = {
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
}


def private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents as 0700 folders; return ``path``.

    Folders that exist keep their mode (see the module docstring); one made by another
    process at the same moment counts as existing."""
    missing: list[Path] = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_DIR)
        except FileExistsError:
            continue
        os.chmod(d, PRIVATE_DIR)
    if not path.is_dir():
        # A file (or a dangling symlink) where a folder is wanted: say so plainly rather
        # than fail later with ENOTDIR on a path the user never typed.
        raise NotADirectoryError(20, "exists and is not a folder", str(path))
    return path


@overload
def open_private(path: Path, mode: Literal["wb", "xb"] = ...) -> BinaryIO: ...


@overload
def open_private(path: Path, mode: Literal["w", "x"], **text: Any) -> TextIO: ...


def open_private(path: Path, mode: Literal["w", "x", "wb", "xb"] = "wb",
                 **text: Any) -> IO[Any]:
    """``open()`` for content that is the user's alone: the file is 0600 once opened.

    ``w``/``wb`` create or truncate (a file being replaced is made 0600 too: it is getting
    new, private content); ``x``/``xb`` refuse an existing file. ``text`` is passed to
    ``open`` in text mode (encoding, newline)."""
    fd = os.open(path, _FLAGS[mode[0]] | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        return os.fdopen(fd, mode.replace("x", "w"), **text)
    except BaseException:
        os.close(fd)
        raise


def open_to_others(path: Path) -> int | None:
    """The permission bits of ``path`` when group or others have any access to it, else
    None (also when it does not exist)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    return mode if mode & 0o077 else None
