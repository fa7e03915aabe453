// Building the TP x DP grid from MPI_COMM_WORLD: MPI_Comm_split for the TP and DP groups,
// NCCL communicators on top when the model lives on the GPU, one watchdog for them all.
#include "parallel/grid.h"

#include <mpi.h>

#include <sstream>

#include "parallel/mpi_comm.h"
#include "parallel/nccl_comm.h"

namespace difftron {

#ifndef DIFFTRON_HAVE_NCCL
bool nccl_built() { return false; }
std::unique_ptr<Communicator> make_nccl_communicator(MpiCommunicator& group, const std::string& name,
                                                     const NcclCommOptions&) {
  throw_error("the ", name, " group needs NCCL for GPU memory, but this build has no NCCL "
              "(configure with CUDA and NCCL found: see CMake's 'difftron: NCCL' line)");
}
#endif

ParallelContext::~ParallelContext() = default;

std::unique_ptr<ParallelContext> ParallelContext::single(Device device, Ops* ops) {
  std::unique_ptr<ParallelContext> c(new ParallelContext());
  c->device_ = device;
  c->host_ = host_name();
  for (const char* n : {"tp", "dp", "world"}) {
    c->owned_.push_back(std::make_unique<SoloCommunicator>(n, Device::CPU));
    c->owned_.push_back(std::make_unique<SoloCommunicator>(n, device, ops));
  }
  c->tp_host_ = c->owned_[0].get();
  c->tp_ = c->owned_[1].get();
  c->dp_host_ = c->owned_[2].get();
  c->dp_ = c->owned_[3].get();
  c->world_host_ = c->owned_[4].get();
  c->world_ = c->owned_[5].get();
  return c;
}

std::unique_ptr<ParallelContext> ParallelContext::from_mpi_world(const GridOptions& o) {
  if (!MpiRuntime::initialized())
    throw_error("the process grid needs MPI, which is not initialised (start through MpiRuntime)");
  if (o.tp < 1 || o.dp < 1) throw_error("tp (", o.tp, ") and dp (", o.dp, ") must be at least 1");
  std::unique_ptr<ParallelContext> c(new ParallelContext());
  DT_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &c->world_rank_));
  DT_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &c->world_size_));
  if (int64_t(o.tp) * o.dp != c->world_size_)
    throw_error("tp (", o.tp, ") x dp (", o.dp, ") = ", int64_t(o.tp) * o.dp,
                " must equal the number of MPI ranks (", c->world_size_, ")");
  c->device_ = o.device;
  c->host_ = host_name();
  c->watchdog_ = std::make_unique<Watchdog>(o.watchdog, process_label());
  const int tp_rank = c->world_rank_ % o.tp, dp_rank = c->world_rank_ / o.tp;

  MPI_Comm tp_comm, dp_comm, world_comm;
  DT_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, dp_rank, tp_rank, &tp_comm));  // consecutive ranks
  DT_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, tp_rank, dp_rank, &dp_comm));  // stride tp
  DT_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &world_comm));
  auto add_mpi = [&](MPI_Comm m, const char* name) {
    auto comm = std::make_unique<MpiCommunicator>(m, name, true);
    comm->set_watchdog(c->watchdog_.get());
    MpiCommunicator* raw = comm.get();
    c->owned_.push_back(std::move(comm));
    return raw;
  };
  MpiCommunicator* tp_mpi = add_mpi(tp_comm, "tp");
  MpiCommunicator* dp_mpi = add_mpi(dp_comm, "dp");
  MpiCommunicator* world_mpi = add_mpi(world_comm, "world");
  if (tp_mpi->rank() != tp_rank || dp_mpi->rank() != dp_rank)
    throw_error("process grid: MPI_Comm_split gave tp rank ", tp_mpi->rank(), " / dp rank ",
                dp_mpi->rank(), " on world rank ", c->world_rank_, " (expected ", tp_rank, " / ",
                dp_rank, ")");
  c->tp_host_ = tp_mpi;
  c->dp_host_ = dp_mpi;
  c->world_host_ = world_mpi;
  if (o.device == Device::CPU) {
    c->tp_ = tp_mpi;
    c->dp_ = dp_mpi;
    c->world_ = world_mpi;
    return c;
  }
  // GPU: NCCL on device memory. DP gradients go on a side stream (they overlap backward);
  // TP collectives sit on the critical path and run on the compute stream.
  NcclCommOptions no;
  no.compute_stream = o.cuda_stream;
  no.ops = o.ops;
  no.cuda_device = o.cuda_device;
  auto add_nccl = [&](MpiCommunicator& group, const char* name, bool side) {
    NcclCommOptions opt = no;
    opt.side_stream = side;
    c->owned_.push_back(make_nccl_communicator(group, name, opt));
    return c->owned_.back().get();
  };
  c->tp_ = add_nccl(*tp_mpi, "tp", false);
  c->dp_ = add_nccl(*dp_mpi, "dp", true);
  c->world_ = add_nccl(*world_mpi, "world", false);
  return c;
}

std::string ParallelContext::describe() const {
  std::ostringstream os;
  os << "world rank " << world_rank_ << " of " << world_size_ << " (tp " << tp_->rank() << " of "
     << tp_->size() << ", dp " << dp_->rank() << " of " << dp_->size() << "), host " << host_
     << ", collectives on " << device_name(device_) << " memory";
  return os.str();
}

int node_local_rank() {
  if (!MpiRuntime::initialized()) return 0;
  MPI_Comm local;
  DT_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local));
  int r = 0;
  DT_MPI_CHECK(MPI_Comm_rank(local, &r));
  DT_MPI_CHECK(MPI_Comm_free(&local));
  return r;
}

}  // namespace difftron
