// The TP x DP process grid: world rank w = dp_rank * tp + tp_rank, so a TP group is tp
// consecutive ranks (one node, NVLink) and a DP group takes every tp-th rank. Groups are
// made with MPI_Comm_split; on the GPU each also gets an NCCL communicator. A
// ParallelContext owns the groups and the watchdog and is passed explicitly to whatever
// needs them (the model, the optimizer, the trainer): there is no global group state.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "parallel/comm.h"
#include "parallel/watchdog.h"

namespace difftron {

class Ops;

struct GridOptions {
  int tp = 1, dp = 1;             // tp * dp must equal the MPI world size
  Device device = Device::CPU;    // where the model's tensors live: CPU -> MPI, CUDA -> NCCL
  int cuda_device = 0;            // this rank's GPU (CUDA only)
  void* cuda_stream = nullptr;    // the CUDA backend's compute stream (nullptr: unknown)
  Ops* ops = nullptr;             // the backend (device copies, synchronisation)
  WatchdogOptions watchdog;
};

class ParallelContext {
 public:
  // One process, no MPI: every group has one rank.
  static std::unique_ptr<ParallelContext> single(Device device = Device::CPU, Ops* ops = nullptr);
  // The grid over MPI_COMM_WORLD (MPI must be initialised, e.g. by MpiRuntime). Collective:
  // every rank calls it with the same tp and dp. Throws when tp * dp != world size.
  static std::unique_ptr<ParallelContext> from_mpi_world(const GridOptions& options);
  ~ParallelContext();

  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }
  int tp_rank() const { return tp_->rank(); }
  int tp_size() const { return tp_->size(); }
  int dp_rank() const { return dp_->rank(); }
  int dp_size() const { return dp_->size(); }
  Device device() const { return device_; }

  // Communicators on the model's memory (NCCL on the GPU, MPI on the CPU).
  Communicator& tp() { return *tp_; }
  Communicator& dp() { return *dp_; }
  Communicator& world() { return *world_; }
  // Communicators on host memory (MPI, or solo), for scalars: losses, norms, counts.
  Communicator& tp_host() { return *tp_host_; }
  Communicator& dp_host() { return *dp_host_; }
  Communicator& world_host() { return *world_host_; }
  Watchdog* watchdog() { return watchdog_.get(); }

  // "world rank 3 of 4 (tp 1 of 2, dp 1 of 2), host node-7"
  std::string describe() const;

 private:
  ParallelContext() = default;
  int world_rank_ = 0, world_size_ = 1;
  Device device_ = Device::CPU;
  std::string host_;
  std::unique_ptr<Watchdog> watchdog_;  // declared first: destroyed after the communicators
  std::vector<std::unique_ptr<Communicator>> owned_;
  Communicator *tp_host_ = nullptr, *dp_host_ = nullptr, *world_host_ = nullptr;
  Communicator *tp_ = nullptr, *dp_ = nullptr, *world_ = nullptr;
};

// The rank of this process among the ranks on its node (MPI_COMM_TYPE_SHARED), for
// choosing its GPU before the grid is built; 0 without MPI.
int node_local_rank();

}  // namespace difftron
