"""Atomic file writes: a temporary file in the same folder, then ``os.replace``.

An interrupted run never leaves a half-written checkpoint, manifest, map, picture or result
file. Every writer of the package goes through here. What appears gets the mode a plain
``open()`` or ``mkdir`` would give under the process's umask (0644 / 0755 under umask 022), not the
0600 / 0700 of temporary files: a service under another account can read a colleague's checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator, Union

from .errors import MoECLIPError

PathLike = Union[str, os.PathLike]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: read once at import: setting the umask to read it is not thread-safe (serve, decode threads)
_UMASK = _read_umask()


def plain_mode(path: PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes ``open()``/``mkdir`` would."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        os.chmod(path, 0o777 & ~_UMASK)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~_UMASK)
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    os.chmod(os.path.join(root, f), 0o666 & ~_UMASK)
    else:
        os.chmod(path, 0o666 & ~_UMASK)


@contextlib.contextmanager
def _temporary(path: PathLike, overwrite: bool) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; on success it replaces ``path``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MoECLIPError(f"{path}: already exists; pass --overwrite to replace it")
    if path.is_dir():
        raise MoECLIPError(f"{path}: is a folder, expected a file name")
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; keep normal permissions
        yield tmp
        # again: some writers (safetensors) replace the file with one of their own, 0600
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: PathLike, write: Callable[[str], None], *, overwrite: bool = True) -> None:
    """``write(tmp_path)`` fills a temporary file that then replaces ``path`` in one step."""
    with _temporary(path, overwrite) as tmp:
        write(tmp)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", *, overwrite: bool = True) -> Iterator[IO]:
    """``with atomic_open(p) as fh: np.save(fh, a)``: the file appears complete or not at all."""
    with _temporary(path, overwrite) as tmp:
        with open(tmp, mode) as fh:
            yield fh


def atomic_write_text(path: PathLike, text: str, *, overwrite: bool = True) -> None:
    with atomic_open(path, "w", overwrite=overwrite) as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: PathLike, data: bytes, *, overwrite: bool = True) -> None:
    with atomic_open(path, "wb", overwrite=overwrite) as fh:
        fh.write(data)


def atomic_copy(src: PathLike, dst: PathLike) -> None:
    """Copy ``src`` over ``dst`` in one step (readers see the old or the new file)."""
    atomic_write(dst, lambda tmp: shutil.copy2(src, tmp))


def replace_dir(tmp: PathLike, final: PathLike) -> None:
    """Move a fully written folder ``tmp`` to ``final``; the old ``final`` is removed only afterwards.

    The folder and its files get plain modes first (``tempfile.mkdtemp`` makes 0700 folders).
    """
    tmp, final = Path(tmp), Path(final)
    plain_mode(tmp)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
