// `difftron plot` draws runs from their metrics.jsonl with gnuplot: the PNG it writes is a
// valid image of the size asked for (PNG signature, IHDR width and height), for one run or
// several, against tokens or steps; a missing or failing gnuplot, or a run without records,
// is an error that names the file, and leaves no picture behind.
// Needs gnuplot (Debian gnuplot-nox, installed by tools/setup.sh).
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "tests/run_command.h"

namespace {

namespace fs = std::filesystem;
using Result = difftron::testing::CommandResult;
Result run(const std::string& args) { return difftron::testing::run_difftron(args); }
bool has(const Result& r, const std::string& s) { return r.output.find(s) != std::string::npos; }
fs::path fresh(const char* tag) { return difftron::testing::fresh_dir("difftron_plot_test_", tag); }

// A PNG's width and height from its IHDR chunk, read independently of the program's own
// check; {0, 0} when the file is not a PNG (signature, then IHDR as the first chunk).
struct PngSize {
  uint32_t width = 0, height = 0;
};
PngSize png_size(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::string b(33, '\0');  // signature 8, IHDR length 4, type 4, data 13
  if (!f.read(&b[0], b.size())) return {};
  if (b.compare(0, 8, "\x89PNG\r\n\x1a\n") != 0 || b.compare(12, 4, "IHDR") != 0) return {};
  auto be32 = [&](size_t at) {
    uint32_t v = 0;
    for (size_t i = 0; i < 4; ++i) v = v << 8 | static_cast<unsigned char>(b[at + i]);
    return v;
  };
  if (be32(8) != 13) return {};  // IHDR's data is 13 bytes
  return {be32(16), be32(20)};
}

bool gnuplot_installed() { return difftron::testing::run_command("gnuplot --version").status == 0; }

// Two short runs with validation: one of the copy task at two learning rates.
void train_runs(const fs::path& dir) {
  for (const char* name : {"a", "b"}) {
    auto r = run(std::string("train --device=cpu --seq=16 --batch=4 --d_model=32 --n_layers=1 --steps=8 --log_every=2 "
                             "--eval_every=4 --eval_batches=1 --lr=") +
                 (name[0] == 'a' ? "1e-3" : "3e-3") + " --ckpt_dir=" + (dir / name).string());
    ASSERT_EQ(r.status, 0) << r.output;
  }
}

TEST(CliPlot, DrawsRunsIntoAValidPng) {
  ASSERT_TRUE(gnuplot_installed()) << "gnuplot is missing: install the Debian package gnuplot-nox (tools/setup.sh)";
  const fs::path dir = fresh("png");
  train_runs(dir);
  const fs::path png = dir / "runs.png";
  auto r = run("plot --runs=" + (dir / "a").string() + "," + (dir / "b").string() + " --out=" + png.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "plot: wrote " + png.string() + " (1500 x 450, 2 runs")) << r.output;
  PngSize s = png_size(png);
  EXPECT_EQ(s.width, 1500u);
  EXPECT_EQ(s.height, 450u);
  EXPECT_GT(fs::file_size(png), 5000u);  // three panels of curves, not an empty canvas

  // one run given as its metrics.jsonl, against steps, at another size, replacing the picture
  r = run("plot --runs=" + (dir / "a/metrics.jsonl").string() + " --labels=lr1e-3 --x=step --plot_width=640 "
          "--plot_height=360 --out=" + png.string());
  ASSERT_EQ(r.status, 0) << r.output;
  s = png_size(png);
  EXPECT_EQ(s.width, 640u);
  EXPECT_EQ(s.height, 360u);

  // a run whose last line was cut short (a crash mid-write) still plots
  const fs::path cut = dir / "cut.jsonl";
  fs::copy_file(dir / "b/metrics.jsonl", cut);
  std::ofstream(cut, std::ios::app) << "{\"event\": \"step\", \"step\": 9, \"lo";
  r = run("plot --runs=" + cut.string() + " --out=" + (dir / "cut.png").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "skipping a line that is not JSON")) << r.output;
  EXPECT_GT(png_size(dir / "cut.png").width, 0u);
  fs::remove_all(dir);
}

TEST(CliPlot, ErrorsNameTheFileAndLeaveNoPicture) {
  const fs::path dir = fresh("errors");
  train_runs(dir);
  const std::string runs = " --runs=" + (dir / "a").string();
  const fs::path png = dir / "p.png";
  // gnuplot missing
  auto r = run("plot" + runs + " --gnuplot=/nonexistent/gnuplot --out=" + png.string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "cannot draw " + png.string() + ": gnuplot is not installed")) << r.output;
  EXPECT_TRUE(has(r, "gnuplot-nox")) << r.output;
  EXPECT_FALSE(fs::exists(png));
  // gnuplot failing (`false` exits 1): an old picture stays as it was
  std::ofstream(png) << "old";
  r = run("plot" + runs + " --gnuplot=false --out=" + png.string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "gnuplot failed (exit status 1) drawing " + png.string())) << r.output;
  EXPECT_EQ(difftron::testing::read_text_file(png), "old");
  // no metrics.jsonl; no records in it; bad flags
  r = run("plot --runs=" + (dir / "none").string() + " --out=" + png.string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--runs: cannot open " + (dir / "none").string())) << r.output;
  fs::create_directories(dir / "empty");
  std::ofstream(dir / "empty/metrics.jsonl") << "{\"event\": \"start\", \"tokens_per_step\": 64}\n";
  r = run("plot --runs=" + (dir / "empty").string() + " --out=" + png.string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, (dir / "empty/metrics.jsonl").string() + " holds no step or eval records")) << r.output;
  r = run("plot" + runs + " --x=time --out=" + png.string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--x (time) must be tokens or step")) << r.output;
  r = run("plot" + runs + " --labels=a,b --out=" + png.string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--labels has 2 labels for 1 runs")) << r.output;
  r = run("plot" + runs);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--out is required")) << r.output;
  fs::remove_all(dir);
}

}  // namespace
