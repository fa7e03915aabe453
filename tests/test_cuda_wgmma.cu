// The Hopper wgmma primitives (kernels/cuda/wgmma.cuh) against CPU products on fresh random
// bf16 inputs, in every form the attention kernels use: S = A B^T with both operands K-major
// from shared memory (contraction 64 and 128), and O = P V with P from registers and V
// MN-major (one N = 128 / 256 instruction, or N = 64 per column group), and dQ = dS K with
// both shared-memory operands MN-major. Each case also runs a
// deliberately wrong descriptor, which must fail, so that a silently ignored field cannot pass.
// Exits 77 (ctest SKIP) without an sm_90 GPU.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "base/rng.h"
#include "kernels/cuda/diff_flash.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace difftron {
namespace wgmma_test {  // named (not anonymous): the device helpers below are unused in some
                        // compilation passes, which would warn for internal linkage
using bf16 = __nv_bfloat16;
using cuda::flash::Tile;
using cuda::flash::smem_addr;

// A [rows][cols] row-major global bf16 matrix into Tile<64>s of rows x 64 (column group g at
// byte offset g * rows * 128), plain stores; then made visible to the async proxy.
__device__ inline void stage(uint8_t* smem, const bf16* src, int rows, int cols) {
  for (int idx = threadIdx.x; idx < rows * cols / 8; idx += blockDim.x) {
    const int r = idx / (cols / 8), c = idx % (cols / 8);  // c: 16-byte chunk in the row
    const int grp = c / 8, cc = c % 8;
    *reinterpret_cast<uint4*>(smem + grp * rows * 128 + Tile<64>::off(r, cc)) =
        *reinterpret_cast<const uint4*>(src + r * cols + c * 8);
  }
}

template <int NT>
__device__ inline void store_acc(const float (&d)[NT][4], float* out, int ld) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  for (int n = 0; n < NT; ++n)
    for (int e = 0; e < 4; ++e)
      out[(16 * warp + g + 8 * (e / 2)) * ld + 8 * n + 2 * t4 + (e % 2)] = d[n][e];
}

// D[64][64] = A[64][K] B[64][K]^T, K = 64 * KG; bad: 1 uses a wrong SBO (must fail).
template <int KG>
__global__ void ss_kernel(const bf16* a, const bf16* b, float* d, int bad) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  namespace w = cuda::wgmma;
  extern __shared__ __align__(1024) uint8_t smem[];
  uint8_t* sa = smem;
  uint8_t* sb = smem + KG * 64 * 128;
  stage(sa, a, 64, 64 * KG);
  stage(sb, b, 64, 64 * KG);
  w::fence_proxy_async();
  __syncthreads();
  float acc[8][4];
  w::fence();
  for (int kk = 0; kk < 4 * KG; ++kk) {
    const uint32_t ta = smem_addr(sa) + (kk / 4) * 64 * 128, tb = smem_addr(sb) + (kk / 4) * 64 * 128;
    const uint64_t da = bad ? w::desc_sw128(ta + 32 * (kk % 4), 16, 512) : w::kmajor_desc(ta, kk % 4);
    w::wgmma_ss<0, 0>(acc, da, w::kmajor_desc(tb, kk % 4), kk > 0);
  }
  w::commit();
  w::wait<0>();
  w::fence_regs(acc);
  store_acc(acc, d, 64);
#endif
}

// D[64][64] = A^T B with A [K][64] and B [K][64] stored with the contraction index as rows
// (both operands MN-major, transposed in the instruction), K = 128: the dQ = dS K form.
__global__ void ss_mn_kernel(const bf16* a, const bf16* b, float* d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  namespace w = cuda::wgmma;
  extern __shared__ __align__(1024) uint8_t smem[];
  uint8_t* sa = smem;
  uint8_t* sb = smem + 128 * 128;
  stage(sa, a, 128, 64);
  stage(sb, b, 128, 64);
  w::fence_proxy_async();
  __syncthreads();
  float acc[8][4];
  w::fence();
  for (int kk = 0; kk < 8; ++kk)
    w::wgmma_ss<1, 1>(acc, w::mnmajor_desc(smem_addr(sa), 128 * 128, kk),
                      w::mnmajor_desc(smem_addr(sb), 128 * 128, kk), kk > 0);
  w::commit();
  w::wait<0>();
  w::fence_regs(acc);
  store_acc(acc, d, 64);
#endif
}

// D[64][N] = P[64][64] V[64][N]; P from registers, V MN-major in N/64 Tile<64> column groups.
// mode 0: one instruction of width N; 1: N = 64 per column group; 2: LBO/SBO swapped (wrong).
template <int NT>
__global__ void rs_kernel(const bf16* p, const bf16* v, float* d, int mode) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  namespace w = cuda::wgmma;
  constexpr int N = NT * 8;
  extern __shared__ __align__(1024) uint8_t smem[];
  stage(smem, v, 64, N);
  w::fence_proxy_async();
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  auto pk = [&](int r, int c) {
    __nv_bfloat162 x;
    x.x = p[r * 64 + c];
    x.y = p[r * 64 + c + 1];
    return *reinterpret_cast<uint32_t*>(&x);
  };
  float acc[NT][4];
  float part[8][4];
  const uint32_t sv = smem_addr(smem), grp = 64 * 128;
  for (int n = 0; n < NT; ++n)
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  for (int kk = 0; kk < 4; ++kk) {
    const int r = 16 * warp + g, c = 16 * kk + 2 * t4;
    const uint32_t a[4] = {pk(r, c), pk(r + 8, c), pk(r, c + 8), pk(r + 8, c + 8)};
    if (mode == 1) {
      for (int gi = 0; gi < N / 64; ++gi) {
        w::fence();
        w::wgmma_rs<1>(part, a, w::desc_sw128(sv + gi * grp + 2048 * kk, 1024, 1024), 0);
        w::commit();
        w::wait<0>();
        w::fence_regs(part);
        for (int n = 0; n < 8; ++n)
          for (int e = 0; e < 4; ++e) acc[gi * 8 + n][e] += part[n][e];
      }
    } else {
      const uint64_t db = mode == 0 ? w::mnmajor_desc(sv, grp, kk)
                                    : w::desc_sw128(sv + 2048 * kk, 1024, grp);
      w::fence_regs(acc);
      w::fence();
      w::wgmma_rs<1>(acc, a, db, 1);
      w::commit();
      w::wait<0>();
      w::fence_regs(acc);
    }
  }
  store_acc(acc, d, N);
#endif
}

struct Mat {
  std::vector<bf16> bf;
  std::vector<double> x;
};
Mat random_mat(int n, uint64_t seed) {
  Rng rng(seed);
  Mat m;
  for (int i = 0; i < n; ++i) {
    m.bf.push_back(__float2bfloat16(float(rng.normal())));
    m.x.push_back(double(__bfloat162float(m.bf.back())));
  }
  return m;
}

void require_sm90() {
  int n = 0;
  cudaDeviceProp prop{};
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0 ||
      cudaGetDeviceProperties(&prop, 0) != cudaSuccess || prop.major != 9) {
    std::fprintf(stderr, "test_cuda_wgmma: no sm_90 GPU, skipping\n");
    std::exit(77);
  }
}

// Max abs error of the GPU result against the reference, relative to the reference's max.
double rel_err(const std::vector<float>& got, const std::vector<double>& ref) {
  double e = 0, m = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    e = std::max(e, std::fabs(double(got[i]) - ref[i]));
    m = std::max(m, std::fabs(ref[i]));
  }
  return e / m;
}

template <typename T>
T* to_device(const std::vector<T>& h) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, h.size() * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}

template <int KG>
double run_ss(int bad, uint64_t seed) {
  const int K = 64 * KG;
  Mat a = random_mat(64 * K, seed), b = random_mat(64 * K, seed + 1);
  std::vector<double> ref(64 * 64, 0.0);
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < 64; ++j)
      for (int k = 0; k < K; ++k) ref[i * 64 + j] += a.x[i * K + k] * b.x[j * K + k];
  bf16 *da = to_device(a.bf), *db = to_device(b.bf);
  float* dd = to_device(std::vector<float>(64 * 64, NAN));
  const int smem = 2 * KG * 64 * 128;
  cudaFuncSetAttribute(ss_kernel<KG>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  ss_kernel<KG><<<1, 128, smem>>>(da, db, dd, bad);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> got(64 * 64);
  cudaMemcpy(got.data(), dd, got.size() * 4, cudaMemcpyDeviceToHost);
  cudaFree(da);
  cudaFree(db);
  cudaFree(dd);
  return rel_err(got, ref);
}

double run_ss_mn(uint64_t seed) {
  Mat a = random_mat(128 * 64, seed), b = random_mat(128 * 64, seed + 1);
  std::vector<double> ref(64 * 64, 0.0);
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < 64; ++j)
      for (int k = 0; k < 128; ++k) ref[i * 64 + j] += a.x[k * 64 + i] * b.x[k * 64 + j];
  bf16 *da = to_device(a.bf), *db = to_device(b.bf);
  float* dd = to_device(std::vector<float>(64 * 64, NAN));
  const int smem = 2 * 128 * 128;
  cudaFuncSetAttribute(ss_mn_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  ss_mn_kernel<<<1, 128, smem>>>(da, db, dd);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> got(64 * 64);
  cudaMemcpy(got.data(), dd, got.size() * 4, cudaMemcpyDeviceToHost);
  cudaFree(da);
  cudaFree(db);
  cudaFree(dd);
  return rel_err(got, ref);
}

template <int NT>
double run_rs(int mode, uint64_t seed) {
  const int N = NT * 8;
  Mat p = random_mat(64 * 64, seed), v = random_mat(64 * N, seed + 1);
  std::vector<double> ref(64 * N, 0.0);
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < N; ++j)
      for (int k = 0; k < 64; ++k) ref[i * N + j] += p.x[i * 64 + k] * v.x[k * N + j];
  bf16 *dp = to_device(p.bf), *dv = to_device(v.bf);
  float* dd = to_device(std::vector<float>(64 * N, NAN));
  const int smem = 64 * N * 2;
  cudaFuncSetAttribute(rs_kernel<NT>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  rs_kernel<NT><<<1, 128, smem>>>(dp, dv, dd, mode);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> got(64 * N);
  cudaMemcpy(got.data(), dd, got.size() * 4, cudaMemcpyDeviceToHost);
  cudaFree(dp);
  cudaFree(dv);
  cudaFree(dd);
  return rel_err(got, ref);
}

constexpr double kTol = 1e-5;  // f32 accumulation of exact bf16 products

TEST(Wgmma, KMajorBothOperands) {
  require_sm90();
  const double e64 = run_ss<1>(0, 11), e128 = run_ss<2>(0, 13), bad = run_ss<1>(1, 17);
  std::printf("wgmma ss: K 64 %.2e, K 128 %.2e, wrong SBO %.2e\n", e64, e128, bad);
  EXPECT_LT(e64, kTol);
  EXPECT_LT(e128, kTol);
  EXPECT_GT(bad, 1e-2);
}

TEST(Wgmma, BothOperandsMnMajor) {
  require_sm90();
  const double e = run_ss_mn(31);
  std::printf("wgmma ss, A and B MN-major (K 128): %.2e\n", e);
  EXPECT_LT(e, kTol);
}

TEST(Wgmma, RegistersTimesMnMajor) {
  require_sm90();
  const double w128 = run_rs<16>(0, 21), w256 = run_rs<32>(0, 23);
  const double g128 = run_rs<16>(1, 25), g256 = run_rs<32>(1, 27);
  const double bad = run_rs<16>(2, 29);
  std::printf("wgmma rs: N 128 %.2e, N 256 %.2e, per-64 groups %.2e / %.2e, swapped %.2e\n",
              w128, w256, g128, g256, bad);
  EXPECT_LT(w128, kTol);
  EXPECT_LT(w256, kTol);
  EXPECT_LT(g128, kTol);
  EXPECT_LT(g256, kTol);
  EXPECT_GT(bad, 1e-2);
}

}  // namespace wgmma_test
}  // namespace difftron
