// NcclCommunicator: collectives on device memory through NCCL, ordered with the compute
// stream by CUDA events, watched by the watchdog through completion events, and aborted
// (ncclCommAbort) by it. Every CUDA / NCCL call is checked with rank, host, file:line
// and the library's error string. Compiled only with DIFFTRON_HAVE_NCCL.
#ifdef DIFFTRON_HAVE_NCCL
#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <memory>

#include "kernels/ops.h"
#include "parallel/mpi_comm.h"
#include "parallel/nccl_comm.h"
#include "parallel/watchdog.h"

namespace difftron {
namespace {

void cuda_check(cudaError_t e, const char* call, const char* file, int line) {
  if (e == cudaSuccess) return;
  int dev = -1;
  cudaGetDevice(&dev);
  throw_error("CUDA error at ", file, ":", line, " on ", process_label(), " device ", dev, ": ",
              call, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

void nccl_check(ncclResult_t r, ncclComm_t comm, const char* call, const char* file, int line) {
  if (r == ncclSuccess || r == ncclInProgress) return;
  const char* last = comm ? ncclGetLastError(comm) : ncclGetLastError(nullptr);
  throw_error("NCCL error at ", file, ":", line, " on ", process_label(), ": ", call, ": ",
              ncclGetErrorString(r), (last && *last ? std::string(" (") + last + ")" : std::string()));
}

#define DT_CUDA_CHECK(call) cuda_check((call), #call, __FILE__, __LINE__)
#define DT_NCCL_CHECK(comm, call) nccl_check((call), (comm), #call, __FILE__, __LINE__)

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::F32: return ncclFloat32;
    case DType::F64: return ncclFloat64;
    case DType::BF16: return ncclBfloat16;
    case DType::I32: return ncclInt32;
  }
  return ncclFloat32;
}

// Work enqueued on the side stream: wait() orders the compute stream after it (or, with
// no compute stream, waits on the host).
class NcclWork final : public CommWork {
 public:
  NcclWork(cudaEvent_t done, cudaStream_t compute) : done_(done), compute_(compute) {}
  ~NcclWork() override {
    if (done_) {
      try {
        wait();
      } catch (...) {
      }
    }
  }
  void wait() override {
    if (!done_) return;
    cudaEvent_t e = done_;
    done_ = nullptr;
    if (compute_)
      DT_CUDA_CHECK(cudaStreamWaitEvent(compute_, e, 0));
    else
      DT_CUDA_CHECK(cudaEventSynchronize(e));
    DT_CUDA_CHECK(cudaEventDestroy(e));
  }

 private:
  cudaEvent_t done_;
  cudaStream_t compute_;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(MpiCommunicator& group, std::string name, const NcclCommOptions& o)
      : name_(std::move(name)), opt_(o), compute_(static_cast<cudaStream_t>(o.compute_stream)) {
    rank_ = group.rank();
    size_ = group.size();
    set_watchdog(group.watchdog());
    DT_CUDA_CHECK(cudaSetDevice(o.cuda_device));
    ncclUniqueId id;
    if (rank_ == 0) DT_NCCL_CHECK(nullptr, ncclGetUniqueId(&id));
    static_assert(sizeof(ncclUniqueId) % 4 == 0, "ncclUniqueId travels as i32 words");
    Tensor idt = host_tensor(&id, int64_t(sizeof id / 4), DType::I32);
    group.broadcast(idt, 0);
    {
      Watchdog::Scope watch(watchdog_, where(), "ncclCommInitRank", timeout());
      DT_NCCL_CHECK(nullptr, ncclCommInitRank(&comm_, size_, id, rank_));
    }
    if (o.side_stream || !compute_) DT_CUDA_CHECK(cudaStreamCreateWithFlags(&own_, cudaStreamNonBlocking));
    DT_CUDA_CHECK(cudaMalloc(&barrier_buf_, sizeof(float)));
    if (watchdog_) {
      ncclComm_t c = comm_;
      auto aborted = aborted_;  // the hook may outlive this object: it shares the flag
      watchdog_->add_abort_hook([c, aborted] {
        if (!aborted->exchange(true)) ncclCommAbort(c);
      });
    }
  }

  ~NcclCommunicator() override {
    if (!aborted_->exchange(true)) {
      if (own_) cudaStreamSynchronize(own_);
      if (compute_) cudaStreamSynchronize(compute_);
      ncclCommDestroy(comm_);
    }
    if (own_) cudaStreamDestroy(own_);
    cudaFree(barrier_buf_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  Device device() const override { return Device::CUDA; }

  void all_reduce(Tensor& t) override {
    check_device(t, "all_reduce");
    run("all_reduce", t, false, [&](cudaStream_t s) {
      DT_NCCL_CHECK(comm_, ncclAllReduce(t.raw(), t.raw(), size_t(t.numel()), nccl_type(t.dtype()),
                                         ncclSum, comm_, s));
    });
  }

  void reduce_scatter(const Tensor& in, Tensor& out) override {
    reduce_scatter_async(in, out)->wait();
  }

  void all_gather(const Tensor& in, Tensor& out) override { all_gather_async(in, out)->wait(); }

  std::unique_ptr<CommWork> reduce_scatter_async(const Tensor& in, Tensor& out) override {
    check_reduce_scatter(in, out);
    return run("reduce_scatter", in, true, [&](cudaStream_t s) {
      DT_NCCL_CHECK(comm_, ncclReduceScatter(in.raw(), out.raw(), size_t(out.numel()),
                                             nccl_type(in.dtype()), ncclSum, comm_, s));
    });
  }

  std::unique_ptr<CommWork> all_gather_async(const Tensor& in, Tensor& out) override {
    check_all_gather(in, out);
    return run("all_gather", in, true, [&](cudaStream_t s) {
      DT_NCCL_CHECK(comm_, ncclAllGather(in.raw(), out.raw(), size_t(in.numel()),
                                         nccl_type(in.dtype()), comm_, s));
    });
  }

  void broadcast(Tensor& t, int root) override {
    check_device(t, "broadcast");
    if (root < 0 || root >= size_)
      throw_error("broadcast on ", where(), ": root ", root, " is not a rank of the group");
    run("broadcast", t, false, [&](cudaStream_t s) {
      DT_NCCL_CHECK(comm_, ncclBroadcast(t.raw(), t.raw(), size_t(t.numel()), nccl_type(t.dtype()),
                                         root, comm_, s));
    });
  }

  void barrier() override {
    cudaStream_t s = own_ ? own_ : compute_;
    if (compute_ && own_) order_after(compute_, own_);
    if (!compute_ && opt_.ops) opt_.ops->synchronize();
    Watchdog::Scope watch(watchdog_, where(), "barrier", timeout());
    DT_NCCL_CHECK(comm_, ncclAllReduce(barrier_buf_, barrier_buf_, 1, ncclFloat32, ncclSum, comm_, s));
    DT_CUDA_CHECK(cudaStreamSynchronize(s));
    check_async_error();
  }

  void abort() override {
    if (!aborted_->exchange(true)) ncclCommAbort(comm_);
  }

 private:
  double timeout() const { return watchdog_ ? watchdog_->options().collective_timeout_s : 0.0; }

  // `waiter` waits (on the device) for the work enqueued so far on `producer`.
  void order_after(cudaStream_t producer, cudaStream_t waiter) {
    cudaEvent_t e;
    DT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    DT_CUDA_CHECK(cudaEventRecord(e, producer));
    DT_CUDA_CHECK(cudaStreamWaitEvent(waiter, e, 0));
    DT_CUDA_CHECK(cudaEventDestroy(e));
  }

  void check_async_error() {
    ncclResult_t st = ncclSuccess;
    DT_NCCL_CHECK(comm_, ncclCommGetAsyncError(comm_, &st));
    DT_NCCL_CHECK(comm_, st);
  }

  // Enqueues `enqueue(stream)` ordered after the compute stream's work; returns the handle
  // that orders later compute after it (waited for at once unless `async`).
  template <typename F>
  std::unique_ptr<CommWork> run(const char* op, const Tensor& t, bool async, F&& enqueue) {
    if (*aborted_) throw_error(op, " on ", where(), ": the NCCL communicator was aborted");
    cudaStream_t s = compute_;
    if (!compute_) {
      if (opt_.ops) opt_.ops->synchronize();  // the host orders the compute work before it
      s = own_;
    } else if (own_) {
      order_after(compute_, own_);
      s = own_;
    }
    enqueue(s);
    if (watchdog_ && timeout() > 0) {
      cudaEvent_t w;
      DT_CUDA_CHECK(cudaEventCreateWithFlags(&w, cudaEventDisableTiming));
      DT_CUDA_CHECK(cudaEventRecord(w, s));
      auto holder = std::shared_ptr<void>(w, [](void* e) { cudaEventDestroy(static_cast<cudaEvent_t>(e)); });
      watchdog_->watch(where(), std::string(op) + " of " + brief(t), timeout(), [holder] {
        return cudaEventQuery(static_cast<cudaEvent_t>(holder.get())) != cudaErrorNotReady;
      });
    }
    if (s == compute_) return std::make_unique<NcclWork>(nullptr, nullptr);  // already ordered
    cudaEvent_t done;
    DT_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    DT_CUDA_CHECK(cudaEventRecord(done, s));
    auto work = std::make_unique<NcclWork>(done, compute_);
    if (!async) work->wait();
    return work;
  }

  std::string name_;
  NcclCommOptions opt_;
  cudaStream_t compute_ = nullptr;
  cudaStream_t own_ = nullptr;
  ncclComm_t comm_ = nullptr;
  void* barrier_buf_ = nullptr;
  int rank_ = 0, size_ = 1;
  std::shared_ptr<std::atomic<bool>> aborted_ = std::make_shared<std::atomic<bool>>(false);
};

}  // namespace

bool nccl_built() { return true; }

std::unique_ptr<Communicator> make_nccl_communicator(MpiCommunicator& group, const std::string& name,
                                                     const NcclCommOptions& options) {
  return std::make_unique<NcclCommunicator>(group, name, options);
}

}  // namespace difftron
#endif  // DIFFTRON_HAVE_NCCL
