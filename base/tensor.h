// Tensors: a shape, a dtype, a device and a shared buffer (plus a byte offset so that
// views are cheap). Allocation belongs to the backend (kernels/ops.h: Ops::empty);
// a Tensor never owns a stream or a handle. Row-major, contiguous.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/error.h"

namespace difftron {

enum class DType { F32, F64, BF16, I32 };
enum class Device { CPU, CUDA };

size_t dtype_size(DType t);
const char* dtype_name(DType t);
const char* device_name(Device d);

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

class Tensor {
 public:
  Tensor() = default;
  // Wraps a buffer allocated by a backend; `deleter` frees it when the last view goes.
  Tensor(Shape shape, DType dtype, Device device, void* data, std::function<void(void*)> deleter);

  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return numel() * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool defined() const { return buffer_ != nullptr; }
  // Rows = product of all dims but the last; cols = the last dim.
  int64_t rows() const { return numel() / shape_.back(); }
  int64_t cols() const { return shape_.back(); }

  void* raw() const { return static_cast<char*>(buffer_.get()) + offset_; }
  template <typename T>
  T* data() const { return static_cast<T*>(raw()); }

  // Same storage, new shape: the new shape may hold fewer elements (a prefix) but not more.
  Tensor view(const Shape& shape) const;
  // Rows [begin, end) of the tensor seen as [rows, cols] (keeps trailing dims).
  Tensor slice_rows(int64_t begin, int64_t end) const;
  // Elements [begin, begin + n) as a 1-D tensor.
  Tensor flat_slice(int64_t begin, int64_t n) const;

  std::string str() const;  // "bf16[4, 128] on cuda"

 private:
  Shape shape_;
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
  std::shared_ptr<void> buffer_;
  size_t capacity_ = 0;  // bytes available from offset_ in the buffer
  size_t offset_ = 0;
};

}  // namespace difftron
