"""Where orchestrator keeps what it remembers (state) and what it can rebuild (caches). A leaf: every
room asks here, so a test's ORCHESTRATOR_CACHE / ORCHESTRATOR_STATE_DIR moves all of it at once."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path


def _home(env: Mapping[str, str]) -> str:
    """$HOME, else the user's home from the password database; never a literal '~' folder."""
    home = env.get("HOME") or os.path.expanduser("~")
    if home == "~" or not os.path.isabs(home):
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
    return home


def cache_dir(kind: str = "", environ: Mapping[str, str] | None = None) -> Path:
    """ORCHESTRATOR_CACHE, else $XDG_CACHE_HOME/orchestrator, else ~/.cache/orchestrator; `kind` names
    the sub-folder (engines, pyenvs, probes, modelfacts, plans, sources, build)."""
    env = os.environ if environ is None else environ
    base = env.get("ORCHESTRATOR_CACHE") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(_home(env), ".cache"), "orchestrator")
    return Path(base) / kind if kind else Path(base)


def state_dir(environ: Mapping[str, str] | None = None) -> str:
    """ORCHESTRATOR_STATE_DIR, else $XDG_STATE_HOME/orchestrator, else ~/.local/state/orchestrator."""
    env = os.environ if environ is None else environ
    if env.get("ORCHESTRATOR_STATE_DIR"):
        return env["ORCHESTRATOR_STATE_DIR"]
    base = env.get("XDG_STATE_HOME") or os.path.join(_home(env), ".local", "state")
    return os.path.join(base, "orchestrator")


class UnsafeOutput(Exception):
    """A file that write_file will not write: the message says what it is, the hint what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def _refuse_existing(target: Path, st: os.stat_result, protect: list[Path]) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeOutput(f"{target} is a symbolic link", "name the file itself: links are not followed")
    for other in protect:
        try:
            if os.path.samestat(st, other.stat()):
                raise UnsafeOutput(f"{target} is the profile being rendered", "write to another file")
        except OSError:
            continue
    if stat.S_ISDIR(st.st_mode):
        raise UnsafeOutput(f"{target} is a directory", "name a file in it")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise UnsafeOutput(f"{target} is not a regular file", "name a regular file, or leave out -o and redirect")


def _write_in_place(target: Path, data: bytes) -> None:
    """Character devices (/dev/null, a terminal) and FIFOs are written to, never replaced."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UnsafeOutput(f"cannot write {target}: {exc.strerror}",
                           "a FIFO needs a reader; or leave out -o and redirect") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_file(path: str | Path, text: str, protect: tuple[str | Path, ...] = ()) -> Path:
    """Write `text` to `path` safely: through a private temporary file (O_EXCL, random name) in the
    same folder, renamed over the target, keeping an existing file's mode (a new file gets the umask's).
    A symbolic link, a directory, one of `protect` (the input profile) or another special file is
    refused; a character device or FIFO is written in place, never replaced."""
    import tempfile

    target = Path(path)
    data = text.encode("utf-8")
    protect_paths = [Path(p) for p in protect]
    try:
        st: os.stat_result | None = os.lstat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UnsafeOutput(f"cannot write {target}: {exc.strerror}", "check the path") from None
    if st is not None:
        _refuse_existing(target, st, protect_paths)
        if not stat.S_ISREG(st.st_mode):
            _write_in_place(target, data)
            return target
        mode = stat.S_IMODE(st.st_mode)
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    folder = target.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:64]}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UnsafeOutput(f"cannot write in {folder}: {exc.strerror}",
                           "create the folder first, or name a file in a folder you can write") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def private_dir(folder: Path) -> Path:
    """`folder` and its missing parents created 0700; an existing folder we own is narrowed to 0700."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        if folder.stat().st_uid == os.getuid():
            folder.chmod(0o700)
    return folder


def write_private(path: Path, text: str) -> None:
    """A cache or state file: written 0600 in a 0700 folder, through a private temporary file (no
    reader ever sees half of it, no symlink is followed)."""
    import tempfile

    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def file_cache(kind: str, path: str | Path, *parts: object) -> Path | None:
    """Where facts about a file are cached (write them with write_private): keyed by `parts` and the
    file's resolved path, size, mtime and inode, so a file rewritten or replaced gets a new entry;
    None when the file cannot be stat'ed."""
    import hashlib

    try:
        real = Path(path).resolve()
        st = real.stat()
    except OSError:
        return None
    stamp = "|".join(str(x) for x in (*parts, real, st.st_size, st.st_mtime_ns, st.st_ino))
    return cache_dir(kind) / (hashlib.sha256(stamp.encode()).hexdigest()[:32] + ".json")


def lock_path(profile_file: str | Path) -> Path:
    """The lock file beside a profile: `homelab.yaml` → `homelab.lock.yaml`."""
    p = Path(profile_file)
    stem = p.name.rsplit(".", 1)[0] if p.suffix in (".yaml", ".yml") else p.name
    return p.with_name(f"{stem}.lock.yaml")
