// <mma.h> for the CPU emulator: nvcuda::wmma, the warp matrix (tensor core)
// fragments and operations, with CUDA's names and signatures. Found before the
// CUDA headers' own mma.h (the shim directory comes first on the include path).
//
// Each lane's fragment holds its share of the matrix in `x[]`. load, store and
// mma are warp collectives: the 32 lanes of the warp must all arrive (else a
// deadlock names the line) and pass the same pointer, leading dimension and
// layout (else WarpMatrixError). After that rendezvous every lane loads or
// stores its own elements, in its own context, so memcheck, asan, counters and
// racecheck see each lane's accesses; mma_sync computes the whole product
// once, from all lanes' fragments. The element mapping, the arithmetic and the
// supported shapes are in docs/emulator.md ("Tensor cores (wmma)").
#pragma once

#include "dcn_emulator.h"

namespace nvcuda {
namespace wmma {

struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;
namespace precision {
struct tf32;
}
enum layout_t { mem_row_major, mem_col_major };

// cvt.rna.tf32.f32: to 10 mantissa bits, to nearest with ties away from zero.
inline float __float_to_tf32(float in) {
  const unsigned bits = dcn_bit_cast<unsigned>(in);
  if ((bits & 0x7f800000u) == 0x7f800000u) return in;  // infinities and NaN as they are
  return dcn_bit_cast<float>((bits + 0x1000u) & 0xffffe000u);
}

template <typename T>
struct helper_traits {
  typedef T element_type;
  typedef T storage_element_type;
  typedef T fill_argument_type;
};
template <>
struct helper_traits<precision::tf32> {
  typedef precision::tf32 element_type;
  typedef float storage_element_type;
  typedef float fill_argument_type;
};

template <typename T, int size, int packed_size = size>
struct __align__(8) __frag_base {
  enum { num_elements = size };
  enum { num_storage_elements = packed_size };
  typedef T element_type;
  typedef typename helper_traits<T>::storage_element_type storage_element_type;
  storage_element_type x[num_storage_elements];
};

// Per lane, as on the GPU: no collective.
template <typename T, int size, int packed_size>
inline void fill_fragment(__frag_base<T, size, packed_size>& f,
                          const typename helper_traits<T>::fill_argument_type& in) {
  for (int i = 0; i < f.num_storage_elements; i++) f.x[i] = in;
}

}  // namespace wmma
}  // namespace nvcuda

namespace dcn {
namespace wmma_detail {
namespace w = ::nvcuda::wmma;

// The matrix a fragment holds (matrix_a: m x k, matrix_b: k x n, accumulator:
// m x n) and how it is spread over the lanes. In storage order (row-major for
// accumulators and row_major fragments, column-major for col_major ones) the
// matrix is cut into vectors of 16 bytes (`vector` elements), dealt out to the
// lanes in turn: x[i] of lane l is element (32 * (i / vector) + l) * vector +
// i % vector. So the warp's i-th vectors are 512 consecutive bytes of the
// matrix, as a GPU's wide loads would fetch them. Where CUDA's fragment has more
// elements than the lane's share, `distinct` (__half matrix_a / matrix_b: 16),
// x[i] holds element i % distinct again.
template <class Use, int m, int n, int k, class T, class Layout>
struct Shape {
  static constexpr bool is_a = std::is_same_v<Use, w::matrix_a>;
  static constexpr bool is_b = std::is_same_v<Use, w::matrix_b>;
  static constexpr bool is_accumulator = std::is_same_v<Use, w::accumulator>;
  static constexpr int rows = is_b ? k : m;
  static constexpr int cols = is_a ? k : n;
  static constexpr int distinct = rows * cols / 32;
  static constexpr int vector_bytes = 16;
  static constexpr int vector = std::min<int>(
      distinct, vector_bytes / sizeof(typename w::helper_traits<T>::storage_element_type));
  static constexpr bool half_input = (is_a || is_b) && std::is_same_v<T, __half>;
  static constexpr int num_elements = half_input ? 16 : distinct;
  static constexpr bool row_major_storage =
      is_accumulator || std::is_same_v<Layout, w::row_major>;

  static constexpr bool wide = (m == 16 && n == 16 && k == 16) || (m == 32 && n == 8 && k == 16) ||
                               (m == 8 && n == 32 && k == 16);
  static constexpr bool type_supported =
      is_accumulator ? (wide && (std::is_same_v<T, float> || std::is_same_v<T, __half>)) ||
                           (m == 16 && n == 16 && k == 8 && std::is_same_v<T, float>) ||
                           (m == 8 && n == 8 && k == 4 && std::is_same_v<T, double>)
                     : (wide && (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>)) ||
                           (m == 16 && n == 16 && k == 8 && std::is_same_v<T, w::precision::tf32>) ||
                           (m == 8 && n == 8 && k == 4 && std::is_same_v<T, double>);
  static_assert(is_a || is_b || is_accumulator,
                "wmma::fragment's first parameter is matrix_a, matrix_b or accumulator");
  static_assert(is_accumulator ? std::is_void_v<Layout>
                               : std::is_same_v<Layout, w::row_major> ||
                                     std::is_same_v<Layout, w::col_major>,
                "a matrix_a / matrix_b fragment takes row_major or col_major; an accumulator none");
  static_assert(type_supported,
                "the CPU emulator's wmma supports m16n16k16, m32n8k16 and m8n32k16 with __half or "
                "__nv_bfloat16 inputs (float or __half accumulators), m16n16k8 with precision::tf32 "
                "inputs and m8n8k4 with double (no integer or sub-byte types)");

  // Row and column of the lane's element i.
  static void position(unsigned lane, int i, int& row, int& col) {
    const int element = i % distinct;
    const int linear = (32 * (element / vector) + int(lane)) * vector + element % vector;
    if (row_major_storage) {
      row = linear / cols;
      col = linear % cols;
    } else {
      col = linear / rows;
      row = linear % rows;
    }
  }
};
}  // namespace wmma_detail
}  // namespace dcn

namespace nvcuda {
namespace wmma {

template <typename Use, int m, int n, int k, typename T, typename Layout = void>
class fragment
    : public __frag_base<T, ::dcn::wmma_detail::Shape<Use, m, n, k, T, Layout>::num_elements> {};

}  // namespace wmma
}  // namespace nvcuda

namespace dcn {
namespace wmma_detail {

template <class Fragment> struct Traits;
template <class Use, int m, int n, int k, class T, class Layout>
struct Traits<w::fragment<Use, m, n, k, T, Layout>> : Shape<Use, m, n, k, T, Layout> {
  using Element = T;
  using Storage = typename w::helper_traits<T>::storage_element_type;
};

inline unsigned lane_id() { return dcn_current->linear_tid & 31u; }

// The caller's source line, for deadlock reports: a defaulted last parameter of
// each operation (evaluated at the call), so CUDA's signatures stay as they are
// and no extra argument of the caller's converts to it.
struct CallerLine {
  explicit CallerLine(int line) : line(line) {}
  int line;
};

// What each lane passes to a load or a store: all 32 must agree.
struct Target {
  const void* pointer;
  unsigned ldm;
  w::layout_t layout;
};

inline const char* layout_name(w::layout_t layout) {
  return layout == w::mem_row_major ? "mem_row_major" : "mem_col_major";
}

template <class Storage>
DCN_UNTRACED const char* check_target(void* const* lane_data) {
  static thread_local char problem[512];
  const Target& first = *static_cast<const Target*>(lane_data[0]);
  for (int l = 1; l < 32; ++l) {
    const Target& other = *static_cast<const Target*>(lane_data[l]);
    if (other.pointer != first.pointer || other.ldm != first.ldm || other.layout != first.layout) {
      std::snprintf(problem, sizeof problem,
                    "lane %d passed pointer %p, ldm %u, %s where lane 0 passed %p, %u, %s: every "
                    "lane of the warp must pass the same pointer, leading dimension and layout",
                    l, other.pointer, other.ldm, layout_name(other.layout), first.pointer,
                    first.ldm, layout_name(first.layout));
      return problem;
    }
  }
  if (reinterpret_cast<std::uintptr_t>(first.pointer) % 32 != 0) {
    std::snprintf(problem, sizeof problem,
                  "pointer %p is not 32-byte (256-bit) aligned, as wmma requires (NumPy aligns "
                  "arrays to 16 bytes only: pass torch tensors; give __shared__ tiles "
                  "__align__(32))", first.pointer);
    return problem;
  }
  if (first.ldm * sizeof(Storage) % 16 != 0) {
    std::snprintf(problem, sizeof problem,
                  "ldm %u is not a multiple of 16 bytes (%zu elements of %zu bytes), as wmma "
                  "requires", first.ldm, 16 / sizeof(Storage), sizeof(Storage));
    return problem;
  }
  return nullptr;
}

// The lane's own elements between memory and its fragment, in runs of
// consecutive addresses of at most 16 bytes (one LDG.128 / STS.128 each). The
// traced build counts each run as one access of the lane at this call site.
template <class Fragment, class Storage>
DCN_UNTRACED void copy_lane(Fragment& f, Storage* memory, unsigned ldm, w::layout_t layout,
                            bool store) {
  using T = Traits<Fragment>;
  const unsigned lane = lane_id();
  constexpr int kRun = int(16 / sizeof(Storage));
  auto offset = [&](int i) {
    int row, col;
    T::position(lane, i, row, col);
    return layout == w::mem_row_major ? std::size_t(row) * ldm + col : std::size_t(col) * ldm + row;
  };
  for (int start = 0; start < T::distinct;) {
    const std::size_t first = offset(start);
    int end = start + 1;
    while (end < T::distinct && end - start < kRun && offset(end) == first + (end - start)) ++end;
    const std::size_t bytes = std::size_t(end - start) * sizeof(Storage);
    if (store) std::memcpy(memory + first, &f.x[start], bytes);
    else std::memcpy(&f.x[start], memory + first, bytes);
#if defined(DCN_TRACED)
    trace_matrix_access(memory + first, unsigned(bytes), store, __builtin_return_address(0));
#endif
    start = end;
  }
  if (!store)
    for (int i = T::distinct; i < T::num_elements; ++i) f.x[i] = f.x[i % T::distinct];
}

template <class Fragment>
void load(int line, Fragment& f, const typename Traits<Fragment>::Storage* p, unsigned ldm,
          w::layout_t layout) {
  using Storage = typename Traits<Fragment>::Storage;
  Target target{p, ldm, layout};
  warp_matrix(line, "wmma::load_matrix_sync", &target, &check_target<Storage>);
  copy_lane(f, const_cast<Storage*>(p), ldm, layout, false);
}

// Inputs as the tensor core reads them: tf32 keeps 10 mantissa bits; a value
// not rounded by __float_to_tf32 is truncated (the GPU's handling of one is
// undocumented).
template <class Element, class Storage, class Acc>
inline Acc input_value(Storage x) {
  if constexpr (std::is_same_v<Element, w::precision::tf32>)
    return dcn_bit_cast<float>(dcn_bit_cast<unsigned>(x) & 0xffffe000u);
  else if constexpr (std::is_same_v<Storage, __half>) return __half2float(x);
  else if constexpr (std::is_same_v<Storage, __nv_bfloat16>) return __bfloat162float(x);
  else return Acc(x);
}

template <class Acc, class Storage>
inline Storage output_value(Acc x) {
  if constexpr (std::is_same_v<Storage, __half>) return __float2half_rn(float(x));
  else return Storage(x);
}

struct MmaOperands {
  const void* a;
  const void* b;
  const void* c;
  void* d;
};

template <class Fragment, class Acc, int R, int C>
void gather(void* const* lane_data, const void* MmaOperands::*which, Acc (&matrix)[R][C]) {
  using T = Traits<Fragment>;
  for (unsigned lane = 0; lane < 32; ++lane) {
    const auto& f = *static_cast<const Fragment*>(
        static_cast<const MmaOperands*>(lane_data[lane])->*which);
    for (int i = 0; i < T::distinct; ++i) {
      int row, col;
      T::position(lane, i, row, col);
      matrix[row][col] = input_value<typename T::Element, typename T::Storage, Acc>(f.x[i]);
    }
  }
}

// D = A B + C over the whole warp: each product (exact: the inputs have at
// most 11 significant bits, or are doubles fused) added to C in k order,
// rounded to the accumulator's precision (float or double) at every step.
// Fragments are registers on the GPU: the traced build does not trace them here.
template <class D, class A, class B, class C>
DCN_UNTRACED const char* multiply(void* const* lane_data) {
  using Acc = std::conditional_t<std::is_same_v<typename Traits<D>::Element, double>, double, float>;
  constexpr int M = Traits<A>::rows, K = Traits<A>::cols, N = Traits<B>::cols;
  Acc a[M][K], b[K][N], sum[M][N];
  gather<A>(lane_data, &MmaOperands::a, a);
  gather<B>(lane_data, &MmaOperands::b, b);
  gather<C>(lane_data, &MmaOperands::c, sum);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      for (int p = 0; p < K; ++p) {
        // A float product of these inputs is exact: one rounding, as fused.
        if constexpr (std::is_same_v<Acc, float>) sum[i][j] += a[i][p] * b[p][j];
        else sum[i][j] = std::fma(a[i][p], b[p][j], sum[i][j]);
      }
  using T = Traits<D>;
  for (unsigned lane = 0; lane < 32; ++lane) {
    D& d = *static_cast<D*>(static_cast<const MmaOperands*>(lane_data[lane])->d);
    for (int i = 0; i < T::num_elements; ++i) {
      int row, col;
      T::position(lane, i, row, col);
      d.x[i] = output_value<Acc, typename T::Storage>(sum[row][col]);
    }
  }
  return nullptr;
}

}  // namespace wmma_detail
}  // namespace dcn

namespace nvcuda {
namespace wmma {

using CallerLine = ::dcn::wmma_detail::CallerLine;

template <class Use, int m, int n, int k, class T, class Layout>
inline void load_matrix_sync(fragment<Use, m, n, k, T, Layout>& a,
                             const typename helper_traits<T>::storage_element_type* p,
                             unsigned ldm, CallerLine line = CallerLine(__builtin_LINE())) {
  static_assert(!std::is_same_v<Use, accumulator>,
                "load_matrix_sync of an accumulator takes a layout (mem_row_major or mem_col_major)");
  ::dcn::wmma_detail::load(line.line, a, p, ldm,
                           std::is_same_v<Layout, row_major> ? mem_row_major : mem_col_major);
}

template <int m, int n, int k, class T>
inline void load_matrix_sync(fragment<accumulator, m, n, k, T>& a, const T* p, unsigned ldm,
                             layout_t layout, CallerLine line = CallerLine(__builtin_LINE())) {
  ::dcn::wmma_detail::load(line.line, a, p, ldm, layout);
}

template <int m, int n, int k, class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, m, n, k, T>& a, unsigned ldm,
                              layout_t layout, CallerLine line = CallerLine(__builtin_LINE())) {
  ::dcn::wmma_detail::Target target{p, ldm, layout};
  ::dcn::warp_matrix(line.line, "wmma::store_matrix_sync", &target,
                     &::dcn::wmma_detail::check_target<T>);
  ::dcn::wmma_detail::copy_lane(const_cast<fragment<accumulator, m, n, k, T>&>(a), p, ldm,
                                layout, true);
}

template <int m, int n, int k, class TD, class TA, class LA, class TB, class LB, class TC>
inline void mma_sync(fragment<accumulator, m, n, k, TD>& d,
                     const fragment<matrix_a, m, n, k, TA, LA>& a,
                     const fragment<matrix_b, m, n, k, TB, LB>& b,
                     const fragment<accumulator, m, n, k, TC>& c,
                     CallerLine line = CallerLine(__builtin_LINE())) {
  static_assert(std::is_same_v<TA, TB>, "mma_sync: matrix_a and matrix_b of one element type");
  static_assert(std::is_same_v<TA, __half> ||
                    (std::is_same_v<TD, TC> &&
                     std::is_same_v<TD, std::conditional_t<std::is_same_v<TA, double>, double,
                                                           float>>),
                "mma_sync: __half inputs take float or __half accumulators; __nv_bfloat16 and "
                "precision::tf32 inputs float ones, double inputs double ones");
  ::dcn::wmma_detail::MmaOperands operands{&a, &b, &c, &d};
  ::dcn::warp_matrix(
      line.line, "wmma::mma_sync", &operands,
      &::dcn::wmma_detail::multiply<fragment<accumulator, m, n, k, TD>,
                                    fragment<matrix_a, m, n, k, TA, LA>,
                                    fragment<matrix_b, m, n, k, TB, LB>,
                                    fragment<accumulator, m, n, k, TC>>);
}

}  // namespace wmma
}  // namespace nvcuda
