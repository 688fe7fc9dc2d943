"""delrec.allocator: a training loop's freed CPU tensors are reused, not faulted in again."""

import ctypes
import resource
import sys

import pytest
import torch

from delrec.allocator import keep_freed_memory
from delrec.layers import DelRec

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@pytest.mark.skipif(not GLIBC, reason="needs glibc's malloc (Linux)")
def test_training_steps_reuse_freed_memory():
    assert keep_freed_memory()
    layer = DelRec(128, delay_init="uniform:0:40", recurrent_dropout=0.2)
    current = torch.randn(150, 64, 128).requires_grad_()

    def faults_of_a_step() -> int:  # minor page faults of one forward and backward
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        layer(current).sum().backward()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults = [faults_of_a_step() for _ in range(12)]  # glibc's defaults: ≈ 2,000 each
    assert min(faults[-4:]) < 50, faults  # the heap has stopped growing


@pytest.mark.skipif(GLIBC, reason="runs where glibc is absent (this system has it)")
def test_other_c_libraries_are_left_alone():
    assert keep_freed_memory() is False
