"""Backend selection, the info command and lazy loading."""

import os
import subprocess
import sys

import pytest
import torch

import effikern
from effikern import backends


def test_set_backend_is_a_setter_and_a_context_manager():
    assert effikern.get_backend() == "auto"
    with effikern.set_backend("cpp"):
        assert effikern.get_backend() == "cpp"
        with effikern.set_backend("torch"):
            assert effikern.get_backend() == "torch"
        assert effikern.get_backend() == "cpp"
    assert effikern.get_backend() == "auto"
    effikern.set_backend("torch")
    try:
        assert effikern.get_backend() == "torch"
    finally:
        effikern.set_backend("auto")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'fast'"):
        effikern.set_backend("fast")


def test_auto_falls_back_to_torch_for_dtypes_a_kernel_lacks():
    import torch

    assert backends.choose("dwsep_conv2d", "cpu", torch.float64) in ("torch", "cpp")
    # float64 is not a Triton dtype here: an explicit request says so instead of running something else.
    with effikern.set_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="float64"):
        backends.choose("dwsep_conv2d", "cpu", torch.float64)


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_environment_variable_sets_the_initial_backend():
    out = _python("import effikern; print(effikern.get_backend())", EFFIKERN_BACKEND="cpp")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cpp"


def test_a_bad_environment_variable_is_named():
    out = _python("import effikern", EFFIKERN_BACKEND="fast")
    assert out.returncode != 0
    assert "the environment variable EFFIKERN_BACKEND must be one of" in out.stderr and "'fast'" in out.stderr


def test_import_needs_neither_triton_nor_the_extension():
    code = "import sys, effikern; print('triton' in sys.modules, 'effikern._C' in sys.modules)"
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_info_lists_backends_and_the_auto_choice():
    out = subprocess.run([sys.executable, "-m", "effikern", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for word in ("effikern", "torch", "triton", "dwsep_conv2d", "cpp", "runs on:"):
        assert word in out.stdout, out.stdout


@pytest.mark.usefixtures("avx512_auto_table")
def test_auto_routes_small_image_dwsep_forwards_to_the_measured_faster_backend():
    """_auto._CASES: on CPU fp32, auto runs the dwsep forward on torch for output images of 14x14 or less
    (measured slower in cpp) and on cpp above; an explicit choice is obeyed whatever the shape."""
    from effikern import backends
    from effikern.ops import dwsep as dwsep_op

    if backends.unavailable_reason("cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not built")
    small, large = dwsep_op._forward_case([8, 64, 14, 14]), dwsep_op._forward_case([8, 64, 15, 14])
    assert (small, large) == ("forward_small_image", None)
    with effikern.set_backend("auto"):
        assert backends.choose("dwsep_conv2d", "cpu", torch.float32, small) == "torch"
        assert backends.choose("dwsep_conv2d", "cpu", torch.float32, large) == "cpp"
        # fp16 was measured faster in cpp on every shape, bf16 not: no small-image split for either.
        assert backends.choose("dwsep_conv2d", "cpu", torch.float16, small) == "cpp"
        assert backends.choose("dwsep_conv2d", "cpu", torch.bfloat16, small) == "torch"
    with effikern.set_backend("cpp"):
        assert backends.choose("dwsep_conv2d", "cpu", torch.float32, small) == "cpp"


@pytest.mark.parametrize("cpu_class, key", [("avx512", "cpu"), ("avx2", "cpu-avx2"), ("default", "cpu-default")])
def test_auto_reads_the_measurements_of_this_cpu_class(monkeypatch, cpu_class, key):
    """auto's CPU entries are per ISA class (_auto.py): a class without measurements keeps torch for every op,
    whatever another class measured; a measured class gets its own entry."""
    from effikern import _auto

    monkeypatch.setattr(_auto, "cpu_class", lambda: cpu_class)
    assert _auto.table_device("cpu") == key and _auto.table_device("cuda") == "cuda"
    fake = {("op_x", "cpu", torch.float32): ("cpp", "torch"), ("op_x", "cpu-avx2", torch.float32): ("triton", "torch")}
    monkeypatch.setattr(_auto, "_PREFERENCE", fake)
    expected = {"avx512": ("cpp", "torch"), "avx2": ("triton", "torch"), "default": ("torch",)}[cpu_class]
    assert _auto.preference("op_x", "cpu", torch.float32) == expected
    monkeypatch.setattr(_auto, "_PREFERENCE", {})
    assert _auto.preference("dwsep_conv2d", "cpu", torch.float32) == ("torch",)


def _dwsep_call(dtype):
    x = torch.randn(2, 4, 6, 6, dtype=dtype, requires_grad=True)
    dw = torch.randn(4, 1, 3, 3, dtype=dtype, requires_grad=True)
    pw = torch.randn(5, 4, 1, 1, dtype=dtype, requires_grad=True)
    return "dwsep_conv2d", lambda: torch.ops.effikern.dwsep_conv2d(x, dw, None, pw, None, [1, 1], [1, 1], [1, 1],
                                                                   "relu", None)


def _sparse_call(dtype):
    from effikern.sparse import from_dense

    sw = from_dense(torch.randn(6, 40, dtype=dtype), torch.rand(6, 40) < 0.5)
    values = sw.values.clone().requires_grad_()
    x = torch.randn(3, 40, dtype=dtype, requires_grad=True)
    return "sparse_linear", lambda: torch.ops.effikern.sparse_linear(
        x, values, sw.crow, sw.col, sw.row, sw.t_crow, sw.t_row, sw.t_perm, sw.value_mask, None, "unstructured", 6,
        40)


@pytest.mark.parametrize("make_call", [_dwsep_call, _sparse_call], ids=["dwsep", "sparse"])
@pytest.mark.parametrize("where", ["after_the_block", "another_thread"])
@pytest.mark.parametrize("choice", ["torch", "cpp"])
def test_backward_runs_under_the_forwards_backend(choice, where, make_call, monkeypatch):
    """The backend chosen around a forward also runs its backward, wherever autograd runs that: after the ``with``
    block has ended, or on another thread (autograd's device threads run CUDA backwards), where the choice is the
    default. Both choices are tried, so this fails whichever one ``auto`` would have picked instead."""
    from backend_util import skip_unavailable

    skip_unavailable(choice, "cpu")
    op, call = make_call(torch.float64)
    resolved = []
    choose = backends.choose

    def spy(*args, **kwargs):
        name = choose(*args, **kwargs)
        resolved.append(name)
        return name

    monkeypatch.setattr(backends, "choose", spy)
    with effikern.set_backend(choice):
        y = call()
    resolved.clear()
    if where == "after_the_block":
        y.sum().backward()
    else:
        import threading

        errors = []

        def backward():
            try:
                assert effikern.get_backend() == "auto"
                y.sum().backward()
            except BaseException as err:  # noqa: BLE001 - re-raised on the test's thread
                errors.append(err)

        worker = threading.Thread(target=backward)
        worker.start()
        worker.join()
        assert not errors, errors
    assert resolved and set(resolved) == {choice}, (op, resolved)


def test_an_unusable_choice_raises_for_empty_inputs_too():
    """An explicitly chosen backend that cannot run a call says so whatever the batch size: an empty batch used to
    return an empty result before the backend was looked at, so a misconfiguration passed unnoticed until the
    first real batch."""
    from effikern.sparse import from_dense

    if torch.cuda.is_available():
        pytest.skip("the cuda backend may run here")
    sw = from_dense(torch.randn(6, 40), torch.rand(6, 40) < 0.5)
    dw, pw = torch.randn(4, 1, 3, 3), torch.randn(5, 4, 1, 1)
    calls = {
        "dwsep_conv2d": lambda x: effikern.functional.dwsep_conv2d(x[:, :16].reshape(-1, 4, 2, 2), dw, None, pw,
                                                                   None, padding=1),
        "sparse_linear": lambda x: effikern.functional.sparse_linear(x, sw),
        "distillation_loss": lambda x: effikern.functional.distillation_loss(x[:, :6], x[:, 6:12],
                                                                             torch.zeros(x.shape[0], dtype=torch.long)),
    }
    for name, call in calls.items():
        for rows in (0, 2):
            with effikern.set_backend("cuda"), pytest.raises(backends.BackendUnavailableError, match="cuda"):
                call(torch.randn(rows, 40))
