// Shared by the multi-rank tests (tests/test_mpi_*.cpp, run under mpirun): MPI started once
// for the binary, and a TP x DP grid whose collectives time out (a broken test fails instead
// of hanging CI).
#pragma once
#include <memory>

#include <gtest/gtest.h>

#include "parallel/grid.h"
#include "parallel/mpi_comm.h"

namespace difftron::testing {

class MpiEnv : public ::testing::Environment {
 public:
  void SetUp() override {
    int argc = 0;
    char** argv = nullptr;
    runtime_ = std::make_unique<MpiRuntime>(&argc, &argv);
  }
  void TearDown() override { runtime_.reset(); }

 private:
  std::unique_ptr<MpiRuntime> runtime_;
};

inline GridOptions test_grid_options(int tp, int dp) {
  GridOptions o;
  o.tp = tp;
  o.dp = dp;
  o.watchdog.collective_timeout_s = 60;
  return o;
}

inline std::unique_ptr<ParallelContext> test_grid(int tp, int dp) {
  return ParallelContext::from_mpi_world(test_grid_options(tp, dp));
}

}  // namespace difftron::testing
