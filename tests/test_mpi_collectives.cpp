// mpi-ranks: 4
// The MPI communicator and the TP x DP grid on 4 ranks: every collective, on every group of
// a 2 x 2 grid and of the 1 x 4 / 4 x 1 grids, for f32 / f64 / i32 / bf16, against values
// computed from (seed, rank, index); sums in rank order and identical bits on every rank;
// group membership (TP consecutive, DP strided); clear errors for bad arguments.
#include <mpi.h>

#include <cmath>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "base/rng.h"
#include "parallel/grid.h"
#include "parallel/mpi_comm.h"
#include "tests/mpi_env.h"

namespace difftron {
namespace {

const auto* const kEnv = ::testing::AddGlobalTestEnvironment(new testing::MpiEnv);

// Exactly representable in f32 and bf16 (small integers / 4), so sums are exact in any order.
double exact_value(uint64_t seed, int rank, int64_t i) {
  return double(int64_t((seed * 2654435761ull + uint64_t(rank) * 40503ull + uint64_t(i) * 977ull) % 61) - 30) / 4.0;
}
// Full-mantissa values: sums depend on the order.
float rough_value(uint64_t seed, int rank, int64_t i) {
  Rng r(seed * 1000003ull + uint64_t(rank) * 7919ull + uint64_t(i));
  return float(r.normal() * std::pow(10.0, double(int(r.below(7))) - 3.0));
}

uint16_t to_bf16(double x) {  // x exactly representable
  float f = float(x);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t(u >> 16);
}
double from_bf16(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A host buffer of n elements of `dtype` filled with exact_value(seed, rank, index).
struct Buf {
  DType dtype;
  std::vector<char> bytes;
  Buf(DType t, int64_t n) : dtype(t), bytes(std::max<size_t>(1, n * dtype_size(t))) {}
  int64_t n() const { return int64_t(bytes.size() / dtype_size(dtype)); }
  Tensor tensor(int64_t n) { return host_tensor(bytes.data(), n, dtype); }
  void set(int64_t i, double x) {
    switch (dtype) {
      case DType::F32: reinterpret_cast<float*>(bytes.data())[i] = float(x); break;
      case DType::F64: reinterpret_cast<double*>(bytes.data())[i] = x; break;
      case DType::I32: reinterpret_cast<int32_t*>(bytes.data())[i] = int32_t(x * 4); break;
      case DType::BF16: reinterpret_cast<uint16_t*>(bytes.data())[i] = to_bf16(x); break;
    }
  }
  double get(int64_t i) const {
    switch (dtype) {
      case DType::F32: return reinterpret_cast<const float*>(bytes.data())[i];
      case DType::F64: return reinterpret_cast<const double*>(bytes.data())[i];
      case DType::I32: return reinterpret_cast<const int32_t*>(bytes.data())[i] / 4.0;
      case DType::BF16: return from_bf16(reinterpret_cast<const uint16_t*>(bytes.data())[i]);
    }
    return 0;
  }
};

const DType kTypes[] = {DType::F32, DType::F64, DType::I32, DType::BF16};
const int64_t kSizes[] = {1, 3, 7, 64, 1000};

void check_collectives(Communicator& c, uint64_t seed) {
  const int P = c.size(), me = c.rank();
  for (DType t : kTypes) {
    for (int64_t n : kSizes) {
      SCOPED_TRACE(std::string(dtype_name(t)) + " n=" + std::to_string(n) + " on " + c.name());
      // all_reduce
      Buf a(t, n);
      for (int64_t i = 0; i < n; ++i) a.set(i, exact_value(seed, me, i));
      Tensor at = a.tensor(n);
      c.all_reduce(at);
      for (int64_t i = 0; i < n; ++i) {
        double want = 0;
        for (int r = 0; r < P; ++r) want += exact_value(seed, r, i);
        ASSERT_EQ(a.get(i), want) << "all_reduce index " << i;
      }
      // reduce_scatter, out of place and in place: out[j] = sum_r in_r[me*n + j]
      for (bool in_place : {false, true}) {
        Buf in(t, P * n), out(t, n);
        for (int64_t i = 0; i < P * n; ++i) in.set(i, exact_value(seed + 1, me, i));
        Tensor it = in.tensor(P * n);
        Tensor ot = in_place ? it.flat_slice(me * n, n) : out.tensor(n);
        c.reduce_scatter(it, ot);
        for (int64_t j = 0; j < n; ++j) {
          double want = 0;
          for (int r = 0; r < P; ++r) want += exact_value(seed + 1, r, me * n + j);
          ASSERT_EQ(in_place ? in.get(me * n + j) : out.get(j), want) << "reduce_scatter index " << j;
        }
      }
      // all_gather, out of place and in place: out[r*n + j] = in_r[j]
      for (bool in_place : {false, true}) {
        Buf in(t, n), out(t, P * n);
        Tensor ot = out.tensor(P * n);
        Tensor it = in_place ? ot.flat_slice(me * n, n) : in.tensor(n);
        for (int64_t j = 0; j < n; ++j) (in_place ? out.set(me * n + j, exact_value(seed + 2, me, j))
                                                  : in.set(j, exact_value(seed + 2, me, j)));
        c.all_gather(it, ot);
        for (int r = 0; r < P; ++r)
          for (int64_t j = 0; j < n; ++j)
            ASSERT_EQ(out.get(r * n + j), exact_value(seed + 2, r, j)) << "all_gather from " << r;
      }
      // broadcast from every root
      for (int root = 0; root < P; ++root) {
        Buf b(t, n);
        for (int64_t i = 0; i < n; ++i) b.set(i, exact_value(seed + 3, me, i));
        Tensor bt = b.tensor(n);
        c.broadcast(bt, root);
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(b.get(i), exact_value(seed + 3, root, i));
      }
    }
  }
  c.barrier();
}

// Full-mantissa f32 sums: the result is the rank-order sum ((x_0 + x_1) + x_2) + ...,
// bit for bit, on every rank (each rank checks against the same formula).
void check_rank_order(Communicator& c, uint64_t seed) {
  const int P = c.size(), me = c.rank();
  const int64_t n = 777;
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) x[i] = rough_value(seed, me, i);
  Tensor t = host_tensor(x.data(), n, DType::F32);
  c.all_reduce(t);
  for (int64_t i = 0; i < n; ++i) {
    float want = rough_value(seed, 0, i);
    for (int r = 1; r < P; ++r) want += rough_value(seed, r, i);
    ASSERT_EQ(x[i], want) << "index " << i;
  }
}

TEST(MpiCollectives, WorldOfFourRanks) {
  auto ctx = testing::test_grid(1, 4);
  ASSERT_EQ(ctx->world_size(), 4);
  check_collectives(ctx->world(), 11);
  check_collectives(ctx->dp(), 12);
  check_rank_order(ctx->world(), 13);
}

TEST(MpiCollectives, TwoByTwoGridGroups) {
  auto ctx = testing::test_grid(2, 2);
  const int w = ctx->world_rank();
  EXPECT_EQ(ctx->tp_size(), 2);
  EXPECT_EQ(ctx->dp_size(), 2);
  EXPECT_EQ(ctx->tp_rank(), w % 2);
  EXPECT_EQ(ctx->dp_rank(), w / 2);
  // membership: gather world ranks over each group
  for (int g = 0; g < 2; ++g) {
    Communicator& c = g == 0 ? ctx->tp_host() : ctx->dp_host();
    double mine = w, all[2];
    all_gather_host(c, &mine, all, 1);
    if (g == 0) {  // TP: consecutive ranks
      EXPECT_EQ(all[0], (w / 2) * 2);
      EXPECT_EQ(all[1], (w / 2) * 2 + 1);
    } else {  // DP: stride tp
      EXPECT_EQ(all[0], w % 2);
      EXPECT_EQ(all[1], w % 2 + 2);
    }
  }
  check_collectives(ctx->tp(), 21 + ctx->dp_rank());
  check_collectives(ctx->dp(), 31 + ctx->tp_rank());
  check_rank_order(ctx->tp(), 41 + ctx->dp_rank());
  check_rank_order(ctx->dp(), 51 + ctx->tp_rank());
}

TEST(MpiCollectives, FourWayTensorParallel) {
  auto ctx = testing::test_grid(4, 1);
  EXPECT_EQ(ctx->tp_size(), 4);
  EXPECT_EQ(ctx->dp_size(), 1);
  check_collectives(ctx->tp(), 61);
  check_collectives(ctx->dp(), 62);  // a group of one
}

TEST(MpiCollectives, HostHelpers) {
  auto ctx = testing::test_grid(2, 2);
  double x[3] = {1.0 * ctx->world_rank(), 2.0, -0.5};
  all_reduce_host(ctx->world_host(), x, 3);
  EXPECT_EQ(x[0], 0.0 + 1 + 2 + 3);
  EXPECT_EQ(x[1], 8.0);
  EXPECT_EQ(x[2], -2.0);
}

TEST(MpiCollectives, BadArgumentsAreReportedWithTheGroup) {
  auto ctx = testing::test_grid(2, 2);
  std::vector<float> a(6), b(2);
  Tensor in = host_tensor(a.data(), 6, DType::F32), out = host_tensor(b.data(), 2, DType::F32);
  try {
    ctx->tp().reduce_scatter(in, out);  // 6 != 2 x 2: thrown before any message
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("group 'tp'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("must hold size (2)"), std::string::npos) << e.what();
  }
  std::vector<double> d(2);
  Tensor dt = host_tensor(d.data(), 2, DType::F64);
  EXPECT_THROW(ctx->dp().reduce_scatter(in.flat_slice(0, 4), dt), Error);  // dtypes differ
  EXPECT_THROW(ctx->dp().broadcast(dt, 5), Error);
}

TEST(MpiCollectives, GridMustMatchTheWorld) {
  try {
    testing::test_grid(3, 1);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tp (3) x dp (1) = 3 must equal the number of MPI ranks (4)"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace difftron
