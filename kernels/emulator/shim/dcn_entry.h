// Included after the kernel source: turns each kernel (or template
// instantiation) into an `extern "C"` entry that unpacks CuPy-style `void**`
// arguments, plus a descriptor of its parameters' concrete types so that
// Python can check every launch's arguments against the signature.
#pragma once

#include <type_traits>
#include <utility>

namespace dcn {

// One parameter after template substitution. `kind` is the scalar kind of the
// value (of the pointee for pointers): 'f' IEEE float, 'i' signed integer,
// 'u' unsigned integer, 'b' bool, 'c' plain char, 'h' __half, 'B'
// __nv_bfloat16, 'v' void, 's' any other struct; `lanes` > 1 for vector
// types (float4: 'f', size 4, lanes 4).
struct ParamDesc {
  char kind;
  unsigned char is_pointer;
  unsigned char is_const;
  unsigned char lanes;
  unsigned size;  // bytes of one lane (of the whole struct for 's')
};

struct KernelDesc {
  const char* name;
  void (*run_thread)(void** args);
  int num_params;
  const ParamDesc* params;
};

template <class T, class = void>
struct ScalarInfo {
  static constexpr char kind = std::is_floating_point_v<T> ? 'f'
                               : std::is_same_v<T, bool>   ? 'b'
                               : std::is_same_v<T, char>   ? 'c'
                               : std::is_enum_v<T>         ? 'i'
                               : std::is_integral_v<T>     ? (std::is_signed_v<T> ? 'i' : 'u')
                                                           : 's';
  static constexpr unsigned size = sizeof(T);
  static constexpr unsigned lanes = 1;
};
template <> struct ScalarInfo<void> {
  static constexpr char kind = 'v';
  static constexpr unsigned size = 0, lanes = 1;
};
#define DCN_SCALAR_INFO(T, KIND, LANE_TYPE, LANES)            \
  template <> struct ScalarInfo<T> {                          \
    static constexpr char kind = KIND;                        \
    static constexpr unsigned size = sizeof(LANE_TYPE);       \
    static constexpr unsigned lanes = LANES;                  \
  };
#define DCN_VECTOR_INFO(PREFIX, LANE_TYPE)                                  \
  DCN_SCALAR_INFO(PREFIX##1, ScalarInfo<LANE_TYPE>::kind, LANE_TYPE, 1)     \
  DCN_SCALAR_INFO(PREFIX##2, ScalarInfo<LANE_TYPE>::kind, LANE_TYPE, 2)     \
  DCN_SCALAR_INFO(PREFIX##3, ScalarInfo<LANE_TYPE>::kind, LANE_TYPE, 3)     \
  DCN_SCALAR_INFO(PREFIX##4, ScalarInfo<LANE_TYPE>::kind, LANE_TYPE, 4)
DCN_SCALAR_INFO(__half, 'h', __half, 1)
DCN_SCALAR_INFO(__half2, 'h', __half, 2)
DCN_SCALAR_INFO(__nv_bfloat16, 'B', __nv_bfloat16, 1)
DCN_SCALAR_INFO(__nv_bfloat162, 'B', __nv_bfloat16, 2)
DCN_VECTOR_INFO(float, float)
DCN_VECTOR_INFO(double, double)
DCN_VECTOR_INFO(int, int)
DCN_VECTOR_INFO(uint, unsigned)
DCN_VECTOR_INFO(short, short)
DCN_VECTOR_INFO(ushort, unsigned short)
DCN_VECTOR_INFO(char, signed char)
DCN_VECTOR_INFO(uchar, unsigned char)
DCN_VECTOR_INFO(longlong, long long)
DCN_VECTOR_INFO(ulonglong, unsigned long long)
#undef DCN_VECTOR_INFO
#undef DCN_SCALAR_INFO

template <class P>
constexpr ParamDesc describe_param() {
  using Value = std::remove_cv_t<std::remove_reference_t<P>>;
  if constexpr (std::is_pointer_v<Value>) {
    using Pointee = std::remove_pointer_t<Value>;
    using Info = ScalarInfo<std::remove_cv_t<Pointee>>;
    return {Info::kind, 1, std::is_const_v<Pointee>, Info::lanes, Info::size};
  } else {
    using Info = ScalarInfo<Value>;
    return {Info::kind, 0, 0, Info::lanes, Info::size};
  }
}

template <class Function> struct KernelSignature;
template <class... Params> struct KernelSignature<void (*)(Params...)> {
  static constexpr int arity = sizeof...(Params);
  // A trailing sentinel keeps the array non-empty for kernels without parameters.
  static constexpr ParamDesc params[] = {describe_param<Params>()..., ParamDesc{}};

  template <auto Kernel, std::size_t... I>
  static void invoke(void** args, std::index_sequence<I...>) {
    Kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Params>>*>(args[I])...);
  }
};

template <auto Kernel>
void run_thread(void** args) {
  using Signature = KernelSignature<decltype(Kernel)>;
  Signature::template invoke<Kernel>(args, std::make_index_sequence<Signature::arity>{});
}

template <auto Kernel>
constexpr KernelDesc describe_kernel(const char* name) {
  using Signature = KernelSignature<decltype(Kernel)>;
  return {name, &run_thread<Kernel>, Signature::arity, Signature::params};
}

}  // namespace dcn
