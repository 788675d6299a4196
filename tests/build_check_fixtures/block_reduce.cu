// A well-behaved kernel: few registers, 1 KiB of static shared memory, a
// barrier, and __launch_bounds__ matching its launch block size of 256.
extern "C" __global__ void __launch_bounds__(256)
block_sum(const float* __restrict__ input, float* __restrict__ block_sums, int n) {
  __shared__ float partial[256];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  partial[threadIdx.x] = i < n ? input[i] : 0.0f;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) block_sums[blockIdx.x] = partial[0];
}
