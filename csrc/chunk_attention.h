// Chunk attention over paged K/V on Hopper: the launcher's interface. Framework-free (no CUDA or
// torch types), so the pybind11 bindings include it without the CUDA headers.
//
// Math and contract: spiral_rt/reference/chunk_attention.py. Inputs (all device pointers):
//   q        (total_q, H, D) rows of q_row_stride elements, heads contiguous (stride D), D = 128;
//   k, v     (num_pages, page_size, H_kv, D) contiguous pages;
//   work     (num_work, 6) int32: q_start, q_end, t0, t1, head, slot; whole items (slot < 0)
//            first, then the num_pieces pieces: query rows [q_start, q_end) (at most 128) of query
//            head `head` against key tiles [t0, t1) of `tiles`. slot < 0: the tiles are all of the rows' keys and the CTA writes o and lse;
//            slot >= 0: a piece of a split key range, written as the fp32 partial state
//            partial_o[slot] (128, D) and partial_lse[slot] (128,) (row i = query row q_start + i)
//            for the merge kernel (spiral_rt/kernels/chunk_attention.py, merge_pieces);
//   tiles    (num_tiles, 2) int32: page, row0 | valid << 16 | counted << 30. A tile is `block_n`
//            consecutive rows of one page starting at row0, of which the first `valid` are keys
//            (the rest are masked; rows past the page end read as zeros); `counted` (with
//            tile_log2_count) marks a tile whose last valid key stands for several copies. A page
//            word with bit 31 set names page (word & 0x7FFFFFFF) of own_k / own_v instead;
//   own_k, own_v (num_own_pages * page_size, H_kv, D) rows of own_row_stride elements (heads
//            contiguous), or null: K/V the caller keeps outside the pool (the current chunk's, straight
//            from the QKV projection), read as pages of page_size consecutive rows.
//   tile_log2_count (num_tiles,) fp32, or null: for tiles marked `counted`, log2 of the number of
//            copies the tile's last valid key stands for, added to that key's score (in the log2
//            domain after scaling); with it, the key range of a work item ends at its first tile with no valid
//            keys. This is how a sequence whose trailing keys are all copies of one key (a
//            zero-padded prompt's text K/V) is read: its distinct keys, the repeated one weighted
//            by its count (tiles and counts computed on the device, see spiral_rt/ops).
//   q_row_scale (total_q,) fp32, or null: a factor on every score of query row i (q_row_scale[i] >
//            0), as if the row were scaled by it: how an RMS norm over all of a row's heads, whose
//            weight the caller folded into the keys, is applied without rewriting q.
// Outputs: o (total_q, H, D) in q's dtype and lse (total_q, H) fp32 (natural log; a row without
// keys gets O = 0, LSE = -inf), for the rows of whole work items; the partial states of pieces.
#pragma once

#include <cstdint>

#include "sampler_step.h"  // DType

namespace spiral_rt {

struct ChunkAttentionArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;
  float* partial_o = nullptr;    // (pieces, 128, D), only read when a work item has slot >= 0
  float* partial_lse = nullptr;  // (pieces, 128)
  const int32_t* work = nullptr;
  const int32_t* tiles = nullptr;
  const float* tile_log2_count = nullptr;  // (num_tiles,) or null
  const float* q_row_scale = nullptr;      // (total_q,) or null
  const void* own_k = nullptr;  // own K/V rows (see above), or null
  const void* own_v = nullptr;
  int64_t own_row_stride = 0;  // elements between consecutive own K (and V) rows
  int64_t num_own_pages = 0;
  int64_t q_row_stride = 0;  // elements between consecutive query rows
  int64_t total_q = 0;
  int64_t num_work = 0;
  int64_t num_pieces = 0;  // the last num_pieces work items are pieces (slot >= 0)
  int64_t num_pages = 0;
  int page_size = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int block_n = 0;
  // Every whole item has a few key tiles (a cross-attention's row blocks): at block_n 176 the kernel
  // then trades its K/V prefetch for a second Q buffer (csrc/chunk_attention_sm90.cu).
  bool short_items = false;
  float sm_scale = 0.f;
  DType dtype = DType::kBFloat16;
};

// Key-tile sizes the kernel is compiled for (block_n must be one of them).
constexpr int kChunkAttentionBlockNs[] = {112, 128, 176};

// Whether the kernel can run on `device`: built for sm_90a and the device is compute 9.0.
bool chunk_attention_sm90_available(int device);

// Launches on `stream` (a cudaStream_t) after making `device` current. Returns a cudaError_t,
// or cudaErrorInvalidValue for arguments the kernel does not support (checked in spiral_rt/ops).
int chunk_attention_sm90_launch(const ChunkAttentionArgs& args, int device, void* stream);

}  // namespace spiral_rt
