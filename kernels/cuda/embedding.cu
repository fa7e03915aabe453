// Token embedding on the GPU (reference: kernels/cpu/embedding.cpp). Forward: a row gather.
// Backward, deterministic without float atomics: the positions are sorted by token (CUB's
// stable radix sort keeps position order within a token), then one block per run of equal
// tokens sums its dout rows in position order and adds the sum into dtable once.
// Token ids outside [0, V) raise difftron::Error (one device flag, read back synchronously).
#include <cub/device/device_radix_sort.cuh>

#include <climits>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

// Throws naming the first bad position and its token id when a kernel flagged one
// (synchronises: reads the context's flag).
void report_bad_token(CudaContext& ctx, const Tensor& tokens, int64_t vocab, const char* op) {
  const int bad = ctx.read_flag();
  if (bad != INT_MAX) {
    int32_t tok = 0;
    DT_CUDA(cudaMemcpy(&tok, tokens.data<int32_t>() + bad, sizeof(int32_t), cudaMemcpyDeviceToHost));
    throw_error("cuda ", op, ": token id ", tok, " at position ", bad,
                " is outside the vocabulary [0, ", vocab, ") (tokens ", tokens.str(), ")");
  }
}

// One warp per token row: lanes copy V-element pieces (V = 8: 16-byte vectors), four in
// flight at a time. A token outside [0, V) is flagged (its row is written as zeros).
template <int V, typename T>
__global__ void embedding_forward_kernel(const int32_t* __restrict__ tokens,
                                         const T* __restrict__ table, T* __restrict__ out,
                                         int64_t n, int64_t d, int64_t vocab, int* flag) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (row >= n) return;
  const int32_t tok = tokens[row];
  T* o = out + row * d;
  if (tok < 0 || tok >= vocab) {
    if (lane == 0) atomicMin(flag, int(row));
    float z[V] = {};
    for (int64_t c = int64_t(lane) * V; c < d; c += 32 * V) store_floats<V>(o + c, z);
    return;
  }
  const T* src = table + int64_t(tok) * d;
  constexpr int U = 4;
  for (int64_t c0 = int64_t(lane) * V; c0 < d; c0 += 32 * V * U) {
    float f[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + int64_t(u) * 32 * V;
      if (c < d) load_floats<V>(src + c, f[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + int64_t(u) * 32 * V;
      if (c < d) store_floats<V>(o + c, f[u]);
    }
  }
}

// Positions 0..n-1 for the sort, and the token check.
__global__ void iota_check_kernel(const int32_t* __restrict__ tokens, int32_t* p, int64_t n,
                                  int64_t vocab, int* flag) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    p[i] = int32_t(i);
    const int32_t t = tokens[i];
    if (t < 0 || t >= vocab) atomicMin(flag, int(i));
  }
}

// Block x = position in the sorted order; only the first position of each run of equal
// tokens works. Threads cover V-column chunks (grid y covers more columns).
template <int V, typename G, typename D>
__global__ void embedding_backward_kernel(const uint32_t* __restrict__ sorted_tok,
                                          const int32_t* __restrict__ sorted_pos,
                                          const G* __restrict__ dout, D* __restrict__ dtable,
                                          int64_t n, int64_t d) {
  const int64_t i = blockIdx.x;
  const uint32_t tok = sorted_tok[i];
  if (i > 0 && sorted_tok[i - 1] == tok) return;
  const int64_t c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  if (c >= d) return;
  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.0f;
  for (int64_t k = i; k < n && sorted_tok[k] == tok; ++k) {
    float f[V];
    load_floats<V>(dout + int64_t(sorted_pos[k]) * d + c, f);
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] += f[j];
  }
  D* row = dtable + int64_t(tok) * d + c;
  float cur[V];
  load_floats<V>(row, cur);
#pragma unroll
  for (int j = 0; j < V; ++j) cur[j] += acc[j];
  store_floats<V>(row, cur);
}

}  // namespace

void embedding_forward(CudaContext& ctx, const Tensor& tokens, const Tensor& table, Tensor& out) {
  const int64_t n = tokens.numel(), d = table.cols(), vocab = table.rows();
  if (n == 0) return;
  int* flag = ctx.reset_flag();
  const bool vec = d % 8 == 0 && aligned16(table.raw()) && aligned16(out.raw());
  const unsigned blocks = unsigned((n * 32 + 255) / 256);
  dispatch_float(table.dtype(), [&](auto t) {
    using T = typename decltype(t)::type;
    if (vec)
      embedding_forward_kernel<8, T><<<blocks, 256, 0, ctx.stream()>>>(
          tokens.data<int32_t>(), table.data<T>(), out.data<T>(), n, d, vocab, flag);
    else
      embedding_forward_kernel<1, T><<<blocks, 256, 0, ctx.stream()>>>(
          tokens.data<int32_t>(), table.data<T>(), out.data<T>(), n, d, vocab, flag);
    DT_CUDA_LAUNCHED();
  });
  report_bad_token(ctx, tokens, vocab, "embedding_forward");
}

void embedding_backward(CudaContext& ctx, const Tensor& tokens, const Tensor& dout,
                        Tensor& dtable) {
  const int64_t n = tokens.numel(), d = dtable.cols(), vocab = dtable.rows();
  if (n == 0) return;
  int end_bit = 1;
  while (end_bit < 32 && (int64_t(1) << end_bit) < vocab) ++end_bit;

  // Scratch: sorted tokens, positions in and out, CUB's temporary storage.
  size_t cub_bytes = 0;
  DT_CUDA(cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const uint32_t*>(nullptr),
                                          static_cast<uint32_t*>(nullptr),
                                          static_cast<const int32_t*>(nullptr),
                                          static_cast<int32_t*>(nullptr), n, 0, end_bit,
                                          ctx.stream()));
  const size_t need = ScratchCarver::round(n * sizeof(uint32_t)) +
                      2 * ScratchCarver::round(n * sizeof(int32_t)) + ScratchCarver::round(cub_bytes);
  ScratchCarver carve(ctx.scratch(need));
  uint32_t* sorted_tok = carve.take<uint32_t>(n);
  int32_t* pos_in = carve.take<int32_t>(n);
  int32_t* pos_out = carve.take<int32_t>(n);
  void* cub_tmp = carve.take<char>(cub_bytes);

  int* flag = ctx.reset_flag();
  iota_check_kernel<<<unsigned(std::min<int64_t>((n + 255) / 256, 4096)), 256, 0, ctx.stream()>>>(
      tokens.data<int32_t>(), pos_in, n, vocab, flag);
  DT_CUDA_LAUNCHED();
  report_bad_token(ctx, tokens, vocab, "embedding_backward");
  // Token ids were checked to be in [0, V): their bits read as uint32 sort correctly.
  DT_CUDA(cub::DeviceRadixSort::SortPairs(cub_tmp, cub_bytes,
                                          reinterpret_cast<const uint32_t*>(tokens.data<int32_t>()),
                                          sorted_tok, pos_in, pos_out, n, 0, end_bit, ctx.stream()));

  const bool vec = d % 8 == 0 && aligned16(dout.raw()) && aligned16(dtable.raw());
  const int V = vec ? 8 : 1;
  const int64_t chunks = (d + V - 1) / V;
  const int threads = int(std::min<int64_t>(256, (chunks + 31) / 32 * 32));
  const dim3 grid(unsigned(n), unsigned((chunks + threads - 1) / threads));
  dispatch_float(dout.dtype(), [&](auto gt) {
    using G = typename decltype(gt)::type;
    dispatch_float(dtable.dtype(), [&](auto dt) {
      using D = typename decltype(dt)::type;
      if (vec)
        embedding_backward_kernel<8, G, D><<<grid, threads, 0, ctx.stream()>>>(
            sorted_tok, pos_out, dout.data<G>(), dtable.data<D>(), n, d);
      else
        embedding_backward_kernel<1, G, D><<<grid, threads, 0, ctx.stream()>>>(
            sorted_tok, pos_out, dout.data<G>(), dtable.data<D>(), n, d);
      DT_CUDA_LAUNCHED();
    });
  });
}

}  // namespace difftron::cuda
