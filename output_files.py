"""Writing result files: atomic replacement that honours the umask, JSON without NaN, and output
locations checked before any long work starts."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from config import UserError


class OutputError(UserError, OSError):
    """An output location that cannot be written; the message names it and the reason."""


def check_writable(path: str | Path) -> None:
    """Refuse, before any long work, an output file that is a folder, a device or FIFO, or cannot be
    created or written (a read-only or full disk)."""
    path = Path(path)
    _check_output_kind(path)
    _probe(path.parent, path)


def check_not_an_input(path: str | Path, inputs: Iterable[str | Path], what: str = "one of the photos to score") -> None:
    """Refuse an output name that holds one of the run's input files, or would (by any spelling: a link
    to it or to its folder, a relative path): writing the results there would replace the input with them."""
    target, where = _identities(path), Path(path).resolve()
    for source in inputs:
        if target & _identities(source) or where == Path(source).resolve():
            raise OutputError(f"{path}: is {source}, {what}; give another file name")


def _identities(path: str | Path) -> set[tuple[int, int]]:
    """(device, inode) of the name itself and of the file it leads to (they differ for a link)."""
    found = set()
    for look in (os.lstat, os.stat):
        try:
            status = look(path)
        except OSError:
            continue
        found.add((status.st_dev, status.st_ino))
    return found


def check_output_folder(folder: str | Path) -> None:
    """Refuse, before any long work, an output folder that cannot be created or written to."""
    _probe(Path(folder), Path(folder))


PROBE_BYTES = 2**20  # what the probe writes and syncs: a full disk (or quota) refuses it at once


def _probe(folder: Path, named: Path) -> None:
    """Create ``folder`` and write and sync a 1 MiB temporary file in it: finds read-only and full
    disks and missing permissions before any long work.

    A disk that fills up later is still reported when it happens, with the previous file intact.
    """
    probe = None
    try:
        probe, descriptor = _create_temporary(folder / "write-check")
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(bytes(PROBE_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise _output_error(named, error) from None
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)


def json_document(value: Any) -> str:
    """JSON text with every NaN or infinity as null: ``NaN`` is not JSON and breaks the reader."""

    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(inner) for inner in item]
        return item

    return json.dumps(finite(value), indent=2, allow_nan=False)


def write_atomically(path: str | Path, data: bytes | str, mode: int | None = None) -> None:
    """Write to a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    A crash, a full disk or a power cut leaves the previous file (or none), never half a model or
    report, and a failed write removes its temporary file. The new file gets ``mode`` when given,
    else keeps the mode of the file it replaces, else gets the mode the umask gives a new file.
    """
    path = Path(path)
    _check_output_kind(path)
    _remove_stale_temporaries(path.parent)
    if mode is None:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            pass
    try:
        temporary, descriptor = _create_temporary(path)
    except OSError as error:
        raise _output_error(path, error) from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(encoded(data) if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _output_error(path, error) from None
        raise


def encoded(text: str) -> bytes:
    """UTF-8, with a file name that is not UTF-8 (``os.fsdecode`` keeps its bytes as surrogates)
    written back as the bytes it has on disk: one such photo must not fail a whole CSV or report."""
    return text.encode("utf-8", errors="surrogateescape")


def _check_output_kind(path: Path) -> None:
    """Only a regular file (or nothing) may be replaced: never a folder, a device node or a FIFO."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise _output_error(path, error) from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"{path}: is a folder; give a file name")
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path}: is a device, FIFO or socket, not a file; give a file name")


# Our temporaries: ``.<name>.fastener-<pid>-<8 hex digits>.tmp``; the pid tells whether the writer
# still lives, and the tag keeps other programs' ``.*.tmp`` files out of the cleanup.
TEMPORARY_NAME = re.compile(r"\..+\.fastener-(\d+)-[0-9a-f]{8}\.tmp")
NAME_MAX_BYTES = 255  # the longest file name most file systems take
TEMPORARY_STEM_BYTES = 200  # of the target's name in a temporary's; the dot and tag add at most 35 bytes
_folders_cleaned: set[Path] = set()  # each folder is swept once per process: listing it per write would cost O(n²)


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A new temporary file beside ``path``, created with mode 0666 so that the umask applies as to any new file.

    Its name starts with as much of ``path``'s name as leaves room for the tag within the 255 bytes
    a file system allows a name: any name that can be written can be written atomically.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = cut_to_bytes(path.name, TEMPORARY_STEM_BYTES)
    while True:
        temporary = path.parent / f".{stem}.fastener-{os.getpid()}-{secrets.token_hex(4)}.tmp"  # see TEMPORARY_NAME
        try:
            return temporary, os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue


def cut_to_bytes(name: str, limit: int) -> str:
    """The longest start of ``name`` that takes at most ``limit`` bytes as a file name on this system."""
    while len(os.fsencode(name)) > limit:
        name = name[:-1]
    return name


def _output_error(path: Path, error: OSError) -> OutputError:
    return OutputError(f"{path}: cannot be written ({error.strerror}); any previous file is unchanged")


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove temporaries whose writer is gone (killed mid-write); a live writer's are kept."""
    if folder in _folders_cleaned:
        return
    _folders_cleaned.add(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = TEMPORARY_NAME.fullmatch(name)
        if match and not process_alive(int(match.group(1))):
            (folder / name).unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 only asks)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
