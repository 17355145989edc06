"""Safe outputs, in ONE place: every moecore writer goes through these helpers.

- :func:`check_output_path`: an output may never resolve to, contain, or lie inside an input
  (symlinks and ``..`` resolved); ``overwrite`` never overrides this.
- :func:`atomic_output_dir`: write into ``.OUT.tmp-<pid>-<rand>`` beside ``OUT``, then
  :func:`publish_dir` swaps it in (``renameat2(RENAME_EXCHANGE)`` on Linux, else two renames).
- :func:`recover_interrupted`: the next run restores ``OUT`` from a ``.OUT.old-*`` left by a
  kill between the two renames, removes stale ``.OUT.tmp-*`` folders (skipping those whose
  process is alive) and says so on stderr.  ``.OUT.partial`` (resumable work) is not touched.
- a full disk (``ENOSPC`` / ``EFBIG`` / quota, also as a safetensors or tokenizers error), or
  any other ``OSError`` on the output, becomes one :class:`~moecore.errors.CheckpointError`
  naming the output (:func:`converting_write_errors`); :func:`user_path` does the same for a
  path the user named (:class:`~moecore.errors.FileAccessError`).
Folders and files follow the umask (``mkdtemp`` / ``mkstemp`` would make them private).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import CheckpointError, FileAccessError, MoecoreError

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DISK_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded", "os error 28",
                   "os error 27", "file write failed")


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc).strip() or type(exc).__name__


@contextlib.contextmanager
def user_path(path: str | os.PathLike, action: str = "read") -> Iterator[None]:
    """The boundary where a path the user named is read or written: an ``OSError`` raised in the
    block (missing file, a folder where a file is expected, permission denied, ...) becomes one
    :class:`~moecore.errors.FileAccessError` ``"cannot {action} {path}: {reason}"``.  Errors that
    are already moecore errors pass unchanged."""
    try:
        yield
    except MoecoreError:
        raise
    except OSError as exc:
        if isinstance(exc, FileExistsError) and exc.filename:  # e.g. mkdir where a file is
            raise FileAccessError(f"cannot {action} {path}: {exc.filename} is not a folder") from exc
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        raise FileAccessError(f"cannot {action} {path}: {_reason(exc)}{where}") from exc


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the new file, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600; follow the umask like open() does
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------- output vs input
def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> Path:
    """Return ``out`` resolved; ``CheckpointError`` if it resolves to, contains, or lies inside
    any existing input path (files or folders; ``None`` entries and non-paths are skipped)."""
    o = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None or not str(inp):
            continue
        i = Path(inp).expanduser()
        if not i.exists():
            continue  # e.g. a hub model id: nothing on disk to protect
        i = i.resolve()
        if o == i:
            raise CheckpointError(f"output {out} is the input {inp}; refusing to write over an input")
        if o.is_relative_to(i):
            raise CheckpointError(f"output {out} lies inside the input {inp}; refusing to write into an input")
        if i.is_relative_to(o):
            raise CheckpointError(f"output {out} contains the input {inp}; replacing it would destroy the input")
    return o


#: every input a writing command of this process declared (:func:`prepare_output`): what
#: :func:`remove_tree`, the one place moecore removes folders, never touches
_PROTECTED: set[Path] = set()


def protect_inputs(inputs: Iterable[str | os.PathLike | None]) -> None:
    """Record ``inputs`` (existing paths; others skipped) as never to be removed by this process."""
    for inp in inputs:
        if inp is not None and str(inp) and Path(inp).expanduser().exists():
            _PROTECTED.add(Path(inp).expanduser().resolve())


def protected_input(path: str | os.PathLike) -> Path | None:
    """The input of this process that ``path`` is, holds or lies inside (``None``: none)."""
    p = Path(path).expanduser()
    target = p.parent.resolve() / p.name  # the entry itself (a symlink is removed, not followed)
    for inp in sorted(_PROTECTED):
        if target == inp or inp.is_relative_to(target) or target.is_relative_to(inp):
            return inp
    return None


def remove_tree(path: str | os.PathLike, *, ignore_errors: bool = True) -> None:
    """Remove the folder ``path``: the one place moecore deletes one (work folders, staging and
    temporary outputs, old checkpoints).  ``CheckpointError`` if it is, contains or lies inside
    an input of this process (:func:`protect_inputs`): a work folder named like an input is
    refused, never deleted."""
    inp = protected_input(path)
    if inp is not None:
        raise CheckpointError(f"refusing to remove {path}: it is, holds or lies inside the input {inp}")
    shutil.rmtree(Path(path).expanduser(), ignore_errors=ignore_errors)


def model_source(model) -> str | None:
    """The local folder a model was loaded from (``name_or_path``), if any."""
    src = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(src) if src else None


# ---------------------------------------------------------------------------- interrupted runs
def _entry_re(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def say(msg: str) -> None:
    """Print ``moecore: msg`` on stderr (status lines of long work, never on stdout)."""
    print(f"moecore: {msg}", file=sys.stderr, flush=True)


def recover_interrupted(out: str | os.PathLike) -> list[str]:
    """Repair what an interrupted write of ``out`` left beside it, and report it on stderr:
    restore ``out`` from ``.OUT.old-*`` if ``out`` is missing (else delete the old copy),
    and delete ``.OUT.tmp-*``.  Entries of a still-running process are skipped.  Returns the
    messages printed."""
    out = Path(out).expanduser().resolve()
    parent, pat, msgs = out.parent, _entry_re(out), []
    if not parent.is_dir():
        return msgs
    found = [(p, m) for p in parent.iterdir() if (m := pat.match(p.name)) and not _alive(int(m.group(2)))]
    olds = sorted((p for p, m in found if m.group(1) == "old"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in olds:
        src = p / "d" if (p / "d").exists() else p  # the fallback rename keeps the old folder at OLD/d
        if not out.exists():
            os.rename(src, out)
            remove_tree(p)
            msgs.append(f"restored {out} from {p.name}, left by an interrupted replace")
        else:
            remove_tree(p)
            msgs.append(f"removed {p.name}, the previous {out.name} left by an interrupted replace")
    for p, m in found:
        if m.group(1) == "tmp" and p.exists():
            remove_tree(p)
            msgs.append(f"removed {p.name}, an incomplete output left by an interrupted run (pid {m.group(2)})")
    for msg in msgs:
        say(msg)
    return msgs


# ---------------------------------------------------------------------------- publish
def new_tmp_dir(out: str | os.PathLike) -> Path:
    """Create ``.OUT.tmp-<pid>-<rand>`` beside ``out`` (mode per umask) and return it."""
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp)  # 0o777 & ~umask
            return tmp
        except FileExistsError:
            continue


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under ``folder`` and the folder itself (durable before a rename)."""
    folder = Path(folder)
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False if unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(tmp: str | os.PathLike, out: str | os.PathLike, overwrite: bool) -> Path:
    """Make the complete folder ``tmp`` appear as ``out`` (fsync'd first).  An existing ``out``
    is replaced only with ``overwrite``: by one atomic exchange where the OS allows (a kill
    leaves either the old or the new ``out``), else by two renames whose interruption
    :func:`recover_interrupted` repairs.  Returns ``out``."""
    tmp, out = Path(tmp), Path(out).expanduser().resolve()
    mode = 0o666 & ~umask()
    for f in tmp.rglob("*"):  # safetensors writes its files 0600: every output file follows the umask
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)
    fsync_tree(tmp)
    if not out.exists():
        os.rename(tmp, out)
    elif not overwrite:
        raise CheckpointError(f"output directory already exists: {out} (use overwrite=True / --overwrite)")
    elif _exchange(tmp, out):
        remove_tree(tmp)  # tmp now holds the previous out
    else:
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
        os.rename(tmp, out)
        remove_tree(old)
    _fsync_dir(out.parent)
    return out


# ---------------------------------------------------------------------------- full disk
def disk_full(exc: BaseException) -> bool:
    """True if ``exc`` (an OSError, SafetensorError, tokenizers or torch error) means the disk
    or file-size limit is full."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    return any(t in str(exc) for t in _DISK_FULL_TEXT)


def _under(filename, out: Path) -> bool:
    """True if ``filename`` (an ``OSError``'s) is ``out``, inside it, or one of its temporary /
    work folders beside it (``.OUT.tmp-*``, ``.OUT.partial``, ...)."""
    if not filename:
        return False
    f = Path(os.fsdecode(filename)).expanduser().absolute()
    o = out.expanduser().absolute()
    if f == o or f.is_relative_to(o):
        return True
    return f != o.parent and f.is_relative_to(o.parent) and f.relative_to(o.parent).parts[0].startswith(f".{o.name}.")


@contextlib.contextmanager
def converting_write_errors(out: str | os.PathLike) -> Iterator[None]:
    """Turn a failure to write ``out`` inside the block into one ``CheckpointError`` naming it:
    a full disk (however the writing library reports it), or an ``OSError`` on ``out`` itself,
    a file inside it or its temporary folders beside it.  Other errors pass unchanged."""
    try:
        yield
    except MoecoreError:
        raise
    except Exception as exc:
        if disk_full(exc):
            raise CheckpointError(f"cannot write {out}: no space left on the device or file size limit "
                                  f"reached ({type(exc).__name__}); nothing was replaced") from exc
        if isinstance(exc, OSError) and (_under(exc.filename, Path(out)) or _under(exc.filename2, Path(out))):
            raise CheckpointError(f"cannot write {out}: {_reason(exc)} ({exc.filename})") from exc
        raise


def prepare_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                   overwrite: bool = False) -> Path:
    """Checks every writing command runs before any heavy work: ``out`` is not an input (nor
    inside / around one), interrupted earlier writes are repaired, and an existing ``out`` is
    only replaced with ``overwrite`` and only if it holds a model.  Returns ``out`` resolved."""
    inputs = list(inputs)
    o = check_output_path(out, inputs)
    protect_inputs(inputs)
    with user_path(out, "write"):
        recover_interrupted(o)
    if o.exists():
        if not overwrite:
            raise CheckpointError(f"output directory already exists: {out} (use overwrite=True / --overwrite)")
        if not o.is_dir():
            raise CheckpointError(f"output path exists and is not a directory: {out}")
        if any(o.iterdir()) and not (o / "config.json").is_file():
            raise CheckpointError(f"refusing to overwrite {out}: it is not empty and holds no model (no config.json)")
    return o


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yield a fresh ``.OUT.tmp-*`` folder; when the block succeeds it becomes ``out``
    (:func:`publish_dir`).  On any failure it is removed and ``out`` is left as it was."""
    o = prepare_output(out, inputs, overwrite)
    with user_path(out, "write"):
        tmp = new_tmp_dir(o)
    try:
        with converting_write_errors(out):
            yield tmp
            publish_dir(tmp, o, overwrite)
    finally:
        if tmp.exists():
            remove_tree(tmp)
