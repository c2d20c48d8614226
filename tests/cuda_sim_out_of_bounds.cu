// Run by ctest in the emulator build under AddressSanitizer (MOELAB_CUDA=SIM, the sanitize preset): a kernel writes
// one element past the end of its output, and ASan must report it with this file and the line of the write.
#include "engine/cuda/device.cuh"

namespace {

__global__ void write_one_too_many(float* out, int n) {
  int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i <= n) out[i] = 1.0f;  // the bug: i == n is one past the end
}

}  // namespace

int main() {
  const int n = 100;
  float* out = static_cast<float*>(moelab::cuda::allocate(n * sizeof(float)));
  moelab::cuda::launch("write_one_too_many", write_one_too_many, dim3(1), dim3(128), 0, out, n);
  moelab::cuda::release(out);
  return 0;
}
