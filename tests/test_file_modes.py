"""Files written by atomic_write get the mode a plain open() gives under the process umask."""
import os
import stat

import pytest

from torch_utils.state_io import atomic_write_bytes, current_umask


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_mode_follows_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        with open(tmp_path / "plain.bin", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    got = stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode)
    want = stat.S_IMODE(os.stat(tmp_path / "plain.bin").st_mode)
    assert got == want == 0o666 & ~mask
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
