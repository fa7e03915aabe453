// Collective communication over Tensors: the one interface the model, the ZeRO optimizer
// and the trainer use for sums across ranks, whatever memory the tensors live in.
// Implementations: MpiCommunicator (host memory, parallel/mpi_comm.h), NcclCommunicator
// (device memory on a CUDA stream, parallel/nccl_comm.h), SoloCommunicator (one rank).
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "base/tensor.h"

namespace difftron {

class Watchdog;

// A collective that may still be running. wait() returns when its results may be read
// (for device communicators: when work the caller enqueues afterwards is ordered after
// it) and the buffers may be reused. Destroying an unwaited handle waits.
class CommWork {
 public:
  virtual ~CommWork() = default;
  virtual void wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // The group's name for messages: "world", "tp", "dp".
  virtual const std::string& name() const = 0;
  // The memory this communicator reads and writes.
  virtual Device device() const = 0;

  // Every operation is collective: all ranks of the group call it in the same order with
  // tensors of the same dtype and numel. Sums are elementwise.
  //
  // t = sum over ranks of t (in place).
  virtual void all_reduce(Tensor& t) = 0;
  // in [size * n] on every rank; out [n] = sum over ranks r of in_r[rank*n, (rank+1)*n).
  // out may be in's own chunk (in place).
  virtual void reduce_scatter(const Tensor& in, Tensor& out) = 0;
  // in [n]; out [size * n] with out[r*n, (r+1)*n) = in of rank r. in may be out's own chunk.
  virtual void all_gather(const Tensor& in, Tensor& out) = 0;
  // t = t of rank `root`.
  virtual void broadcast(Tensor& t, int root) = 0;
  virtual void barrier() = 0;

  // Asynchronous forms: the collective may run while the caller goes on (on the GPU, on a
  // side stream, overlapping compute); the default runs it now and returns a done handle.
  virtual std::unique_ptr<CommWork> reduce_scatter_async(const Tensor& in, Tensor& out);
  virtual std::unique_ptr<CommWork> all_gather_async(const Tensor& in, Tensor& out);

  // Stops this communicator for good so that no rank stays blocked in it (the watchdog's
  // last resort before exiting). Must be safe to call from another thread.
  virtual void abort() {}

  // A collective that does not finish within the watchdog's timeout ends the process.
  void set_watchdog(Watchdog* w) { watchdog_ = w; }
  Watchdog* watchdog() const { return watchdog_; }

 protected:
  // Checks the arguments of the collectives; `op` names the caller in messages.
  void check_same(const Tensor& a, const Tensor& b, const char* op) const;
  void check_reduce_scatter(const Tensor& in, const Tensor& out) const;
  void check_all_gather(const Tensor& in, const Tensor& out) const;
  void check_device(const Tensor& t, const char* op) const;
  std::string where() const;  // "group 'tp' (rank 1 of 2)"

  Watchdog* watchdog_ = nullptr;
};

class Ops;

// A group of one rank: every collective is a copy or nothing. Used for TP=1 / DP=1 and
// single-process runs that never initialise MPI. `ops` copies device memory when an
// out-of-place collective needs it (may be null for host memory).
class SoloCommunicator final : public Communicator {
 public:
  SoloCommunicator(std::string name, Device device, Ops* ops = nullptr)
      : name_(std::move(name)), device_(device), ops_(ops) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  Device device() const override { return device_; }
  void all_reduce(Tensor& t) override;
  void reduce_scatter(const Tensor& in, Tensor& out) override;
  void all_gather(const Tensor& in, Tensor& out) override;
  void broadcast(Tensor& t, int root) override;
  void barrier() override {}

 private:
  void copy(const Tensor& in, Tensor& out, const char* op);
  std::string name_;
  Device device_;
  Ops* ops_;
};

// Host helpers on a host-memory communicator (MPI or solo): x = sum over ranks, in place.
void all_reduce_host(Communicator& comm, double* x, int64_t n);
// out [size * n] = every rank's in [n], in rank order.
void all_gather_host(Communicator& comm, const double* in, double* out, int64_t n);

// Every rank of `comm` (host memory; null: one process) reports whether its part of a
// collective task succeeded (`my_error` empty) or failed; throws difftron::Error on every rank
// when one failed: the rank's own message where it failed, else one naming the failed ranks.
void agree_or_throw(Communicator* comm, const std::string& my_error, const std::string& what);

// "f32[4, 8]": a tensor in watchdog messages (no device: the group says where).
std::string brief(const Tensor& t);

// A non-owning Tensor over host memory (for handing host arrays to a communicator).
Tensor host_tensor(void* data, int64_t n, DType dtype);

}  // namespace difftron
