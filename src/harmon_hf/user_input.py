"""Telling what is wrong with a path, a model name or an error, in one line: shared by the `harmon` command, the
converter and training."""

import errno
import os
import re
from pathlib import Path


# The errors of a write that found no room: a full disk or quota, or a file size limit (`ulimit -f`).
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (library messages run to paragraphs), or its type for an empty one."""
    return next(iter(str(error).strip().splitlines()), type(error).__name__)


def is_missing_folder(name: str) -> bool:
    """Whether `name` can only mean a local folder, and there is none: a Hub id is NAME or OWNER/NAME, so for any
    other missing path the Hub client's complaint about the id's form would hide that the folder is missing."""
    looks_like_a_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    return looks_like_a_path and not Path(name).expanduser().is_dir()


def unwritable_folder(path: Path) -> Path | None:
    """The nearest existing path on the way to `path` (itself included) when it is not a folder this process may
    write in, else None. Raises OSError when a folder on the way may not be searched."""
    folder = next(candidate for candidate in (path, *path.parents) if candidate.exists())
    return None if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK) else folder


def system_error(error: BaseException) -> OSError | None:
    """The operating system's error behind `error`: itself for an OSError, the "(os error N)" that ends the message of
    a Rust library's error (safetensors, tokenizers, which raise no OSError), else None: not the system's doing."""
    if isinstance(error, OSError):
        return error
    match = re.search(r"\(os error (\d+)\)$", str(error).strip())
    return None if match is None else OSError(int(match[1]), os.strerror(int(match[1])))


def cannot_write(path, error: OSError) -> str:
    """One line on why `path` could not be written, saying it plainly when there was no room for it."""
    if error.errno in NO_ROOM:
        return f"cannot write {path}: the disk is full or a file size limit was reached ({error.strerror})"
    return f"cannot write {path}: {error.strerror or error}"
