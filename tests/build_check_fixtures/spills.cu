// __launch_bounds__(1024, 2) caps registers at 65536 / (2 * 1024) = 32 per
// thread, while 64 loaded values stay live until the second loop: ptxas must
// spill some of them to local memory.
extern "C" __global__ void __launch_bounds__(1024, 2)
spill_heavy(const float* __restrict__ input, float* __restrict__ output) {
  float values[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) values[i] = input[threadIdx.x + i * 1024];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < 64; ++i) sum += values[i] * values[(i * 37) % 64];
  output[threadIdx.x] = sum;
}
