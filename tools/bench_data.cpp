// `difftron bench-data DATASET`: what the streaming loader delivers on this machine.
// Phase 1 takes batches as fast as possible (tokens/s, and the reader thread's own rate);
// phase 2 sleeps a simulated training step after each batch and reports the share of the
// step spent waiting for data. --data_bench_cold first evicts the shards from the page cache.
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include <gflags/gflags.h>

#include "io/loader.h"
#include "launch/command.h"

DEFINE_int64(data_bench_seq, 2048, "bench-data: sequence length S");
DEFINE_int64(data_bench_batch, 8, "bench-data: sequences per batch B");
DEFINE_double(data_bench_seconds, 5, "bench-data: duration of each phase");
DEFINE_double(data_bench_step_ms, 200, "bench-data: simulated training step in phase 2 (0 skips phase 2)");
DEFINE_int32(data_bench_prefetch, 4, "bench-data: ring size (batches read ahead)");
DEFINE_bool(data_bench_verify, true, "bench-data: verify checksums at open (reads every token once)");
DEFINE_bool(data_bench_cold, false, "bench-data: evict the shards from the page cache first (posix_fadvise)");
DEFINE_bool(data_bench_shuffle, true, "bench-data: shuffled (training) order; false = sequential (validation)");

namespace {

using clock_type = std::chrono::steady_clock;
double since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

int bench_data_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (argc != 2) {
    std::fprintf(stderr, "usage: difftron bench-data DATASET [--data_bench_seq=2048 --data_bench_batch=8 ...]\n");
    return 2;
  }
  const std::string path = argv[1];
  const int64_t B = FLAGS_data_bench_batch, S = FLAGS_data_bench_seq;
  if (FLAGS_data_bench_cold) {
    for (const auto& f : difftron::list_dataset_shards(path)) {
      const int fd = ::open(f.c_str(), O_RDONLY);
      if (fd >= 0) {
        ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        ::close(fd);
      }
    }
  }
  difftron::DatasetOptions o;
  o.path = path;
  o.seed = 1;
  o.shuffle = FLAGS_data_bench_shuffle;
  o.verify_checksums = FLAGS_data_bench_verify;
  o.prefetch_batches = FLAGS_data_bench_prefetch;
  auto t_open = clock_type::now();
  auto loader = difftron::open_token_loader(o);
  const double open_s = since(t_open);
  const auto& ds = loader->dataset();
  std::printf("dataset %s: %zu shard(s), %lld tokens (%.1f MB on disk as uint%d)\n", path.c_str(), ds.num_shards(),
              (long long)ds.num_tokens(), ds.num_tokens() * ds.shard(0).token_bytes() / 1e6,
              8 * ds.shard(0).token_bytes());
  std::printf("open%s: %.3f s%s\n", FLAGS_data_bench_verify ? " + verify" : "", open_s,
              FLAGS_data_bench_verify ? "" : " (no verification)");
  if (FLAGS_data_bench_verify && open_s > 0)
    std::printf("  verification rate: %.1f M tokens/s\n", ds.num_tokens() / open_s / 1e6);

  std::vector<int32_t> tok(size_t(B * S)), tgt(size_t(B * S));
  auto t_first = clock_type::now();
  loader->next_batch(B, S, tok.data(), tgt.data());
  std::printf("first batch: %.2f ms (reader start-up)\n", since(t_first) * 1e3);

  // Phase 1: as fast as the caller can take batches.
  difftron::LoaderStats s0 = loader->stats();
  auto t1 = clock_type::now();
  int64_t n1 = 0;
  while (since(t1) < FLAGS_data_bench_seconds) {
    loader->next_batch(B, S, tok.data(), tgt.data());
    ++n1;
  }
  const double d1 = since(t1);
  difftron::LoaderStats s1 = loader->stats();
  const double tokens1 = double(n1 * B * S);
  std::printf("phase 1 (no compute): %lld batches of %lld x %lld in %.2f s: %.2f M tokens/s delivered; "
              "reader thread busy %.2f s (%.2f M tokens/s of its own time)\n",
              (long long)n1, (long long)B, (long long)S, d1, tokens1 / d1 / 1e6, s1.read_seconds - s0.read_seconds,
              tokens1 / std::max(1e-9, s1.read_seconds - s0.read_seconds) / 1e6);

  // Phase 2: a training-like loop with a simulated step.
  if (FLAGS_data_bench_step_ms > 0) {
    const auto step = std::chrono::duration<double, std::milli>(FLAGS_data_bench_step_ms);
    s0 = loader->stats();
    auto t2 = clock_type::now();
    int64_t n2 = 0;
    while (since(t2) < FLAGS_data_bench_seconds) {
      loader->next_batch(B, S, tok.data(), tgt.data());
      std::this_thread::sleep_for(step);
      ++n2;
    }
    const double d2 = since(t2);
    s1 = loader->stats();
    const double wait = s1.wait_seconds - s0.wait_seconds;
    std::printf("phase 2 (%.0f ms steps, %.0f tokens/s consumed): %lld steps, waiting for data %.3f ms per step "
                "= %.4f%% of step time\n",
                FLAGS_data_bench_step_ms, double(B * S) / (FLAGS_data_bench_step_ms / 1e3), (long long)n2,
                wait / double(n2) * 1e3, 100.0 * wait / d2);
  }
  std::printf("position: %s\n", loader->position().c_str());
  return 0;
}

}  // namespace

DIFFTRON_COMMAND("bench-data", "measure the token loader's throughput and stalls on a dataset", bench_data_main);
