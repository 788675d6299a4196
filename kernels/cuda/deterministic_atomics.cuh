// Scatter-adds whose result does not depend on the order the adds run in,
// for the backward passes under torch.use_deterministic_algorithms(True)
// (docs/ops-semantics.md, "Determinism"). The host side -- when to use them,
// the scale, the status check, the conversion back -- is kernels/determinism.py.
//
// Float atomics are not reproducible: float addition is not associative, and
// the order in which threads reach an address changes from run to run. Integer
// addition is associative, so the sums here are fixed-point int64: a value v
// is added as round(v * scale) and the element's value is sum / scale.
//
// The scale. The host picks scale = 2^e, the largest power of two with
//     max|v| * scale * max_addends <= 2^62,
// max|v| bounding every value added and max_addends the number of values one
// element can receive. Then every partial sum, in any order, stays below
// 2^62 + max_addends / 2 < 2^63 in magnitude: the range is about
// ±max|v|·max_addends. The resolution is 1/scale: each add rounds by at most
// 0.5/scale, so an element's error is at most max_addends·0.5/scale
// = 2^-63 · max|v| · max_addends² (for max_addends up to 2^19 that is below
// one float32 rounding of max|v|).
//
// What is detected, on the device, into *status (bits FIXED_POINT_*):
//  - a NaN or infinite value (no fixed-point value represents it);
//  - |v·scale| >= 2^62 or a running sum that wrapped around int64 (the
//    host's bound was wrong).
// The host reads status once after the kernel and acts (kernels/determinism.py).
//
// Usage, in a kernel that scatters into grad_input:
//     __global__ void k(..., float* grad_input, long long* grad_input_fixed,
//                       double fixed_scale, int* fixed_status, ...) {
//         const ScatterAdd<float> grad_in{grad_input, grad_input_fixed, fixed_scale,
//                                         fixed_status};
//         grad_in.add(index, value);   // float atomic, or fixed point when
//     }                                // grad_input_fixed is not null
// At most one of grad_input / grad_input_fixed is non-null (uniform across the
// launch, so the branch costs nothing); both null means no scatter
// (grad_in.enabled() is false). Either path issues one atomic per add.

#pragma once

// Measurement builds only (-DDCNBENCH_COUNT_ATOMICS, scripts/count_atomics.py):
// the scatter-add atomics issued, [0] float, [1] fixed point. The registered
// builds never define it, so they count nothing.
#ifdef DCNBENCH_COUNT_ATOMICS
extern "C" {
__device__ unsigned long long dcnbench_atomics_issued[2];
}
#define DCNBENCH_COUNT_ATOMIC(kind) atomicAdd(&dcnbench_atomics_issued[kind], 1ull)
#else
#define DCNBENCH_COUNT_ATOMIC(kind)
#endif

// Bits of the status word.
#define FIXED_POINT_NONFINITE 1
#define FIXED_POINT_OVERFLOW 2

// Adds `addend`, already in fixed point (a value, or a partial sum of values,
// times the scale), to the int64 fixed-point sum *sum.
__device__ __forceinline__ void fixed_point_add_sum(long long* sum, long long addend_value,
                                                    int* status) {
    // CUDA has no signed 64-bit atomicAdd; two's complement makes the unsigned
    // one the same operation.
    const unsigned long long addend = static_cast<unsigned long long>(addend_value);
    const unsigned long long old =
        atomicAdd(reinterpret_cast<unsigned long long*>(sum), addend);
    const unsigned long long result = old + addend;
    // Signed overflow: both operands of one sign, the result of the other.
    if (static_cast<long long>((old ^ result) & (addend ^ result)) < 0)
        atomicOr(status, FIXED_POINT_OVERFLOW);
}

// Adds round(value * scale) to the int64 fixed-point sum *sum.
template <typename value_t>
__device__ __forceinline__ void fixed_point_add(long long* sum, value_t value, double scale,
                                                int* status) {
    const double v = static_cast<double>(value);
    const double scaled = v * scale;  // exact: scale is 2^e
    // One test for the common path (false for NaN too); v - v is NaN exactly
    // for a NaN or infinite v. No isfinite / llrint: calls, which made ptxas
    // spill the backwards on sm_80. 2^62 itself is in range: the host's scale
    // may put max|v| exactly there (max_addends = 1, max|v| a power of two).
    if (!(fabs(scaled) <= 4611686018427387904.0)) {  // 2^62
        atomicOr(status, v - v == 0.0 ? FIXED_POINT_OVERFLOW : FIXED_POINT_NONFINITE);
        return;
    }
    fixed_point_add_sum(sum, __double2ll_rn(scaled), status);
}

// A scatter-add target: float atomics into `values`, or the deterministic
// fixed-point sums when `fixed` is not null (then `values` is null); both
// null: no scatter (the input needs no gradient).
template <typename accum_t>
struct ScatterAdd {
    accum_t* values;
    long long* fixed;
    double scale;
    int* status;

    __device__ __forceinline__ void add(long long index, accum_t value) const {
        DCNBENCH_COUNT_ATOMIC(fixed != nullptr);
        if (fixed != nullptr)
            fixed_point_add(fixed + index, value, scale, status);
        else
            atomicAdd(values + index, value);
    }
    // The same target, `by` elements further on (null stays null).
    __device__ __forceinline__ ScatterAdd shifted(long long by) const {
        return ScatterAdd{values != nullptr ? values + by : nullptr,
                          fixed != nullptr ? fixed + by : nullptr, scale, status};
    }
    __device__ __forceinline__ bool enabled() const {
        return values != nullptr || fixed != nullptr;
    }
};
