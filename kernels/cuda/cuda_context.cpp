// CudaContext: the per-device stream, cuBLASLt handle and workspace, scratch, error slot,
// RoPE table and GEMM plan caches; and the error reporting behind DT_CUDA / DT_CUBLAS.
#include "kernels/cuda/cuda_context.h"

#include <climits>
#include <string>

#include "kernels/cuda/cuda_arch.h"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {

static int current_device() {
  int d = -1;
  if (cudaGetDevice(&d) != cudaSuccess) return -1;
  return d;
}

void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  throw_error(file, ":", line, ": CUDA error on device ", current_device(), ": ",
              cudaGetErrorName(err), " (", cudaGetErrorString(err), ") in ", call);
}

void throw_cublas_error(cublasStatus_t st, const char* call, const char* file, int line) {
  throw_error(file, ":", line, ": cuBLAS error on device ", current_device(), ": ",
              cublasGetStatusName(st), " (", cublasGetStatusString(st), ") in ", call);
}

MatmulPlan::~MatmulPlan() {
  // Destructors must not throw: statuses are ignored here.
  if (a) cublasLtMatrixLayoutDestroy(a);
  if (b) cublasLtMatrixLayoutDestroy(b);
  if (y) cublasLtMatrixLayoutDestroy(y);
  if (op) cublasLtMatmulDescDestroy(op);
}

CudaContext::CudaContext(int device) : device_(device) {
  int count = 0;
  DT_CUDA(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count)
    throw_error("cuda: device index ", device, " is outside [0, ", count, ") (", count,
                " GPU(s) visible)");
  DT_CUDA(cudaSetDevice(device));
  DT_CUDA(cudaGetDeviceProperties(&props_, device));
  const std::string why = arch_mismatch(built_archs(), props_.major, props_.minor, props_.name);
  if (!why.empty() && built_archs()[0] != '\0') throw_error("cuda: ", why);
  DT_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  DT_CUBLAS(cublasLtCreate(&lt_));
  workspace_bytes_ = size_t(32) << 20;  // what cuBLASLt recommends for Hopper
  workspace_ = alloc(workspace_bytes_, "the cuBLASLt workspace");
  DT_CUBLAS(cublasCreate(&blas_));
  DT_CUBLAS(cublasSetStream(blas_, stream_));
  DT_CUBLAS(cublasSetAtomicsMode(blas_, CUBLAS_ATOMICS_NOT_ALLOWED));  // deterministic
  DT_CUDA(cudaMalloc(reinterpret_cast<void**>(&dev_flag_), sizeof(int)));
  DT_CUDA(cudaMallocHost(reinterpret_cast<void**>(&host_flag_), sizeof(int)));
}

CudaContext::~CudaContext() {
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(stream_);
  plans_.clear();
  if (blas_) cublasDestroy(blas_);
  if (lt_) cublasLtDestroy(lt_);
  free(workspace_, workspace_bytes_);
  free(scratch_, scratch_bytes_);
  cudaFree(dev_flag_);
  free(rope_, size_t(rope_S_) * size_t(rope_dh_ / 2) * 2 * sizeof(float));
  if (host_flag_) cudaFreeHost(host_flag_);
  if (stream_) cudaStreamDestroy(stream_);
}

void CudaContext::activate() const {
  int cur = -1;
  DT_CUDA(cudaGetDevice(&cur));
  if (cur != device_) DT_CUDA(cudaSetDevice(device_));
}

void* CudaContext::scratch(size_t bytes) {
  if (bytes > scratch_bytes_) {
    DT_CUDA(cudaStreamSynchronize(stream_));  // earlier kernels may still read the old one
    const size_t grow = std::max(bytes, scratch_bytes_ + scratch_bytes_ / 2);
    free(scratch_, scratch_bytes_);
    scratch_ = nullptr;
    scratch_bytes_ = 0;
    scratch_ = alloc(grow, "op scratch");
    scratch_bytes_ = grow;
  }
  return scratch_;
}

// The slot is reset by a memset (no host round trip): every byte 0x7f, i.e. 0x7f7f7f7f,
// larger than any position; read_flag() maps it to INT32_MAX.
int* CudaContext::reset_flag() {
  DT_CUDA(cudaMemsetAsync(dev_flag_, 0x7f, sizeof(int), stream_));
  return dev_flag_;
}

int CudaContext::read_flag() {
  DT_CUDA(cudaMemcpyAsync(host_flag_, dev_flag_, sizeof(int), cudaMemcpyDeviceToHost, stream_));
  DT_CUDA(cudaStreamSynchronize(stream_));
  return *host_flag_ == 0x7f7f7f7f ? INT_MAX : *host_flag_;
}

const void* CudaContext::rope_table(int64_t S, int64_t dh, double theta) {
  if (rope_ && dh == rope_dh_ && theta == rope_theta_ && S <= rope_S_) return rope_;
  const int64_t rows = std::max(S, rope_dh_ == dh && rope_theta_ == theta ? rope_S_ : int64_t(0));
  DT_CUDA(cudaStreamSynchronize(stream_));
  free(rope_, size_t(rope_S_) * size_t(rope_dh_ / 2) * 2 * sizeof(float));
  rope_ = nullptr;
  rope_S_ = 0;
  rope_ = alloc(size_t(rows) * size_t(dh / 2) * 2 * sizeof(float), "the RoPE table");
  build_rope_table(*this, rope_, rows, dh, theta);
  rope_S_ = rows;
  rope_dh_ = dh;
  rope_theta_ = theta;
  return rope_;
}

void* CudaContext::alloc(size_t bytes, const char* what) {
  activate();
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the error so that later calls do not see it
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    throw_error("cuda: cannot allocate ", bytes, " bytes for ", what, " on device ", device_, ": ",
                cudaGetErrorString(err), " (", free_b >> 20, " MiB free of ", total_b >> 20, " MiB; this process holds ",
                memory_->allocated.load() >> 20, " MiB)");
  }
  memory_->add(int64_t(bytes));
  return p;
}

void CudaContext::free(void* p, size_t bytes) {
  if (!p) return;
  cudaFree(p);  // destructors call this: the status is ignored
  memory_->sub(int64_t(bytes));
}

MatmulPlan* CudaContext::find_plan(const MatmulKey& key) {
  auto it = plans_.find(key);
  return it == plans_.end() ? nullptr : it->second.get();
}

MatmulPlan* CudaContext::add_plan(const MatmulKey& key, std::unique_ptr<MatmulPlan> plan) {
  MatmulPlan* p = plan.get();
  plans_[key] = std::move(plan);
  return p;
}

}  // namespace difftron::cuda
