"""One guarded path for every file a run writes: whole or absent, and a full disk in one line.

A file is written under a temporary name next to its own (`.NAME.partial.SUFFIX`, keeping the
suffix so writers that infer the format from it still do), flushed to disk (fsync) and renamed
over the final name (`os.replace`, atomic within a file system); a directory is assembled as
`.NAME.partial/` and renamed the same way (`staged_directory`). A reader never sees half a file,
a crash leaves at most a hidden `.partial` that the next write replaces, and a failed write
removes its `.partial`.

A full disk (ENOSPC or EDQUOT from Python, "os error 28" from safetensors' Rust writer, ffmpeg's
"No space left on device") becomes `DiskFullError`, one line naming the path and the free space;
the CLIs print it and exit 1. Several ranks writing parts of one thing agree on a failure
(`collective_write`), so a rank whose disk filled does not leave the others waiting in a
collective.

Used by checkpoints (distill/checkpoint.py), the export (expert folders, LoRA files,
generator.json, the pipeline folder), history.json, config.yaml, previews, and prepare's
condition shards.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how safetensors (Rust), torch.save and ffmpeg report a full disk in their messages
_FULL_MESSAGES = ("os error 28", "os error 122", "no space left on device", "disk quota exceeded")


class DiskFullError(OSError):
    """No room to write a file of the run; `strerror` is the one-line message."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) is a full disk or an exceeded quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError) or getattr(error, "errno", None) in _FULL_ERRNOS:
            return True
        if any(text in str(error).lower() for text in _FULL_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False


def free_mib(path: Path) -> float:
    """Free space of the file system holding `path` (or its nearest existing parent), MiB."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 2**20


def disk_full(path: Path, what: str = "") -> DiskFullError:
    """The one-line error for a full disk while writing `path`."""
    return DiskFullError(
        f"disk full writing {what or path} ({free_mib(path):.1f} MiB free in "
        f"{Path(path).parent}); nothing partial was kept; free space and rerun"
    )


@contextlib.contextmanager
def disk_full_as_error(path: Path, what: str = "") -> Iterator[None]:
    """Turn a full-disk error raised in the block into DiskFullError naming `path`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if is_disk_full(error):
            raise disk_full(Path(path), what) from None
        raise


def partial_name(path: Path) -> Path:
    """`dir/.NAME.partial.SUFFIX`: hidden, and with the suffix writers infer formats from."""
    path = Path(path)
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def _fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write `path`'s content to; on success it is flushed to disk
    and renamed to `path`, on any error removed (a full disk raised as DiskFullError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_name(path)
    try:
        with disk_full_as_error(path):
            yield temporary
            _fsync_file(temporary)
            # As open() would create it (0666 less the umask): safetensors' writer makes its
            # files 0600, which other users of a shared teacher directory or export cannot read.
            if temporary.is_file():
                os.chmod(temporary, 0o666 & ~_umask())
            os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _fsync_directory(path.parent)


def _open_for_write(path: Path):
    """The file object every Python-side write goes through (tests put a full disk here)."""
    return open(path, "wb")


def write_bytes(path: str | Path, data: bytes) -> Path:
    with replacing(path) as temporary, _open_for_write(temporary) as file:
        file.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(value, indent=indent) + "\n")


def write_yaml(path: str | Path, value) -> Path:
    import yaml

    return write_text(path, yaml.safe_dump(value, sort_keys=False))


def _save_file(tensors, path, metadata):
    """safetensors' writer (tests put a full disk here)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> Path:
    """`tensors` (contiguous CPU copies are made as needed) as a safetensors file."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with replacing(path) as temporary:
        _save_file(tensors, temporary, metadata)
    return Path(path)


class _HashingWriter(io.RawIOBase):
    """A file torch.save writes through: hashes what passes and keeps the OSError of a failed
    write (torch.save reports it only as 'unexpected pos A vs B')."""

    def __init__(self, file):
        self.file, self.sha256, self.size, self.error = file, hashlib.sha256(), 0, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as error:
            self.error = error
            raise
        self.sha256.update(data)
        self.size += len(data)
        return written


def torch_save(obj, path: str | Path) -> dict:
    """torch.save(obj) to `path`; returns {'sha256', 'bytes'} of what was written."""
    import torch

    with replacing(path) as temporary, _open_for_write(temporary) as file:
        writer = _HashingWriter(file)
        try:
            torch.save(obj, writer)
        except (OSError, RuntimeError) as error:
            if writer.error is not None:
                raise writer.error from error
            raise
    return {"sha256": writer.sha256.hexdigest(), "bytes": writer.size}


@contextlib.contextmanager
def staged_directory(path: str | Path, create: bool = True) -> Iterator[Path]:
    """Yield `.NAME.partial/` next to directory `path` to assemble it in; on success it replaces
    `path` (an existing one is removed), on any error it is removed (a full disk raised as
    DiskFullError). `create=False`: the caller (another rank) only writes into it."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.partial")
    if create:
        shutil.rmtree(staging, ignore_errors=True)  # a crashed attempt's
        staging.mkdir(parents=True)
    try:
        with disk_full_as_error(path):
            yield staging
            if create:
                publish_directory(staging, path)
    except BaseException:
        if create:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_directory(staging: Path, path: Path) -> None:
    """Rename the complete directory `staging` to `path`, replacing what was there."""
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    _fsync_directory(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def collective_write(write: Callable[[], T]) -> T | None:
    """Run `write` on this rank (collective: every rank calls it, some may have nothing to
    write). A DiskFullError on any rank is raised on every rank, with that rank's
    message, so none is left waiting at the next collective."""
    import torch.distributed as dist

    from phased_dmd_mp.distill.signals import agree

    error, result = None, None
    try:
        result = write()
    except DiskFullError as caught:
        error = caught
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return result
    if agree(error is not None):
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else error.strerror)
        raise DiskFullError(next(m for m in messages if m))
    return result
