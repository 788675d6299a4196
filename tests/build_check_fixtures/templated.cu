// A templated kernel, reachable only through NVRTC name expressions; the
// __half instantiation needs <cuda_fp16.h> from the include directories.
#include <cuda_fp16.h>

template <typename T, int ITEMS_PER_THREAD>
__global__ void scale(T* data, T factor, int n) {
  const int first = (blockIdx.x * blockDim.x + threadIdx.x) * ITEMS_PER_THREAD;
#pragma unroll
  for (int item = 0; item < ITEMS_PER_THREAD; ++item) {
    if (first + item < n) data[first + item] = data[first + item] * factor;
  }
}
