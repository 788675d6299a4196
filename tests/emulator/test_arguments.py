"""The launch API as CuPy takes it, and the signature check of every call."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from kernels import emulator

SOURCE = r"""
#include <cuda_fp16.h>
extern "C" __global__ void fill(float* out, float value, long long count, double scale,
                                const __half* weights, unsigned char* bytes, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = value * scale + count + __half2float(weights[i]) + bytes[i];
}
"""


@pytest.fixture(scope="module")
def fill() -> emulator.RawKernel:
    return emulator.RawKernel(SOURCE, "fill")


def _args(**overrides):
    size = 8
    args = {"out": np.zeros(size, np.float32), "value": np.float32(2), "count": 3, "scale": 0.5,
            "weights": np.ones(size, np.float16), "bytes": np.arange(size, dtype=np.uint8),
            "n": np.int32(size)}
    args.update(overrides)
    return args


def test_cupy_call_conventions_work(fill):
    args = _args()
    fill((1,), (32,), tuple(args.values()), shared_mem=0, stream=None)
    np.testing.assert_array_equal(args["out"], 2 * 0.5 + 3 + 1 + np.arange(8))


def test_python_int_for_64_bit_and_float_for_double_are_accepted_like_cupy(fill):
    args = _args(count=10**12, scale=1.0)
    fill((1,), (8,), tuple(args.values()))
    assert args["out"][0] == np.float32(2 + 10**12 + 1)


def test_torch_cpu_tensors_and_any_dtype_for_unsigned_char_pointers(fill):
    args = _args(out=torch.zeros(8), weights=torch.ones(8, dtype=torch.float16),
                 bytes=np.zeros(2, np.float32))  # 8 bytes through unsigned char*
    fill((1,), (8,), tuple(args.values()))
    assert torch.equal(args["out"], torch.full((8,), 5.0))


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("n", 8, r"argument 6 'n' \(declared `int n`\): a Python int for `int`: CuPy passes Python "
             r"ints as 64-bit integers.*pass numpy.int32\(8\)"),
    ("value", 2.0, r"argument 1 'value'.*a Python float for `float`.*pass numpy.float32\(2.0\)"),
    ("n", np.int64(8), r"argument 6 'n'.*expected a int32 scalar for `int`, got numpy.int64"),
    ("weights", np.ones(8, np.float32),
     r"argument 4 'weights'.*expected a float16 array for `const __half\*`, got a float32 array"),
    ("weights", np.ones(8, ml_dtypes.bfloat16), r".*expected a float16 array.*got a bfloat16 array"),
    ("out", np.float32(1), r"argument 0 'out'.*expected an array of float \(dtype float32\) for "
                           r"`float\*`, got numpy.float32 scalar"),
    ("value", np.zeros(1, np.float32), r"argument 1 'value'.*expected a float value, got a "
                                       r"float32 array"),
    ("out", np.zeros((8, 2), np.float32)[:, 0], r"argument 0 'out'.*not C-contiguous"),
    ("out", torch.zeros(8, 2)[:, 0], r"argument 0 'out'.*tensor is not contiguous"),
])
def test_mismatched_argument_names_kernel_argument_and_types(fill, name, value, expected):
    with pytest.raises(emulator.KernelArgumentError, match=f"kernel 'fill', {expected}"):
        fill((1,), (8,), tuple(_args(**{name: value}).values()))


def test_read_only_array_for_a_non_const_pointer_is_refused(fill):
    out = np.zeros(8, np.float32)
    out.flags.writeable = False
    with pytest.raises(emulator.KernelArgumentError, match="read-only array passed for the "
                                                           "non-const `float\\*`"):
        fill((1,), (8,), tuple(_args(out=out).values()))


def test_wrong_argument_count_lists_the_signature(fill):
    with pytest.raises(emulator.KernelArgumentError,
                       match=r"takes 7 argument\(s\) \(float\* out, float value, long long count, "
                             r"double scale, const __half\* weights, unsigned char\* bytes, "
                             r"int n\), but 2 were given"):
        fill((1,), (8,), (np.zeros(8, np.float32), np.float32(1)))


@pytest.mark.parametrize(("grid", "block", "expected"), [
    ([1], (8,), "grid must be a tuple"),
    ((1,), (2048,), "outside the limits"),
    ((1,), (64, 32), "has 2048 threads, more than 1024"),
    ((0,), (8,), "outside the limits"),
])
def test_invalid_launch_configuration(fill, grid, block, expected):
    with pytest.raises(emulator.LaunchConfigError, match=expected):
        fill(grid, block, tuple(_args().values()))


def test_shared_memory_above_the_default_limit_needs_the_attribute(fill):
    args = tuple(_args().values())
    with pytest.raises(emulator.LaunchConfigError, match="max_dynamic_shared_size_bytes"):
        fill((1,), (8,), args, shared_mem=64 * 1024)
    fill.max_dynamic_shared_size_bytes = 100 * 1024
    fill((1,), (8,), args, shared_mem=64 * 1024)
    assert fill.attributes["max_dynamic_shared_size_bytes"] == 100 * 1024


def test_parameters_and_attributes_are_exposed(fill):
    assert [p.cxx_type for p in fill.params] == [
        "float*", "float", "long long", "double", "const __half*", "unsigned char*", "int"]
    assert fill.max_threads_per_block == 1024
    assert emulator.getDeviceProperties(0)["multiProcessorCount"] == 132
