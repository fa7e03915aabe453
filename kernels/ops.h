// The op interface: everything above kernels/ (the model, the optimizer, the trainer)
// calls these and never knows which backend runs them. kernels/cpu/ holds the reference
// semantics (f32 and f64); kernels/cuda/ the fast path (bf16 activations, f32 accumulate).
//
// Conventions, for every backend:
// - Tensors are row-major and contiguous; shapes are checked against each other.
// - "accumulates" means the op adds into its output (+=); otherwise it overwrites.
// - Statistics saved for backward (rstd, lse) use the "stat dtype": f64 when the
//   activations are f64, else f32. The differential lambda is a [1] tensor in stat dtype.
// - Layouts of attention tensors (s = position, docs/MODEL.md section 1, "interleaved"):
//     q   [B, S, h, 2, dh]     diff head i owns maps (i,0) and (i,1) (query head 2i + j)
//     k   [B, S, h_kv, 2, dh]  group g owns maps (g,0), (g,1); head i uses g = i / (h / h_kv)
//     v   [B, S, h_kv, 2*dh]
//     out [B, S, h, 2*dh]
//     lse [B, h, 2, S]         log-sum-exp of each map's scaled, masked scores
//   The standard (baseline) attention uses q [B,S,H,dh], k/v [B,S,H_kv,dh], out [B,S,H,dh],
//   lse [B,H,S].
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "base/tensor.h"

namespace difftron {

// Device memory this backend has allocated (tensors and its own workspaces), in bytes, and
// the most it held at once since the last reset_peak_memory(). device_used: what the driver
// reports in use on the device (every process, the CUDA context, library pools); -1 where
// there is no such figure (the CPU).
struct MemoryStats {
  int64_t allocated = 0, peak = 0;
  int64_t device_used = -1, device_total = -1;
};

struct AdamWParams {
  float lr = 1e-3f;
  float beta1 = 0.9f, beta2 = 0.98f, eps = 1e-8f;
  float weight_decay = 0.0f;  // decoupled: p -= lr * wd * p
  int64_t step = 1;           // 1-based, for bias correction
  float grad_scale = 1.0f;    // grads are multiplied by this first (clipping)
};

// One tensor's AdamW update for Ops::adamw_step_each.
struct AdamWTensors {
  Tensor param;    // the master weights, as adamw_step's param
  Tensor grad;     // as adamw_step's grad
  Tensor m, v;     // as adamw_step's moments
  AdamWParams hp;
  Tensor working;  // the working weights (a float dtype, param's numel) set to the updated
                   // param; undefined when param is itself the weight
};

class Ops {
 public:
  virtual ~Ops() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;

  // ---- memory ------------------------------------------------------------------
  virtual Tensor empty(const Shape& shape, DType dtype) = 0;
  virtual void fill_zero(Tensor& t) = 0;
  // dst = src element-wise with dtype conversion (same numel).
  virtual void copy(const Tensor& src, Tensor& dst) = 0;
  // Host <-> tensor, converting to/from the tensor's dtype.
  virtual void upload(Tensor& dst, const float* src) = 0;
  virtual void upload(Tensor& dst, const double* src) = 0;
  virtual void upload(Tensor& dst, const int32_t* src) = 0;
  virtual void download(const Tensor& src, float* dst) = 0;
  virtual void download(const Tensor& src, double* dst) = 0;
  virtual void synchronize() {}
  // Raw copies (the tensor's bytes as stored, no conversion) and page-locked host memory to
  // make them at full bus speed: what a checkpoint's snapshot and load need. The defaults
  // serve tensors in host memory; alloc_pinned returns null when it cannot allocate.
  virtual void download_bytes(const Tensor& src, void* dst) {
    DT_CHECK(src.device() == Device::CPU, "download_bytes: no implementation for ", src.str());
    std::memcpy(dst, src.raw(), src.nbytes());
  }
  virtual void upload_bytes(Tensor& dst, const void* src) {
    DT_CHECK(dst.device() == Device::CPU, "upload_bytes: no implementation for ", dst.str());
    std::memcpy(dst.raw(), src, dst.nbytes());
  }
  virtual void* alloc_pinned(size_t bytes) { return std::malloc(bytes); }
  virtual void free_pinned(void* p) { std::free(p); }
  // What the backend's allocations hold (see MemoryStats); the CPU reference counts nothing.
  virtual MemoryStats memory_stats() { return {}; }
  virtual void reset_peak_memory() {}

  // ---- initialisation ----------------------------------------------------------------
  // Counter-based N(0, std^2) values: element g (flat row-major index in the FULL,
  // unsharded tensor) of tensor `tensor_id` under `seed` depends on (seed, tensor_id, g)
  // only, so any block can be generated on its own and a TP rank's slice equals the same
  // slice of the one-process tensor. The contract every backend implements (u64 wrapping
  // arithmetic; ^ xor; >> logical shift):
  //   mix(z)  = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB;
  //             return z ^ (z >> 31)                               (splitmix64's finaliser)
  //   key     = mix(mix(seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019)
  //                 ^ (tensor_id * 0xD1B54A32D192ED03 + 0x8CB92BA72F3D8DD7))
  //   h(i)    = mix(key + (i + 1) * 0x9E3779B97F4A7C15)           (splitmix64's i-th output)
  //   u1      = double((h(2g) >> 11) + 1) * 2^-53                  in (0, 1]
  //   u2      = double(h(2g + 1) >> 11) * 2^-53                    in [0, 1)
  //   value   = std * (sqrt(-2 * log(u1)) * cos((2 * pi) * u2))    in double, evaluated as
  //             double(std) * (std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2))
  // then rounded to out's dtype: f64 as is; f32 round-to-nearest-even; bf16 the f32 value
  // rounded to nearest even (double -> f32 -> bf16, as an upload of floats does). Backends
  // may differ from the CPU reference by the last bit of the double log/cos only (so an f32
  // or bf16 result by at most one unit of its last place, rarely).
  // `out` (f32, f64 or bf16; viewed as [rows, cols] = [numel / last dim, last dim], a 1-D
  // tensor as [n, 1]) is the block at (row0, col0) of a full matrix with `full_cols`
  // columns: out element (r, c) is g = (row0 + r) * full_cols + (col0 + c). Requires
  // full_cols >= 1, row0 >= 0, 0 <= col0, col0 + cols <= full_cols, std finite and >= 0,
  // and the last g below 2^62 (errors name the op and the value). Overwrites out.
  // The CPU reference is kernels/cpu/init_normal.cpp, which also defines this default for
  // backends without their own kernel: computed on the host, then upload(out, double*).
  virtual void init_normal(Tensor& out, uint64_t seed, uint64_t tensor_id, double std,
                           int64_t full_cols, int64_t row0, int64_t col0);

  // ---- dense ---------------------------------------------------------------------
  // y[M,N] = alpha * op(a) @ op(b) + beta * y, op(t) = t^T when trans_t. a, b, y are
  // seen as 2-D [rows, cols].
  virtual void matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& y,
                      float alpha = 1.0f, float beta = 0.0f) = 0;
  // y = op(a) @ op(b) + c (c: y's shape and dtype, not overlapping y): the residual stream's
  // x_out = x_in + f(x) Wo^T in one pass. The default is copy(c, y) then matmul with beta 1
  // (the CPU reference); CUDA reads c as cuBLASLt's C input, sparing the copy's round trip.
  virtual void matmul_add(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                          const Tensor& c, Tensor& y) {
    copy(c, y);
    matmul(a, trans_a, b, trans_b, y, 1.0f, 1.0f);
  }
  // y += alpha * x
  virtual void axpy(float alpha, const Tensor& x, Tensor& y) = 0;
  virtual void scale(Tensor& x, float alpha) = 0;
  // sum of squares, returned to the host (synchronises)
  virtual double sum_squares(const Tensor& x) = 0;
  // sum_squares of each tensor, the same numbers bit for bit, with one synchronisation for all
  // (the gradient norm over every parameter; the default calls sum_squares for each).
  virtual std::vector<double> sum_squares_each(const std::vector<Tensor>& xs) {
    std::vector<double> out;
    out.reserve(xs.size());
    for (const Tensor& x : xs) out.push_back(sum_squares(x));
    return out;
  }

  // ---- embedding -------------------------------------------------------------------
  // out[n, :] = table[tokens[n], :]; tokens i32 [N], table [V, d], out [N, d]
  virtual void embedding_forward(const Tensor& tokens, const Tensor& table, Tensor& out) = 0;
  // dtable[tokens[n], :] += dout[n, :]  (accumulates; deterministic order)
  virtual void embedding_backward(const Tensor& tokens, const Tensor& dout, Tensor& dtable) = 0;

  // ---- RMSNorm ---------------------------------------------------------------------
  // Over the last dim: y = x * rstd * w * scale, rstd = 1/sqrt(mean(x^2) + eps); rstd [rows].
  virtual void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, float scale, Tensor& y,
                               Tensor& rstd) = 0;
  // dx += dL/dx (the residual add is fused: dx is the residual stream's gradient),
  // dw += dL/dw.
  virtual void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, float scale,
                                const Tensor& dy, Tensor& dx, Tensor& dw) = 0;

  // ---- RoPE (rotate-half / NeoX) ------------------------------------------------------
  // In place on x [B, S, H, dh]: pairs (c, c + dh/2) of each head rotated by angle
  // s * theta^(-2c/dh). inverse=true rotates by the negative angle (the backward).
  virtual void rope(Tensor& x, double theta, bool inverse) = 0;

  // ---- differential attention ---------------------------------------------------------
  // lambda[0] = exp(<lq1,lk1>) - exp(<lq2,lk2>) + lambda_init; vectors [dh].
  virtual void diff_lambda_forward(const Tensor& lq1, const Tensor& lk1, const Tensor& lq2,
                                   const Tensor& lk2, double lambda_init, Tensor& lambda) = 0;
  // Given dL/dlambda [1], accumulates into dlq1, dlk1, dlq2, dlk2.
  virtual void diff_lambda_backward(const Tensor& lq1, const Tensor& lk1, const Tensor& lq2,
                                    const Tensor& lk2, const Tensor& dlambda, Tensor& dlq1,
                                    Tensor& dlk1, Tensor& dlq2, Tensor& dlk2) = 0;
  // out = (A1 - lambda A2) V per diff head, A_j = causal softmax(Q_j K_j^T / sqrt(dh)).
  // `saved` is backend-private state the forward may keep for the backward (the fused CUDA
  // kernels keep O2n = A2 V, sparing the backward a pass): a bf16 tensor of at least
  // diff_attention_saved_numel(q) elements, or undefined / smaller to keep nothing (the
  // backward then recomputes). The caller passes the same `saved` to the backward.
  virtual int64_t diff_attention_saved_numel(const Tensor& q) const { return 0; }
  virtual void diff_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& lambda, Tensor& out, Tensor& lse,
                                      Tensor& saved) = 0;
  // dq, dk, dv, dlambda [1] are overwritten.
  virtual void diff_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& lambda, const Tensor& out, const Tensor& lse,
                                       const Tensor& saved, const Tensor& dout, Tensor& dq,
                                       Tensor& dk, Tensor& dv, Tensor& dlambda) = 0;

  // ---- standard causal attention (the baseline Transformer), GQA ------------------------
  virtual void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                                 Tensor& lse) = 0;
  virtual void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, const Tensor& dout,
                                  Tensor& dq, Tensor& dk, Tensor& dv) = 0;

  // ---- Differential Transformer V2: the pairwise subtraction (docs/MODEL.md section 5) ----
  // att [B, S, 2H, dh] is standard attention's output with 2H query heads, pair i being query
  // heads (2i, 2i + 1); z [B*S, H] the lambda logits (x W_lambda^T); out [B, S, H, dh]:
  //   out[n, i, :] = att[n, 2i, :] - sigmoid(z[n, i]) * att[n, 2i + 1, :]
  // att, z, out (and the backward's dout, datt, dz) share one dtype (f32 or f64 on the CPU,
  // f32 or bf16 on the GPU; arithmetic in f32 there). The CPU reference
  // (kernels/cpu/diff_v2_combine.cpp) is also the default for host tensors.
  virtual void diff_v2_combine_forward(const Tensor& att, const Tensor& z, Tensor& out);
  // Overwrites datt [B, S, 2H, dh] and dz [B*S, H]:
  //   datt[n, 2i] = dout[n, i],  datt[n, 2i + 1] = -s dout[n, i],
  //   dz[n, i] = -s (1 - s) <dout[n, i], att[n, 2i + 1]>,  s = sigmoid(z[n, i]).
  virtual void diff_v2_combine_backward(const Tensor& att, const Tensor& z, const Tensor& dout,
                                        Tensor& datt, Tensor& dz);

  // ---- attention of new tokens against a K/V cache (generation, core/decode.h) -----------
  // B sequences, each with T new tokens at positions start[b] + t (t < T); start is i32 [B]
  // in the backend's memory. Per sequence: q and k of the new tokens are rotated as rope()
  // rotates position start[b] + t; the rotated k and v are written into cache rows
  // start[b] + t; then new query t attends to cache rows [0, start[b] + t] (causal among the
  // new tokens). q, k and v are not modified. Requires start[b] + T <= C (the CPU checks and
  // throws; a GPU kernel cannot, and skips such rows: nothing written, out rows left as they were).
  // Differential (q is 5-D): q [B,T,h,2,dh], k [B,T,h_kv,2,dh], v [B,T,h_kv,2dh],
  //   k_cache [B,C,h_kv,2,dh], v_cache [B,C,h_kv,2dh], lambda [1] in stat dtype,
  //   out [B,T,h,2dh] = (A1 - lambda A2) V, as diff_attention_forward (before the sub-layer norm).
  // Standard (q is 4-D): q [B,T,H,dh], k and v [B,T,H_kv,dh], caches [B,C,H_kv,dh], lambda
  //   undefined, out [B,T,H,dh], as attention_forward.
  // The CPU reference (kernels/cpu/cached_attention.cpp) is also the default for host tensors.
  virtual void cached_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& start,
                                const Tensor& lambda, double rope_theta, Tensor& k_cache,
                                Tensor& v_cache, Tensor& out);

  // ---- SwiGLU -----------------------------------------------------------------------
  // out = silu(gate) * up, all [N, F]
  virtual void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) = 0;
  // dgate, dup overwritten
  virtual void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout,
                               Tensor& dgate, Tensor& dup) = 0;

  // ---- softmax cross-entropy ----------------------------------------------------------
  // logits [N, V], targets i32 [N] (< 0: ignored, loss 0). losses [N] = lse - logit[target];
  // lse [N]. Both in stat dtype.
  virtual void cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& losses,
                                     Tensor& lse) = 0;
  // dlogits = (softmax(logits) - onehot(target)) * dloss (0 rows for ignored targets).
  // dlogits may alias logits.
  virtual void cross_entropy_backward(const Tensor& logits, const Tensor& targets,
                                      const Tensor& lse, float dloss, Tensor& dlogits) = 0;

  // ---- optimizer ---------------------------------------------------------------------
  // AdamW on an f32 master `param` with f32 moments m, v; grad in any float dtype.
  virtual void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v,
                          const AdamWParams& hp) = 0;
  // A whole step's updates: for each item, adamw_step(param, grad, m, v, hp) then, where
  // `working` is defined, copy(param, working); the same bits as those calls in turn. No
  // tensor of one item may overlap another item's. A backend may run them all at once (CUDA:
  // one launch that writes the working copy in the update's pass, sparing the copy's re-read
  // of the f32 masters); the default is that loop (the CPU reference).
  virtual void adamw_step_each(const std::vector<AdamWTensors>& items) {
    for (const AdamWTensors& t : items) {
      Tensor p = t.param, m = t.m, v = t.v, w = t.working;
      adamw_step(p, t.grad, m, v, t.hp);
      if (w.defined()) copy(p, w);
    }
  }
};

// The CPU reference backend (always available).
std::unique_ptr<Ops> make_cpu_ops();
// The CUDA backend on `device_index`; throws difftron::Error when CUDA is not built in
// or no GPU is present.
// Options of the CUDA backend, chosen by the program (`train --deterministic`, benchmarks).
struct CudaOptions {
  bool deterministic = false;   // fixed-order reductions: bitwise repeatable steps (the fused
                                // attention backward's dQ without f32 atomics; ~20% slower)
  bool hopper_kernels = true;   // the sm_90a fused attention kernels where the GPU has them
                                // (false: the mma.sync kernels every GPU runs, for A/B runs)
};
std::unique_ptr<Ops> make_cuda_ops(int device_index, const CudaOptions& options = {});
bool cuda_available();  // built with CUDA and at least one GPU visible

}  // namespace difftron
