"""Building: the source transform, unsupported features, compile errors,
includes, namespaces and name expressions."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import emulator
from kernels.emulator.module import parse_options
from kernels.emulator.source import transform


@pytest.mark.parametrize(("line", "construct"), [
    ('asm volatile("bar.sync 0;");', "inline assembly"),
    ("float v = tex2D<float>(texture_object, 0.5f, 0.5f);", "texture and surface memory"),
    ("cooperative_groups::this_grid().sync();", "cooperative groups"),
    ("child<<<1, 1>>>();", "dynamic parallelism"),
    ("v = __shfl_down(v, 1);", "without _sync"),
    ("__hmma_m16n16k16_ld_a(0, 0, 16, 0);", "tensor core builtins"),
])
def test_unsupported_feature_fails_at_build_naming_construct_and_line(line, construct):
    code = f'extern "C" __global__ void k(float* out) {{\n  float v = 0;\n  {line}\n}}\n'
    module = emulator.RawModule(code=code)
    with pytest.raises(emulator.UnsupportedFeatureError, match=f"source.cu:3: .*{construct}"):
        module.get_function("k")


def test_compile_error_points_at_the_source_line():
    code = 'extern "C" __global__ void k(float* out) {\n  out[0] = undefined_name;\n}\n'
    with pytest.raises(emulator.CompileError, match=r"source.cu:2:\d+: error: .*undefined_name"):
        emulator.RawModule(code=code).get_function("k")


def test_quoted_include_is_inlined_and_transformed(tmp_path):
    (tmp_path / "sum.cuh").write_text(
        "#pragma once\n__device__ float block_total(float v) {\n"
        "  __shared__ float partial[64];\n  partial[threadIdx.x] = v;\n  __syncthreads();\n"
        "  float t = 0;\n  for (int k = 0; k < blockDim.x; ++k) t += partial[k];\n  return t;\n}\n")
    code = ('#include "sum.cuh"\n#include "sum.cuh"\n'
            'extern "C" __global__ void k(const float* x, float* out) {\n'
            "  out[threadIdx.x] = block_total(x[threadIdx.x]);\n}\n")
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    emulator.RawModule(code=code, options=("-I", str(tmp_path))).get_function("k")(
        (1,), (64,), (x, out))
    np.testing.assert_array_equal(out, np.full(64, x.sum()))


def test_kernels_in_namespaces_and_dynamic_shared_memory_at_namespace_scope():
    code = r"""
extern __shared__ float scratch[];
namespace ops { namespace detail {
__global__ void reverse(const float* x, float* y) {
  scratch[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  y[threadIdx.x] = scratch[blockDim.x - 1 - threadIdx.x];
}
template <int K> __global__ void add(float* y) { y[threadIdx.x] += K; }
} }
"""
    module = emulator.RawModule(code=code, name_expressions=("ops::detail::add<3>",))
    x = np.arange(32, dtype=np.float32)
    y = np.zeros(32, np.float32)
    module.get_function("reverse")((1,), (32,), (x, y), shared_mem=32 * 4)
    module.get_function("ops::detail::add<3>")((1,), (32,), (y,))
    np.testing.assert_array_equal(y, x[::-1] + 3)


def test_unknown_names_are_clear_errors():
    code = 'template <int K> __global__ void add(float* y) { y[threadIdx.x] += K; }\n'
    with pytest.raises(emulator.CompileError, match="name expression 'sub<1>' names no __global__"):
        emulator.RawModule(code=code, name_expressions=("sub<1>",)).get_function("sub<1>")
    module = emulator.RawModule(code=code, name_expressions=("add<1>",))
    with pytest.raises(KeyError, match="launchable names: \\['add<1>'\\]"):
        module.get_function("add")


def test_transform_keeps_lines_and_reads_signatures():
    code = ("template <typename T>\n__global__ void __launch_bounds__(256) k(const T* __restrict__ x,"
            "\n    T* y, int n, float) {\n  __shared__ T tile[32], other[4];\n"
            "  if (n) __syncthreads();\n}\n")
    result = transform(code)
    kernel = result.kernels["k"]
    assert kernel.is_template and kernel.param_names == ("x", "y", "n", "arg3")
    assert kernel.param_texts[0] == "const T* __restrict__ x"
    assert result.uses_collectives
    assert result.text.count("\n") == code.count("\n")
    assert "static thread_local T tile[32], other[4];" in result.text
    assert result.text.count("poison_shared_once_per_block") == 2


def test_comments_between_parameters_are_no_part_of_their_declarations():
    code = ("__global__ void k(const float* x,  // [N, C]\n"
            "    /* the output */ float* y) {}\n")
    assert transform(code).kernels["k"].param_texts == ("const float* x", "float* y")


def test_barrier_free_source_takes_the_fast_path():
    assert not transform('extern "C" __global__ void k(float* y) { y[0] = 1; }').uses_collectives


def test_nvrtc_options_map_to_gxx():
    options = parse_options(["-DFOO=1", "-D", "BAR", "--define-macro=BAZ", "-I", "/x",
                             "--include-path=/y", "-std=c++14", "--use_fast_math", "-arch=sm_90"])
    assert options.cxx_args == ("-std=c++17", "-DFOO=1", "-DBAR", "-DBAZ", "-I/x", "-I/y")
    assert options.include_dirs == ("/x", "/y")
    assert parse_options(["--std=c++20"]).cxx_args == ("-std=c++20",)
