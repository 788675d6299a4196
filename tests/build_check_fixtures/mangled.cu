// A C++ kernel (not extern "C") and no name expression for it: ptxas knows it
// only by its mangled name, which is all CuPy could fetch it by.
__global__ void fill(float* data) { data[threadIdx.x] = 1.0f; }
