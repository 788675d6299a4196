// Asks for 4 resident blocks of 1024 threads, twice what an SM holds: ptxas
// warns and ignores the minimum, and the check must pass that warning on.
extern "C" __global__ void __launch_bounds__(1024, 4) fill(float* data) {
  data[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}
