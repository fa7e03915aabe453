// The parallel code on a GPU (skipped without one): NCCL communicators of a one-rank grid
// (collectives on device memory, the side stream's ordering), ZeRO-1 through NCCL training
// like the plain AdamW, and tensor parallelism TP=2 on one GPU (two threads, two CUDA
// backends, a host-staged communicator) giving the loss and gradients of one model; that
// harness also runs on the CPU in f32, so CI checks it.
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "core/model.h"
#include "core/optimizer.h"
#include "base/rng.h"
#include "kernels/ops.h"
#include "parallel/grid.h"
#include "parallel/mpi_comm.h"
#include "parallel/nccl_comm.h"
#include "tests/tolerances.h"
#ifdef DIFFTRON_HAVE_CUDA
#include "kernels/cuda/cuda_ops.h"
#endif

namespace difftron {
namespace {

bool have_gpu() { return cuda_available(); }

MpiRuntime& mpi() {
  static int argc = 0;
  static char** argv = nullptr;
  static MpiRuntime rt(&argc, &argv);  // one rank, no mpirun (MPI singleton)
  return rt;
}

void* stream_of(Ops& ops) {
#ifdef DIFFTRON_HAVE_CUDA
  if (auto* c = cuda::context_of(ops)) return c->stream();
#endif
  return nullptr;
}

std::unique_ptr<ParallelContext> one_rank_grid(Ops& ops) {
  mpi();
  GridOptions o;
  o.device = Device::CUDA;
  o.ops = &ops;
  o.cuda_stream = stream_of(ops);
  o.watchdog.collective_timeout_s = 60;
  return ParallelContext::from_mpi_world(o);
}

ModelConfig tiny(AttentionKind kind) {
  ModelConfig c;
  c.vocab_size = 64;
  c.d_model = 64;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.ffn_dim = 128;
  c.max_seq_len = 32;
  c.attention = kind;
  return c;
}

void make_batch(uint64_t seed, int64_t n, int64_t V, std::vector<int32_t>& tok, std::vector<int32_t>& tgt) {
  Rng r(seed);
  tok.resize(n);
  tgt.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    tok[i] = int32_t(r.below(uint64_t(V)));
    tgt[i] = i % 13 == 7 ? -1 : int32_t((tok[i] * 3 + 1) % V);
  }
}

TEST(ParallelGpu, NcclCollectivesOnOneRank) {
  if (!have_gpu() || !nccl_built()) GTEST_SKIP() << "needs a GPU and NCCL";
  auto ops = make_cuda_ops(0);
  auto ctx = one_rank_grid(*ops);
  const int64_t n = 1000;
  std::vector<float> x(n), y(n);
  for (int64_t i = 0; i < n; ++i) x[i] = float(i % 37) * 0.25f - 3.0f;
  for (Communicator* c : {&ctx->tp(), &ctx->dp(), &ctx->world()}) {
    ASSERT_EQ(c->device(), Device::CUDA);
    Tensor t = ops->empty({n}, DType::F32), u = ops->empty({n}, DType::F32);
    ops->upload(t, x.data());
    c->all_reduce(t);                          // one rank: unchanged
    c->reduce_scatter(t, u);                   // out of place: a copy
    auto work = c->all_gather_async(u, t);     // on the DP side stream for dp()
    work->wait();
    ops->scale(t, 2.0f);                       // ordered after the gather on the compute stream
    c->broadcast(t, 0);
    c->barrier();
    ops->download(t, y.data());
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(y[i], 2.0f * x[i]) << c->name() << " index " << i;
    Tensor b = ops->empty({n}, DType::BF16);
    ops->upload(b, x.data());
    c->all_reduce(b);
    ops->download(b, y.data());
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(y[i], x[i]) << "bf16 on " << c->name();
  }
}

TEST(ParallelGpu, ZeroThroughNcclTrainsLikePlainAdamW) {
  if (!have_gpu() || !nccl_built()) GTEST_SKIP() << "needs a GPU and NCCL";
  const int64_t B = 2, S = 32, steps = 8;
  std::vector<double> losses[2];
  for (int zero = 0; zero < 2; ++zero) {
    auto ops = make_cuda_ops(0);
    std::unique_ptr<ParallelContext> ctx = zero ? one_rank_grid(*ops) : nullptr;
    Model m(tiny(AttentionKind::Differential), *ops, ModelPrecision::cuda_mixed(), B, S,
            ctx ? model_parallel(*ctx) : ModelParallel{});
    m.init_weights(5);
    OptimizerConfig oc;
    oc.lr = 3e-3;
    oc.warmup_steps = 2;
    oc.total_steps = steps;
    AdamW opt(oc, m, ctx.get());
    std::vector<int32_t> tok, tgt;
    for (int64_t s = 0; s < steps; ++s) {
      m.zero_grads();
      make_batch(100 + s, B * S, 64, tok, tgt);
      losses[zero].push_back(m.forward_backward(tok.data(), tgt.data(), B, S, 1.0f));
      opt.step(s);
    }
  }
  for (int64_t s = 0; s < steps; ++s) {
    std::printf("step %lld: plain AdamW loss %.9f, ZeRO through NCCL %.9f\n", (long long)s, losses[0][s], losses[1][s]);
    EXPECT_NEAR(losses[1][s], losses[0][s], 1e-5 * losses[0][s]) << "step " << s;
  }
  EXPECT_LT(losses[1].back(), losses[1].front());
}

// ---- TP=2 in two threads on one GPU ------------------------------------------------------

// A reusable barrier for `n` threads.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  uint64_t gen_ = 0;
};

// Ranks are threads; sums go through host memory in rank order (device tensors via Ops).
struct ThreadGroup {
  explicit ThreadGroup(int n) : size(n), slots(n), sync(n) {}
  int size;
  std::vector<std::vector<double>> slots;
  Barrier sync;
};

class ThreadComm final : public Communicator {
 public:
  ThreadComm(ThreadGroup& g, int rank, Device dev, Ops* ops) : g_(g), rank_(rank), dev_(dev), ops_(ops) {}
  int rank() const override { return rank_; }
  int size() const override { return g_.size; }
  const std::string& name() const override { return name_; }
  Device device() const override { return dev_; }
  void all_reduce(Tensor& t) override {
    std::vector<double> mine(t.numel());
    if (!ops_)
      std::memcpy(mine.data(), t.raw(), t.nbytes());  // the host group's tensors are f64
    else
      ops_->download(t, mine.data());
    g_.slots[rank_] = mine;
    g_.sync.arrive_and_wait();
    std::vector<double> sum(t.numel(), 0.0);
    for (int r = 0; r < g_.size; ++r)
      for (int64_t i = 0; i < t.numel(); ++i) sum[i] += g_.slots[r][i];
    g_.sync.arrive_and_wait();
    if (!ops_)
      std::memcpy(t.raw(), sum.data(), t.nbytes());
    else
      ops_->upload(t, sum.data());
  }
  void all_gather(const Tensor& in, Tensor& out) override {  // host f64 only (the model's use)
    ASSERT_EQ(ops_, nullptr);
    g_.slots[rank_].assign(in.data<double>(), in.data<double>() + in.numel());
    g_.sync.arrive_and_wait();
    for (int r = 0; r < g_.size; ++r)
      std::copy(g_.slots[r].begin(), g_.slots[r].end(), out.data<double>() + r * in.numel());
    g_.sync.arrive_and_wait();
  }
  void reduce_scatter(const Tensor&, Tensor&) override { FAIL() << "not used by the model"; }
  void broadcast(Tensor&, int) override {}
  void barrier() override { g_.sync.arrive_and_wait(); }

 private:
  ThreadGroup& g_;
  int rank_;
  Device dev_;
  Ops* ops_;
  std::string name_ = "tp";
};

// TP=2 as two threads against one model: on the CPU (always) and on the GPU in f32, where the
// sums must agree to rounding; and on the GPU in bf16 mixed precision, the training path.
struct TpCase {
  Device dev;
  DType dtype;
};
class TensorParallelTwoThreads : public ::testing::TestWithParam<TpCase> {};

TEST_P(TensorParallelTwoThreads, MatchesOneModel) {
  const Device dev = GetParam().dev;
  const bool bf16 = GetParam().dtype == DType::BF16;
  if (dev == Device::CUDA && !have_gpu()) GTEST_SKIP() << "needs a GPU";
  auto make_ops = [&] { return dev == Device::CUDA ? make_cuda_ops(0) : make_cpu_ops(); };
  const ModelPrecision prec = bf16 ? ModelPrecision::cuda_mixed() : ModelPrecision::uniform(DType::F32);
  for (auto kind : {AttentionKind::Differential, AttentionKind::Standard}) {
    const int64_t B = 2, S = 32;
    const ModelConfig cfg = tiny(kind);
    // f32 (CPU, and the GPU's f32 GEMMs, which round like the CPU's): the bounds of
    // reordered sums (tests/tolerances.h). bf16 (u = 2^-8) makes those worst cases vacuous;
    // its bounds are what the H200 showed with a margin: the loss within 2e-3 relative,
    // gradients 3e-2 in relative L2 (the GPU is one model of processor, unlike CI's CPUs).
    const double loss_tol = bf16 ? 2e-3 : testing::loss_rel_bound(cfg, S, B * S);
    const double grad_tol = bf16 ? 3e-2 : testing::grad_rel_bound(cfg, S, B * S);
    std::vector<int32_t> tok, tgt;
    make_batch(7, B * S, cfg.vocab_size, tok, tgt);
    // one model
    auto ops1 = make_ops();
    Model one(cfg, *ops1, prec, B, S);
    one.init_weights(9);
    one.zero_grads();
    const double loss1 = one.forward_backward(tok.data(), tgt.data(), B, S, 1.0f);
    // two TP ranks
    ThreadGroup dev_group(2), host_group(2);
    double loss2[2];
    std::vector<std::vector<std::vector<float>>> grads(2);
    std::vector<std::unique_ptr<Ops>> ops2(2);
    std::vector<std::string> errors(2);
    std::vector<std::thread> threads;
    std::vector<std::vector<Param>> layout(2);
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back([&, r] {
        try {
          ops2[r] = make_ops();
          ThreadComm tp(dev_group, r, dev, ops2[r].get()), tph(host_group, r, Device::CPU, nullptr);
          ModelParallel mp;
          mp.tp = &tp;
          mp.tp_host = &tph;
          Model m(cfg, *ops2[r], prec, B, S, mp);
          m.init_weights(9);
          m.zero_grads();
          loss2[r] = m.forward_backward(tok.data(), tgt.data(), B, S, 1.0f);
          for (auto& p : m.params()) {
            std::vector<float> g(p.grad.numel());
            ops2[r]->download(p.grad, g.data());
            grads[r].push_back(std::move(g));
          }
          layout[r] = m.params();
        } catch (const std::exception& e) {
          errors[r] = e.what();
        }
      });
    }
    for (auto& t : threads) t.join();
    ASSERT_EQ(errors[0], "");
    ASSERT_EQ(errors[1], "");
    EXPECT_EQ(loss2[0], loss2[1]);
    EXPECT_NEAR(loss2[0], loss1, loss_tol * loss1) << attention_kind_name(kind);
    std::printf("%s %s: loss one model %.7f, TP=2 %.7f\n", device_name(dev), attention_kind_name(kind), loss1, loss2[0]);
    auto rel = [](const std::vector<float>& a, const std::vector<float>& b) {
      double num = 0, den = 0;
      for (size_t k = 0; k < a.size(); ++k) {
        num += (double(a[k]) - b[k]) * (double(a[k]) - b[k]);
        den += double(b[k]) * b[k];
      }
      return std::sqrt(num / std::max(den, 1e-30));
    };
    // every gradient, rebuilt from the two shards, against the one model's
    for (size_t i = 0; i < one.params().size(); ++i) {
      const Param& p = one.params()[i];
      std::vector<float> full(p.grad.numel()), tp_full(p.grad.numel());
      ops1->download(p.grad, full.data());
      for (int r = 0; r < 2; ++r) {
        const Param& q = layout[r][i];
        const int64_t cols = q.full_shape.size() > 1 ? q.full_shape[1] : 1;
        for (int64_t k = 0; k < q.grad.numel(); ++k) {
          int64_t at = k;  // index into the full tensor
          if (q.shard_dim == 0) at = q.shard_begin * cols + k;
          if (q.shard_dim == 1) at = (k / q.grad.dim(1)) * cols + q.shard_begin + k % q.grad.dim(1);
          tp_full[at] = grads[r][i][k];
        }
        if (q.shard_dim < 0) break;  // whole on every rank: rank 0's copy covers it
      }
      // In bf16 the lambda vectors' gradient is a sum with heavy cancellation, dominated by
      // the rounding of upstream activations, which differs between one model and two shards
      // (measured 18-36%); the f32 GPU case checks the TP logic for them exactly.
      if (bf16 && p.name.find(".lambda_") != std::string::npos) continue;
      EXPECT_LT(rel(tp_full, full), grad_tol) << p.name << " (" << attention_kind_name(kind) << ")";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, TensorParallelTwoThreads,
                         ::testing::Values(TpCase{Device::CPU, DType::F32}, TpCase{Device::CUDA, DType::F32},
                                           TpCase{Device::CUDA, DType::BF16}),
                         [](const auto& info) {
                           return std::string(device_name(info.param.dev)) + "_" + dtype_name(info.param.dtype);
                         });

}  // namespace
}  // namespace difftron
