"""The source distribution carries everything the extension build needs (an sdist without a header cannot build)."""

import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "setup.py")), reason="needs the source checkout")
def test_sdist_holds_every_extension_source_and_header(tmp_path):
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, EFFIKERN_NO_EXT="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    (archive,) = list(tmp_path.glob("*.tar.gz"))
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for f in files:
            if f.endswith((".h", ".cuh", ".cpp", ".cu")):
                wanted.add(os.path.relpath(os.path.join(folder, f), ROOT))
    assert wanted and not wanted - packed, sorted(wanted - packed)
