// Tensor bookkeeping: shapes, views, names. No arithmetic lives here.
#include "base/tensor.h"

#include <sstream>

namespace difftron {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::BF16: return 2;
    case DType::I32: return 4;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F64: return "f64";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
  }
  return "?";
}

const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Tensor::Tensor(Shape shape, DType dtype, Device device, void* data,
               std::function<void(void*)> deleter)
    : shape_(std::move(shape)), dtype_(dtype), device_(device), buffer_(data, std::move(deleter)) {
  capacity_ = nbytes();
}

Tensor Tensor::view(const Shape& shape) const {
  DT_CHECK(defined(), "view of an undefined tensor");
  Tensor t = *this;
  t.shape_ = shape;
  DT_CHECK(t.nbytes() <= capacity_, "view ", shape_str(shape), " exceeds storage of ", str());
  return t;
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  DT_CHECK(begin >= 0 && begin <= end && end <= shape_[0], "bad row slice [", begin, ", ", end,
           ") of ", str());
  Tensor t = *this;
  int64_t row_elems = numel() / shape_[0];
  t.offset_ += begin * row_elems * dtype_size(dtype_);
  t.shape_[0] = end - begin;
  t.capacity_ = capacity_ - begin * row_elems * dtype_size(dtype_);
  return t;
}

Tensor Tensor::flat_slice(int64_t begin, int64_t n) const {
  DT_CHECK(begin >= 0 && begin + n <= numel(), "bad flat slice of ", str());
  Tensor t = *this;
  t.offset_ += begin * dtype_size(dtype_);
  t.shape_ = {n};
  t.capacity_ = capacity_ - begin * dtype_size(dtype_);
  return t;
}

std::string Tensor::str() const {
  std::ostringstream os;
  os << dtype_name(dtype_) << shape_str(shape_) << " on " << device_name(device_);
  return os.str();
}

}  // namespace difftron
