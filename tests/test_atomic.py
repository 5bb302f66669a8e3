"""atomic.py, the one guarded write path: a file or directory is whole or absent, and a full
disk (ENOSPC, EDQUOT, safetensors' 'os error 28') is DiskFullError naming the path with nothing
partial left behind."""

import errno
import io

import pytest
import torch
from safetensors.torch import load_file

from phased_dmd_mp import atomic


class FullAfter(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""

    room = 64

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


@pytest.mark.parametrize(
    "error, full",
    [  # fmt: skip
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
         True),
        (RuntimeError("[enforce fail at inline_container.cc:626] unexpected pos 64 vs 0"), False),
        (OSError(errno.EACCES, "Permission denied"), False),
    ],
)
def test_what_counts_as_a_full_disk(error, full):
    assert atomic.is_disk_full(error) is full
    wrapped = RuntimeError("while saving")
    wrapped.__cause__ = error
    assert atomic.is_disk_full(wrapped) is full


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    atomic.write_json(path, {"iteration": 1})
    monkeypatch.setattr(atomic, "_open_for_write", lambda p: FullAfter(p, "wb"))
    with pytest.raises(atomic.DiskFullError) as error:
        atomic.write_json(path, {"iteration": 2, "padding": "x" * 100})
    assert str(path) in error.value.strerror and "MiB free" in error.value.strerror
    assert "\n" not in error.value.strerror
    assert path.read_text() == '{\n  "iteration": 1\n}\n'  # the complete old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]
    # torch.save's 'unexpected pos' is reported as what it is
    with pytest.raises(atomic.DiskFullError, match="state.pt"):
        atomic.torch_save({"w": torch.zeros(1000)}, tmp_path / "state.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]


def test_safetensors_os_error_28_is_a_full_disk(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(tensors, path, metadata):
        path.write_bytes(b"half")
        raise SafetensorError("I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(atomic, "_save_file", full)
    with pytest.raises(atomic.DiskFullError, match="disk full writing .*w.safetensors"):
        atomic.save_safetensors({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    atomic.save_safetensors({"w": torch.ones(3)[::2]}, tmp_path / "w.safetensors")  # strided
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_a_staged_directory_is_whole_or_absent(tmp_path):
    final = tmp_path / "export"
    with atomic.staged_directory(final) as staging:
        (staging / "a.txt").write_text("first")
    assert [p.name for p in final.iterdir()] == ["a.txt"]
    with pytest.raises(atomic.DiskFullError, match="disk full writing .*export"):
        with atomic.staged_directory(final) as staging:
            (staging / "b.txt").write_text("second")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert [p.name for p in final.iterdir()] == ["a.txt"]  # the previous complete one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with atomic.staged_directory(final) as staging:
        (staging / "b.txt").write_text("second")
    assert [p.name for p in final.iterdir()] == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_the_temporary_name_keeps_the_suffix(tmp_path):
    """matplotlib and ffmpeg pick the format from the suffix."""
    assert atomic.partial_name(tmp_path / "iter_000002.png").name == ".iter_000002.partial.png"
    with atomic.replacing(tmp_path / "grid.png") as temporary:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        figure = plt.figure()
        figure.savefig(temporary)
        plt.close(figure)
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_get_the_umasks_mode(tmp_path, umask):
    """Every writer's file is readable as the umask allows, as open() makes it: safetensors'
    writer made its files 0600 (condition shards, exported weights and LoRA files), unreadable
    to the rest of a team sharing a teacher directory or export."""
    import os

    previous = os.umask(umask)
    try:
        atomic.save_safetensors({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
        atomic.write_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(previous)
    for name in ("a.safetensors", "a.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
