// AdamW on the GPU (reference: kernels/cpu/adamw.cpp, PyTorch's update order): f32 master
// weights and moments, gradients f32 or bf16. adamw_step: one tensor, one fused element-wise
// pass (16 bytes read + 12 written per element with an f32 grad). adamw_step_each: every
// tensor of a step in one launch, each tensor's working copy (bf16) written in the same pass,
// which spares the separate Ops::copy's launch and its 4-byte re-read of each master element.
// Both run adamw_element, so their f32 results are the same bits, and the working copy is
// stored by store_floats as copy.cu stores it (round to nearest even).
#include <cmath>
#include <vector>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

// AdamWParams as the kernels use them: decay = 1 - lr * wd, inverse bias corrections.
struct AdamWHyper {
  float lr, beta1, beta2, eps, decay, grad_scale, inv_bc1, inv_bc2;
};

AdamWHyper hyper_of(const AdamWParams& hp) {
  const double bc1 = 1.0 - std::pow(double(hp.beta1), double(hp.step));
  const double bc2 = 1.0 - std::pow(double(hp.beta2), double(hp.step));
  return {hp.lr, hp.beta1, hp.beta2, hp.eps, float(1.0 - double(hp.lr) * double(hp.weight_decay)),
          hp.grad_scale, float(1.0 / bc1), float(1.0 / bc2)};
}

// One element's update, shared by both kernels. The rounding of every operation is spelled
// out (the _rn intrinsics are never contracted), so the bits do not hang on where the compiler
// forms FMAs: these are the operations nvcc 13.0 made of the former `m = beta1 * m + (1 - beta1)
// * g; v = beta2 * v + (1 - beta2) * g * g; p = p * decay - lr * m_hat / (sqrtf(v_hat) + eps)`
// in its vectorised path (its scalar path fused v the other way round).
__device__ __forceinline__ void adamw_element(const AdamWHyper& h, float g, float& p, float& m, float& v) {
  const float gj = __fmul_rn(g, h.grad_scale);
  m = __fmaf_rn(h.beta1, m, __fmul_rn(__fsub_rn(1.0f, h.beta1), gj));
  v = __fmaf_rn(gj, __fmul_rn(__fsub_rn(1.0f, h.beta2), gj), __fmul_rn(h.beta2, v));
  const float mh = __fmul_rn(m, h.inv_bc1), vh = __fmul_rn(v, h.inv_bc2);
  p = __fmaf_rn(p, h.decay, -__fdiv_rn(__fmul_rn(h.lr, mh), __fadd_rn(__fsqrt_rn(vh), h.eps)));
}

// V elements from i: param, m, v updated in place; W (void: none) the working copy written.
template <int V, typename G, typename W>
__device__ __forceinline__ void adamw_vector(const AdamWHyper& h, float* param, const G* grad, float* m,
                                             float* v, W* working, int64_t i) {
  float p[V], g[V], mm[V], vv[V];
  load_floats<V>(param + i, p);
  load_floats<V>(grad + i, g);
  load_floats<V>(m + i, mm);
  load_floats<V>(v + i, vv);
#pragma unroll
  for (int j = 0; j < V; ++j) adamw_element(h, g[j], p[j], mm[j], vv[j]);
  store_floats<V>(param + i, p);
  store_floats<V>(m + i, mm);
  store_floats<V>(v + i, vv);
  if constexpr (!std::is_void_v<W>) store_floats<V>(working + i, p);
}

template <typename G>
struct AdamWOp {
  float* param;
  const G* grad;
  float* m;
  float* v;
  AdamWHyper h;
  template <int V>
  __device__ void apply(int64_t i) const {
    adamw_vector<V, G, void>(h, param, grad, m, v, nullptr, i);
  }
};

// ---- adamw_step_each: one launch over a table of tensors --------------------------------
enum ItemDType : int { kNone = 0, kF32 = 1, kBf16 = 2 };

// One tensor as the kernel reads it from the device table.
struct AdamWItem {
  float* param;
  const void* grad;
  float* m;
  float* v;
  void* working;        // null: no working copy
  int64_t numel;
  int64_t first_block;  // blocks of the items before this one (prefix sum)
  AdamWHyper h;
  int grad_dtype, working_dtype;  // ItemDType
  int vec;                        // every pointer 16-byte aligned: 8-element vectors
};

constexpr int kThreads = 256;
constexpr int64_t kChunk = kThreads * 8 * 4;  // elements per block: 4 vectors of 8 per thread

// Elements [begin, begin + n) of one item; begin is a multiple of kChunk, so the vectors
// keep the item's alignment. With V = 8 the last n % 8 elements go one by one.
template <int V, typename G, typename W>
__device__ void adamw_block(const AdamWItem& it, int64_t begin, int64_t n) {
  float* p = it.param + begin;
  const G* g = static_cast<const G*>(it.grad) + begin;
  float* m = it.m + begin;
  float* v = it.v + begin;
  W* w = nullptr;
  if constexpr (!std::is_void_v<W>) w = static_cast<W*>(it.working) + begin;
  const int64_t nvec = n / V;
  for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) adamw_vector<V, G, W>(it.h, p, g, m, v, w, c * V);
  for (int64_t i = nvec * V + threadIdx.x; i < n; i += blockDim.x) adamw_vector<1, G, W>(it.h, p, g, m, v, w, i);
}

template <typename G, typename W>
__device__ void adamw_block_by_alignment(const AdamWItem& it, int64_t begin, int64_t n) {
  if (it.vec)
    adamw_block<8, G, W>(it, begin, n);
  else
    adamw_block<1, G, W>(it, begin, n);
}

template <typename G>
__device__ void adamw_block_by_working(const AdamWItem& it, int64_t begin, int64_t n) {
  if (it.working_dtype == kBf16)
    adamw_block_by_alignment<G, bf16>(it, begin, n);
  else if (it.working_dtype == kF32)
    adamw_block_by_alignment<G, float>(it, begin, n);
  else
    adamw_block_by_alignment<G, void>(it, begin, n);
}

// Block b updates chunk b - first_block of the last item whose first_block <= b (items
// without elements own no block). Every branch is uniform over the block.
__global__ void adamw_each_kernel(const AdamWItem* __restrict__ items, int n_items) {
  const int64_t b = blockIdx.x;
  int lo = 0, hi = n_items - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (items[mid].first_block <= b)
      lo = mid;
    else
      hi = mid - 1;
  }
  const AdamWItem it = items[lo];
  const int64_t begin = (b - it.first_block) * kChunk;
  const int64_t n = it.numel - begin < kChunk ? it.numel - begin : kChunk;
  if (it.grad_dtype == kBf16)
    adamw_block_by_working<bf16>(it, begin, n);
  else
    adamw_block_by_working<float>(it, begin, n);
}

int item_dtype(const Tensor& t) {
  if (!t.defined()) return kNone;
  return t.dtype() == DType::BF16 ? kBf16 : kF32;
}

}  // namespace

void adamw_step(CudaContext& ctx, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v,
                const AdamWParams& hp) {
  const bool vec = aligned16(param.raw()) && aligned16(grad.raw()) && aligned16(m.raw()) &&
                   aligned16(v.raw());
  dispatch_float(grad.dtype(), [&](auto t) {
    using G = typename decltype(t)::type;
    AdamWOp<G> op{param.data<float>(), grad.data<G>(), m.data<float>(), v.data<float>(), hyper_of(hp)};
    launch_elementwise(ctx, param.numel(), vec, op);
  });
}

void adamw_step_each(CudaContext& ctx, const std::vector<AdamWTensors>& items) {
  std::vector<AdamWItem> table;
  table.reserve(items.size());
  int64_t blocks = 0;
  for (const AdamWTensors& t : items) {
    const int64_t n = t.param.numel();
    if (n == 0) continue;
    const bool vec = aligned16(t.param.raw()) && aligned16(t.grad.raw()) && aligned16(t.m.raw()) &&
                     aligned16(t.v.raw()) && (!t.working.defined() || aligned16(t.working.raw()));
    table.push_back({t.param.data<float>(), t.grad.raw(), t.m.data<float>(), t.v.data<float>(),
                     t.working.defined() ? t.working.raw() : nullptr, n, blocks, hyper_of(t.hp),
                     item_dtype(t.grad), item_dtype(t.working), vec});
    blocks += (n + kChunk - 1) / kChunk;
  }
  if (table.empty()) return;
  // The table goes through the stream. From pageable memory the copy has staged the host bytes
  // when it returns (and may first wait for the stream: idle here, as the step's gradient norm
  // has just synchronised it), so `table` may go.
  const size_t bytes = table.size() * sizeof(AdamWItem);
  AdamWItem* dev = static_cast<AdamWItem*>(ctx.scratch(bytes));
  DT_CUDA(cudaMemcpyAsync(dev, table.data(), bytes, cudaMemcpyHostToDevice, ctx.stream()));
  adamw_each_kernel<<<unsigned(blocks), kThreads, 0, ctx.stream()>>>(dev, int(table.size()));
  DT_CUDA_LAUNCHED();
}

}  // namespace difftron::cuda
