"""Private folders and files for dumps.

A folder is created 0700 with an unguessable name and registered with loky's
resource tracker, so that a parent killed with SIGKILL leaves nothing behind
once the tracker notices. Files are created ``O_EXCL`` and 0600.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import shutil
import stat

from loky.backend import resource_tracker

from ._errors import TempFolderError
from ._options import ENV_TEMP_FOLDER

__all__ = [
    "FOLDER_PREFIX",
    "check_room",
    "check_safe_folder",
    "create_private_file",
    "free_bytes",
    "no_room_error",
    "make_missing_folders",
    "make_private_folder",
    "remove_folders_made",
    "remove_private_folder",
    "sweep_partial_results",
    "sweep_stale_folders",
    "unsafe_reason",
    "unlink_quietly",
]

FOLDER_PREFIX = "mmexec-"
_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


#: Result files being written by a worker: ``w<worker pid>-<random>.mmap``.
_WRITER_PREFIX = "w"
#: loky's named semaphores, ``/dev/shm/sem.loky-<pid>-<random>``.
_LOKY_SEMAPHORE_PREFIX = "sem.loky-"


@functools.cache
def pid_namespace() -> str:
    """Where this process's pid means something: ``<PID namespace inode>.<boot id>``, or '' if unknown.

    The inode of ``/proc/self/ns/pid`` tells namespaces of one machine apart
    (every machine's first one has the same inode); the boot id tells
    machines (and boots) apart, for a temp folder shared over the network.
    Neither changes during a process's life: read once.
    """
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip().replace("-", "")[:12]
    except OSError:
        return ""
    return f"{namespace:x}.{boot}" if boot else ""


def sweep_stale_folders(parent: str, dead_callers: set[int] | None = None) -> set[int]:
    """Remove what processes of this user that no longer exist left in ``parent``; their pids.

    Only a process killed together with loky's resource tracker (SIGKILL of a
    whole process group) leaves anything behind: our folder, holding at most
    the results that were in transit, and, in ``/dev/shm``, loky's named
    semaphores, which that tracker would have unlinked. (Unlinking a
    semaphore only removes its name: a process that still has it open can
    go on using it.)

    A pid means something only in its PID namespace, and ``/dev/shm`` may be
    shared across namespaces (``docker --ipc=host``): a folder is judged only
    if its name carries this process's namespace (``mmexec-<pid>-<ns>-...``),
    and loky's semaphores only for a caller proven dead that way, here or in
    ``dead_callers`` (found in another folder).
    """
    uid, namespace = os.getuid(), pid_namespace()
    dead = set(dead_callers or ())
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return dead
    semaphores = []
    for entry in entries:
        name = entry.name
        if name.startswith(_LOKY_SEMAPHORE_PREFIX):
            semaphores.append(entry)
            continue
        if not name.startswith(FOLDER_PREFIX) or not namespace:
            continue
        parts = name[len(FOLDER_PREFIX) :].split("-")
        if len(parts) != 3 or parts[1] != namespace:
            continue  # another PID namespace's (or an older mmexec's): its pid means nothing here
        try:
            pid = int(parts[0])
            st = entry.stat(follow_symlinks=False)
        except (OSError, ValueError):
            continue
        if st.st_uid == uid and stat.S_ISDIR(st.st_mode) and _dead(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            dead.add(pid)
    for entry in semaphores:
        try:
            pid = int(entry.name[len(_LOKY_SEMAPHORE_PREFIX) :].split("-", 1)[0])
            if pid in dead and entry.stat(follow_symlinks=False).st_uid == uid:
                os.unlink(entry.path)
        except (OSError, ValueError):
            continue
    return dead


def unsafe_reason(folder: str) -> str | None:
    """Why another user could swap what mmexec puts in ``folder``, or None when it is safe.

    Every folder from ``folder`` up to ``/`` must belong to this user or to
    root, and must not be writable by others unless it has the sticky bit
    (as ``/tmp`` and ``/dev/shm`` do): otherwise another user can rename our
    private folder (or one above it) and put one of theirs in its place, and
    then read the dumps and replace the results written there.
    """
    uid = os.getuid()
    path = os.path.realpath(folder)
    while True:
        try:
            st = os.stat(path)
        except OSError:  # not there (yet), or not a folder: creating it will say so
            st = None
        if st is not None:
            if st.st_uid not in (uid, 0):
                return f"{path!r} belongs to another user (uid {st.st_uid})"
            others_write = st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and not _own_group(st.st_gid))
            if others_write and not st.st_mode & stat.S_ISVTX:
                return f"{path!r} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}) without the sticky bit"
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def _own_group(gid: int) -> bool:
    """True when no other user belongs to group ``gid`` (a user-private group, as ``umask 002`` setups use)."""
    import grp
    import pwd

    uid = os.getuid()
    try:
        me = pwd.getpwuid(uid).pw_name
        members = set(grp.getgrgid(gid).gr_mem)
        others = {p.pw_name for p in pwd.getpwall() if p.pw_gid == gid and p.pw_uid != uid}
    except (KeyError, OSError):
        return False
    return members <= {me} and not others


def check_safe_folder(folder: str) -> None:
    """Raise :class:`TempFolderError` if ``folder`` is not safe for private data (:func:`unsafe_reason`)."""
    reason = unsafe_reason(folder)
    if reason is not None:
        raise TempFolderError(
            errno.EPERM,
            f"temp folder {folder!r} is not safe for private data: {reason}, so another user could replace "
            "the files mmexec writes there. Use a folder only you can write to, one with the sticky bit "
            f"(like /tmp or /dev/shm), or leave temp_folder and {ENV_TEMP_FOLDER} unset.",
        )


def make_missing_folders(folder: str) -> list[str]:
    """Create ``folder`` and any missing folder above it (mode 0700); the ones created, deepest first."""
    missing = []
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            missing.remove(path)  # made meanwhile by someone else: not ours to remove
        except OSError as exc:
            raise TempFolderError(
                exc.errno, f"cannot create the temp folder {folder!r}: {exc.strerror}. Choose a folder you can "
                f"write to with temp_folder=... or {ENV_TEMP_FOLDER}."
            ) from exc
    return missing


def remove_folders_made(folders: list[str]) -> None:
    """Remove the folders :func:`make_missing_folders` made, deepest first, if they are empty."""
    for path in folders:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def make_private_folder(parent: str) -> str:
    """Create ``parent/mmexec-<pid>-<random>`` with mode 0700 and track it (sweeping ``parent`` is the
    caller's: see :func:`sweep_stale_folders`)."""
    try:
        os.makedirs(parent, exist_ok=True)
        check_safe_folder(parent)
        path = os.path.join(parent, f"{FOLDER_PREFIX}{os.getpid()}-{pid_namespace() or '0'}-{secrets.token_hex(12)}")
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)
    except TempFolderError:
        raise
    except OSError as exc:
        raise TempFolderError(
            exc.errno,
            f"cannot create a private folder in {parent!r}: {exc.strerror}. "
            f"Choose a writable folder with temp_folder=... or the {ENV_TEMP_FOLDER} "
            "environment variable.",
        ) from exc
    resource_tracker.register(path, "folder")
    return path


def remove_private_folder(path: str) -> None:
    """Delete a folder made by :func:`make_private_folder` and everything in it."""
    shutil.rmtree(path, ignore_errors=True)
    resource_tracker.unregister(path, "folder")


def create_private_file(folder: str, suffix: str = ".mmap", writer: int | None = None) -> tuple[int, str]:
    """Create a new 0600 file with an unguessable name; return ``(fd, path)``.

    ``writer``: the pid of the worker that creates it for a result (named
    ``w<pid>-...``), so that :func:`sweep_partial_results` can remove it if
    that worker dies before the caller took it.
    """
    prefix = "" if writer is None else f"{_WRITER_PREFIX}{writer}-"
    path = os.path.join(folder, prefix + secrets.token_hex(16) + suffix)
    fd = os.open(path, _FILE_FLAGS, 0o600)
    return fd, path


def _dead(pid: int) -> bool:
    """True when ``pid`` no longer runs here (gone, or a zombie not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def sweep_partial_results(folder: str) -> list[str]:
    """Remove the result files in our ``folder`` whose writing worker died (partial writes); their paths."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(_WRITER_PREFIX):
            continue
        try:
            pid = int(name[len(_WRITER_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if _dead(pid):
            unlink_quietly(entry.path)
            removed.append(entry.path)
    return removed


def unlink_quietly(path: str) -> None:
    """Remove a file that may already be gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def free_bytes(folder: str) -> int:
    """Bytes available to this user in ``folder``'s file system."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def check_room(folder: str, nbytes: int) -> None:
    """Raise :class:`TempFolderError` when ``folder`` has no room for ``nbytes``."""
    free = free_bytes(folder)
    if nbytes > free:
        raise no_room_error(folder, nbytes, free)


def no_room_error(folder: str, nbytes: int, free: int | None = None) -> TempFolderError:
    """The error for a full folder: names it, the bytes needed and free, and the fix."""
    if free is None:
        try:
            free = free_bytes(folder)
        except OSError:
            free = -1
    return TempFolderError(
        errno.ENOSPC,
        f"not enough space in {folder!r} to memory-map an array: {nbytes:,} bytes "
        f"needed, {free:,} bytes free. Pass temp_folder=... (or set the "
        f"{ENV_TEMP_FOLDER} environment variable) to a folder with more room, or "
        "raise max_nbytes / pass max_nbytes=None to send arrays by pickling.",
    )
