// Commands that write must not destroy what is already there, and commands that read a
// file or a number must refuse insane ones up front: `prepare --overwrite` replaces only
// a dataset prepare wrote, `convert` never writes into a training run's checkpoint root and
// replaces an export only with --overwrite, `generate` refuses a model larger than the host's
// memory, numbers outside their range and a tokenizer recorded as a path. Each refusal exits 1 naming the flag, file or value.
// `train --ckpt_dir` records the run in that directory: metrics.jsonl (start, steps with the
// window-mean loss, evaluations, checkpoints, end; resumes append) and a log file per rank.
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/run_command.h"

namespace {

namespace fs = std::filesystem;
using Result = difftron::testing::CommandResult;
Result run(const std::string& args) { return difftron::testing::run_difftron(args); }
bool has(const Result& r, const std::string& s) { return r.output.find(s) != std::string::npos; }

const std::string kHf = std::string(DIFFTRON_SOURCE_DIR) + "/tests/data/hf_diffllama_gqa";

// A fresh folder for one test, removed at the end.
struct Scratch {
  std::string path;
  explicit Scratch(const std::string& name)
      : path((fs::temp_directory_path() / ("difftron_cli_out_" + name + "_" + std::to_string(getpid()))).string()) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~Scratch() { fs::remove_all(path); }
  std::string operator/(const std::string& s) const { return path + "/" + s; }
};

void write_text(const std::string& path, const std::string& s) { std::ofstream(path) << s; }
std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

TEST(CliOutputs, PrepareOverwriteReplacesOnlyItsOwnDatasets) {
  Scratch s("prepare");
  write_text(s / "a.txt", "some text for a dataset");
  fs::create_directories(s / "mine");
  write_text(s / "mine/precious.txt", "keep me");
  auto r = run("prepare --progress=false --val_fraction=0 --input=" + s / "a.txt" + " --out=" + s / "mine --overwrite");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--overwrite: " + s / "mine" + " is not a dataset written by difftron prepare")) << r.output;
  EXPECT_EQ(read_text(s / "mine/precious.txt"), "keep me");
  r = run("prepare --progress=false --val_fraction=0 --input=" + s / "a.txt" + " --out=" + s.path + " --overwrite");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "is the input")) << r.output;
  r = run("prepare --progress=false --val_fraction=0 --input=" + s / "a.txt" + " --out=" + s / "ds");
  ASSERT_EQ(r.status, 0) << r.output;
  r = run("prepare --progress=false --val_fraction=0 --input=" + s / "a.txt" + " --out=" + s / "ds --overwrite");
  EXPECT_EQ(r.status, 0) << r.output;
  r = run("prepare --input=" + s / "a.txt" + " --out=" + s / "x --jobs=100000");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--jobs (100000) must be in [0, 1024]")) << r.output;
  r = run("prepare --input=" + s / "a.txt" + " --out=" + s / "x --shard_tokens=99999999999999999");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--shard_tokens (99999999999999999) must be in [1, 2^40]")) << r.output;
}

TEST(CliOutputs, ConvertNeverWritesIntoATrainingRun) {
  Scratch s("ckpt");
  auto r = run("convert --from_hf=" + kHf + " --to_checkpoint=" + s / "run");
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string latest = read_text(s / "run/latest");
  r = run("convert --from_hf=" + kHf + " --to_checkpoint=" + s / "run");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--to_checkpoint=" + s / "run" + " already holds a training run's checkpoints")) << r.output;
  EXPECT_TRUE(has(r, "choose an empty or new directory")) << r.output;
  EXPECT_EQ(read_text(s / "run/latest"), latest);
  // step_* folders alone (a run whose `latest` is missing) count too.
  fs::create_directories(s / "run2/step_00000100");
  r = run("convert --from_hf=" + kHf + " --to_checkpoint=" + s / "run2");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "(step_00000100)")) << r.output;
  EXPECT_FALSE(fs::exists(s / "run2/latest"));
}

TEST(CliOutputs, ConvertToHfReplacesAFolderOnlyWithOverwrite) {
  Scratch s("hf");
  ASSERT_EQ(run("convert --from_hf=" + kHf + " --to_checkpoint=" + s / "ck").status, 0);
  fs::create_directories(s / "empty");
  auto r = run("convert --checkpoint=" + s / "ck --to_hf=" + s / "empty");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(s / "empty/model.safetensors"));
  fs::create_directories(s / "hf");
  write_text(s / "hf/notes.txt", "mine");
  write_text(s / "hf/config.json", "old");
  r = run("convert --checkpoint=" + s / "ck --to_hf=" + s / "hf");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--to_hf=" + s / "hf" + " is not empty")) << r.output;
  EXPECT_TRUE(has(r, "--overwrite")) << r.output;
  EXPECT_EQ(read_text(s / "hf/config.json"), "old");
  r = run("convert --checkpoint=" + s / "ck --to_hf=" + s / "hf --overwrite");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_text(s / "hf/notes.txt"), "mine");  // other files stay
  EXPECT_NE(read_text(s / "hf/config.json").find("diffllama"), std::string::npos);
  EXPECT_EQ(read_text(s / "hf/config.json"), read_text(s / "empty/config.json"));
  for (const auto& e : fs::directory_iterator(s.path))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
  r = run("convert --help");
  EXPECT_TRUE(has(r, "--overwrite")) << "the flag is documented";
}

TEST(CliOutputs, GenerateRefusesInsaneNumbersAndModelsLargerThanMemory) {
  Scratch s("gen");
  ASSERT_EQ(run("convert --from_hf=" + kHf + " --to_checkpoint=" + s / "ck").status, 0);
  auto r = run("generate --device=cpu --checkpoint=" + s / "ck --prompt_ids=1,99999999999");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--prompt_ids: '99999999999' is not a token id in [0, ")) << r.output;
  r = run("generate --device=cpu --checkpoint=" + s / "ck --prompt_ids=1 --max_new_tokens=-5");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--max_new_tokens (-5) must be in [0, 1000000]")) << r.output;
  // A checkpoint whose config claims ~8.8e12 parameters (meta.json is all it takes to read).
  std::string name = read_text(s / "ck/latest");  // "step_00000000\n"
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  const std::string dir = s / ("ck/" + name);
  ASSERT_TRUE(fs::exists(dir + "/meta.json")) << dir;
  nlohmann::json j = nlohmann::json::parse(read_text(dir + "/meta.json"));
  // A tokenizer recorded as a path (train records "bytes" or the JSON text) is not opened.
  j["extra"]["tokenizer"] = "/etc/passwd";
  std::ofstream(dir + "/meta.json") << j.dump(2);
  r = run("generate --device=cpu --checkpoint=" + s / "ck --prompt=x");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "its tokenizer is neither \"bytes\" nor tokenizer.json text ('/etc/passwd')")) << r.output;
  j["extra"].erase("tokenizer");
  auto& c = j["model_config"];
  c["vocab_size"] = int64_t(1) << 30;
  c["d_model"] = 4096;
  c["n_heads"] = 32;
  c["n_kv_heads"] = 32;
  c["head_dim"] = 64;
  c["ffn_dim"] = 11008;
  std::ofstream(dir + "/meta.json") << j.dump(2);
  if (read_text("/proc/meminfo").find("MemAvailable:") == std::string::npos) GTEST_SKIP() << "no MemAvailable";
  r = run("generate --device=cpu --checkpoint=" + s / "ck --prompt_ids=1");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "8796700177536 parameters x 4 bytes")) << r.output;
  EXPECT_TRUE(has(r, "GiB available (MemAvailable)")) << r.output;
  r = run("convert --checkpoint=" + s / "ck --to_hf=" + s / "hf");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "GiB of host memory")) << r.output;
  EXPECT_FALSE(fs::exists(s / "hf"));
}

// ---- train --ckpt_dir: the run directory's records -------------------------------------

using Json = nlohmann::json;

// Every line of ROOT/metrics.jsonl, parsed (a line that does not parse fails the test).
std::vector<Json> read_metrics(const std::string& root) {
  std::ifstream f(root + "/metrics.jsonl");
  std::vector<Json> out;
  std::string line;
  for (int n = 1; std::getline(f, line); ++n) {
    try {
      out.push_back(Json::parse(line));
    } catch (const Json::exception& e) {
      ADD_FAILURE() << root << "/metrics.jsonl line " << n << " does not parse: " << e.what() << "\n" << line;
    }
  }
  return out;
}

std::vector<Json> events(const std::vector<Json>& records, const std::string& event) {
  std::vector<Json> out;
  for (const Json& r : records)
    if (r.value("event", "") == event) out.push_back(r);
  return out;
}

const std::string kTrain =
    "train --device=cpu --data=synthetic:copy --seq=16 --batch=4 --d_model=32 --n_heads=2 --n_layers=2 "
    "--warmup=2 --eval_batches=2 ";

TEST(CliOutputs, TrainRecordsTheRunInItsDirectory) {
  Scratch s("metrics");
  // A: every step logged, so its records give each step's loss
  auto r = run(kTrain + "--steps=12 --log_every=1 --eval_every=6 --ckpt_every=4 --ckpt_dir=" + s / "a");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "start-up: config ")) << r.output;
  EXPECT_TRUE(has(r, "MFU n/a")) << r.output;
  const std::vector<Json> a = read_metrics(s / "a");
  ASSERT_FALSE(a.empty());
  for (const Json& rec : a) {
    EXPECT_TRUE(rec.contains("time") && rec.contains("elapsed_s")) << rec.dump();
    EXPECT_TRUE(rec.contains("event")) << rec.dump();
  }
  ASSERT_EQ(a.front().value("event", ""), "start");
  const Json& start = a.front();
  EXPECT_NE(start["command_line"].get<std::string>().find("--ckpt_dir=" + s / "a"), std::string::npos);
  EXPECT_EQ(start["flags"]["steps"], "12");
  EXPECT_EQ(start["flags"]["device"], "cpu");
  EXPECT_FALSE(start["flags"].contains("lr")) << "only flags that differ from the default";
  EXPECT_EQ(start["model_config"]["d_model"], 32);
  EXPECT_GT(start["parameters"].get<int64_t>(), 0);
  EXPECT_EQ(start["device"], "cpu");
  EXPECT_EQ(start["tokens_per_step"], 64);
  EXPECT_GT(start["plan_peak_bytes"].get<double>(), 0);
  EXPECT_EQ(start["resumed"], false);
  for (const char* phase : {"config", "allocation", "init", "first_step", "to_first_step"})
    EXPECT_GE(start["startup_s"].value(phase, -1.0), 0.0) << phase;
  EXPECT_FALSE(start["startup_s"].contains("load"));

  const std::vector<Json> steps = events(a, "step");
  ASSERT_EQ(steps.size(), 12u);
  std::vector<double> loss(13, 0.0);  // loss[k]: the loss of step k
  for (size_t i = 0; i < steps.size(); ++i) {
    const Json& st = steps[i];
    EXPECT_EQ(st["step"], int64_t(i + 1));
    EXPECT_EQ(st["window_steps"], 1);
    EXPECT_EQ(st["tokens"], int64_t(64 * (i + 1)));
    EXPECT_GT(st["tokens_per_s"].get<double>(), 0);
    EXPECT_GT(st["lr"].get<double>(), 0);
    EXPECT_GT(st["grad_norm"].get<double>(), 0);
    EXPECT_TRUE(st["mfu"].is_null()) << "no peak known on the CPU";
    EXPECT_TRUE(st.contains("mem_peak_bytes")) << st.dump();
    loss[i + 1] = st["loss"];
  }
  const std::vector<Json> evals = events(a, "eval");
  ASSERT_EQ(evals.size(), 2u);  // step 6 and the final one
  EXPECT_EQ(evals[0]["step"], 6);
  EXPECT_EQ(evals[0]["final"], false);
  EXPECT_EQ(evals[1]["step"], 12);
  EXPECT_EQ(evals[1]["final"], true);
  for (const Json& e : evals) {
    const double l = e["loss"];
    EXPECT_NEAR(e["perplexity"].get<double>(), std::exp(l), 1e-9 * std::exp(l));
    EXPECT_NEAR(e["bits_per_token"].get<double>(), l / std::log(2.0), 1e-12);
    EXPECT_EQ(e["tokens"], 2 * 4 * 16);
    EXPECT_FALSE(e.contains("bits_per_byte")) << "synthetic data has no tokenizer";
  }
  const std::vector<Json> ckpts = events(a, "checkpoint");
  ASSERT_EQ(ckpts.size(), 3u);
  int64_t ck_steps[3] = {4, 8, 12};
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(ckpts[i]["step"], ck_steps[i]);
    EXPECT_EQ(ckpts[i]["reason"], i < 2 ? "periodic" : "final");
    EXPECT_GE(ckpts[i]["stall_s"].get<double>(), 0);
    EXPECT_GE(ckpts[i]["write_s"].get<double>(), 0);
    const std::string meta_path = ckpts[i]["path"].get<std::string>() + "/meta.json";
    ASSERT_TRUE(fs::exists(meta_path)) << ckpts[i].dump();
    // every checkpoint records the command that made it, its changed flags and the config
    const Json meta = Json::parse(read_text(meta_path));
    EXPECT_EQ(meta["extra"]["command_line"], start["command_line"]) << meta.dump();
    EXPECT_EQ(meta["extra"]["changed_flags"], start["flags"]) << meta.dump();
    EXPECT_TRUE(meta.contains("model_config")) << meta.dump();
  }
  const Json& end = a.back();
  ASSERT_EQ(end.value("event", ""), "end");
  EXPECT_EQ(end["stop"], "done");
  EXPECT_EQ(end["steps"], 12);
  EXPECT_EQ(end["final_loss"].get<double>(), loss[12]);
  EXPECT_GT(end["tokens_per_s"].get<double>(), 0);
  EXPECT_TRUE(end.contains("mem_peak_bytes"));
  const std::string log = read_text(s / "a/logs/train_rank00000.log");
  EXPECT_TRUE(log.find("backend: cpu") != std::string::npos) << "lines logged before the directory was opened";
  EXPECT_TRUE(log.find("start-up: config") != std::string::npos) << log;
  EXPECT_TRUE(log.find("checkpoint written") != std::string::npos) << log;

  // B: the same run logged every 5 steps (and at the first and last step): each line's loss
  // is the mean of the step losses since the previous line; an MFU against a given peak.
  r = run(kTrain + "--steps=12 --log_every=5 --peak_tflops=0.001 --ckpt_dir=" + s / "b");
  ASSERT_EQ(r.status, 0) << r.output;
  const std::vector<Json> b = events(read_metrics(s / "b"), "step");
  ASSERT_EQ(b.size(), 4u);
  const int64_t window_end[4] = {1, 5, 10, 12};
  int64_t from = 1;
  for (size_t i = 0; i < 4; ++i) {
    double sum = 0;
    for (int64_t k = from; k <= window_end[i]; ++k) sum += loss[size_t(k)];
    const int64_t n = window_end[i] - from + 1;
    EXPECT_EQ(b[i]["step"], window_end[i]);
    EXPECT_EQ(b[i]["window_steps"], n);
    EXPECT_DOUBLE_EQ(b[i]["loss"].get<double>(), sum / double(n)) << "window ending at step " << window_end[i];
    EXPECT_NEAR(b[i]["mfu"].get<double>(), b[i]["tflops"].get<double>() / 0.001, 1e-9);
    from = window_end[i] + 1;
  }
  char mean[32];
  std::snprintf(mean, sizeof mean, "loss %.4f", (loss[11] + loss[12]) / 2);
  EXPECT_TRUE(has(r, std::string("step     12/12 | ") + mean)) << "the log line prints the window mean\n" << r.output;

  // Resuming A appends: the first run's lines stay as they were.
  const std::string before = read_text(s / "a/metrics.jsonl");
  r = run(kTrain + "--steps=16 --log_every=1 --ckpt_dir=" + s / "a");
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string after = read_text(s / "a/metrics.jsonl");
  ASSERT_GT(after.size(), before.size());
  EXPECT_EQ(after.substr(0, before.size()), before);
  const std::vector<Json> a2 = read_metrics(s / "a");
  const std::vector<Json> starts = events(a2, "start");
  ASSERT_EQ(starts.size(), 2u);
  EXPECT_EQ(starts[1]["resumed"], true);
  EXPECT_EQ(starts[1]["resume_step"], 12);
  EXPECT_GE(starts[1]["startup_s"].value("load", -1.0), 0.0);
  const std::vector<Json> steps2 = events(a2, "step");
  ASSERT_EQ(steps2.size(), 16u);
  EXPECT_EQ(steps2[12]["step"], 13);
  EXPECT_EQ(steps2[12]["tokens"], 13 * 64);
  EXPECT_EQ(events(a2, "end").size(), 2u);
}

TEST(CliOutputs, TrainRecordsAFailureAndSurvivesAnUnwritableMetricsFile) {
  Scratch s("metrics_fail");
  // a failure after the run directory was opened: an `end` record naming it, and the log
  auto r = run(kTrain + "--steps=2 --data=" + s / "missing --ckpt_dir=" + s / "run");
  ASSERT_EQ(r.status, 1) << r.output;
  const std::vector<Json> recs = read_metrics(s / "run");
  ASSERT_FALSE(recs.empty()) << r.output;
  EXPECT_EQ(recs.back()["event"], "end");
  EXPECT_EQ(recs.back()["stop"], "error");
  EXPECT_NE(recs.back()["error"].get<std::string>().find(s / "missing"), std::string::npos) << recs.back().dump();
  EXPECT_NE(read_text(s / "run/logs/train_rank00000.log").find("error: "), std::string::npos);
  // metrics.jsonl cannot be opened (a folder of that name): a warning, and the run trains on
  fs::create_directories(s / "run2/metrics.jsonl");
  r = run(kTrain + "--steps=3 --ckpt_dir=" + s / "run2");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "cannot open " + s / "run2/metrics.jsonl")) << r.output;
  EXPECT_TRUE(fs::exists(s / "run2/latest"));
}

}  // namespace
