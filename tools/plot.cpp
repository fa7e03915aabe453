// `difftron plot`: one PNG of one or several runs side by side, from their RUN/metrics.jsonl
// (docs/TRAINING.md): the training loss (each `step` record's window mean), the validation
// loss (`eval` records) and the throughput (tokens/s), against tokens trained or steps.
// gnuplot draws it (Debian: gnuplot-nox): the series are written to data files next to a
// gnuplot script in a temporary folder, gnuplot renders into that folder, and the PNG is
// checked (signature and size in its IHDR) before it replaces --out.
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <gflags/gflags.h>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "launch/command.h"

extern char** environ;

DEFINE_string(runs, "", "plot: comma-separated runs: directories of `train --ckpt_dir` or their metrics.jsonl files");
DEFINE_string(labels, "", "plot: comma-separated legend labels, one per run (default: the run directories' names)");
DEFINE_string(x, "tokens", "plot: the x axis, tokens (trained, all ranks) or step");
DEFINE_string(gnuplot, "gnuplot", "plot: the gnuplot program (Debian package gnuplot-nox)");
DEFINE_int32(plot_width, 1500, "plot: picture width in pixels");
DEFINE_int32(plot_height, 450, "plot: picture height in pixels");
DECLARE_string(out);  // tools/prepare.cpp; plot: the PNG to write

namespace difftron {
namespace {

namespace fs = std::filesystem;

// One run's series, by step (a resumed run that repeats steps keeps the later records).
struct Run {
  std::string label, file;
  struct Point {
    double tokens, value;
  };
  std::map<int64_t, Point> train, val, speed;  // loss, validation loss, tokens/s
};

Run read_run(const std::string& path) {
  Run run;
  run.file = fs::is_directory(path) ? (fs::path(path) / "metrics.jsonl").string() : path;
  std::ifstream f(run.file);
  if (!f)
    throw_error("--runs: cannot open ", run.file, " (runs are `difftron train --ckpt_dir` directories, which hold "
                "metrics.jsonl, or such files)");
  fs::path name = fs::path(path).lexically_normal();
  if (name.filename().empty()) name = name.parent_path();
  if (!fs::is_directory(path)) name = name.parent_path();  // RUN/metrics.jsonl: RUN
  run.label = name.filename().string();
  if (run.label.empty() || run.label == ".") run.label = path;

  double tokens_per_step = 0;  // the latest `start` record's: eval records carry no tokens trained
  int64_t bad = 0, line_no = 0;
  for (std::string line; std::getline(f, line);) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json r;
    try {
      r = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      if (bad++ == 0) std::cerr << "plot: " << run.file << ":" << line_no << ": skipping a line that is not JSON\n";
      continue;
    }
    if (!r.is_object()) continue;
    const std::string event = r.value("event", "");
    auto number = [&](const char* key) { return r.contains(key) && r[key].is_number() ? r[key].get<double>() : -1.0; };
    if (!r.contains("step") && event != "start") continue;
    const int64_t step = r.contains("step") && r["step"].is_number() ? r["step"].get<int64_t>() : -1;
    if (event == "start") {
      if (number("tokens_per_step") > 0) tokens_per_step = number("tokens_per_step");
    } else if (event == "step" && step >= 0) {
      const double tokens = number("tokens") >= 0 ? number("tokens") : double(step) * tokens_per_step;
      if (number("loss") >= 0) run.train[step] = {tokens, number("loss")};
      if (number("tokens_per_s") > 0) run.speed[step] = {tokens, number("tokens_per_s")};
    } else if (event == "eval" && step >= 0 && number("loss") >= 0) {
      run.val[step] = {double(step) * tokens_per_step, number("loss")};
    }
  }
  if (bad > 1) std::cerr << "plot: " << run.file << ": " << bad << " lines that are not JSON skipped\n";
  if (run.train.empty() && run.val.empty())
    throw_error(run.file, " holds no step or eval records: nothing to plot");
  return run;
}

// A string in a gnuplot script: single quotes, in which only '' needs escaping.
std::string quoted(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("''") : std::string(1, c);
  return q + "'";
}

void write_series(const std::string& path, const std::map<int64_t, Run::Point>& points, bool by_step) {
  std::ofstream f(path);
  f.precision(17);
  for (const auto& [step, p] : points) f << (by_step ? double(step) : p.tokens) << " " << p.value << "\n";
  if (!f.flush()) throw_error("plot: cannot write ", path);
}

// The gnuplot script: three panels side by side, one colour per run in all of them.
std::string gnuplot_script(const std::vector<Run>& runs, const std::string& dir, const std::string& png, bool by_step) {
  std::ostringstream s;
  s << "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {\n"
    << "  set terminal pngcairo size " << FLAGS_plot_width << "," << FLAGS_plot_height << " noenhanced font 'sans,10'\n"
    << "} else {\n"
    << "  set terminal png size " << FLAGS_plot_width << "," << FLAGS_plot_height << " noenhanced\n"
    << "}\n"
    << "set output " << quoted(png) << "\n"
    << "set multiplot layout 1,3\n"
    << "set grid\n"
    << "set key top right\n"
    << "set xlabel " << quoted(by_step ? "step" : "tokens") << "\n";
  if (!by_step) s << "set format x '%.1s%c'\n";  // 1.5M, 200k
  struct Panel {
    const char* title;
    const char* ylabel;
    std::map<int64_t, Run::Point> Run::*series;
    const char* style;
  };
  const Panel panels[] = {{"training loss (window mean)", "loss", &Run::train, "lines lw 2"},
                          {"validation loss", "loss", &Run::val, "linespoints lw 2 pt 7 ps 0.6"},
                          {"throughput", "tokens/s", &Run::speed, "lines lw 2"}};
  for (int k = 0; k < 3; ++k) {
    const Panel& p = panels[k];
    s << "set title " << quoted(p.title) << "\nset ylabel " << quoted(p.ylabel) << "\n";
    std::vector<std::string> curves;
    for (size_t i = 0; i < runs.size(); ++i) {
      if ((runs[i].*p.series).empty()) continue;
      const std::string data = dir + "/run" + std::to_string(i) + "_" + std::to_string(k) + ".dat";
      write_series(data, runs[i].*p.series, by_step);
      // gnuplot has 8 default colours: runs 9-16 repeat them dashed, and so on
      curves.push_back(quoted(data) + " using 1:2 with " + p.style + " lc " + std::to_string(i % 8 + 1) + " dt " +
                       std::to_string(i / 8 + 1) + " title " + quoted(runs[i].label));
    }
    if (curves.empty()) {  // an empty panel says why
      s << "set label 1 " << quoted(std::string("no ") + p.title + " records") << " at graph 0.5,0.5 center\n"
        << "set xrange [0:1]\nset yrange [0:1]\nplot NaN notitle\nunset label 1\nset autoscale\n";
      continue;
    }
    s << "plot ";
    for (size_t c = 0; c < curves.size(); ++c) s << (c ? ", \\\n     " : "") << curves[c];
    s << "\n";
  }
  s << "unset multiplot\nset output\n";
  return s.str();
}

// Width and height from a PNG's signature and IHDR chunk; false when the file is not a PNG.
bool png_size(const std::string& path, uint32_t* width, uint32_t* height) {
  std::ifstream f(path, std::ios::binary);
  unsigned char b[24];
  if (!f.read(reinterpret_cast<char*>(b), sizeof b)) return false;
  static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (std::memcmp(b, sig, 8) != 0 || std::memcmp(b + 12, "IHDR", 4) != 0) return false;
  auto be32 = [](const unsigned char* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; };
  *width = be32(b + 16);
  *height = be32(b + 20);
  return *width > 0 && *height > 0;
}

// Runs `gnuplot -d script` (no init files), its output into `log`; returns its exit status.
int run_gnuplot(const std::string& script, const std::string& log, const std::string& png) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  std::vector<std::string> args = {FLAGS_gnuplot, "-d", script};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid;
  const int err = posix_spawnp(&pid, FLAGS_gnuplot.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (err == ENOENT)
    throw_error("cannot draw ", png, ": gnuplot is not installed (no '", FLAGS_gnuplot, "' on the PATH); install "
                "the Debian package gnuplot-nox (tools/setup.sh does) or name the program with --gnuplot");
  if (err != 0) throw_error("cannot draw ", png, ": cannot start ", FLAGS_gnuplot, ": ", std::strerror(err));
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) throw_error("waiting for ", FLAGS_gnuplot, ": ", std::strerror(errno));
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int plot_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (argc > 1) throw_error("unexpected argument '", argv[1], "' (flags are --name=value)");
  const std::vector<std::string> paths = split_flag_list(FLAGS_runs);
  if (paths.empty()) throw_error("--runs is required: run directories (train --ckpt_dir), comma-separated");
  if (FLAGS_out.empty()) throw_error("--out is required: the PNG file to write");
  if (FLAGS_x != "tokens" && FLAGS_x != "step") throw_error("--x (", FLAGS_x, ") must be tokens or step");
  if (FLAGS_plot_width < 100 || FLAGS_plot_width > 10000 || FLAGS_plot_height < 100 || FLAGS_plot_height > 10000)
    throw_error("--plot_width and --plot_height (", FLAGS_plot_width, " x ", FLAGS_plot_height,
                ") must be in [100, 10000]");
  const std::vector<std::string> labels = split_flag_list(FLAGS_labels);
  if (!labels.empty() && labels.size() != paths.size())
    throw_error("--labels has ", labels.size(), " labels for ", paths.size(), " runs");
  std::vector<Run> runs;
  for (size_t i = 0; i < paths.size(); ++i) {
    runs.push_back(read_run(paths[i]));
    if (!labels.empty()) runs.back().label = labels[i];
  }

  std::string tmpl = (fs::temp_directory_path() / "difftron_plot_XXXXXX").string();
  if (!mkdtemp(tmpl.data())) throw_error("plot: cannot make a temporary folder: ", std::strerror(errno));
  const std::string dir = tmpl, script = dir + "/plot.gp", log = dir + "/gnuplot.log", png = dir + "/plot.png";
  {
    std::ofstream f(script);
    f << gnuplot_script(runs, dir, png, FLAGS_x == "step");
    if (!f.flush()) throw_error("plot: cannot write ", script);
  }
  int status = 0;
  try {
    status = run_gnuplot(script, log, FLAGS_out);
  } catch (const Error&) {  // no gnuplot: nothing to look at in the folder
    std::error_code ec;
    fs::remove_all(dir, ec);
    throw;
  }
  std::ifstream lf(log);
  std::stringstream messages;
  messages << lf.rdbuf();
  uint32_t w = 0, h = 0;
  if (status != 0 || !png_size(png, &w, &h))
    throw_error("gnuplot ", status != 0 ? "failed (exit status " + std::to_string(status) + ")" : "wrote no PNG",
                " drawing ", FLAGS_out, "; its script and data are in ", dir, ", its messages:\n", messages.str());
  std::error_code ec;
  fs::rename(png, FLAGS_out, ec);
  if (ec) {  // another file system: copy
    ec.clear();
    fs::copy_file(png, FLAGS_out, fs::copy_options::overwrite_existing, ec);
    if (ec) throw_error("cannot write ", FLAGS_out, ": ", ec.message(), " (the picture is ", png, ")");
  }
  fs::remove_all(dir, ec);
  std::cout << "plot: wrote " << FLAGS_out << " (" << w << " x " << h << ", " << runs.size() << " run"
            << (runs.size() > 1 ? "s" : "") << ": training loss, validation loss and tokens/s against " << FLAGS_x
            << ")\n";
  return 0;
}

}  // namespace
}  // namespace difftron

DIFFTRON_COMMAND("plot", "draw runs' loss and throughput from their metrics.jsonl into a PNG (gnuplot)",
                 difftron::plot_main);
