"""Triton launchers run on their tensors' GPU.

Triton launches on torch's *current* device and its current stream, not on the tensors' device: with the
tensors on cuda:1 and the current device cuda:0 (a model moved with ``.to("cuda:1")`` without
``torch.cuda.set_device``) a launch fails ("Pointer argument (at 0) cannot be accessed from Triton (cpu
tensor?)", triton-lang/triton#2441) or, with peer access, runs on the wrong GPU, unordered with the stream
that produced its inputs. The CUDA loaders take the same guard (ops/dwsep.py ``_load_cuda``).
"""

import functools

import torch


def _first_tensor_device(args):
    return args[0].device


def on_device_of(fn, device_of=_first_tensor_device):
    """``fn`` run with the current CUDA device set to ``device_of(args)`` (unchanged for CPU tensors: the
    interpreter)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        device = device_of(args)
        if device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return call
