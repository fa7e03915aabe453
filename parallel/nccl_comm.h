// NCCL communicators for device memory. Each is created from an ncclUniqueId that the
// group's rank 0 makes and broadcasts over the group's MPI communicator. Collectives are
// enqueued on CUDA streams and ordered with the compute stream by events (no host wait),
// or, when the compute stream is unknown, by synchronising through the Ops.
// Implemented in parallel/nccl_comm.cu, which is compiled only with CUDA + NCCL
// (DIFFTRON_HAVE_NCCL); without it make_nccl_communicator throws.
#pragma once
#include <memory>
#include <string>

#include "parallel/comm.h"

namespace difftron {

class Ops;
class MpiCommunicator;

struct NcclCommOptions {
  // The cudaStream_t on which the tensors are produced and consumed (the CUDA backend's
  // stream). nullptr: unknown; then every collective first waits on the host for `ops`
  // (Ops::synchronize) and its results are waited for on the host too.
  void* compute_stream = nullptr;
  Ops* ops = nullptr;
  // Run the collectives on a stream of their own (so that gradient reduce-scatters
  // overlap the rest of backward); false: on the compute stream itself.
  bool side_stream = false;
  int cuda_device = 0;  // the device this rank uses (made current before NCCL init)
};

// True when this build has NCCL.
bool nccl_built();

// Collective over `group`: every rank of the group calls it. The returned communicator
// carries `name` in messages and is watched by `group`'s watchdog.
std::unique_ptr<Communicator> make_nccl_communicator(MpiCommunicator& group, const std::string& name,
                                                     const NcclCommOptions& options);

}  // namespace difftron
