"""File rules shared by every writer and reader of a bundle (or a calibration set):
content hashes, paths confined to their directory, and atomic publication of a directory."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def umask_mode(kind: str = "dir") -> int:
    """The mode the process's umask gives a new directory (``mkdtemp`` makes 0700, which locks
    other users of a shared model directory out of a bundle)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if kind == "dir" else 0o666) & ~mask


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def remove_stale(parent, prefix: str) -> list[Path]:
    """Remove ``parent/PREFIX<pid>-*`` entries whose process is gone (a killed writer's
    leftovers); -> what was removed. Entries of live processes and of other users stay."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        pid = e.name[len(prefix):].split("-", 1)[0].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        try:
            if e.lstat().st_uid != os.getuid():
                continue
            shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()
            removed.append(e)
        except OSError:
            pass
    return removed


def make_temp_dir(parent, prefix: str) -> Path:
    """``mkdtemp`` named ``PREFIX<pid>-XXXX`` (so a later run can tell a dead process's
    leftovers) with the umask's mode instead of 0700."""
    d = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    os.chmod(d, umask_mode())
    return d


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src, dst, flags: int) -> bool:
    """Linux renameat2(2); False where the C library or file system lacks it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(str(src)), AT_FDCWD, os.fsencode(str(dst)), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


class StagingDirectory:
    """A temporary sibling of ``target`` that is filled and then published in one rename.

    The staging directory is ``.NAME.tmp-<pid>-XXXX`` with the umask's mode; stale ones of dead
    processes are removed when a new one is made. ``publish(replace=False)`` is exclusive: it
    fails with ``FileExistsError`` when ``target`` appeared meanwhile (two writers: the later
    one loses, never silently replaces). ``publish(replace=True)`` swaps the directories in one
    atomic exchange where the system has it, so a reader sees the old directory or the new one,
    never none. ``discard()`` (or leaving a ``with`` block through an exception, including
    KeyboardInterrupt) removes the staging directory."""

    def __init__(self, target):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.prefix = f".{self.target.name}.tmp-"
        remove_stale(self.target.parent, self.prefix)
        remove_stale(self.target.parent, f".{self.target.name}.old-")
        self.path = make_temp_dir(self.target.parent, self.prefix)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.discard()
        return False

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def publish(self, replace: bool = True) -> Path:
        if not replace:
            if not _renameat2(self.path, self.target, _RENAME_NOREPLACE):
                if os.path.lexists(self.target):  # fallback: a small window remains
                    raise FileExistsError(errno.EEXIST, "exists", str(self.target))
                os.rename(self.path, self.target)
            return self.target
        if os.path.isdir(self.target) and not os.path.islink(self.target) \
                and _renameat2(self.path, self.target, _RENAME_EXCHANGE):
            shutil.rmtree(self.path, ignore_errors=True)  # now holds the old directory
            return self.target
        old = None
        if os.path.lexists(self.target):
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
        return self.target


def target_problem(out, force: bool = False, what: str = "output directory") -> str | None:
    """Why a directory could not be (re)placed at ``out``, found before any work (None: it can).
    Refuses names that are no directory to create ('.', '..'), the current directory or one
    above it, an existing file, an existing directory without ``force``, and a parent where
    nothing can be created (probed with an empty directory, removed at once: permission bits
    do not tell, e.g. for root in /proc)."""
    raw = os.fspath(out).rstrip("/")
    out = Path(out)
    name = os.path.basename(os.path.normpath(raw or "/"))
    if raw.endswith(("/.", "/..")) or raw in (".", "..", "") or name in ("", ".", ".."):
        return f"{out} does not name a new {what} (give a path such as out/name)"
    absolute = Path(os.path.abspath(out))
    cwd = Path(os.getcwd())
    if absolute == cwd or absolute in cwd.parents:
        return f"{out} is the current directory or one above it; refusing to replace it"
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            return f"{out} exists and is not a directory; refusing to replace it"
        if not force:
            return f"{out} already exists (use --force to replace it)"
    parent = next((a for a in absolute.parents if a.exists()), None)
    if parent is None or not parent.is_dir():
        return f"cannot write the {what} {out}: {parent} is not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".flexdit-probe-", dir=parent))
    except OSError as e:
        return f"cannot write the {what} {out}: cannot create anything in {parent} ({e.strerror or e})"
    return None


class OutsideError(ValueError):
    """A relative path that leaves its directory (``..``, absolute, or through a symbolic link)."""


def os_error_reason(e: BaseException) -> str:
    """An OSError (or pathlib's symlink-loop RuntimeError) as a short phrase for a one-line error."""
    if isinstance(e, RuntimeError) and "symlink loop" in str(e).lower():
        return "symlink loop"
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return reason[0].lower() + reason[1:] if reason else reason


def os_error_message(e: OSError) -> str:
    """'PATH: reason' for a CLI's one error line (the path when the error names one)."""
    return f"{e.filename}: {os_error_reason(e)}" if e.filename else os_error_reason(e)


def resolve_inside(root, rel: str) -> Path:
    """``root / rel`` with every symbolic link resolved; refuses a path that ends up outside
    ``root`` (a manifest entry or a linked file must never make a runtime read elsewhere)."""
    try:
        base = Path(root).resolve()
        p = (base / rel).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13), a name too long
        raise OutsideError(f"{rel} cannot be resolved: {os_error_reason(e)}") from None
    if Path(rel).is_absolute() or (p != base and base not in p.parents):
        raise OutsideError(f"{rel} points outside the bundle directory")
    return p
