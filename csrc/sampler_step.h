// Fused sampler step: the launcher's interface. Framework-free (no CUDA or torch types), so the
// pybind11 bindings include it without the CUDA headers.
//
// Per sequence s (rows of N = seq_len contiguous elements) and element i:
//   mu[s,i]     = a[s] * x[s,i] + b[s] * m[s,i]                     (fp32 math)
//   x_next[s,i] = round(mu[s,i] + c[s] * eps[s,i])                  (to the input dtype)
//   sq_sum[s]   = sum_i (x_next[s,i] - mu[s,i])^2                    (fp32, rounded x_next)
// eps comes from a tensor, from Philox keyed by noise_key[s] = (seed, sequence, chunk, step), or
// is zero. sq_sum is reduced deterministically: per-block partials, then the last block of each
// sequence (found with a self-resetting ticket) sums them in a fixed order.
#pragma once

#include <cstdint>

namespace spiral_rt {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class NoiseMode : int { kNone = 0, kTensor = 1, kPhilox = 2 };

struct SamplerStepArgs {
  const void* x = nullptr;            // (S, N) dtype
  const void* m = nullptr;            // (S, N) dtype: velocity or x0 prediction
  const float* a = nullptr;           // (S,)
  const float* b = nullptr;           // (S,)
  const float* c = nullptr;           // (S,)
  const void* noise = nullptr;        // (S, N) dtype, NoiseMode::kTensor only
  const int64_t* noise_key = nullptr; // (S, 4) int64, NoiseMode::kPhilox only
  void* x_next = nullptr;             // (S, N) dtype
  void* mu = nullptr;                 // (S, N) dtype, or null to skip writing it
  float* partials = nullptr;          // (S, blocks_per_seq) workspace
  uint32_t* tickets = nullptr;        // (S,) workspace, zero on entry, left zero on exit
  float* sq_sum = nullptr;            // (S,)
  int64_t num_seqs = 0;
  int64_t seq_len = 0;
  DType dtype = DType::kFloat32;
  NoiseMode noise_mode = NoiseMode::kNone;
};

// Elements each thread block covers; the same for the vector and scalar paths.
int64_t sampler_step_elems_per_block(DType dtype);
int64_t sampler_step_blocks_per_seq(int64_t seq_len, DType dtype);

// Launches on `stream` (a cudaStream_t) after making `device` current. Returns a cudaError_t.
int sampler_step_launch(const SamplerStepArgs& args, int device, void* stream);

// cudaGetErrorString for a code returned above.
const char* cuda_error_string(int code);

// The id of the CUDA graph capture that `stream` (a cudaStream_t) is recording, or 0 when it is
// not capturing; the return value is a cudaError_t. Lets the caller keep one zeroed ticket buffer
// per capture instead of zeroing one inside the graph before every launch.
int stream_capture_id(void* stream, uint64_t* id);

}  // namespace spiral_rt
