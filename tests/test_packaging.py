"""The source distribution carries everything the extension build needs (an sdist without a header cannot build)."""

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    return out.stdout.split() if out.returncode == 0 and out.stdout else None


def test_sdist_holds_every_extension_source_and_header(tmp_path):
    files = _tracked_files()
    if files is None or "setup.py" not in files:
        pytest.skip("needs the git checkout")
    # From a copy of the tracked files only: setuptools also packs whatever an old *.egg-info/SOURCES.txt lists,
    # so building in the checkout could hide a missing MANIFEST.in entry.
    tree = tmp_path / "tree"
    for f in files:
        os.makedirs(tree / os.path.dirname(f), exist_ok=True)
        if os.path.isfile(os.path.join(ROOT, f)):
            shutil.copy2(os.path.join(ROOT, f), tree / f)
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, EFFIKERN_NO_EXT="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    (archive,) = list((tmp_path / "dist").glob("*.tar.gz"))
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for f in files:
            if f.endswith((".h", ".cuh", ".cpp", ".cu")):
                wanted.add(os.path.relpath(os.path.join(folder, f), ROOT))
    assert wanted and not wanted - packed, sorted(wanted - packed)
