"""Large outputs of the cpp kernels are advised for transparent huge pages (csrc/cpu/output_alloc.h).

What is checked is the advice itself: the VmFlags of the mapping that holds a 2 MiB-aligned part of the output
carry "hg" (MADV_HUGEPAGE) whatever the machine's THP mode, and do not with EFFIKERN_HUGE_PAGES=0. Each case
runs in a fresh interpreter, so the output is a fresh allocation that no earlier call advised. Whether huge
pages are then actually used depends on the kernel's THP mode and free memory; the speed is the benchmarks'.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
    reason="needs Linux with transparent huge pages")

# Prints, for each output tensor the case makes, whether its 2 MiB-aligned interior is advised.
PROBE = textwrap.dedent('''
    import torch, effikern

    def advised(t):
        start = (t.data_ptr() + (2 << 20) - 1) & ~((2 << 20) - 1)
        assert start + (2 << 20) <= t.data_ptr() + t.nbytes, "the tensor holds no whole 2 MiB page"
        found = None
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head = line.split()[0]
                if "-" in head and ":" not in head:
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= start < hi
                elif inside and line.startswith("VmFlags:"):
                    found = "hg" in line.split()[1:]
        assert found is not None, "no mapping holds the tensor"
        return found

    torch.manual_seed(0)
    with effikern.set_backend("cpp"):
        {case}
''')

CASES = {
    # grad_x (8.4 MB) and y (4.2 MB) of the fused conv, channels_last
    "dwsep": '''
        x = torch.randn(2, 64, 128, 128).contiguous(memory_format=torch.channels_last).requires_grad_()
        dw, pw = torch.randn(64, 1, 3, 3), torch.randn(32, 64, 1, 1)
        y = effikern.functional.dwsep_conv2d(x, dw, None, pw, None, padding=1, activation="relu")
        y.backward(torch.ones_like(y))
        print(advised(y), advised(x.grad))''',
    # y [4096, 512] (8.4 MB) of a sparse linear
    "sparse": '''
        from effikern.sparse import from_dense
        w = torch.randn(512, 256)
        sw = from_dense(w, torch.rand(512, 256) > 0.9, "unstructured", None)
        print(advised(effikern.functional.sparse_linear(torch.randn(4096, 256), sw)))''',
    # the student gradient [256, 16384] (16.8 MB) the distillation loss's forward computes with the loss, and the
    # backward's scaled copy of it
    "distill": '''
        s, t = torch.randn(256, 16384, requires_grad=True), torch.randn(256, 16384)
        _, grad = torch.ops.effikern.distillation_loss(s.detach(), t, None, 2.0, 0.5, -100, True)
        effikern.functional.distillation_loss(s, t, None, temperature=2.0).backward()
        print(advised(grad), advised(s.grad))''',
}


def _probe(case, **env):
    code = PROBE.format(case=textwrap.indent(textwrap.dedent(CASES[case]).strip(), " " * 4).lstrip())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize("case", list(CASES))
def test_large_outputs_are_advised_for_huge_pages(case):
    flags = _probe(case)
    assert flags and all(f == "True" for f in flags), flags


@pytest.mark.parametrize("case", ["dwsep"])
def test_advice_can_be_turned_off(case):
    flags = _probe(case, EFFIKERN_HUGE_PAGES="0")
    assert flags and all(f == "False" for f in flags), flags
