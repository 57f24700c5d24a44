"""File rules shared by every writer and reader of a bundle (or a calibration set) and by the
runtimes' output directories: content hashes, paths confined to their directory, and atomic
publication of a directory."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def mount_points() -> set[str]:
    """Every mount point of this process's mount namespace (bind mounts of a directory on its own
    file system included, which ``os.path.ismount`` misses); empty where /proc is not mounted."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            fields = [line.split(" ") for line in f]
    except OSError:
        return set()
    octal = re.compile(r"\\([0-7]{3})")  # mountinfo writes a space as \040
    return {octal.sub(lambda m: chr(int(m.group(1), 8)), f[4]) for f in fields if len(f) > 4}


def _probe(parent) -> OSError | None:
    """Whether a new directory can be made in ``parent`` (made and removed at once: permission
    bits do not tell, e.g. for root in /proc or on a read-only mount)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".flexdit-probe-", dir=parent))
    except OSError as e:
        return e
    return None


def writes_into(target) -> bool:
    """Whether an existing ``target`` directory cannot be replaced by a rename, so a publication
    has to write into it: a mount point (a Docker volume's root: EBUSY) or a directory whose
    parent takes no new entries."""
    target = Path(target)
    if not target.is_dir() or target.is_symlink():
        return False
    real = os.path.realpath(target)
    return os.path.ismount(real) or real in mount_points() or _probe(Path(real).parent) is not None


def entry_label(path: Path) -> str:
    """An entry's name for a message, with ``/`` after a directory (``ls -F``)."""
    return path.name + ("/" if path.is_dir() and not path.is_symlink() else "")


class ForeignEntries(Exception):
    """The target holds entries the publication may not replace (``labels``: their names)."""

    def __init__(self, labels: list[str]):
        super().__init__(", ".join(labels))
        self.labels = labels


class StagingDirectory:
    """A temporary directory that is filled and then published as ``target``.

    The staging directory is ``.NAME.tmp-<pid>-XXXX`` with the umask's mode, beside ``target``
    (inside it where ``writes_into``: a mount point cannot be renamed); stale ones of dead
    processes are removed when a new one is made. ``publish(replace=False)`` is exclusive: it
    fails with ``FileExistsError`` when ``target`` appeared (or, written into, filled) meanwhile:
    two writers, the later one loses, never silently replaces. ``publish(replace=True)`` swaps
    the directories in one atomic exchange where the system has it, so a reader sees the old
    directory or the new one, never none; written into, each entry is replaced by a rename.
    ``replaceable(path)`` limits what of an existing target may go: anything else, found when
    publishing, raises ``ForeignEntries`` with nothing changed. ``discard()`` (or leaving a
    ``with`` block through an exception, including KeyboardInterrupt) removes the staging
    directory."""

    def __init__(self, target):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.into = writes_into(self.target)
        where = self.target if self.into else self.target.parent
        self.prefix = f".{self.target.name}.tmp-"
        remove_stale(where, self.prefix)
        remove_stale(where, f".{self.target.name}.old-")
        self.path = make_temp_dir(where, self.prefix)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.discard()
        return False

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _entries(self, directory: Path) -> list[Path]:
        return sorted(e for e in directory.iterdir() if e != self.path)

    def _check(self, directory: Path, replaceable) -> list[Path]:
        entries = self._entries(directory)
        foreign = [entry_label(e) for e in entries if replaceable is not None and not replaceable(e)]
        if foreign:
            raise ForeignEntries(foreign)
        return entries

    @staticmethod
    def _remove(entries) -> None:
        for e in entries:
            shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()

    def publish(self, replace: bool = True, replaceable=None) -> Path:
        if self.into:
            return self._publish_into(replace, replaceable)
        if not replace:
            if not _renameat2(self.path, self.target, _RENAME_NOREPLACE):
                if os.path.lexists(self.target):  # fallback: a small window remains
                    raise FileExistsError(errno.EEXIST, "exists", str(self.target))
                os.rename(self.path, self.target)
            return self.target
        is_dir = os.path.isdir(self.target) and not os.path.islink(self.target)
        if is_dir:
            self._check(self.target, replaceable)
            if _renameat2(self.path, self.target, _RENAME_EXCHANGE):
                try:  # the staging path now holds the old directory: what came in since the check?
                    old = self._check(self.path, replaceable)
                except ForeignEntries:
                    _renameat2(self.path, self.target, _RENAME_EXCHANGE)  # back: nothing replaced
                    raise
                self._remove(old)
                os.rmdir(self.path)
                return self.target
        old = None
        if os.path.lexists(self.target):  # fallback without renameat2: a moment without target
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
            try:
                entries = self._check(old, replaceable) if is_dir else [old]
            except ForeignEntries:
                os.replace(old, self.target)
                raise
        os.replace(self.path, self.target)
        if old is not None:
            self._remove(entries)
            if is_dir:
                os.rmdir(old)
        return self.target

    def _publish_into(self, replace: bool, replaceable) -> Path:
        if self._entries(self.target) and not replace:
            raise FileExistsError(errno.EEXIST, "not empty", str(self.target))
        old = self._check(self.target, replaceable)
        new = self._entries(self.path)
        names = {e.name for e in new}
        self._remove(e for e in old if e.name in names and e.is_dir() and not e.is_symlink())
        for e in new:
            os.replace(e, self.target / e.name)
        self._remove(e for e in old if e.name not in names)
        os.rmdir(self.path)
        return self.target


def write_problem(out, what: str = "output directory") -> str | None:
    """Why nothing could be written at ``out`` (None: it can): its nearest existing ancestor must
    take a new directory, or, where ``out`` itself is written into (``writes_into``), ``out``."""
    absolute = Path(os.path.abspath(out))
    if writes_into(absolute):
        parent = absolute
    else:
        parent = next((a for a in absolute.parents if a.exists()), None)
        if parent is None or not parent.is_dir():
            return f"cannot write the {what} {out}: {parent} is not a directory"
    e = _probe(parent)
    if e is not None:
        return f"cannot write the {what} {out}: cannot create anything in {parent} ({e.strerror or e})"
    return None


def target_problem(out, force: bool = False, what: str = "output directory") -> str | None:
    """Why a directory could not be (re)placed at ``out``, found before any work (None: it can).
    Refuses names that are no directory to create ('.', '..'), the current directory or one
    above it, an existing file or symbolic link, an existing directory without ``force``, and
    a place where nothing can be written (``write_problem``)."""
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
    return write_problem(out, what)


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
