"""Atomic file writes: a temporary file in the same folder, then ``os.replace``.

An interrupted run never leaves a half-written checkpoint, manifest, map, picture or result
file. Every writer of the package goes through here.
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; keep normal permissions
        yield tmp
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
    """Move a fully written folder ``tmp`` to ``final``; the old ``final`` is removed only afterwards."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
