"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Everything is written under a temporary name in the target's own folder (so the final rename
stays on one file system) and renamed into place only when the body of the ``with`` ran to its
end. On any failure the temporary is removed and an existing target is left as it was. What is
renamed into place carries the user's usual modes (``0o666`` / ``0o777`` less the umask): the
temporaries ``tempfile`` makes are private (0600 files, 0700 folders).

    with atomic_file(out, mode=0o755) as tmp:    # one file: tmp is an empty file beside out
        compile_to(tmp)
    with atomic_dir(checkpoint) as tmp:           # one folder, replacing an existing one whole
        (tmp / "config.json").write_text(...)
    with staged_files(folder, last="model.onnx") as tmp:  # several files dropped into a folder
        write_model_and_data(tmp)                 # model.onnx moves in after its data files
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(*, directory: bool = False) -> int:
    """The mode a plain ``open()`` / ``mkdir()`` gives: 0o666 (files) or 0o777 (folders) less the umask."""
    return (0o777 if directory else 0o666) & ~umask()


def apply_usual_modes(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the user's usual modes."""
    path = Path(path)
    if not path.is_dir():
        path.chmod(usual_mode())
        return
    file_mode, dir_mode = usual_mode(), usual_mode(directory=True)
    path.chmod(dir_mode)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), dir_mode)
        for f in files:
            os.chmod(os.path.join(root, f), file_mode)


@contextmanager
def _creating(target: Path) -> Iterator[None]:
    """Name ``target`` (not the temporary's random name) when the temporary cannot be made."""
    try:
        yield
    except OSError as e:
        raise type(e)(f"cannot write {target}: {e.strerror or e}") from None  # the same kind of error


@contextmanager
def atomic_file(target, *, mode: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary file beside ``target``; on success it gets ``mode`` (default: the
    usual file mode) and is renamed onto ``target``. The target's folder must exist; creating the
    temporary on entry makes an unwritable folder fail before any work."""
    target = Path(target)
    with _creating(target):
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, usual_mode() if mode is None else mode)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it (and all it holds) gets the
    usual modes and takes ``target``'s place: an existing ``target`` is moved aside, the new folder
    renamed in, the old one deleted (and put back if the rename fails). The target's folder must
    exist."""
    target = Path(target)
    with _creating(target):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = tmp.with_name(tmp.name + ".old")  # unique because tmp is
    try:
        yield tmp
        apply_usual_modes(tmp)
        if os.path.lexists(target):
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # put the previous folder back
                raise
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_files(folder, *, last: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder inside ``folder``; on success each file written into it is
    renamed into ``folder`` (with the usual file mode), the one named ``last`` after all others so a
    reader who sees it sees its companions. Each rename is atomic; the group is not. The temporary
    folder is always removed."""
    folder = Path(folder)
    with _creating(folder):
        tmp = Path(tempfile.mkdtemp(prefix=".staged.", suffix=".tmp", dir=folder))
    try:
        yield tmp
        names = sorted(p.name for p in tmp.iterdir())
        if last is not None:
            if last not in names:
                raise FileNotFoundError(f"{tmp / last}: the file to move in last was not written")
            names = [n for n in names if n != last] + [last]
        for name in names:
            apply_usual_modes(tmp / name)
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["apply_usual_modes", "atomic_dir", "atomic_file", "staged_files", "umask", "usual_mode"]
