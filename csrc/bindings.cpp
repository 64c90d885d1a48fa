// pybind11 bindings of spiral_rt._C.
//
// Kernels receive raw device pointers (tensor.data_ptr()) and a stream handle
// (torch.cuda.current_stream().cuda_stream); validation happens once, in spiral_rt/ops. This file
// compiles without the CUDA headers: when the module is built without CUDA, only build_info() and
// the host-side Philox helpers exist, and build_info()["cuda"] is False.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "chunk_attention.h"
#include "philox.h"
#include "sampler_step.h"

namespace py = pybind11;
using spiral_rt::DType;
using spiral_rt::NoiseMode;

namespace {

py::dict build_info() {
  py::dict info;
#ifdef SPIRAL_RT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::string(SPIRAL_RT_CUDA_VERSION);
  info["cuda_archs"] = std::string(SPIRAL_RT_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = std::string();
#endif
  return info;
}

// Host evaluation of the exact code the kernels run (philox.h), for tests without a GPU.
py::tuple philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const spiral_rt::U32x4 r = spiral_rt::philox4x32_10({c0, c1, c2, c3}, k0, k1);
  return py::make_tuple(r.x, r.y, r.z, r.w);
}

std::vector<float> philox_normals(uint64_t seed, uint32_t sequence, uint32_t chunk, uint32_t step,
                                  int64_t count) {
  std::vector<float> out(static_cast<size_t>(count));
  float z[4];
  for (int64_t i = 0; i < count; ++i) {
    if (i % 4 == 0) spiral_rt::philox_normal4(seed, static_cast<uint32_t>(i / 4), sequence, chunk, step, z);
    out[static_cast<size_t>(i)] = z[i % 4];
  }
  return out;
}

#ifdef SPIRAL_RT_WITH_CUDA
template <typename P>
P* ptr(uintptr_t address) {
  return reinterpret_cast<P*>(address);
}

void sampler_step(uintptr_t x, uintptr_t m, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t noise,
                  uintptr_t noise_key, uintptr_t x_next, uintptr_t mu, uintptr_t partials,
                  uintptr_t tickets, uintptr_t sq_sum, int64_t num_seqs, int64_t seq_len, int dtype,
                  int noise_mode, int device, uintptr_t stream) {
  spiral_rt::SamplerStepArgs args;
  args.x = ptr<const void>(x);
  args.m = ptr<const void>(m);
  args.a = ptr<const float>(a);
  args.b = ptr<const float>(b);
  args.c = ptr<const float>(c);
  args.noise = ptr<const void>(noise);
  args.noise_key = ptr<const int64_t>(noise_key);
  args.x_next = ptr<void>(x_next);
  args.mu = ptr<void>(mu);
  args.partials = ptr<float>(partials);
  args.tickets = ptr<uint32_t>(tickets);
  args.sq_sum = ptr<float>(sq_sum);
  args.num_seqs = num_seqs;
  args.seq_len = seq_len;
  args.dtype = static_cast<DType>(dtype);
  args.noise_mode = static_cast<NoiseMode>(noise_mode);
  const int err = spiral_rt::sampler_step_launch(args, device, ptr<void>(stream));
  if (err != 0)
    throw std::runtime_error(std::string("spiral_rt sampler_step launch failed: ") +
                             spiral_rt::cuda_error_string(err));
}

void chunk_attention(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, uintptr_t partial_o,
                     uintptr_t partial_lse, uintptr_t work, uintptr_t tiles, int64_t q_row_stride, int64_t total_q,
                     int64_t num_work, int64_t num_pieces, int64_t num_pages, int page_size, int num_heads, int num_kv_heads,
                     int head_dim, int block_n, float sm_scale, int dtype, int device, uintptr_t stream,
                     uintptr_t tile_log2_count, uintptr_t q_row_scale, bool short_items, uintptr_t own_k, uintptr_t own_v, int64_t own_row_stride, int64_t num_own_pages) {
  spiral_rt::ChunkAttentionArgs args;
  args.q = ptr<const void>(q);
  args.k = ptr<const void>(k);
  args.v = ptr<const void>(v);
  args.o = ptr<void>(o);
  args.lse = ptr<float>(lse);
  args.partial_o = ptr<float>(partial_o);
  args.partial_lse = ptr<float>(partial_lse);
  args.work = ptr<const int32_t>(work);
  args.tiles = ptr<const int32_t>(tiles);
  args.tile_log2_count = ptr<const float>(tile_log2_count);
  args.q_row_scale = ptr<const float>(q_row_scale);
  args.own_k = ptr<const void>(own_k);
  args.own_v = ptr<const void>(own_v);
  args.own_row_stride = own_row_stride;
  args.num_own_pages = num_own_pages;
  args.q_row_stride = q_row_stride;
  args.total_q = total_q;
  args.num_work = num_work;
  args.num_pieces = num_pieces;
  args.num_pages = num_pages;
  args.page_size = page_size;
  args.num_heads = num_heads;
  args.num_kv_heads = num_kv_heads;
  args.head_dim = head_dim;
  args.block_n = block_n;
  args.short_items = short_items;
  args.sm_scale = sm_scale;
  args.dtype = static_cast<DType>(dtype);
  const int err = spiral_rt::chunk_attention_sm90_launch(args, device, ptr<void>(stream));
  if (err != 0)
    throw std::runtime_error(std::string("spiral_rt chunk_attention launch failed: ") +
                             spiral_rt::cuda_error_string(err));
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "spiral_rt native kernels (pointer-level; use spiral_rt.ops for the checked API)";
  m.def("build_info", &build_info, "What this module was built with: {'cuda', 'cuda_version', 'cuda_archs'}");
  m.def("philox4x32", &philox4x32, "Philox4x32-10 of one counter block, on the host",
        py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"), py::arg("k1"));
  m.def("philox_normals", &philox_normals,
        "The first `count` standard normals of a noise stream, computed on the host",
        py::arg("seed"), py::arg("sequence"), py::arg("chunk"), py::arg("step"), py::arg("count"));

  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(DType::kFloat32);
  dtypes["float16"] = static_cast<int>(DType::kFloat16);
  dtypes["bfloat16"] = static_cast<int>(DType::kBFloat16);
  m.attr("DTYPES") = dtypes;
  py::dict modes;
  modes["none"] = static_cast<int>(NoiseMode::kNone);
  modes["tensor"] = static_cast<int>(NoiseMode::kTensor);
  modes["philox"] = static_cast<int>(NoiseMode::kPhilox);
  m.attr("NOISE_MODES") = modes;

#ifdef SPIRAL_RT_WITH_CUDA
  m.def("sampler_step", &sampler_step, "Launch the fused sampler step (see csrc/sampler_step.h)",
        py::arg("x"), py::arg("m"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("noise"),
        py::arg("noise_key"), py::arg("x_next"), py::arg("mu"), py::arg("partials"),
        py::arg("tickets"), py::arg("sq_sum"), py::arg("num_seqs"), py::arg("seq_len"),
        py::arg("dtype"), py::arg("noise_mode"), py::arg("device"), py::arg("stream"));
  m.def("sampler_step_blocks_per_seq",
        [](int64_t seq_len, int dtype) {
          return spiral_rt::sampler_step_blocks_per_seq(seq_len, static_cast<DType>(dtype));
        },
        py::arg("seq_len"), py::arg("dtype"));
  m.def("stream_capture_id",
        [](uintptr_t stream) {
          uint64_t id = 0;
          const int err = spiral_rt::stream_capture_id(ptr<void>(stream), &id);
          if (err != 0)
            throw std::runtime_error(std::string("cudaStreamGetCaptureInfo failed: ") +
                                     spiral_rt::cuda_error_string(err));
          return id;
        },
        "The id of the graph capture the stream is recording, 0 when it is not capturing",
        py::arg("stream"));
  m.def("chunk_attention", &chunk_attention,
        "Launch the Hopper chunk attention over paged K/V (see csrc/chunk_attention.h)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("partial_o"),
        py::arg("partial_lse"), py::arg("work"), py::arg("tiles"), py::arg("q_row_stride"), py::arg("total_q"),
        py::arg("num_work"), py::arg("num_pieces"), py::arg("num_pages"), py::arg("page_size"), py::arg("num_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_n"), py::arg("sm_scale"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"), py::arg("tile_log2_count") = 0, py::arg("q_row_scale") = 0,
        py::arg("short_items") = false, py::arg("own_k") = 0, py::arg("own_v") = 0,
        py::arg("own_row_stride") = 0, py::arg("num_own_pages") = 0);
  m.def("chunk_attention_available", &spiral_rt::chunk_attention_sm90_available,
        "Whether the Hopper chunk attention kernel runs on this device (sm_90a build, compute 9.0)",
        py::arg("device"));
  py::list block_ns;
  for (int bn : spiral_rt::kChunkAttentionBlockNs) block_ns.append(bn);
  m.attr("CHUNK_ATTENTION_BLOCK_NS") = block_ns;
#endif
}
