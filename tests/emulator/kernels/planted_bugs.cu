// Kernels with planted bugs that the emulator must catch (test_planted_bugs.py).

// The tree reduction of kernels/emulator/bench.py with the __syncthreads()
// after the shared-memory store removed: threads read partials that other
// threads have not written yet.
extern "C" __global__ void tree_sum_missing_sync(const float* x, float* sums, int n) {
  __shared__ float partial[256];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  partial[threadIdx.x] = i < n ? x[i] : 0.0f;
  // BUG: missing __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) sums[blockIdx.x] = partial[0];
}

// Off-by-one bound: the thread with i == n writes one element past the end.
extern "C" __global__ void copy_off_by_one(const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) y[i] = i < n ? x[i] : 0.0f;  // BUG: i <= n
}

// Reads one element past the end of x (only AddressSanitizer sees reads).
extern "C" __global__ void shifted_read(const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i + 1];  // BUG: x[n] for the last thread
}

// A barrier inside a branch only part of the block takes.
extern "C" __global__ void barrier_in_branch(float* y) {
  if (threadIdx.x < 48) {
    y[threadIdx.x] = 1.0f;
    __syncthreads();  // BUG: threads 48.. never get here
  }
}

// Two halves of the block wait at different __syncthreads() calls.
extern "C" __global__ void barriers_per_branch(float* y) {
  if (threadIdx.x % 2) {
    y[threadIdx.x] = 1.0f;
    __syncthreads();
  } else {
    y[threadIdx.x] = 2.0f;
    __syncthreads();  // BUG: a different barrier than the odd threads'
  }
}

// A full-mask shuffle that only half of the warp executes.
extern "C" __global__ void shuffle_in_branch(float* y) {
  float v = y[threadIdx.x];
  if (threadIdx.x < 16) v += __shfl_down_sync(0xffffffffu, v, 1);  // BUG: mask names all lanes
  y[threadIdx.x] = v;
}
