// MPI for host memory: the runtime's start and end (MpiRuntime), the checked-call macro
// used for every MPI call, and MpiCommunicator, whose sums are deterministic: each element
// is added in rank order ((x_0 + x_1) + x_2) + ... by the one rank that owns it, so every
// rank gets the same bits whatever the message timing.
#pragma once
#include <mpi.h>

#include <string>
#include <vector>

#include "parallel/comm.h"

namespace difftron {

// Throws difftron::Error naming the call, file:line, world rank, host and MPI's own
// error string when `code` is not MPI_SUCCESS.
void mpi_check(int code, const char* call, const char* file, int line);
#define DT_MPI_CHECK(call) ::difftron::mpi_check((call), #call, __FILE__, __LINE__)

// "rank 3 (host node-7)": this process in messages (world rank; "rank ?" before MPI_Init).
std::string process_label();
std::string host_name();

// Initialises MPI (thread level MPI_THREAD_FUNNELED: only the main thread calls MPI) if
// it is not yet initialised, and finalises it on destruction if it did. Errors on
// MPI_COMM_WORLD are returned (and thrown by DT_MPI_CHECK) rather than aborting.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
  static bool initialized();
  int world_rank() const;
  int world_size() const;

 private:
  bool owns_ = false;
};

class MpiCommunicator final : public Communicator {
 public:
  // Wraps `comm`; frees it on destruction when `owns` (it came from MPI_Comm_split).
  MpiCommunicator(MPI_Comm comm, std::string name, bool owns);
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  Device device() const override { return Device::CPU; }
  MPI_Comm comm() const { return comm_; }

  void all_reduce(Tensor& t) override;
  void reduce_scatter(const Tensor& in, Tensor& out) override;
  void all_gather(const Tensor& in, Tensor& out) override;
  void broadcast(Tensor& t, int root) override;
  void barrier() override;

 private:
  // Sums, for each rank r, the slice [off[r], off[r+1]) of every rank's `src` (element
  // offsets), into this rank's `dst` (which may be its own slice of src).
  void reduce_slices(const char* src, char* dst, const std::vector<int64_t>& off, DType dtype);
  // Sends this rank's slice [off[me], off[me+1]) of buf to every peer and receives
  // every peer's slice into buf.
  void gather_slices(char* buf, const std::vector<int64_t>& off, size_t elem);
  double timeout() const;

  MPI_Comm comm_;
  std::string name_;
  bool owns_;
  int rank_ = 0, size_ = 1;
};

}  // namespace difftron
