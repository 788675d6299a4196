"""Tensor cores in the emulator: nvcuda::wmma (kernels/wmma.cu) against NumPy,
and the same kernels built by NVRTC for sm_90 and sm_80 (valid CUDA: what the
known-answer tests run is what a GPU would run).

The GEMM kernel computes D = alpha (A B + C), one warp per tile, over every
supported shape, input type and layout, with padded leading dimensions whose
padding is NaN: an element read from the wrong place poisons the result, an
element stored to the wrong place overwrites NaN padding or leaves a NaN hole.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from kernels import emulator
from kernels.build_check import check_kernels
from kernels.cuda_sources import CudaSource
from kernels.nvrtc import ToolchainNotFound, find_toolchain

HALF, BF16, TF32, DOUBLE = "__half", "__nv_bfloat16", "wmma::precision::tf32", "double"
MEMORY_DTYPE = {HALF: np.float16, BF16: ml_dtypes.bfloat16, TF32: np.float32, DOUBLE: np.float64,
                "float": np.float32}
MEMORY_TYPE = {HALF: HALF, BF16: BF16, TF32: "float", DOUBLE: DOUBLE}


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One instantiation of wmma_gemm."""

    shape: tuple[int, int, int]  # M, N, K of the fragments
    input: str
    accumulator: str = "float"
    row_major_a: bool = True
    row_major_b: bool = False
    row_major_c: bool = True
    round_tf32: bool = False

    @property
    def expression(self) -> str:
        m, n, k = self.shape
        layout = {True: "wmma::row_major", False: "wmma::col_major"}
        flag = {True: "true", False: "false"}
        return (f"wmma_gemm<{m}, {n}, {k}, {self.input}, {MEMORY_TYPE[self.input]}, "
                f"{self.accumulator}, {layout[self.row_major_a]}, {layout[self.row_major_b]}, "
                f"{flag[self.row_major_c]}, {flag[self.round_tf32]}>")

    def __str__(self) -> str:
        layouts = "".join("r" if r else "c"
                          for r in (self.row_major_a, self.row_major_b, self.row_major_c))
        m, n, k = self.shape
        return f"m{m}n{n}k{k}-{self.input.split(':')[-1]}-{self.accumulator}-{layouts}"


GEMMS = (
    Gemm((16, 16, 16), HALF),
    Gemm((16, 16, 16), HALF, row_major_a=False, row_major_b=True, row_major_c=False),
    Gemm((16, 16, 16), HALF, row_major_b=True),
    Gemm((16, 16, 16), HALF, row_major_a=False, row_major_c=False),
    Gemm((16, 16, 16), HALF, accumulator=HALF),
    Gemm((16, 16, 16), BF16),
    Gemm((16, 16, 16), BF16, row_major_a=False, row_major_b=True, row_major_c=False),
    Gemm((32, 8, 16), HALF),
    Gemm((8, 32, 16), BF16, row_major_c=False),
    Gemm((16, 16, 8), TF32, round_tf32=True),
    Gemm((16, 16, 8), TF32, row_major_a=False, row_major_b=True),
    Gemm((8, 8, 4), DOUBLE, accumulator=DOUBLE),
    Gemm((8, 8, 4), DOUBLE, accumulator=DOUBLE, row_major_a=False, row_major_b=True,
         row_major_c=False),
)


@pytest.fixture(scope="module")
def wmma(kernel_source) -> emulator.RawModule:
    return emulator.RawModule(code=kernel_source("wmma.cu"),
                              name_expressions=tuple(g.expression for g in GEMMS))


def aligned(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` starting at a 64-byte boundary, as torch's and
    cudaMalloc's allocations do (wmma needs 32 bytes; NumPy gives 16)."""
    raw = np.empty(array.nbytes + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def in_memory(matrix: np.ndarray, row_major: bool, pad: int, dtype) -> np.ndarray:
    """``matrix`` laid out with a leading dimension ``pad`` elements longer than
    its rows (row-major) or columns (column-major), the padding NaN."""
    stored = matrix if row_major else matrix.T
    memory = np.full((stored.shape[0], stored.shape[1] + pad), np.nan, dtype=dtype)
    memory[:, :stored.shape[1]] = stored
    return aligned(memory)


def run_gemm(module, gemm: Gemm, a: np.ndarray, b: np.ndarray, c: np.ndarray, alpha: float,
             padded: bool = True) -> np.ndarray:
    """D from the emulator, as float64; with ``padded``, the leading dimensions
    are longer than the rows (columns) and the padding is NaN."""
    m, n, k = gemm.shape
    memory = MEMORY_DTYPE[gemm.input]
    accumulator = MEMORY_DTYPE[gemm.accumulator]
    pad_in = 16 // np.dtype(memory).itemsize if padded else 0  # one more 16-byte step of ldm
    pad_acc = 32 // np.dtype(accumulator).itemsize if padded else 0
    a_mem = in_memory(a, gemm.row_major_a, pad_in, memory)
    b_mem = in_memory(b, gemm.row_major_b, pad_in, memory)
    c_mem = in_memory(c, gemm.row_major_c, pad_acc, accumulator)
    d_mem = aligned(np.full_like(c_mem, np.nan))
    rows, cols = c.shape
    tiles = (rows // m) * (cols // n)
    gemm_kernel = module.get_function(gemm.expression)
    gemm_kernel((tiles,), (32,), (
        a_mem, b_mem, c_mem, d_mem, np.int32(cols // n), np.int32(a.shape[1]),
        np.int32(a_mem.shape[1]), np.int32(b_mem.shape[1]), np.int32(c_mem.shape[1]),
        np.float32(alpha)))
    d = d_mem[:, :c_mem.shape[1] - pad_acc]
    d = d if gemm.row_major_c else d.T
    assert np.isnan(d_mem[:, c_mem.shape[1] - pad_acc:].astype(np.float64)).all(), \
        "store_matrix_sync wrote into the padding past the tile's columns"
    return d.astype(np.float64)


def inputs(rng, gemm: Gemm, integers: bool):
    m, n, k = gemm.shape
    rows, cols, depth = 2 * m, 3 * n, 3 * k
    if integers:  # every product and sum exact in float: the result must be too
        draw = lambda shape: rng.integers(-4, 5, shape).astype(np.float64)  # noqa: E731
    else:
        draw = lambda shape: rng.standard_normal(shape)  # noqa: E731
    memory = MEMORY_DTYPE[gemm.input]
    a = draw((rows, depth)).astype(memory)
    b = draw((depth, cols)).astype(memory)
    c = draw((rows, cols)).astype(MEMORY_DTYPE[gemm.accumulator])
    return a, b, c


@pytest.mark.parametrize("gemm", GEMMS, ids=str)
def test_gemm_of_small_integers_is_exact(wmma, rng, gemm):
    a, b, c = inputs(rng, gemm, integers=True)
    d = run_gemm(wmma, gemm, a, b, c, alpha=0.5)
    expected = 0.5 * (a.astype(np.float64) @ b.astype(np.float64) + c.astype(np.float64))
    np.testing.assert_array_equal(d, expected)


def float_accumulation_bound(a, b, c, alpha: float) -> np.ndarray:
    """What float accumulation of exact products may lose: one float rounding
    per addition, on the magnitudes summed, then the scaling's."""
    depth = a.shape[1]
    magnitude = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)) + np.abs(c)
    return abs(alpha) * magnitude * (depth + 2) * 2.0**-24


@pytest.mark.parametrize("gemm", [g for g in GEMMS if g.input in (HALF, BF16)
                                  and g.accumulator == "float"][:3], ids=str)
def test_half_and_bfloat16_products_are_exact_and_accumulate_in_float(wmma, rng, gemm):
    a, b, c = inputs(rng, gemm, integers=False)
    d = run_gemm(wmma, gemm, a, b, c, alpha=1.25)
    exact = 1.25 * (a.astype(np.float64) @ b.astype(np.float64) + c.astype(np.float64))
    error = np.abs(d - exact)
    assert (error <= float_accumulation_bound(a, b, c, 1.25)).all(), error.max()


def to_tf32(x: np.ndarray, ties_away: bool) -> np.ndarray:
    """x (float32) with 11 significant bits, by NumPy's frexp: rounded to nearest
    with ties away from zero (cvt.rna) or truncated (the emulated mma_sync on
    inputs that __float_to_tf32 did not round)."""
    mantissa, exponent = np.frexp(x.astype(np.float64))
    scaled = np.abs(mantissa) * 2.0**11
    kept = np.floor(scaled + 0.5) if ties_away else np.floor(scaled)
    return np.ldexp(np.sign(mantissa) * kept, exponent - 11)


@pytest.mark.parametrize("round_inputs", [True, False], ids=["float_to_tf32", "truncated"])
def test_tf32_inputs_keep_10_mantissa_bits(wmma, rng, round_inputs):
    gemm = next(g for g in GEMMS if g.input == TF32 and g.round_tf32 == round_inputs)
    a, b, c = inputs(rng, gemm, integers=False)
    d = run_gemm(wmma, gemm, a, b, c, alpha=1.0)
    a_tf32, b_tf32 = to_tf32(a, round_inputs), to_tf32(b, round_inputs)
    expected = a_tf32 @ b_tf32 + c
    bound = float_accumulation_bound(a_tf32, b_tf32, c, 1.0)
    assert (np.abs(d - expected) <= bound).all(), np.abs(d - expected).max()
    # The rounding shows: the full float32 inputs give a result far outside that bound.
    fp32 = a.astype(np.float64) @ b.astype(np.float64) + c
    assert np.median(np.abs(d - fp32) / bound) > 10


def fragment_layout(module, block: int):
    owner = aligned(np.full((16, 16), np.nan, dtype=np.float32))
    counts = np.zeros(4, dtype=np.int32)
    a = aligned(np.arange(256).reshape(16, 16).astype(np.float16))  # distinct elements
    replicated = np.zeros(32, dtype=np.int32)
    module.get_function("wmma_fragment_layout")((1,), (block,), (owner, counts, a, replicated))
    return owner, counts, replicated


def test_fragment_elements_per_lane(wmma):
    owner, counts, replicated = fragment_layout(wmma, 32)
    # Documented mapping: x[i] of lane l is row l / 4 + 8 (i / 4), column 4 (l % 4) + i % 4.
    lane, i = np.meshgrid(np.arange(32), np.arange(8), indexing="ij")
    expected = np.full((16, 16), np.nan, dtype=np.float32)
    expected[lane // 4 + 8 * (i // 4), 4 * (lane % 4) + i % 4] = lane * 64 + i
    np.testing.assert_array_equal(owner, expected)
    # CUDA's num_elements: accumulator 16x16 float, matrix_a half, tf32 matrix_a, double acc.
    np.testing.assert_array_equal(counts, [8, 16, 4, 2])
    # A __half matrix_a holds 8 distinct elements per lane, CUDA's 16 as two copies.
    np.testing.assert_array_equal(replicated, 1)


def test_a_lane_missing_from_a_load_is_a_deadlock_naming_the_line(wmma, kernel_source):
    line = 1 + next(i for i, text in enumerate(kernel_source("wmma.cu").splitlines(), 1)
                    if "else if (lane < 16)" in text)
    a = aligned(np.zeros((32, 16), dtype=np.float16))
    d = aligned(np.zeros((16, 16), dtype=np.float32))
    with pytest.raises(emulator.KernelDeadlockError,
                       match=rf"16 thread\(s\) wait at wmma::load_matrix_sync on line {line}"):
        wmma.get_function("wmma_divergent_load")((1,), (32,), (a, d, np.int32(0)))


def test_lanes_passing_different_pointers_are_an_error(wmma):
    a = aligned(np.zeros((32, 16), dtype=np.float16))
    d = aligned(np.zeros((16, 16), dtype=np.float32))
    with pytest.raises(emulator.WarpMatrixError,
                       match=r"warp 0, wmma::load_matrix_sync on line \d+: lane 16 passed pointer"):
        wmma.get_function("wmma_divergent_load")((1,), (32,), (a, d, np.int32(1)))


def test_a_warp_of_fewer_than_32_threads_is_an_error(wmma):
    with pytest.raises(emulator.WarpMatrixError, match=r"warp 1 of the block has only 16 thread"):
        fragment_layout(wmma, 48)


def test_misaligned_pointer_and_leading_dimension_are_errors(wmma, rng):
    gemm = GEMMS[0]
    a, b, c = inputs(rng, gemm, integers=True)
    kernel = wmma.get_function(gemm.expression)
    a_mem, b_mem = aligned(a), aligned(np.ascontiguousarray(b.T))
    c_mem, d_mem = aligned(c), aligned(np.zeros_like(c))
    depth, cols = np.int32(a.shape[1]), np.int32(c.shape[1])
    args = [a_mem, b_mem, c_mem, d_mem, np.int32(cols // 16), depth, depth, depth, cols,
            np.float32(1)]
    with pytest.raises(emulator.WarpMatrixError, match="ldm 44 is not a multiple of 16 bytes"):
        kernel((1,), (32,), (*args[:6], np.int32(44), *args[7:]))
    shifted = aligned(np.zeros(a.size + 8, dtype=np.float16))[8:].reshape(a.shape)  # 16 bytes in
    with pytest.raises(emulator.WarpMatrixError, match="is not 32-byte .* aligned"):
        kernel((1,), (32,), (shifted, *args[1:]))


@pytest.mark.parametrize(("element", "call", "message"), [
    ("float", "load_matrix_sync(f, a, 16)", "wmma supports m16n16k16"),
    ("__half", "load_matrix_sync(f, a, 16, wmma::mem_row_major)",  # a layout only for C
     "no matching function for call to .load_matrix_sync"),
], ids=["float-matrix_a", "layout-for-matrix_a"])
def test_what_cuda_refuses_fails_at_build(element, call, message):
    code = ("#include <mma.h>\n"
            "using namespace nvcuda;\n"
            f'extern "C" __global__ void k(const {element}* a) {{\n'
            f"  wmma::fragment<wmma::matrix_a, 16, 16, 16, {element}, wmma::row_major> f;\n"
            f"  wmma::{call};\n}}\n")
    with pytest.raises(emulator.CompileError, match=message):
        emulator.RawModule(code=code).get_function("k")


# ------------------------------------------------------------- the modes --
@pytest.mark.parametrize("gemm", GEMMS[:2], ids=str)
def test_counters_count_each_fragment_access_as_the_sectors_it_touches(wmma, rng, gemm):
    a, b, c = inputs(rng, gemm, integers=True)  # 2 x 3 tiles of 16 x 16, 3 steps of k
    with emulator.mode("counters"), emulator.recording() as launches:
        d = run_gemm(wmma, gemm, a, b, c, alpha=1.0, padded=False)
    np.testing.assert_array_equal(d, a.astype(np.float64) @ b.astype(np.float64) + c)
    counts = {buffer.name: buffer for buffer in launches[0].buffers}
    warps = 6
    # A 16 x 16 half tile: one 16-byte vector per lane, 512 consecutive bytes: 16 sectors.
    for name in "ab":
        load = counts[name].access["load"]
        assert (load.requests, load.sectors, load.efficiency) == (3 * warps, 3 * warps * 16, 1.0)
    assert counts["a"].distinct_read_sectors == a.nbytes // 32
    # A 16 x 16 float accumulator: two vectors per lane row-major (16 sectors each);
    # column-major, 8 scalar accesses per lane, each request 8 rows of 4 columns.
    requests, sectors = (2, 16) if gemm.row_major_c else (8, 4)
    for name, kind in (("c", "load"), ("d", "store")):
        access = counts[name].access[kind]
        assert (access.requests, access.sectors, access.efficiency) == (
            requests * warps, requests * warps * sectors, 1.0)
    assert counts["d"].distinct_written_sectors == c.nbytes // 32


def staged(module, barrier: int, rng):
    a = aligned(rng.integers(-4, 5, (16, 16)).astype(np.float16))
    b = aligned(rng.integers(-4, 5, (16, 16)).astype(np.float16))
    d = aligned(np.full((16, 16), np.nan, dtype=np.float32))
    module.get_function("wmma_staged")((1,), (64,), (a, b, d, np.int32(barrier)))
    np.testing.assert_array_equal(d, a.astype(np.float64) @ b.astype(np.float64))


def test_counters_a_shared_tile_fragment_is_four_wavefronts(wmma, rng):
    with emulator.mode("counters"), emulator.recording() as launches:
        staged(wmma, 1, rng)
    # Warp 1's load_matrix_sync from the shared tile: 32 lanes x 16 bytes, 4 per bank.
    assert launches[0].shared["load"] == emulator.traced.SharedCounts(requests=1, wavefronts=4)


def test_racecheck_sees_the_lanes_fragment_accesses(wmma, rng):
    with emulator.mode("racecheck"):
        staged(wmma, 1, rng)
        run_gemm(wmma, GEMMS[0], *inputs(rng, GEMMS[0], integers=True), alpha=1.0)
        with pytest.raises(emulator.RaceCheckError,
                           match=r"data race on shared memory.*written by block \(0, 0, 0\) "
                                 r"thread \(\d+, 0, 0\), then read by block \(0, 0, 0\) "
                                 r"thread \((3[2-9]|[4-6]\d), 0, 0\)"):
            staged(wmma, 0, rng)


def warp_epilogue(module, sync: int, rng):
    c = aligned(rng.standard_normal((16, 16)).astype(np.float32))
    d = aligned(np.full((16, 16), np.nan, dtype=np.float32))
    module.get_function("wmma_warp_epilogue")((1,), (32,), (c, d, np.int32(sync)))
    np.testing.assert_array_equal(d, c.T)


def test_racecheck_orders_a_warps_accesses_by_its_wmma_operations_and_syncwarp(wmma, rng):
    with emulator.mode("racecheck"):
        warp_epilogue(wmma, 1, rng)  # store, load, store of the same tile: no race
        with pytest.raises(emulator.RaceCheckError,
                           match=r"data race on shared memory, byte offset 4: written by block "
                                 r"\(0, 0, 0\) thread \(0, 0, 0\), then read by block \(0, 0, 0\) "
                                 r"thread \(1, 0, 0\)"):
            warp_epilogue(wmma, 0, rng)  # lanes read what others stored, without __syncwarp()


def test_memcheck_catches_a_fragment_stored_past_the_end(wmma, rng):
    gemm = GEMMS[0]
    a, b, c = inputs(rng, gemm, integers=True)
    kernel = wmma.get_function(gemm.expression)
    depth, cols = np.int32(a.shape[1]), np.int32(c.shape[1])
    short_d = aligned(np.zeros((c.shape[0] - 1, c.shape[1]), dtype=np.float32))
    with emulator.mode("memcheck"), pytest.raises(
            emulator.MemcheckError, match=r"argument 3 'd'.*past its end"):
        kernel((6,), (32,), (aligned(a), aligned(np.ascontiguousarray(b.T)), aligned(c), short_d,
                             np.int32(3), depth, depth, depth, cols, np.float32(1)))


def test_asan_catches_a_fragment_loaded_past_the_end(kernel_source, rng):
    gemm = GEMMS[0]
    module = emulator.RawModule(code=kernel_source("wmma.cu"), name_expressions=(gemm.expression,))
    a, b, c = inputs(rng, gemm, integers=True)
    depth, cols = np.int32(a.shape[1]), np.int32(c.shape[1])
    short_a = aligned(a[:-1])
    with emulator.mode("asan"), pytest.raises(
            emulator.AddressSanitizerError,
            match=r"heap-buffer-overflow, READ of 16 byte\(s\).*argument 0 'a'"):
        module.get_function(gemm.expression)(
            (6,), (32,), (short_a, aligned(np.ascontiguousarray(b.T)), aligned(c),
                          aligned(np.zeros_like(c)), np.int32(3), depth, depth, depth, cols,
                          np.float32(1)))


# ----------------------------------------------------------- NVRTC build --
def test_the_kernels_build_for_sm90_and_sm80_with_nvrtc():
    try:
        find_toolchain()
    except ToolchainNotFound as error:
        if os.environ.get("CI"):  # the wheels are test dependencies: CI must have them
            raise
        pytest.skip(f"CUDA toolchain wheels not installed: {error}")
    others = {"wmma_fragment_layout": 32, "wmma_divergent_load": 32, "wmma_staged": 64,
              "wmma_warp_epilogue": 32}
    source = CudaSource("wmma.cu", tuple(g.expression for g in GEMMS),
                        {**others, **{g.expression: 32 for g in GEMMS}}, options=("-std=c++17",))
    kernels = Path(__file__).parent / "kernels"
    result = check_kernels({source.filename: source}, cuda_dir=kernels, only=(source.filename,))
    assert [p for p in result.problems if p.severity == "error"] == []
    built = {(report.arch, report.kernel) for report in result.kernels}
    assert built == {(arch, kernel) for arch in ("sm_90", "sm_80")
                     for kernel in (*others, *(g.expression for g in GEMMS))}
