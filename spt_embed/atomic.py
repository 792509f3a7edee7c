"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Files go through a temporary sibling that is flushed to disk (fsync) and then renamed over the target. Unlike a
bare `tempfile` file (always mode 0600), the result gets the permissions a plain `open()` would give it under
the process umask (0644 under umask 022), so a shared model or index stays readable by others. Files written by
other libraries (safetensors' writer, and so `save_pretrained`, creates them 0600) get the same treatment through
`apply_umask`, which `atomic_folder` and `publish_entries` apply to everything they publish.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a folder and everything under it) the permissions a plain `open()` / `mkdir()` would
    give it under the process umask: files 0666 & ~umask, folders 0777 & ~umask."""
    mask = _umask()
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """`with atomic_file(p, "wb") as handle:` writes p atomically; an exception leaves p as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode must be 'w' or 'wb', got {mode!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    handle = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False, **open_kwargs)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        apply_umask(handle.name)
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` to disk, so that a rename that publishes it publishes whole files."""
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        with file.open("rb") as handle:
            os.fsync(handle.fileno())


def staging_folder(parent: Path, name: str) -> Path:
    """A new empty folder beside `parent / name` for building it; made with mkdir (not mkdtemp, which makes it
    private), so it gets the usual permissions."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def previous_folder(target: Path) -> Path:
    """Where the folder being replaced waits during the instant between the two renames of `atomic_folder`."""
    return target.parent / f".{target.name}.previous"


def atomic_folder(target: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool, marker: str) -> Path:
    """Let `write` fill a staging folder next to `target`, then swap it in with renames.

    The previous folder is renamed to `.NAME.previous` for the instant between the two renames (a reader may fall
    back to it should a crash happen exactly there). `marker` is a file every folder of this kind has: a folder
    without it is never replaced.
    """
    target = Path(target).expanduser()
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True (CLI: --overwrite) to replace it.")
        if not (target / marker).is_file():
            raise FileExistsError(f"{target} exists and has no {marker}: refusing to replace a folder of another kind.")
    temporary = staging_folder(target.parent, target.name)
    try:
        write(temporary)
        apply_umask(temporary)
        fsync_tree(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    previous = previous_folder(target)
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(target, previous)
        os.replace(temporary, target)
        shutil.rmtree(previous)
    else:
        os.replace(temporary, target)
    return target


def publish_entries(staging: Path, target: Path) -> list[str]:
    """Move every entry of the filled folder `staging` into the existing folder `target`, each replacing the entry of
    the same name; returns their names. Entries get the umask's permissions and are flushed to disk first, so each
    appears whole. For the outputs of a run whose folder also holds its checkpoints and logs."""
    apply_umask(staging)
    fsync_tree(staging)
    names = sorted(item.name for item in staging.iterdir())
    for name in names:
        destination = target / name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(staging / name, destination)
    return names
