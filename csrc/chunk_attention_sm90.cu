// Chunk attention over paged K/V for Hopper (sm_90a): TMA loads, warpgroup MMAs, warp
// specialization. Interface and contract: chunk_attention.h; the work partition and key tiles come
// from spiral_rt/ops/chunk_attention.py; the reference is spiral_rt/reference/chunk_attention.py.
//
// Work items are 128 query rows of one head against a range of key tiles; the plan lists whole
// items first, then the pieces of the last wave's split items. The whole items run on persistent
// CTAs, one per SM, CTA b taking items b, b + P, ... (P CTAs): the producer loads the next item's
// Q as soon as both consumers issued their last S of the current one, so the next item's loads
// overlap this one's last P V and epilogue. Each piece then gets a CTA of its own, started by the
// hardware on whichever SM frees first (static striding measured worse for them). An item whose
// keys are the one tile its CTA's previous item read (a cross-attention over a prompt's distinct
// rows, whose row blocks the plan lays out CTA by CTA) reuses that tile from shared memory. Plans
// of such short items (ChunkAttentionArgs::short_items) run a one-stage K/V ring and two Q buffers:
// the next item's Q loads while the current item still reads its own.
// Three warpgroups: WG0 is the producer (one thread issues every TMA load; the others idle with
// few registers), WG1 and WG2 are consumers owning 64 query rows each. Per key tile:
//   S = Q K^T      wgmma m64 n{BN} k16, Q and K from shared memory (K-major, 128B swizzle)
//   online softmax in registers (exp2, scale folded in), S -> P (bf16/f16) stays in registers
//   O += P V       wgmma m64 n128 k16, P from registers, V from shared memory (N-major)
// K and V tiles go through STAGES-deep rings of shared-memory buffers with mbarriers: "full"
// (TMA bytes landed) and "free" (both consumers done reading), separate for K and V, so S = Q K^T
// starts before V has landed and a K buffer is reloaded as soon as its S is computed. Within a
// consumer, S of tile t+1 and P V of tile t are issued together and the softmax of tile t+1 runs
// while P V is on the tensor cores (FA3's intra-warpgroup overlap); between the consumers, FA3's
// scheduler barrier makes them take turns on the tensor cores (bench/NOTES.md, session 7).
//
// Paged keys: a 3-D tensor map views the pool as (pages, page_size, H_kv * D); a tile is a box of
// BN rows at (page, row0). Rows past the page end come back as zeros (TMA out-of-bounds fill);
// rows past the sequence's last key are masked in S and, where they lie inside the page (stale
// data, even NaN), zeroed in the V buffer: only in a sequence's partly filled last page, not in
// the short tile that ends every full page (1560-token pages, BN 176). Shared-memory tiles are
// stored as two 64-column halves of 128-byte rows, the layout of TMA's 128B swizzle and of the
// wgmma descriptors below.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "chunk_attention.h"
#include "wgmma.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SPIRAL_RT_SM90A 1
#endif

namespace spiral_rt {
namespace {

constexpr int kHeadDim = 128;
constexpr int kRowsPerConsumer = 64;
constexpr int kThreads = 384;         // producer + 2 consumer warpgroups
constexpr int kHalfBytes = 64 * 2;    // one 64-column half of a 16-bit row: the swizzle span
constexpr int kQHalfBytes = kRowsPerConsumer * kHalfBytes;  // 8 KiB: one TMA box of Q
// A tile's word: row0 (bits 0-15) | valid keys (bits 16-29) | kCountedBit: its last valid key
// stands for several copies (tile_log2_count[t] holds log2 of their number).
constexpr int kValidMask = 0x3FFF;
constexpr int kCountedBit = 1 << 30;

struct Params {
  void* o;
  float* lse;
  float* partial_o;
  float* partial_lse;
  const int32_t* work;
  const int32_t* tiles;
  const float* tile_log2_count;  // null, or per tile: log2 of the copies its last valid key stands for
  const float* q_row_scale;      // null, or per query row: a factor on its scores
  int num_work;
  int num_whole;       // items [0, num_whole) run whole, strided over the first num_persistent CTAs;
  int num_persistent;  // every later CTA runs one piece (dispatched as SMs free up)
  int num_heads;
  int page_size;
  int group;  // query heads per KV head
  float scale_log2;  // sm_scale * log2(e)
};

// A one-stage K/V ring (plans of short items: a cross-attention's single-tile row blocks) leaves room
// for a second Q buffer, so the producer loads the next item's Q while this item's S still reads the
// current one: with one key tile an item, the Q load is otherwise the item's critical path.
template <int STAGES>
constexpr int q_buffers() { return STAGES == 1 ? 2 : 1; }

template <int BN, int STAGES>
struct Layout {
  static constexpr int kQBuffers = q_buffers<STAGES>();
  static constexpr int kTileBytes = 2 * BN * kHalfBytes;  // one K or V tile (two halves)
  static constexpr int kQBytes = 4 * kQHalfBytes;         // one Q buffer: [consumer][half][64 rows][128 B]
  static constexpr int kQ = 0;
  static constexpr int kK = kQBuffers * kQBytes;
  static constexpr int kV = kK + STAGES * kTileBytes;
  static constexpr int kBarriers = kV + STAGES * kTileBytes;
  static constexpr int kBytes = kBarriers + 8 * (2 * kQBuffers + 4 * STAGES);
  static constexpr int kAlloc = kBytes + 1024;  // slack to align the base to 1 KiB (swizzle atoms)
};

#ifdef SPIRAL_RT_SM90A

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator reads/writes across an asynchronous MMA.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// Shared-memory matrix descriptor, 128B swizzle. K-major operands (Q, K): rows of 128 B, groups
// of 8 rows 1 KiB apart (stride byte offset); stepping k by 16 elements adds 32 B to the start.
// N-major V: `lead` is the distance between the two 64-column halves, groups of 8 key rows are
// 1 KiB apart.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lead_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lead_bytes >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

// A work item's key tiles end at t1, or with per-tile counts (device-computed tiles) at its first
// tile without valid keys. Producer and consumers compute it alike.
__device__ __forceinline__ int key_range_end(const Params& p, int t0, int t1) {
  if (p.tile_log2_count != nullptr)
    for (int t = t0; t < t1; ++t)
      if (((p.tiles[2 * t + 1] >> 16) & kValidMask) == 0) return t;
  return t1;
}

// A whole item's keys as the kernel reads them: tiles [t0, t1) of one KV head.
struct ItemKeys {
  int t0, t1, kv_head;
};

__device__ __forceinline__ ItemKeys item_keys(const Params& p, int w) {
  const int32_t* work = p.work + 6 * w;
  return {work[2], key_range_end(p, work[2], work[3]), work[4] / p.group};
}

// A persistent CTA's item whose keys are one tile, the very tile its previous item read for the
// same KV head (a cross-attention's row blocks: the plan lays such items out CTA by CTA), finds
// it still in shared memory: the producer skips its loads and the consumers keep the buffers
// until the last item that reads them. Producer and consumers decide it alike.
__device__ __forceinline__ bool same_single_tile(const ItemKeys& a, const ItemKeys& b) {
  return a.t1 == a.t0 + 1 && b.t1 == b.t0 + 1 && a.t0 == b.t0 && a.kv_head == b.kv_head;
}

#endif  // SPIRAL_RT_SM90A

template <typename T, int BN, int STAGES>
__global__ void __launch_bounds__(kThreads, 1)
    chunk_attention_sm90_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                                const __grid_constant__ CUtensorMap v_map, const __grid_constant__ CUtensorMap k_own_map,
                                const __grid_constant__ CUtensorMap v_own_map, const Params p) {
#ifdef SPIRAL_RT_SM90A
  using L = Layout<BN, STAGES>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  constexpr int QB = L::kQBuffers;
  const uint32_t bars = base + L::kBarriers;
  auto bar_q = [&](int b) { return bars + 8 * b; };
  auto bar_k = [&](int s) { return bars + 8 * (QB + s); };
  auto bar_v = [&](int s) { return bars + 8 * (QB + STAGES + s); };
  auto bar_k_free = [&](int s) { return bars + 8 * (QB + 2 * STAGES + s); };
  auto bar_v_free = [&](int s) { return bars + 8 * (QB + 3 * STAGES + s); };
  auto bar_q_free = [&](int b) { return bars + 8 * (QB + 4 * STAGES + b); };
  // the CTA's item-th item uses Q buffer item % QB, that buffer's (item / QB)-th phase
  auto q_phase = [&](int item) { return static_cast<uint32_t>((item / QB) & 1); };
  // The warpgroup index through a warp broadcast: the compiler then treats it (and the Q buffer
  // descriptors derived from it) as warp-uniform and keeps the wgmma descriptors in uniform
  // registers; from threadIdx directly it held them in vector registers and moved each into a
  // uniform one (R2UR) before every S wgmma.
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0), tid = threadIdx.x % 128;
  // This CTA's work items: first, first + stride, ... below end.
  const bool persistent = static_cast<int>(blockIdx.x) < p.num_persistent;
  const int first = persistent ? blockIdx.x : p.num_whole + blockIdx.x - p.num_persistent;
  const int stride = persistent ? p.num_persistent : p.num_work;
  const int end = persistent ? p.num_whole : p.num_work;

  if (threadIdx.x == 0) {
    for (int b = 0; b < QB; ++b) {
      mbar_init(bar_q(b), 1);
      mbar_init(bar_q_free(b), 2 * 128);
    }
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(bar_k(s), 1);
      mbar_init(bar_v(s), 1);
      // every consumer thread releases the buffer (one arrival per warp measured 7% slower at BN 112)
      mbar_init(bar_k_free(s), 2 * 128);
      mbar_init(bar_v_free(s), 2 * 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------------------------------------------------------- producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
    if (tid == 0) {
      for (const CUtensorMap* map : {&k_map, &v_map, &k_own_map, &v_own_map})
        asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
      int done = 0;  // key tiles loaded so far: the ring's stage and phase run on across items
      ItemKeys prev = {0, 0, -1};
      for (int w = first, item = 0; w < end; w += stride, ++item) {
        const int32_t* work = p.work + 6 * w;
        const int q_start = work[0], head = work[4];
        const ItemKeys keys = item_keys(p, w);
        const int t0 = keys.t0, t1 = same_single_tile(prev, keys) ? t0 : keys.t1;  // reused: nothing to load
        prev = keys;
        const int qb = item % QB;
        mbar_wait(bar_q_free(qb), q_phase(item) ^ 1);  // both consumers are done with this buffer's last Q
        mbar_expect_tx(bar_q(qb), L::kQBytes);
        for (int c = 0; c < 2; ++c)
          for (int h = 0; h < 2; ++h)
            tma_load_2d(base + L::kQ + qb * L::kQBytes + (2 * c + h) * kQHalfBytes, &q_map, head * kHeadDim + 64 * h,
                        q_start + kRowsPerConsumer * c, bar_q(qb));
        const int kv_col = (head / p.group) * kHeadDim;
        for (int t = t0; t < t1; ++t, ++done) {
          const int s = done % STAGES;
          const uint32_t phase = (done / STAGES) & 1;
          // a negative page word is a page of the caller's own K/V rows (bit 31 set, the page below it)
          const int page_word = p.tiles[2 * t], page = page_word & 0x7FFFFFFF, row0 = p.tiles[2 * t + 1] & 0xFFFF;
          const CUtensorMap* km = page_word < 0 ? &k_own_map : &k_map;
          const CUtensorMap* vm = page_word < 0 ? &v_own_map : &v_map;
          const uint32_t k_dst = base + L::kK + s * L::kTileBytes, v_dst = base + L::kV + s * L::kTileBytes;
          mbar_wait(bar_k_free(s), phase ^ 1);  // a fresh barrier passes parity 1 at once
          mbar_expect_tx(bar_k(s), L::kTileBytes);
          tma_load_3d(k_dst, km, kv_col, row0, page, bar_k(s));
          tma_load_3d(k_dst + BN * kHalfBytes, km, kv_col + 64, row0, page, bar_k(s));
          mbar_wait(bar_v_free(s), phase ^ 1);
          mbar_expect_tx(bar_v(s), L::kTileBytes);
          tma_load_3d(v_dst, vm, kv_col, row0, page, bar_v(s));
          tma_load_3d(v_dst + BN * kHalfBytes, vm, kv_col + 64, row0, page, bar_v(s));
        }
      }
    }
    return;
  }

  // ------------------------------------------------------------------ consumers
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
  const int c = wg - 1;
  const int warp = tid / 32, lane = tid % 32;
  const int row_lo = warp * 16 + lane / 4;  // this thread's rows: row_lo and row_lo + 8
  const int col0 = 2 * (lane % 4);          // and columns col0, col0 + 1 of every 8
  const float scale = p.scale_log2;
  float scale_lo = scale, scale_hi = scale;  // the current item's rows' (q_row_scale)

  float o[kHeadDim / 2];
  float s_acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) s_acc[i] = 0.f;
  uint32_t pf[BN / 16][4];  // P of the previous tile as A fragments of P V
  float m_lo, m_hi, l_lo, l_hi;
  // Descriptors of this consumer's Q and of stage 0's K and V buffers: an offset of n bytes adds
  // n >> 4 to the start-address field (the low 14 bits; shared addresses stay below 256 KiB, so
  // the sum never carries out of it).
  const uint64_t q_desc0 = smem_desc(base + L::kQ + 2 * c * kQHalfBytes, 16);
  uint64_t q_desc = q_desc0;  // the current item's Q buffer
  const uint64_t k_desc = smem_desc(base + L::kK, 16);
  const uint64_t v_desc = smem_desc(base + L::kV, BN * kHalfBytes);

  int shift = 0;  // tile t of the current item is the CTA's (t + shift)-th: its ring stage and phase
  // (t + shift >= 0: unsigned, the stage and phase take a mask and a shift instead of a signed division)
  auto stage_of = [&](int t) { return static_cast<int>(static_cast<uint32_t>(t + shift) % STAGES); };
  auto phase_of = [&](int t) { return (static_cast<uint32_t>(t + shift) / STAGES) & 1u; };
  // A tile's word is row0 | valid << 16: keys in its first `valid` rows; the V rows after them
  // need zeroing only when they lie inside the page (past its end TMA filled zeros).
  auto word_of = [&](int t) { return p.tiles[2 * t + 1]; };
  auto valid_in = [](int word) { return (word >> 16) & kValidMask; };
  auto stale_rows = [&](int word) { return valid_in(word) < BN && (word & 0xFFFF) + valid_in(word) < p.page_size; };

  // S = Q K^T over D = 128: 8 k-steps, 4 in each 64-column half (issued, not waited for).
  auto issue_s = [&](int t) {
    const uint64_t k_stage = k_desc + ((stage_of(t) * L::kTileBytes) >> 4);
    mbar_wait(bar_k(stage_of(t)), phase_of(t));
    fence_regs(s_acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const uint32_t off = (kk % 4) * 32;  // 16 elements = 32 B within the 128 B row
      Wgmma<T, BN, Operands::kSS>::run(s_acc, q_desc + (((kk / 4) * kQHalfBytes + off) >> 4),
                                       k_stage + (((kk / 4) * BN * kHalfBytes + off) >> 4), kk > 0);
    }
    wgmma_commit();
  };
  // O += P V: BN / 16 k-steps of 16 key rows (2 KiB of each half apart).
  auto issue_pv = [&](int t, int word) {
    const uint32_t v_offset = stage_of(t) * L::kTileBytes;
    const uint64_t v_stage = v_desc + (v_offset >> 4);  // tiles are 16-byte multiples apart
    mbar_wait(bar_v(stage_of(t)), phase_of(t));
    if (stale_rows(word)) {
      const int valid = valid_in(word);
      // Rows past the last key may hold stale values (NaN * 0 = NaN): zero them in this buffer.
      for (int idx = valid * 8 + tid; idx < BN * 8; idx += 128) {
        const int row = idx / 8, chunk = idx % 8;
        uint8_t* v_tile = smem + L::kV + v_offset;
        *reinterpret_cast<uint4*>(v_tile + row * kHalfBytes + chunk * 16) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(v_tile + (BN + row) * kHalfBytes + chunk * 16) = make_uint4(0, 0, 0, 0);
      }
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      asm volatile("bar.sync %0, 128;" ::"r"(1 + c) : "memory");
    }
    fence_regs(o);
    fence_regs(pf);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
      Wgmma<T, kHeadDim, Operands::kRS>::run(o, pf[kk], v_stage + ((kk * 16 * kHalfBytes) >> 4), 1);
    wgmma_commit();
  };
  // Online softmax of the S of tile t in the log2 domain, in place (s_acc becomes P in fp32);
  // returns the factors by which O must be rescaled. Each row lives in the 4 threads of a quad.
  auto softmax = [&](int t, int word, float& alpha_lo, float& alpha_hi) {
    const int valid = valid_in(word);
    if (valid < BN) {
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const int col = 8 * j + col0;
        if (col >= valid) s_acc[4 * j] = s_acc[4 * j + 2] = -INFINITY;
        if (col + 1 >= valid) s_acc[4 * j + 1] = s_acc[4 * j + 3] = -INFINITY;
      }
    }
    if (word & kCountedBit) {
      // the last valid key stands for 2^tile_log2_count[t] copies: raise its raw score by
      // log2(copies) / (the row's) scale (read only in flagged tiles: one register for every tile spills)
      const float log2_count = p.tile_log2_count[t];
      const float bias_lo = log2_count / scale_lo, bias_hi = log2_count / scale_hi;
      const int last = valid - 1;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        if (8 * j + col0 == last) {
          s_acc[4 * j] += bias_lo;
          s_acc[4 * j + 2] += bias_hi;
        }
        if (8 * j + col0 + 1 == last) {
          s_acc[4 * j + 1] += bias_lo;
          s_acc[4 * j + 3] += bias_hi;
        }
      }
    }
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      mx_lo = fmaxf(mx_lo, fmaxf(s_acc[4 * j], s_acc[4 * j + 1]));
      mx_hi = fmaxf(mx_hi, fmaxf(s_acc[4 * j + 2], s_acc[4 * j + 3]));
    }
#pragma unroll
    for (int sh = 1; sh <= 2; sh <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, sh));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, sh));
    }
    const float new_lo = fmaxf(m_lo, mx_lo * scale_lo), new_hi = fmaxf(m_hi, mx_hi * scale_hi);
    alpha_lo = exp2_approx(m_lo - new_lo);  // 0 on the first tile (m = -inf)
    alpha_hi = exp2_approx(m_hi - new_hi);
    m_lo = new_lo;
    m_hi = new_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      s_acc[4 * j] = exp2_approx(fmaf(s_acc[4 * j], scale_lo, -new_lo));
      s_acc[4 * j + 1] = exp2_approx(fmaf(s_acc[4 * j + 1], scale_lo, -new_lo));
      s_acc[4 * j + 2] = exp2_approx(fmaf(s_acc[4 * j + 2], scale_hi, -new_hi));
      s_acc[4 * j + 3] = exp2_approx(fmaf(s_acc[4 * j + 3], scale_hi, -new_hi));
      sum_lo += s_acc[4 * j] + s_acc[4 * j + 1];
      sum_hi += s_acc[4 * j + 2] + s_acc[4 * j + 3];
    }
    l_lo = l_lo * alpha_lo + sum_lo;
    l_hi = l_hi * alpha_hi + sum_hi;
  };
  auto rescale_o = [&](float alpha_lo, float alpha_hi) {
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      o[4 * j] *= alpha_lo;
      o[4 * j + 1] *= alpha_lo;
      o[4 * j + 2] *= alpha_hi;
      o[4 * j + 3] *= alpha_hi;
    }
  };
  // P (fp32, in s_acc) -> A fragments: S columns 16 kk .. 16 kk + 15 are k-step kk of P V.
  auto pack_p = [&]() {
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      pf[j / 2][(j % 2) * 2] = pack2<T>(s_acc[4 * j], s_acc[4 * j + 1]);
      pf[j / 2][(j % 2) * 2 + 1] = pack2<T>(s_acc[4 * j + 2], s_acc[4 * j + 3]);
    }
  };

  // FA3's scheduler barrier between the two consumers: a consumer issues its MMAs of a tile only
  // after the other has issued its own, so one consumer's softmax runs while the other's MMAs
  // own the tensor cores (named barriers 3 and 4, consumer 0 starts).
  auto wait_turn = [&]() { asm volatile("bar.sync %0, 256;" ::"r"(3 + c) : "memory"); };
  auto pass_turn = [&]() { asm volatile("bar.arrive %0, 256;" ::"r"(4 - c) : "memory"); };
  if (c == 0) asm volatile("bar.arrive 3, 256;" ::: "memory");

  // A persistent CTA's items follow one another: the producer loads the next item's Q and first
  // key tiles while the consumers finish this item's last P V and epilogue.
  int done = 0;
  ItemKeys keys = first < end ? item_keys(p, first) : ItemKeys{0, 0, -1};
  bool reused = false;  // this item's one tile is the previous item's, still in its buffers
  for (int w = first, item = 0; w < end; w += stride, ++item) {
    const int32_t* work = p.work + 6 * w;
    const int q_start = work[0], q_end = work[1], head = work[4], slot = work[5];
    const int t0 = keys.t0, t1 = keys.t1;
    const ItemKeys next = w + stride < end ? item_keys(p, w + stride) : ItemKeys{0, 0, -1};
    const bool keep = same_single_tile(keys, next);  // the next item reads this tile: do not free it
    if (p.q_row_scale != nullptr) {  // rows past the item's end are computed, never stored
      const int r = q_start + kRowsPerConsumer * c + row_lo;
      scale_lo = r < q_end ? scale * p.q_row_scale[r] : scale;
      scale_hi = r + 8 < q_end ? scale * p.q_row_scale[r + 8] : scale;
    }
    if (reused) {
      shift = done - 1 - t0;  // the tile loaded last
    } else {
      shift = done - t0;
      done += t1 - t0;
    }
#pragma unroll
    for (int i = 0; i < kHeadDim / 2; ++i) o[i] = 0.f;
    m_lo = m_hi = -INFINITY;
    l_lo = l_hi = 0.f;
    const int qb = item % QB;
    q_desc = q_desc0 + ((qb * L::kQBytes) >> 4);
    mbar_wait(bar_q(qb), q_phase(item));
    if (t0 == t1) {
      mbar_arrive(bar_q_free(qb));  // no keys: O = 0, LSE = -inf
    } else {
      float alpha_lo, alpha_hi;
      int word = word_of(t0);
      wait_turn();
      issue_s(t0);
      pass_turn();
      wgmma_wait<0>();
      fence_regs(s_acc);
      if (!keep) mbar_arrive(bar_k_free(stage_of(t0)));
      softmax(t0, word, alpha_lo, alpha_hi);
      pack_p();
      // Steady state: S of tile t and P V of tile t - 1 run on the tensor cores while this
      // warpgroup does the softmax of tile t (FA3's intra-warpgroup overlap); O is rescaled for
      // tile t - 1 in the shadow of S, before P V of t - 1 is issued.
      for (int t = t0 + 1; t < t1; ++t) {
        const int word_prev = word;
        word = word_of(t);  // loaded early: used after S of tile t is done
        mbar_wait(bar_k(stage_of(t)), phase_of(t));  // outside the turn: data first
        wait_turn();
        issue_s(t);
        rescale_o(alpha_lo, alpha_hi);  // O is idle: P V of tile t - 2 is done
        issue_pv(t - 1, word_prev);
        pass_turn();
        wgmma_wait<1>();  // S of tile t (committed first) is done: its K buffer is free
        fence_regs(s_acc);
        mbar_arrive(bar_k_free(stage_of(t)));
        softmax(t, word, alpha_lo, alpha_hi);
        wgmma_wait<0>();  // P V of tile t - 1 is done: its V buffer and the P registers are free
        fence_regs(o);
        mbar_arrive(bar_v_free(stage_of(t - 1)));
        pack_p();
      }
      mbar_arrive(bar_q_free(qb));  // every S of this item is done: the producer may reuse its Q buffer
      rescale_o(alpha_lo, alpha_hi);
      issue_pv(t1 - 1, word);
      wgmma_wait<0>();
      fence_regs(o);
      if (!keep) mbar_arrive(bar_v_free(stage_of(t1 - 1)));
    }
    reused = keep;
    keys = next;

    // Finish the row sums across the quad, normalize, store.
#pragma unroll
    for (int sh = 1; sh <= 2; sh <<= 1) {
      l_lo += __shfl_xor_sync(0xffffffffu, l_lo, sh);
      l_hi += __shfl_xor_sync(0xffffffffu, l_hi, sh);
    }
    const int D = kHeadDim, H = p.num_heads;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = kRowsPerConsumer * c + row_lo + 8 * half, row = q_start + r;
      if (row >= q_end) continue;
      const float l = half ? l_hi : l_lo, m = half ? m_hi : m_lo;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const float lse = l > 0.f ? (m + __log2f(l)) * 0.6931471805599453f : -INFINITY;
      if (slot < 0) {
        T* out = static_cast<T*>(p.o) + (static_cast<int64_t>(row) * H + head) * D;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
          *reinterpret_cast<uint32_t*>(out + 8 * j + col0) = pack2<T>(o[4 * j + 2 * half] * inv, o[4 * j + 2 * half + 1] * inv);
        if (lane % 4 == 0) p.lse[static_cast<int64_t>(row) * H + head] = lse;
      } else {
        const int64_t pr = static_cast<int64_t>(slot) * 2 * kRowsPerConsumer + r;
        float* out = p.partial_o + pr * D;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
          *reinterpret_cast<float2*>(out + 8 * j + col0) = make_float2(o[4 * j + 2 * half] * inv, o[4 * j + 2 * half + 1] * inv);
        if (lane % 4 == 0) p.partial_lse[pr] = lse;
      }
    }
  }
#endif  // SPIRAL_RT_SM90A
}

// ---------------------------------------------------------------------- host side

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver, found through the runtime (no -lcuda at link time).
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      return static_cast<EncodeTiled>(nullptr);
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// A tensor map over `rank` dims (innermost first) of 16-bit elements, 128B swizzle, zero fill.
bool make_map(CUtensorMap* map, DType dtype, const void* ptr, int rank, const cuuint64_t* dims,
              const cuuint64_t* byte_strides, const cuuint32_t* box) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return false;
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const auto type = dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, type, rank, const_cast<void*>(ptr), dims, byte_strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T, int BN, int STAGES>
cudaError_t launch(const ChunkAttentionArgs& a, int num_sms, cudaStream_t stream) {
  using L = Layout<BN, STAGES>;
  auto kernel = chunk_attention_sm90_kernel<T, BN, STAGES>;
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kAlloc);
  if (attr != cudaSuccess) return attr;

  CUtensorMap q_map, k_map, v_map, k_own_map, v_own_map;
  const cuuint64_t q_dims[2] = {static_cast<cuuint64_t>(a.num_heads) * kHeadDim, static_cast<cuuint64_t>(a.total_q)};
  const cuuint64_t q_strides[1] = {static_cast<cuuint64_t>(a.q_row_stride) * 2};
  const cuuint32_t q_box[2] = {64, kRowsPerConsumer};
  const cuuint64_t kv_row = static_cast<cuuint64_t>(a.num_kv_heads) * kHeadDim;
  const cuuint64_t kv_dims[3] = {kv_row, static_cast<cuuint64_t>(a.page_size), static_cast<cuuint64_t>(a.num_pages)};
  const cuuint64_t kv_strides[2] = {kv_row * 2, kv_row * 2 * a.page_size};
  const cuuint32_t kv_box[3] = {64, BN, 1};
  if (!make_map(&q_map, a.dtype, a.q, 2, q_dims, q_strides, q_box) ||
      !make_map(&k_map, a.dtype, a.k, 3, kv_dims, kv_strides, kv_box) ||
      !make_map(&v_map, a.dtype, a.v, 3, kv_dims, kv_strides, kv_box))
    return cudaErrorInvalidValue;
  if (a.own_k != nullptr) {  // the own rows as pages of page_size rows, own_row_stride elements apart
    const cuuint64_t own_dims[3] = {kv_row, static_cast<cuuint64_t>(a.page_size),
                                    static_cast<cuuint64_t>(a.num_own_pages)};
    const cuuint64_t own_row = static_cast<cuuint64_t>(a.own_row_stride) * 2;
    const cuuint64_t own_strides[2] = {own_row, own_row * a.page_size};
    if (!make_map(&k_own_map, a.dtype, a.own_k, 3, own_dims, own_strides, kv_box) ||
        !make_map(&v_own_map, a.dtype, a.own_v, 3, own_dims, own_strides, kv_box))
      return cudaErrorInvalidValue;
  } else {  // no tile is flagged own: any valid map will do
    k_own_map = k_map;
    v_own_map = v_map;
  }

  Params p;
  p.o = a.o;
  p.lse = a.lse;
  p.partial_o = a.partial_o;
  p.partial_lse = a.partial_lse;
  p.work = a.work;
  p.tiles = a.tiles;
  p.tile_log2_count = a.tile_log2_count;
  p.q_row_scale = a.q_row_scale;
  p.num_work = static_cast<int>(a.num_work);
  p.num_whole = static_cast<int>(a.num_work - a.num_pieces);
  p.num_persistent = p.num_whole < num_sms ? p.num_whole : num_sms;
  p.num_heads = a.num_heads;
  p.page_size = a.page_size;
  p.group = a.num_heads / a.num_kv_heads;
  p.scale_log2 = a.sm_scale * 1.4426950408889634f;
  // whole items: one persistent CTA per SM (its shared memory allows no second), striding over
  // them; then one CTA per piece, each started on the first SM to free up
  kernel<<<static_cast<unsigned>(p.num_persistent + p.num_work - p.num_whole), kThreads, L::kAlloc, stream>>>(
      q_map, k_map, v_map, k_own_map, v_own_map, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const ChunkAttentionArgs& a, int num_sms, cudaStream_t stream) {
  if (a.short_items && a.block_n == 176) return launch<T, 176, 1>(a, num_sms, stream);
  switch (a.block_n) {
    case 112: return launch<T, 112, 3>(a, num_sms, stream);
    case 128: return launch<T, 128, 3>(a, num_sms, stream);
    case 176: return launch<T, 176, 2>(a, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

bool chunk_attention_sm90_available(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    return false;
  return major == 9 && minor == 0 && encode_tiled() != nullptr;
}

int chunk_attention_sm90_launch(const ChunkAttentionArgs& a, int device, void* stream) {
  if (a.num_work == 0) return cudaSuccess;
  if (a.head_dim != kHeadDim || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0 ||
      a.page_size <= 0 || a.page_size > 0xFFFF || a.num_pieces < 0 || a.num_pieces > a.num_work ||
      (a.dtype != DType::kBFloat16 && a.dtype != DType::kFloat16))
    return cudaErrorInvalidValue;
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return err;
  if (current != device && (err = cudaSetDevice(device)) != cudaSuccess) return err;
  int num_sms = 0;
  if ((err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
  auto s = static_cast<cudaStream_t>(stream);
  return a.dtype == DType::kBFloat16 ? launch_typed<__nv_bfloat16>(a, num_sms, s)
                                     : launch_typed<__half>(a, num_sms, s);
}

}  // namespace spiral_rt
