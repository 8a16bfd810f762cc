"""xlstm_export.fsio: nothing half-written on failure, an existing target kept, modes follow the umask."""

from __future__ import annotations

import os
import stat

import pytest

from xlstm_export.fsio import atomic_dir, atomic_file, staged_files, umask, usual_mode


class Boom(Exception):
    pass


@pytest.fixture
def mask_027():
    """Run with umask 027 (so the usual modes are 0640 / 0750, not tempfile's 0600 / 0700)."""
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _only(folder, *names):
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temporaries left over


def test_umask_is_read_without_changing_it(mask_027):
    assert umask() == 0o027
    assert umask() == 0o027
    assert usual_mode() == 0o640 and usual_mode(directory=True) == 0o750


# --- atomic_file ---------------------------------------------------------------------------------
def test_atomic_file_writes_with_the_usual_mode(tmp_path, mask_027):
    out = tmp_path / "lib.so"
    with atomic_file(out) as tmp:
        assert tmp.parent == tmp_path and not out.exists()
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and _mode(out) == 0o640
    _only(tmp_path, "lib.so")


def test_atomic_file_explicit_mode(tmp_path):
    out = tmp_path / "lib.so"
    with atomic_file(out, mode=0o751) as tmp:
        tmp.write_bytes(b"x")
    assert _mode(out) == 0o751


def test_atomic_file_failure_keeps_the_old_file(tmp_path):
    out = tmp_path / "model.engine"
    out.write_bytes(b"old")
    with pytest.raises(Boom), atomic_file(out) as tmp:
        tmp.write_bytes(b"half")
        raise Boom
    assert out.read_bytes() == b"old"
    _only(tmp_path, "model.engine")


def test_atomic_file_failure_leaves_nothing(tmp_path):
    with pytest.raises(Boom), atomic_file(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"half")
        raise Boom
    _only(tmp_path)


def test_atomic_file_unwritable_folder_fails_on_entry(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_file(tmp_path / "missing" / "a.bin"):
        pytest.fail("the body must not run")


# --- atomic_dir ----------------------------------------------------------------------------------
def test_atomic_dir_creates_with_usual_modes(tmp_path, mask_027):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and not out.exists()
        (tmp / "config.json").write_text("{}")
        (tmp / "1").mkdir()
        fd = os.open(tmp / "1" / "model.onnx", os.O_CREAT | os.O_WRONLY, 0o600)  # a private file
        os.close(fd)
    assert _mode(out) == 0o750 and _mode(out / "1") == 0o750
    assert _mode(out / "config.json") == 0o640 and _mode(out / "1" / "model.onnx") == 0o640
    _only(tmp_path, "ckpt")


def test_atomic_dir_replaces_the_old_folder_whole(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    with atomic_dir(out) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
    _only(out, "new.bin")
    _only(tmp_path, "ckpt")


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "weights").write_bytes(b"old")
    with pytest.raises(Boom), atomic_dir(out) as tmp:
        (tmp / "weights").write_bytes(b"half")
        raise Boom
    assert (out / "weights").read_bytes() == b"old"
    _only(out, "weights")
    _only(tmp_path, "ckpt")


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    with pytest.raises(Boom), atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "weights").write_bytes(b"half")
        raise Boom
    _only(tmp_path)


def test_atomic_dir_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "weights").write_bytes(b"old")
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp"):  # the new folder's rename into place
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"), atomic_dir(out) as tmp:
        (tmp / "weights").write_bytes(b"new")
    assert (out / "weights").read_bytes() == b"old"
    _only(tmp_path, "ckpt")


# --- staged_files --------------------------------------------------------------------------------
def test_staged_files_moves_the_last_file_in_after_its_companions(tmp_path, monkeypatch, mask_027):
    order = []
    real_replace = os.replace

    def replace(src, dst):
        order.append(os.path.basename(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with staged_files(tmp_path, last="model.onnx") as tmp:
        for name in ("model.onnx", "model.onnx.data", "tokenizer.json"):
            (tmp / name).write_bytes(name.encode())
    assert order[-1] == "model.onnx" and sorted(order) == ["model.onnx", "model.onnx.data", "tokenizer.json"]
    _only(tmp_path, "model.onnx", "model.onnx.data", "tokenizer.json")
    assert (tmp_path / "model.onnx.data").read_bytes() == b"model.onnx.data"
    assert _mode(tmp_path / "model.onnx") == 0o640


def test_staged_files_failure_leaves_nothing(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"old")
    with pytest.raises(Boom), staged_files(tmp_path, last="model.onnx") as tmp:
        (tmp / "model.onnx").write_bytes(b"half")
        raise Boom
    assert (tmp_path / "model.onnx").read_bytes() == b"old"
    _only(tmp_path, "model.onnx")


def test_staged_files_missing_last_file_moves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.onnx"), staged_files(tmp_path, last="model.onnx") as tmp:
        (tmp / "model.onnx.data").write_bytes(b"data")
    _only(tmp_path)
