// MpiCommunicator: collectives on host memory built from point-to-point messages so that
// the order of every sum is fixed (rank order) and messages stay under MPI's int counts.
// all_reduce = reduce of per-rank slices + all-gather of the slices.
#include "parallel/mpi_comm.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "base/bf16.h"
#include "parallel/watchdog.h"

namespace difftron {

// ---- errors and names -----------------------------------------------------------------

std::string host_name() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof buf - 1) != 0) return "?";
  return buf;
}

std::string process_label() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  std::string r = "?";
  if (init && !fin) {
    int rank = 0;
    if (MPI_Comm_rank(MPI_COMM_WORLD, &rank) == MPI_SUCCESS) r = std::to_string(rank);
  }
  return "rank " + r + " (host " + host_name() + ")";
}

void mpi_check(int code, const char* call, const char* file, int line) {
  if (code == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING + 1] = {0};
  int len = 0;
  if (MPI_Error_string(code, msg, &len) != MPI_SUCCESS) std::snprintf(msg, sizeof msg, "code %d", code);
  throw_error("MPI error at ", file, ":", line, " on ", process_label(), ": ", call, ": ", msg);
}

// ---- runtime ---------------------------------------------------------------------------

bool MpiRuntime::initialized() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  if (initialized()) return;
  int provided = 0;
  DT_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  owns_ = true;
  DT_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  if (provided < MPI_THREAD_FUNNELED)
    throw_error("MPI provides thread level ", provided, " on ", process_label(),
                "; difftron needs MPI_THREAD_FUNNELED (its watchdog runs in a second thread)");
}

MpiRuntime::~MpiRuntime() {
  if (owns_ && initialized()) MPI_Finalize();
}

int MpiRuntime::world_rank() const {
  int r = 0;
  DT_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &r));
  return r;
}

int MpiRuntime::world_size() const {
  int s = 1;
  DT_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &s));
  return s;
}

// ---- communicator ------------------------------------------------------------------------

namespace {

constexpr int kTag = 0x6474;              // "dt"
constexpr int64_t kMaxMessage = 1 << 30;  // bytes per point-to-point message
constexpr int64_t kPieceBytes = 64 << 20; // per-peer receive buffer of a reduction round


// dst[j] = ((src[0][j] + src[1][j]) + ...) in the dtype's own arithmetic (bf16: f32 sums
// rounded once at the end).
void sum_in_order(const std::vector<const char*>& src, char* dst, int64_t n, DType dtype) {
  switch (dtype) {
    case DType::F32: {
      float* d = reinterpret_cast<float*>(dst);
      for (int64_t j = 0; j < n; ++j) {
        float acc = reinterpret_cast<const float*>(src[0])[j];
        for (size_t r = 1; r < src.size(); ++r) acc += reinterpret_cast<const float*>(src[r])[j];
        d[j] = acc;
      }
      break;
    }
    case DType::F64: {
      double* d = reinterpret_cast<double*>(dst);
      for (int64_t j = 0; j < n; ++j) {
        double acc = reinterpret_cast<const double*>(src[0])[j];
        for (size_t r = 1; r < src.size(); ++r) acc += reinterpret_cast<const double*>(src[r])[j];
        d[j] = acc;
      }
      break;
    }
    case DType::I32: {
      int32_t* d = reinterpret_cast<int32_t*>(dst);
      for (int64_t j = 0; j < n; ++j) {
        int32_t acc = reinterpret_cast<const int32_t*>(src[0])[j];
        for (size_t r = 1; r < src.size(); ++r) acc += reinterpret_cast<const int32_t*>(src[r])[j];
        d[j] = acc;
      }
      break;
    }
    case DType::BF16: {
      uint16_t* d = reinterpret_cast<uint16_t*>(dst);
      for (int64_t j = 0; j < n; ++j) {
        float acc = bf16_to_float(reinterpret_cast<const uint16_t*>(src[0])[j]);
        for (size_t r = 1; r < src.size(); ++r)
          acc += bf16_to_float(reinterpret_cast<const uint16_t*>(src[r])[j]);
        d[j] = float_to_bf16(acc);
      }
      break;
    }
  }
}

// Posts the messages of `bytes` from/to `p` to/from `peer`, split under kMaxMessage.
void post(std::vector<MPI_Request>& reqs, bool send, const char* p, int64_t bytes, int peer,
          MPI_Comm comm) {
  for (int64_t o = 0; o < bytes; o += kMaxMessage) {
    int n = int(std::min(kMaxMessage, bytes - o));
    reqs.emplace_back();
    if (send)
      DT_MPI_CHECK(MPI_Isend(p + o, n, MPI_BYTE, peer, kTag, comm, &reqs.back()));
    else
      DT_MPI_CHECK(MPI_Irecv(const_cast<char*>(p) + o, n, MPI_BYTE, peer, kTag, comm, &reqs.back()));
  }
}

void wait_all(std::vector<MPI_Request>& reqs) {
  if (reqs.empty()) return;
  DT_MPI_CHECK(MPI_Waitall(int(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE));
  reqs.clear();
}

}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name, bool owns)
    : comm_(comm), name_(std::move(name)), owns_(owns) {
  DT_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  DT_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  DT_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  if (owns_ && MpiRuntime::initialized()) MPI_Comm_free(&comm_);
}

double MpiCommunicator::timeout() const {
  return watchdog_ ? watchdog_->options().collective_timeout_s : 0.0;
}

void MpiCommunicator::reduce_slices(const char* src, char* dst, const std::vector<int64_t>& off,
                                    DType dtype) {
  const size_t es = dtype_size(dtype);
  const int P = size_;
  const int64_t piece = std::max<int64_t>(1, kPieceBytes / int64_t(es));
  int64_t rounds = 0;
  for (int r = 0; r < P; ++r) rounds = std::max(rounds, (off[r + 1] - off[r] + piece - 1) / piece);
  const int64_t my_len = off[rank_ + 1] - off[rank_];
  std::vector<char> tmp(size_t(std::min(piece, my_len)) * es * P);
  std::vector<MPI_Request> reqs;
  std::vector<const char*> srcs(P);
  for (int64_t k = 0; k < rounds; ++k) {
    // this round: piece k of every rank's slice
    for (int r = 0; r < P; ++r) {
      if (r == rank_) continue;
      const int64_t lo = off[r] + k * piece, hi = std::min(off[r + 1], lo + piece);
      if (hi > lo) post(reqs, true, src + lo * es, (hi - lo) * int64_t(es), r, comm_);
    }
    const int64_t lo = off[rank_] + k * piece, hi = std::min(off[rank_ + 1], lo + piece);
    const int64_t n = std::max<int64_t>(0, hi - lo);
    for (int r = 0; r < P; ++r) {
      if (r == rank_) {
        srcs[r] = src + lo * es;
        continue;
      }
      char* buf = tmp.data() + size_t(r) * size_t(n) * es;
      srcs[r] = buf;
      if (n > 0) post(reqs, false, buf, n * int64_t(es), r, comm_);
    }
    wait_all(reqs);
    if (n > 0) sum_in_order(srcs, dst + (k * piece) * es, n, dtype);
  }
}

void MpiCommunicator::gather_slices(char* buf, const std::vector<int64_t>& off, size_t es) {
  std::vector<MPI_Request> reqs;
  const int64_t mine = off[rank_ + 1] - off[rank_];
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    const int64_t len = off[r + 1] - off[r];
    if (len > 0) post(reqs, false, buf + off[r] * es, len * int64_t(es), r, comm_);
    if (mine > 0) post(reqs, true, buf + off[rank_] * es, mine * int64_t(es), r, comm_);
  }
  wait_all(reqs);
}

void MpiCommunicator::all_reduce(Tensor& t) {
  check_device(t, "all_reduce");
  if (size_ == 1) return;
  Watchdog::Scope watch(watchdog_, where(), "all_reduce of " + brief(t), timeout());
  const int64_t n = t.numel();
  std::vector<int64_t> off(size_ + 1);
  for (int r = 0; r <= size_; ++r) off[r] = n * r / size_;
  char* base = static_cast<char*>(t.raw());
  const size_t es = dtype_size(t.dtype());
  reduce_slices(base, base + off[rank_] * es, off, t.dtype());
  gather_slices(base, off, es);
}

void MpiCommunicator::reduce_scatter(const Tensor& in, Tensor& out) {
  check_reduce_scatter(in, out);
  Watchdog::Scope watch(watchdog_, where(), "reduce_scatter of " + brief(in), timeout());
  const int64_t n = out.numel();
  std::vector<int64_t> off(size_ + 1);
  for (int r = 0; r <= size_; ++r) off[r] = n * r;
  reduce_slices(static_cast<const char*>(in.raw()), static_cast<char*>(out.raw()), off, in.dtype());
}

void MpiCommunicator::all_gather(const Tensor& in, Tensor& out) {
  check_all_gather(in, out);
  Watchdog::Scope watch(watchdog_, where(), "all_gather of " + brief(in), timeout());
  const int64_t n = in.numel();
  const size_t es = dtype_size(in.dtype());
  char* base = static_cast<char*>(out.raw());
  if (in.raw() != base + rank_ * n * es) std::memmove(base + rank_ * n * es, in.raw(), in.nbytes());
  std::vector<int64_t> off(size_ + 1);
  for (int r = 0; r <= size_; ++r) off[r] = n * r;
  gather_slices(base, off, es);
}

void MpiCommunicator::broadcast(Tensor& t, int root) {
  check_device(t, "broadcast");
  if (root < 0 || root >= size_)
    throw_error("broadcast on ", where(), ": root ", root, " is not a rank of the group");
  if (size_ == 1) return;
  Watchdog::Scope watch(watchdog_, where(), "broadcast of " + brief(t), timeout());
  char* p = static_cast<char*>(t.raw());
  const int64_t bytes = int64_t(t.nbytes());
  for (int64_t o = 0; o < bytes; o += kMaxMessage)
    DT_MPI_CHECK(MPI_Bcast(p + o, int(std::min(kMaxMessage, bytes - o)), MPI_BYTE, root, comm_));
}

void MpiCommunicator::barrier() {
  if (size_ == 1) return;
  Watchdog::Scope watch(watchdog_, where(), "barrier", timeout());
  DT_MPI_CHECK(MPI_Barrier(comm_));
}

}  // namespace difftron
