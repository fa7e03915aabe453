// `difftron needles`: writes multi-needle retrieval tasks in the paper's format ("The magic
// number of CITY is NUMBER." in filler text; docs/EVAL.md): for every context length and depth,
// --needle_samples samples of N needles of which R are asked for. --needle_format=prompts writes
// one JSON line per sample (prompts, answers, cities, and spans: the byte range of each queried
// needle's sentence in its prompt; `difftron eval --task=needles|noise`); text writes
// each queried sequence with its answer, one per paragraph, for a training mixture.
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>
#include <vector>

#include <gflags/gflags.h>
#include <nlohmann/json.hpp>

#include "core/eval_tasks.h"
#include "io/tokenizer.h"
#include "launch/command.h"

DEFINE_string(needle_out, "", "needles: the file to write");
DEFINE_string(needle_format, "prompts", "needles: prompts (JSON lines for eval --task=needles) | text (training text)");
DEFINE_string(needle_tokenizer, "bytes", "needles: the tokenizer lengths are counted with: bytes or a tokenizer.json file");
DEFINE_string(needle_lengths, "512", "needles: prompt lengths in tokens, comma-separated");
DEFINE_string(needle_depths, "0,0.25,0.5,0.75,1", "needles: depths of the queried needles in the filler, comma-separated");
DEFINE_int64(needle_count, 6, "needles: N, needles in each context");
DEFINE_int64(needle_queries, 2, "needles: R, needles asked for (one prompt each)");
DEFINE_int64(needle_samples, 10, "needles: samples of each length and depth");
DEFINE_int32(needle_digits, 7, "needles: digits of each magic number");
DEFINE_uint64(needle_seed, 1, "needles: seed of the samples");

namespace difftron {
namespace {

std::vector<double> parse_numbers(const std::string& flag, const std::string& list) {
  std::vector<double> out;
  std::stringstream ss(list);
  for (std::string item; std::getline(ss, item, ',');) {
    const std::optional<double> v = parse_whole<double>(item);
    if (!v) throw_error("--", flag, ": '", item, "' is not a number");
    out.push_back(*v);
  }
  if (out.empty()) throw_error("--", flag, " is empty");
  return out;
}

int needles_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (FLAGS_needle_out.empty()) throw_error("--needle_out: give the file to write");
  if (FLAGS_needle_format != "prompts" && FLAGS_needle_format != "text")
    throw_error("--needle_format (", FLAGS_needle_format, ") must be prompts or text");
  if (FLAGS_needle_samples <= 0) throw_error("--needle_samples (", FLAGS_needle_samples, ") must be positive");
  const std::unique_ptr<Tokenizer> tok = load_tokenizer(FLAGS_needle_tokenizer);
  const auto count = [&](const std::string& text) { return int64_t(tok->encode(text).size()); };
  const std::vector<double> lengths = parse_numbers("needle_lengths", FLAGS_needle_lengths);
  const std::vector<double> depths = parse_numbers("needle_depths", FLAGS_needle_depths);
  std::ofstream out(FLAGS_needle_out);
  if (!out) throw_error("--needle_out=", FLAGS_needle_out, ": cannot open for writing");
  int64_t written = 0;
  uint64_t sample_seed = FLAGS_needle_seed * 1000003;
  for (double length : lengths) {
    if (length < 1 || length != double(int64_t(length)))
      throw_error("--needle_lengths: ", length, " is not a positive whole number of tokens");
    for (double depth : depths)
      for (int64_t i = 0; i < FLAGS_needle_samples; ++i) {
        NeedleOptions o;
        o.context_tokens = int64_t(length);
        o.depth = depth;
        o.needles = FLAGS_needle_count;
        o.queries = FLAGS_needle_queries;
        o.digits = FLAGS_needle_digits;
        o.seed = ++sample_seed;
        const NeedleSample s = make_needle_sample(o, count);
        if (FLAGS_needle_format == "text") {
          for (size_t q = 0; q < s.prompts.size(); ++q) out << s.prompts[q] << " " << s.answers[q] << ".\n\n";
        } else {
          nlohmann::json j;
          j["context_tokens"] = o.context_tokens;
          j["depth"] = depth;
          j["needles"] = o.needles;
          j["queries"] = o.queries;
          j["seed"] = o.seed;
          j["prompts"] = s.prompts;
          j["answers"] = s.answers;
          j["cities"] = s.queried_cities;
          j["spans"] = s.spans;  // byte range of each queried needle's sentence in its prompt
          j["prompt_tokens"] = count(s.prompts.front());
          out << j.dump() << "\n";
        }
        ++written;
      }
  }
  out.close();
  if (!out) throw_error("--needle_out=", FLAGS_needle_out, ": write failed");
  std::cout << "needles: " << written << " samples (" << FLAGS_needle_count << " needles, " << FLAGS_needle_queries
            << " queried) written to " << FLAGS_needle_out << "\n";
  return 0;
}

}  // namespace
}  // namespace difftron

DIFFTRON_COMMAND("needles", "writes multi-needle retrieval tasks (the magic number of CITY) for eval --task=needles",
                 difftron::needles_main);
