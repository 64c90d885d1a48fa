// Counter-based random numbers shared by the CUDA kernels and the host (for tests without a GPU).
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) maps a
// 128-bit counter and a 64-bit key to 128 random bits. spiral_rt keys its noise by
//   key     = seed (64 bits)
//   counter = (element_index / 4, sequence_id, chunk_index, step_index)
// so element e of a sequence's noise is lane e % 4 of one Philox block and depends on nothing
// else: not on the batch it runs in, the block size or the backend. Uniforms use the top 23 bits
// as odd multiples of 2^-24 (exact in fp32, never 0 or 1); normals come from Box-Muller on lanes
// (0, 1) and (2, 3): r = sqrt(-2 ln u0), theta = 2 pi u1 - pi, z = (r cos theta, r sin theta).
// Framework-free: plain C++ types only.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SPIRAL_RT_HD __host__ __device__ __forceinline__
#else
#define SPIRAL_RT_HD inline
#endif

namespace spiral_rt {

struct U32x4 {
  uint32_t x, y, z, w;
};

SPIRAL_RT_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    // One 32x32->64 multiply (a single IMAD.WIDE.U32 on the GPU) gives both halves.
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * ctr.x;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * ctr.z;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    ctr = U32x4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return ctr;
}

// Odd multiple of 2^-24 in (0, 1): exact in fp32, so log() never sees 0.
SPIRAL_RT_HD float u32_to_unit_open(uint32_t r) {
  return static_cast<float>(((r >> 9) << 1) | 1u) * 5.9604644775390625e-08f;
}

SPIRAL_RT_HD void box_muller(uint32_t a, uint32_t b, float& z0, float& z1) {
  // logf stays the accurate one: the fast __logf loses relative precision as u -> 1, where
  // the radius is small. r2 > 0 always (u < 1), so r2 * rsqrt(r2) is a safe, cheap sqrt.
  const float r2 = -2.0f * logf(u32_to_unit_open(a));
#if defined(__CUDA_ARCH__)
  const float radius = r2 * rsqrtf(r2);
#else
  const float radius = std::sqrt(r2);
#endif
  // theta in [-pi, pi): the range where the fast hardware sine/cosine are accurate.
  const float theta = u32_to_unit_open(b) * 6.28318530717958647692f - 3.14159265358979323846f;
  float s, c;
#if defined(__CUDA_ARCH__)
  __sincosf(theta, &s, &c);
#else
  s = std::sin(theta);
  c = std::cos(theta);
#endif
  z0 = radius * c;
  z1 = radius * s;
}

// The four standard normals of Philox block `quad` (elements 4*quad .. 4*quad+3).
SPIRAL_RT_HD void philox_normal4(uint64_t seed, uint32_t quad, uint32_t sequence, uint32_t chunk,
                                 uint32_t step, float out[4]) {
  const U32x4 r = philox4x32_10(U32x4{quad, sequence, chunk, step}, static_cast<uint32_t>(seed),
                                static_cast<uint32_t>(seed >> 32));
  box_muller(r.x, r.y, out[0], out[1]);
  box_muller(r.z, r.w, out[2], out[3]);
}

}  // namespace spiral_rt
