// Kernels with known counters and known races, for tests/emulator/test_counters.py
// and test_racecheck.py. One warp-level request per (warp, site) unless noted.

// Coalesced float32 copy: 4 sectors per request, efficiency 1.
extern "C" __global__ void copy(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}

// Lane i reads x[32 i]: 32 sectors per load request, efficiency 1/8.
extern "C" __global__ void gather_stride32(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[32 * i];
}

// Every lane reads x[0]: 1 sector per request, 4 useful bytes of 32.
extern "C" __global__ void broadcast(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[0];
}

// 16-byte vector loads and stores, as dcnv3_vectorized moves them: 16 sectors per
// request, a quarter of the scalar copy's requests for the same bytes.
extern "C" __global__ void copy_vector(const float* x, float* y, int n_vectors) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n_vectors) {
        const uint4 raw = *reinterpret_cast<const uint4*>(x + 4 * i);
        *reinterpret_cast<uint4*>(y + 4 * i) = make_uint4(raw.x, raw.y, raw.z, raw.w);
    }
}

// dcnv3_vectorized's float path: one uint4 load split into its four words (clang
// loads them as four 4-byte pieces), still one 16-byte request per warp.
extern "C" __global__ void sum_vector_words(const float* x, float* y, int n_vectors) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n_vectors) {
        const uint4 raw = *reinterpret_cast<const uint4*>(x + 4 * i);
        const unsigned word[4] = {raw.x, raw.y, raw.z, raw.w};
        float sum = 0.f;
        for (int k = 0; k < 4; ++k) sum += __uint_as_float(word[k]);
        y[i] = sum;
    }
}

// Two neighbouring scalars per lane: two requests of 8 sectors, not one vector.
extern "C" __global__ void pair_sum(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[2 * i] + x[2 * i + 1];
}

// Every lane adds into one bin: one atomic request per warp touching one sector.
extern "C" __global__ void histogram_one_bin(const float* x, float* bins, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(bins, x[i]);
}

// Only even lanes store: a request per warp still, the 16 lanes' bytes in 4 sectors.
extern "C" __global__ void divergent_store(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && threadIdx.x % 2 == 0) y[i] = x[i];
}

// Staged through shared memory with a barrier: shared accesses are not global traffic.
extern "C" __global__ void reverse_in_block(const float* x, float* y) {
    __shared__ float staged[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    staged[threadIdx.x] = x[i];
    __syncthreads();
    y[i] = staged[blockDim.x - 1 - threadIdx.x];
}

// Shared memory at a lane stride of `stride` floats: a `stride`-way bank conflict
// (32 banks of 4 bytes) up to 32; stride 0 is a broadcast, conflict-free.
extern "C" __global__ void shared_stride(const float* x, float* y, int stride) {
    __shared__ float tile[32 * 32];
    for (int k = threadIdx.x; k < 32 * 32; k += blockDim.x) tile[k] = x[k];  // conflict-free
    __syncthreads();
    y[blockIdx.x * blockDim.x + threadIdx.x] = tile[(threadIdx.x * stride) % (32 * 32)];
}

// ----------------------------------------------------------------- races --
// Many threads of many blocks add into the same few bins with a plain +=: a race.
extern "C" __global__ void scatter_plain(const float* x, float* bins, int n, int num_bins) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) bins[i % num_bins] += x[i];
}

// The same scatter, correct: atomics do not race with each other.
extern "C" __global__ void scatter_atomic(const float* x, float* bins, int n, int num_bins) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(bins + i % num_bins, x[i]);
}

// Reads a neighbour's shared slot before the barrier that publishes it: a race.
extern "C" __global__ void shared_read_before_barrier(const float* x, float* y) {
    __shared__ float staged[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    staged[threadIdx.x] = x[i];
    const float neighbour = staged[(threadIdx.x + 1) % blockDim.x];
    __syncthreads();
    y[i] = neighbour;
}

// The same exchange after the barrier: correct.
extern "C" __global__ void shared_read_after_barrier(const float* x, float* y) {
    __shared__ float staged[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    staged[threadIdx.x] = x[i];
    __syncthreads();
    y[i] = staged[(threadIdx.x + 1) % blockDim.x];
}

// A (not unrolled) loop over contiguous pairs: the same two sites again each
// iteration, never a vector.
extern "C" __global__ void pairs_in_a_loop(const float* x, float* y, int n, int pairs) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float sum = 0.f;
        for (int p = 0; p < pairs; ++p) sum += x[2 * pairs * i + 2 * p] * x[2 * pairs * i + 2 * p + 1];
        y[i] = sum;
    }
}
