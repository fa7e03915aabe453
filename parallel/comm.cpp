// What every communicator shares: argument checks, the synchronous fallback of the
// asynchronous collectives, the one-rank communicator and the host helpers.
#include "parallel/comm.h"

#include <cstring>
#include <string>
#include <vector>

#include "base/error.h"
#include "kernels/ops.h"

namespace difftron {

namespace {
class DoneWork final : public CommWork {
 public:
  void wait() override {}
};
}  // namespace

std::string Communicator::where() const {
  return "group '" + name() + "' (rank " + std::to_string(rank()) + " of " + std::to_string(size()) + ")";
}

void Communicator::check_device(const Tensor& t, const char* op) const {
  if (!t.defined()) throw_error(op, " on ", where(), ": undefined tensor");
  if (t.device() != device())
    throw_error(op, " on ", where(), ": tensor ", t.str(), " is not in ", device_name(device()),
                " memory, which this communicator works on");
}

void Communicator::check_same(const Tensor& a, const Tensor& b, const char* op) const {
  check_device(a, op);
  check_device(b, op);
  if (a.dtype() != b.dtype())
    throw_error(op, " on ", where(), ": dtypes differ: ", a.str(), " vs ", b.str());
}

void Communicator::check_reduce_scatter(const Tensor& in, const Tensor& out) const {
  check_same(in, out, "reduce_scatter");
  if (in.numel() != out.numel() * size())
    throw_error("reduce_scatter on ", where(), ": input ", in.str(), " must hold size (", size(),
                ") x output ", out.str(), " elements");
  const char* chunk = static_cast<const char*>(in.raw()) + rank() * out.nbytes();
  const char* o = static_cast<const char*>(out.raw());
  const char* i0 = static_cast<const char*>(in.raw());
  if (o != chunk && o + out.nbytes() > i0 && o < i0 + in.nbytes())
    throw_error("reduce_scatter on ", where(), ": output overlaps the input but is not this rank's chunk");
}

void Communicator::check_all_gather(const Tensor& in, const Tensor& out) const {
  check_same(in, out, "all_gather");
  if (out.numel() != in.numel() * size())
    throw_error("all_gather on ", where(), ": output ", out.str(), " must hold size (", size(),
                ") x input ", in.str(), " elements");
  const char* chunk = static_cast<const char*>(out.raw()) + rank() * in.nbytes();
  const char* i = static_cast<const char*>(in.raw());
  const char* o0 = static_cast<const char*>(out.raw());
  if (i != chunk && i + in.nbytes() > o0 && i < o0 + out.nbytes())
    throw_error("all_gather on ", where(), ": input overlaps the output but is not this rank's chunk");
}

std::unique_ptr<CommWork> Communicator::reduce_scatter_async(const Tensor& in, Tensor& out) {
  reduce_scatter(in, out);
  return std::make_unique<DoneWork>();
}

std::unique_ptr<CommWork> Communicator::all_gather_async(const Tensor& in, Tensor& out) {
  all_gather(in, out);
  return std::make_unique<DoneWork>();
}

// ---- one rank ---------------------------------------------------------------------

void SoloCommunicator::copy(const Tensor& in, Tensor& out, const char* op) {
  if (in.raw() == out.raw()) return;
  if (ops_) {
    ops_->copy(in, out);
  } else if (device_ == Device::CPU) {
    std::memmove(out.raw(), in.raw(), in.nbytes());
  } else {
    throw_error(op, " on ", where(), ": an out-of-place copy of device memory needs an Ops");
  }
}

void SoloCommunicator::all_reduce(Tensor& t) { check_device(t, "all_reduce"); }

void SoloCommunicator::reduce_scatter(const Tensor& in, Tensor& out) {
  check_reduce_scatter(in, out);
  copy(in, out, "reduce_scatter");
}

void SoloCommunicator::all_gather(const Tensor& in, Tensor& out) {
  check_all_gather(in, out);
  copy(in, out, "all_gather");
}

void SoloCommunicator::broadcast(Tensor& t, int root) {
  check_device(t, "broadcast");
  if (root != 0) throw_error("broadcast on ", where(), ": root ", root, " is not a rank of the group");
}

// ---- host helpers -------------------------------------------------------------------

std::string brief(const Tensor& t) { return std::string(dtype_name(t.dtype())) + shape_str(t.shape()); }

Tensor host_tensor(void* data, int64_t n, DType dtype) {
  return Tensor({n}, dtype, Device::CPU, data, [](void*) {});
}

void all_reduce_host(Communicator& comm, double* x, int64_t n) {
  Tensor t = host_tensor(x, n, DType::F64);
  comm.all_reduce(t);
}

void all_gather_host(Communicator& comm, const double* in, double* out, int64_t n) {
  Tensor ti = host_tensor(const_cast<double*>(in), n, DType::F64);
  Tensor to = host_tensor(out, n * comm.size(), DType::F64);
  comm.all_gather(ti, to);
}

void agree_or_throw(Communicator* comm, const std::string& my_error, const std::string& what) {
  if (!comm || comm->size() == 1) {
    if (!my_error.empty()) throw Error(my_error);
    return;
  }
  const int n = comm->size();
  double mine = my_error.empty() ? 0.0 : 1.0;
  std::vector<double> all(n);
  all_gather_host(*comm, &mine, all.data(), 1);
  std::string failed;
  for (int r = 0; r < n; ++r)
    if (all[r] != 0) failed += (failed.empty() ? "" : ", ") + std::to_string(r);
  if (failed.empty()) return;
  if (!my_error.empty()) throw Error(my_error);
  throw_error(what, " failed on rank(s) ", failed, " (their messages name the file and the error)");
}

}  // namespace difftron
