// Variant timing of the sampler step: graph of 16 calls on distinct buffers, bf16.
// Usage: bench [B=8] [noise: 2 = Philox (default), 0 = none]
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cstdio>
#include <vector>
#include "sampler_step.h"
using namespace spiral_rt;
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); return 1; } } while (0)
int main(int argc, char** argv) {
  const int B = argc > 1 ? atoi(argv[1]) : 8, SETS = 16;
  const NoiseMode mode = argc > 2 && atoi(argv[2]) == 0 ? NoiseMode::kNone : NoiseMode::kPhilox;
  const int64_t N = 16LL * 3 * 60 * 104, numel = B * N;
  const int64_t blocks = sampler_step_blocks_per_seq(N, DType::kBFloat16);
  std::vector<void*> x(SETS), m(SETS), xn(SETS), mu(SETS);
  std::vector<__nv_bfloat16> host(numel);
  for (int64_t i = 0; i < numel; ++i) host[i] = __float2bfloat16(float((i * 2654435761u) % 1000) / 500.f - 1.f);
  for (int s = 0; s < SETS; ++s) {
    CK(cudaMalloc(&x[s], numel * 2)); CK(cudaMalloc(&m[s], numel * 2)); CK(cudaMalloc(&xn[s], numel * 2)); CK(cudaMalloc(&mu[s], numel * 2));
    CK(cudaMemcpy(x[s], host.data(), numel * 2, cudaMemcpyHostToDevice)); CK(cudaMemcpy(m[s], host.data(), numel * 2, cudaMemcpyHostToDevice));
  }
  float *a, *b, *c, *partials, *sq; uint32_t* tickets; int64_t* keys;
  CK(cudaMalloc(&a, B * 4)); CK(cudaMalloc(&b, B * 4)); CK(cudaMalloc(&c, B * 4)); CK(cudaMalloc(&sq, B * 4));
  CK(cudaMalloc(&partials, B * blocks * 4 * SETS)); CK(cudaMalloc(&tickets, B * 4 * SETS)); CK(cudaMemset(tickets, 0, B * 4 * SETS));
  CK(cudaMalloc(&keys, B * 4 * 8));
  std::vector<float> ones(B, 0.7f); std::vector<int64_t> hk(B * 4);
  for (int i = 0; i < B; ++i) { hk[4 * i] = 1234; hk[4 * i + 1] = i; hk[4 * i + 2] = 3; hk[4 * i + 3] = 1; }
  CK(cudaMemcpy(a, ones.data(), B * 4, cudaMemcpyHostToDevice)); CK(cudaMemcpy(b, ones.data(), B * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(c, ones.data(), B * 4, cudaMemcpyHostToDevice)); CK(cudaMemcpy(keys, hk.data(), B * 32, cudaMemcpyHostToDevice));
  cudaStream_t st; CK(cudaStreamCreate(&st));
  auto args = [&](int s) {
    SamplerStepArgs p; p.x = x[s]; p.m = m[s]; p.a = a; p.b = b; p.c = c; p.noise_key = keys; p.x_next = xn[s]; p.mu = mu[s];
    p.partials = partials + s * B * blocks; p.tickets = tickets + s * B; p.sq_sum = sq; p.num_seqs = B; p.seq_len = N;
    p.dtype = DType::kBFloat16; p.noise_mode = mode; return p; };
  void* flush; CK(cudaMalloc(&flush, 256 << 20));
  auto time_graph = [&](auto body) {
    cudaGraph_t g; cudaGraphExec_t ge;
    cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal); body(); cudaStreamEndCapture(st, &g);
    cudaGraphInstantiate(&ge, g, 0);
    for (int i = 0; i < 10; ++i) cudaGraphLaunch(ge, st);
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    std::vector<float> t;
    for (int i = 0; i < 200; ++i) {
      cudaMemsetAsync(flush, i, 256 << 20, st);
      cudaEventRecord(e0, st); cudaGraphLaunch(ge, st); cudaEventRecord(e1, st); cudaEventSynchronize(e1);
      float ms; cudaEventElapsedTime(&ms, e0, e1); t.push_back(ms * 1000.f / SETS);
    }
    std::sort(t.begin(), t.end()); return t[t.size() / 2]; };
  float us = time_graph([&] { for (int s = 0; s < SETS; ++s) sampler_step_launch(args(s), 0, st); });
  CK(cudaGetLastError());
  float copy_us = time_graph([&] { for (int s = 0; s < SETS; ++s) cudaMemcpyAsync(xn[s], x[s], numel * 2, cudaMemcpyDeviceToDevice, st),
                                    cudaMemcpyAsync(mu[s], m[s], numel * 2, cudaMemcpyDeviceToDevice, st); });
  // checksum of the last set's outputs
  sampler_step_launch(args(0), 0, st); CK(cudaStreamSynchronize(st));
  std::vector<__nv_bfloat16> out(numel); CK(cudaMemcpy(out.data(), xn[0], numel * 2, cudaMemcpyDeviceToHost));
  std::vector<float> hsq(B); CK(cudaMemcpy(hsq.data(), sq, B * 4, cudaMemcpyDeviceToHost));
  double cs = 0; for (int64_t i = 0; i < numel; ++i) cs += __bfloat162float(out[i]);
  const double mb = 4.0 * numel * 2 / 1e6;
  printf("B=%d noise=%d blocks/seq=%lld  step %.2f us (%.0f GB/s)  2 copies of x,m %.2f us  frac %.3f  checksum %.6g sq0 %.6g\n",
         B, int(mode), (long long)blocks, us, mb * 1e3 / us, copy_us, copy_us / us, cs, hsq[0]);
  return 0;
}
