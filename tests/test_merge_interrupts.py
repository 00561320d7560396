"""Issue 21, item 9: SIGINT and SIGKILL during ``layerwise merge``.

The merge runs in a child process that pauses right after it wrote the first chunk of merged weights (a
hook installed by the child's script: the merge code itself is unchanged), and is interrupted there. The
tests check that nothing that looks like a finished output is left, that an earlier output being replaced
with ``--overwrite`` survives, and that the next run succeeds and writes the same bytes as an uninterrupted
run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from layerwise._io import OUTPUT_MARKER, is_temporary_name
from layerwise.cli import main
from layerwise.editing.checkpoints import save_checkpoint

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.w": torch.randn(16, 8, generator=g) for i in range(4)}


@pytest.fixture
def setup(tmp_path):
    base = save_checkpoint(_sd(0), tmp_path / "base")
    fts = [save_checkpoint(_sd(i + 1), tmp_path / f"ft{i}") for i in range(2)]
    cfgs = {}
    for name, scale in (("a", 0.3), ("b", 0.7)):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({"method": "task_arithmetic", "base_model": str(base),
                                       "models": [str(f) for f in fts], "scale": scale}))
        cfgs[name] = cfg
    ref = tmp_path / "ref"
    assert main(["merge", str(cfgs["a"]), "--out", str(ref), "--no-progress"]) == 0
    return tmp_path, cfgs, ref


def _tree(folder) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


_PAUSE_IN_WRITE = """
real = checkpoints.ShardedSafetensorsWriter.write

def write(self, *args, **kwargs):
    real(self, *args, **kwargs)
    print("ready", flush=True)
    time.sleep(120)

checkpoints.ShardedSafetensorsWriter.write = write
"""

# between the two renames of an --overwrite: the earlier output is set aside, the new one not yet in place
_PAUSE_BEFORE_FINAL_RENAME = """
real = os.replace

def replace(src, dst, *args, **kwargs):
    if str(src).endswith(".tmp"):
        print("ready", flush=True)
        time.sleep(120)
    return real(src, dst, *args, **kwargs)

os.replace = replace
"""


def _paused_merge(argv: list[str], pause: str = _PAUSE_IN_WRITE) -> subprocess.Popen:
    """Start ``layerwise merge`` in a child that stops (sleeps) at ``pause``: by default after its first
    write of merged weights."""
    # Ctrl-C as a user's terminal delivers it: a job started in the background by a shell (as CI may be)
    # ignores SIGINT, and Python then installs no KeyboardInterrupt handler; restore it.
    script = "import os, signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
    script += "from layerwise.editing import checkpoints\n"
    script += "from layerwise.cli import main\n"
    script += pause + f"\nsys.exit(main({argv!r}))\n"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    while not lines or lines[-1] != "ready":  # the merge prints its plan first
        line = proc.stdout.readline()
        assert line, ("the child ended before writing", lines, proc.stderr.read())
        lines.append(line.strip())
    return proc


def _leftovers(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if is_temporary_name(p.name))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_merge_leaves_nothing_finished_and_the_rerun_matches(setup, sig):
    root, cfgs, ref = setup
    out = root / "merged"
    argv = ["merge", str(cfgs["a"]), "--out", str(out), "--no-progress"]
    proc = _paused_merge(argv)
    assert _leftovers(root), "the merge writes into a temporary folder"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not out.exists()  # nothing at the output path: no partial output looks finished
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
        assert _leftovers(root) == []  # cleaned up on the way out
    else:
        assert proc.returncode == -signal.SIGKILL
        (left,) = _leftovers(root)  # a hidden .merged.xxxxxxxx.tmp, marked as being written
        marker = json.loads((root / left / OUTPUT_MARKER).read_text())
        assert marker["state"] == "being written" and "files" not in marker
    assert main(argv) == 0
    assert _leftovers(root) == []  # the rerun removed what the killed run left
    assert _tree(out) == _tree(ref)  # same bytes as an uninterrupted run (marker and record included)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_overwrite_keeps_the_earlier_output(setup, sig):
    root, cfgs, ref = setup
    out = root / "merged"
    assert main(["merge", str(cfgs["b"]), "--out", str(out), "--no-progress"]) == 0
    before = _tree(out)
    proc = _paused_merge(["merge", str(cfgs["a"]), "--out", str(out), "--no-progress", "--overwrite"])
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert _tree(out) == before  # the earlier output is intact, byte for byte
    assert main(["merge", str(cfgs["a"]), "--out", str(out), "--no-progress", "--overwrite"]) == 0
    assert _leftovers(root) == []
    assert _tree(out) == _tree(ref)


def test_kill_between_the_two_renames_keeps_the_earlier_output(setup):
    root, cfgs, ref = setup
    out = root / "merged"
    assert main(["merge", str(cfgs["b"]), "--out", str(out), "--no-progress"]) == 0
    before = _tree(out)
    proc = _paused_merge(["merge", str(cfgs["a"]), "--out", str(out), "--no-progress", "--overwrite"],
                         _PAUSE_BEFORE_FINAL_RENAME)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not out.exists()  # killed between the renames: the earlier output was set aside...
    (old,) = [p for p in _leftovers(root) if p.endswith(".old")]
    assert _tree(root / old) == before  # ...intact, byte for byte
    # the next use of the folder puts it back before deciding anything (here: a refused run without
    # --overwrite, which must find the earlier output again and leave it alone)
    assert main(["merge", str(cfgs["a"]), "--out", str(out), "--no-progress"]) == 2
    assert _tree(out) == before
    assert main(["merge", str(cfgs["a"]), "--out", str(out), "--no-progress", "--overwrite"]) == 0
    assert _leftovers(root) == [] and _tree(out) == _tree(ref)
