// Fused sampler step kernel (see sampler_step.h for the math and the contract).
//
// Grid (blocks_per_seq, num_seqs), 256 threads. Each block covers kUnroll 16-byte vectors a
// thread of one sequence, all loaded before any math so that they are in flight at once; the
// Philox noise is generated while they arrive. Rows whose length or pointers do not allow
// 16-byte vectors take the scalar path over the same block ranges, so the partial sums (and
// sq_sum) do not depend on it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "philox.h"
#include "sampler_step.h"

namespace spiral_rt {
namespace {

constexpr int kThreads = 256;
// Three 16-byte vectors a thread at 3 resident blocks per SM (80 registers, no spills): at the
// engine's 8 sequences of one chunk that is 392 blocks, a single wave on 132 SMs, so no block
// waits for a second wave. Measured on the H100 at 8 sequences (graph of 16 calls, bench/
// sampler_variants.sh): 9.90 us, against 10.44 us for two vectors at 4 blocks/SM (1.12 waves)
// and 10.0 us for either without noise; one vector at 8 blocks/SM spills and takes 21 us.
constexpr int kUnroll = 3;
constexpr int kMinBlocksPerSM = 3;

template <typename T>
struct Elem;
// load: element -> fp32; store: fp32 -> element (round to nearest); bits: the raw encoding.
template <>
struct Elem<float> {
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
  __device__ static uint32_t bits(float v) { return __float_as_uint(v); }
};
template <>
struct Elem<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
  __device__ static uint32_t bits(__half v) { return __half_as_ushort(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
  __device__ static uint32_t bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
};

template <typename T>
constexpr int vec_elems() { return 16 / sizeof(T); }
template <typename T>
constexpr int elems_per_block() { return kThreads * kUnroll * vec_elems<T>(); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Whole-vector loads and stores through plain integer types, so each is one instruction
// (copying a struct of __nv_bfloat16 may be split into 16-bit accesses).
template <int kBytes>
struct Word;
template <>
struct Word<16> { using type = uint4; };
template <>
struct Word<8> { using type = uint2; };
template <>
struct Word<4> { using type = uint32_t; };
template <>
struct Word<2> { using type = uint16_t; };

template <typename P>
__device__ __forceinline__ P load_pack(const void* src) {
  using W = typename Word<sizeof(P)>::type;
  const W w = *static_cast<const W*>(src);
  P p;
  memcpy(&p, &w, sizeof(P));
  return p;
}

// Assembles the 32-bit words from the elements' bits, so the store is one instruction.
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T, N>& p) {
  constexpr int kPerWord = sizeof(T) >= 4 ? 1 : 4 / sizeof(T);
  constexpr int kWords = N / kPerWord;
  if constexpr (kWords == 0) {
    *dst = p.v[0];  // a single 2-byte element (scalar path)
  } else {
    uint32_t words[kWords];
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      words[w] = 0;
#pragma unroll
      for (int e = 0; e < kPerWord; ++e) words[w] |= Elem<T>::bits(p.v[w * kPerWord + e]) << (16 * e);
    }
    using W = typename Word<sizeof(T) * N>::type;
    W out;
    memcpy(&out, words, sizeof(W));
    *reinterpret_cast<W*>(dst) = out;
  }
}

struct NoiseKey {
  uint64_t seed;
  uint32_t sequence, chunk, step;
};

__device__ __forceinline__ NoiseKey load_key(const int64_t* key) {
  return NoiseKey{static_cast<uint64_t>(key[0]), static_cast<uint32_t>(key[1]),
                  static_cast<uint32_t>(key[2]), static_cast<uint32_t>(key[3])};
}

__device__ __forceinline__ float philox_eps(const NoiseKey& k, int64_t i) {
  float z[4];
  philox_normal4(k.seed, static_cast<uint32_t>(i >> 2), k.sequence, k.chunk, k.step, z);
  return z[i & 3];
}

// Sum over the block in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += smem[w];
  }
  __syncthreads();
  return total;
}

// Takes a ticket with an acquire-release atomic: it publishes this block's partial (release) and,
// in the block that draws the last ticket, orders the reads of every other partial after it
// (acquire), so neither side needs a full __threadfence on the kernel's tail.
__device__ __forceinline__ unsigned take_ticket(unsigned* ticket) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  unsigned old;
  asm volatile("atom.add.acq_rel.gpu.u32 %0, [%1], 1;" : "=r"(old) : "l"(ticket) : "memory");
  return old;
#else
  __threadfence();
  return atomicAdd(ticket, 1u);
#endif
}

template <typename T, bool kVector, NoiseMode kNoise>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) sampler_step_kernel(SamplerStepArgs p) {
  using E = Elem<T>;
  constexpr int kVec = kVector ? vec_elems<T>() : 1;
  constexpr int kIters = elems_per_block<T>() / (kThreads * kVec);
  __shared__ float smem[kThreads / 32];
  __shared__ bool is_last_block;

  const int64_t seq = blockIdx.y;
  const int64_t n = p.seq_len;
  const int64_t row = seq * n;
  const float A = p.a[seq], B = p.b[seq], C = p.c[seq];
  NoiseKey key{};
  if constexpr (kNoise == NoiseMode::kPhilox) key = load_key(p.noise_key + 4 * seq);

  const T* x = static_cast<const T*>(p.x) + row;
  const T* m = static_cast<const T*>(p.m) + row;
  const T* noise = kNoise == NoiseMode::kTensor ? static_cast<const T*>(p.noise) + row : nullptr;
  T* x_next = static_cast<T*>(p.x_next) + row;
  T* mu_out = p.mu ? static_cast<T*>(p.mu) + row : nullptr;

  const int64_t start = int64_t(blockIdx.x) * elems_per_block<T>();
  float sq = 0.f;

  // Load everything this thread needs before the math so all loads are in flight together.
  Pack<T, kVec> xs[kIters], ms[kIters], ns[kIters];
  int64_t first[kIters];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    first[it] = start + (int64_t(it) * kThreads + threadIdx.x) * kVec;
    if (first[it] < n) {  // kVector: n % kVec == 0, so a started vector is whole
      xs[it] = load_pack<Pack<T, kVec>>(x + first[it]);
      ms[it] = load_pack<Pack<T, kVec>>(m + first[it]);
      if constexpr (kNoise == NoiseMode::kTensor) ns[it] = load_pack<Pack<T, kVec>>(noise + first[it]);
    }
  }
  // The noise depends on nothing loaded: generate all of it while the loads are in flight, so the
  // Philox and Box-Muller math overlaps the memory latency instead of following it.
  float eps[kIters][kVec];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if (first[it] >= n) continue;
    if constexpr (kNoise == NoiseMode::kPhilox && kVec >= 4) {
      // A vector starts at a multiple of 4 elements: one Philox block per 4 elements.
#pragma unroll
      for (int q = 0; q < kVec / 4; ++q)
        philox_normal4(key.seed, static_cast<uint32_t>((first[it] >> 2) + q), key.sequence,
                       key.chunk, key.step, eps[it] + 4 * q);
    } else if constexpr (kNoise == NoiseMode::kPhilox) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) eps[it][j] = philox_eps(key, first[it] + j);
    }
  }
  Pack<T, kVec> xo[kIters], mo[kIters];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if (first[it] >= n) continue;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float e = 0.f;
      if constexpr (kNoise == NoiseMode::kPhilox) e = eps[it][j];
      else if constexpr (kNoise == NoiseMode::kTensor) e = E::load(ns[it].v[j]);
      const float mu = A * E::load(xs[it].v[j]) + B * E::load(ms[it].v[j]);
      xo[it].v[j] = E::store(mu + C * e);
      mo[it].v[j] = E::store(mu);
      const float d = E::load(xo[it].v[j]) - mu;  // the density of the stored (rounded) sample
      sq += d * d;
    }
  }

  // Deterministic two-level reduction of sq over the sequence. The partial is published and the
  // ticket taken *before* this block's outputs are stored, so the ticket's release orders the
  // partial alone, not the block's stores.
  const float partial = block_sum(sq, smem);
  float* partials = p.partials + seq * gridDim.x;
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = partial;
    is_last_block = take_ticket(p.tickets + seq) == gridDim.x - 1;
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    if (first[it] >= n) continue;
    store_pack(x_next + first[it], xo[it]);
    if (mu_out) store_pack(mu_out + first[it], mo[it]);
  }
  __syncthreads();
  if (!is_last_block) return;
  // thread 0's acquire, then the barrier above: the other partials are visible to every thread here
  float s = 0.f;
  for (int i = threadIdx.x; i < static_cast<int>(gridDim.x); i += kThreads) s += __ldcg(partials + i);
  const float total = block_sum(s, smem);
  if (threadIdx.x == 0) {
    p.sq_sum[seq] = total;
    p.tickets[seq] = 0u;  // ready for the next launch (and for CUDA graph replays)
  }
}

template <typename T>
bool vector_ok(const SamplerStepArgs& p) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return p.seq_len % vec_elems<T>() == 0 && aligned(p.x) && aligned(p.m) && aligned(p.x_next) &&
         (p.mu == nullptr || aligned(p.mu)) &&
         (p.noise_mode != NoiseMode::kTensor || aligned(p.noise));
}

template <typename T, bool kVector>
cudaError_t launch_typed(const SamplerStepArgs& p, dim3 grid, cudaStream_t stream) {
  switch (p.noise_mode) {
    case NoiseMode::kNone:
      sampler_step_kernel<T, kVector, NoiseMode::kNone><<<grid, kThreads, 0, stream>>>(p);
      break;
    case NoiseMode::kTensor:
      sampler_step_kernel<T, kVector, NoiseMode::kTensor><<<grid, kThreads, 0, stream>>>(p);
      break;
    case NoiseMode::kPhilox:
      sampler_step_kernel<T, kVector, NoiseMode::kPhilox><<<grid, kThreads, 0, stream>>>(p);
      break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const SamplerStepArgs& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(sampler_step_blocks_per_seq(p.seq_len, p.dtype)),
                  static_cast<unsigned>(p.num_seqs));
  return vector_ok<T>(p) ? launch_typed<T, true>(p, grid, stream)
                         : launch_typed<T, false>(p, grid, stream);
}

}  // namespace

int64_t sampler_step_elems_per_block(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return elems_per_block<float>();
    case DType::kFloat16: return elems_per_block<__half>();
    case DType::kBFloat16: return elems_per_block<__nv_bfloat16>();
  }
  return 0;
}

int64_t sampler_step_blocks_per_seq(int64_t seq_len, DType dtype) {
  const int64_t per_block = sampler_step_elems_per_block(dtype);
  return (seq_len + per_block - 1) / per_block;
}

int sampler_step_launch(const SamplerStepArgs& p, int device, void* stream) {
  if (p.num_seqs == 0 || p.seq_len == 0) return cudaSuccess;
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return err;
  if (current != device && (err = cudaSetDevice(device)) != cudaSuccess) return err;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: return launch<float>(p, s);
    case DType::kFloat16: return launch<__half>(p, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, s);
  }
  return cudaErrorInvalidValue;
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int stream_capture_id(void* stream, uint64_t* id) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long capture = 0;
  const cudaError_t err = cudaStreamGetCaptureInfo(static_cast<cudaStream_t>(stream), &status, &capture);
  *id = err == cudaSuccess && status == cudaStreamCaptureStatusActive ? capture : 0;
  return err;
}

}  // namespace spiral_rt
