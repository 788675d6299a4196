// Missing semicolon on line 4: NVRTC must report it with file and line.
extern "C" __global__ void broken(float* data) {
  const int i = threadIdx.x;
  data[i] = 1.0f
}
