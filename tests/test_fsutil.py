"""privacy.fsutil's folder swap: a crash leaves the old folder or the new one, never half of one, and two processes
building the same folder at once (parallel benchmark cells, two runs on one work dir) do not delete each other's
half-built staging folder."""

from __future__ import annotations

import os
import subprocess
import sys

from privacy.fsutil import replace_dir, staging_dir


def test_a_staging_folder_of_a_live_process_survives_and_a_dead_ones_is_removed(tmp_path):
    target = tmp_path / "ref"
    mine = staging_dir(target)
    (mine / "model.safetensors").write_bytes(b"half-built")
    # another process builds the same target meanwhile: it must not remove ours
    other = subprocess.run([sys.executable, "-c", "import sys; from privacy.fsutil import staging_dir; "
                            "print(staging_dir(sys.argv[1]))", str(target)], capture_output=True, text=True,
                           check=True, cwd=os.getcwd()).stdout.strip()
    assert (mine / "model.safetensors").read_bytes() == b"half-built"
    # its process has exited, so its folder is a leftover of a killed run: the next staging_dir removes it,
    # and a legacy name (no owner recorded) too
    legacy = tmp_path / ".ref.staging-abc123"
    legacy.mkdir()
    again = staging_dir(target)
    assert not os.path.exists(other) and not legacy.exists() and mine.is_dir() and again.is_dir()
    (again / "x").write_text("new")
    replace_dir(again, target)
    assert (target / "x").read_text() == "new" and mine.is_dir()
    replace_dir(mine, target)  # the last finished build wins, whole
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ref"]  # nothing left behind
