// Per-device state of the CUDA backend (one stream, one cuBLASLt handle and workspace,
// stream-ordered scratch, cached GEMM plans and RoPE tables) and the checks that wrap
// every CUDA / cuBLAS call with file:line, device and the library's error string.
// Host-only header: compiled by both g++ (cuda_ops.cpp) and nvcc (the kernels).
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "base/error.h"

namespace difftron::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* call, const char* file,
                                     int line);

}  // namespace difftron::cuda

// Every CUDA runtime call goes through DT_CUDA; every cuBLAS(Lt) call through DT_CUBLAS.
#define DT_CUDA(call)                                                          \
  do {                                                                         \
    cudaError_t dt_err_ = (call);                                              \
    if (dt_err_ != cudaSuccess)                                                \
      ::difftron::cuda::throw_cuda_error(dt_err_, #call, __FILE__, __LINE__);  \
  } while (0)
#define DT_CUBLAS(call)                                                        \
  do {                                                                         \
    cublasStatus_t dt_st_ = (call);                                            \
    if (dt_st_ != CUBLAS_STATUS_SUCCESS)                                       \
      ::difftron::cuda::throw_cublas_error(dt_st_, #call, __FILE__, __LINE__); \
  } while (0)
// After every kernel launch (<<<...>>>): reports bad launch configurations at once.
#define DT_CUDA_LAUNCHED() DT_CUDA(cudaGetLastError())

namespace difftron::cuda {

// Key of a cached cuBLASLt plan: shape, transposes, dtypes (cudaDataType) and pointer
// alignments (the heuristic may pick kernels that need aligned operands).
struct MatmulKey {
  int64_t m, n, k;
  bool ta, tb;
  int type_ab, type_y;
  int align_a, align_b, align_y;
  bool operator<(const MatmulKey& o) const {
    return std::tie(m, n, k, ta, tb, type_ab, type_y, align_a, align_b, align_y) <
           std::tie(o.m, o.n, o.k, o.ta, o.tb, o.type_ab, o.type_y, o.align_a, o.align_b, o.align_y);
  }
};

struct MatmulPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, y = nullptr;  // cuBLAS's A, B, C=D
  cublasLtMatmulAlgo_t algo{};
  ~MatmulPlan();
};

// Device bytes allocated through a context (tensors, workspace, scratch, RoPE table) and the
// most held at once. Shared with the tensors' deleters, which may outlive the context.
struct MemoryCounter {
  std::atomic<int64_t> allocated{0}, peak{0};
  void add(int64_t bytes) {
    const int64_t now = allocated.fetch_add(bytes) + bytes;
    int64_t p = peak.load();
    while (now > p && !peak.compare_exchange_weak(p, now)) {
    }
  }
  void sub(int64_t bytes) { allocated.fetch_sub(bytes); }
};

class CudaContext {
 public:
  explicit CudaContext(int device);
  ~CudaContext();
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  cublasLtHandle_t lt() const { return lt_; }
  // Classic cuBLAS on stream() (strided-batched GEMMs over sub-matrices: attention_gemm.cu).
  cublasHandle_t blas() const { return blas_; }
  void* workspace() const { return workspace_; }
  size_t workspace_bytes() const { return workspace_bytes_; }
  const cudaDeviceProp& props() const { return props_; }
  int num_sms() const { return props_.multiProcessorCount; }

  // Makes this context's device current for the calling thread.
  void activate() const;

  // Device scratch of at least `bytes`, ordered on stream(): valid until the next call of
  // scratch() (one op carves all it needs from one call). Growing synchronises the stream.
  void* scratch(size_t bytes);

  // Device error slot for argument checks that only the GPU can do (token ids): reset_flag()
  // enqueues a reset (no host round trip), kernels atomicMin a bad index into it, read_flag()
  // synchronises and returns it (INT32_MAX: none).
  int* reset_flag();
  int read_flag();

  // cos/sin table [S, dh/2] (float2) for RoPE, computed in double on the device.
  const void* rope_table(int64_t S, int64_t dh, double theta);

  // cudaMalloc / cudaFree, counted in memory(). alloc throws naming `what`, the size and the
  // device's free memory.
  void* alloc(size_t bytes, const char* what);
  void free(void* p, size_t bytes);
  const std::shared_ptr<MemoryCounter>& memory() const { return memory_; }

  MatmulPlan* find_plan(const MatmulKey& key);
  MatmulPlan* add_plan(const MatmulKey& key, std::unique_ptr<MatmulPlan> plan);

 private:
  int device_;
  cudaDeviceProp props_{};
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  int* dev_flag_ = nullptr;
  int* host_flag_ = nullptr;  // pinned
  void* rope_ = nullptr;
  int64_t rope_S_ = 0, rope_dh_ = 0;
  double rope_theta_ = 0;
  std::map<MatmulKey, std::unique_ptr<MatmulPlan>> plans_;
  std::shared_ptr<MemoryCounter> memory_ = std::make_shared<MemoryCounter>();
};

// Carves aligned pieces out of one scratch allocation.
class ScratchCarver {
 public:
  static size_t round(size_t b) { return (b + 255) / 256 * 256; }
  explicit ScratchCarver(void* base) : p_(static_cast<char*>(base)) {}
  template <typename T>
  T* take(size_t count) {
    T* r = reinterpret_cast<T*>(p_);
    p_ += round(count * sizeof(T));
    return r;
  }

 private:
  char* p_;
};

}  // namespace difftron::cuda
