// The model flags and --model_config, combined (rules in launch/model_config.h).
#include "launch/model_config.h"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <vector>

#include <gflags/gflags.h>

#include "base/error.h"

// The model flags (launch/train.cpp defines them).
DECLARE_string(attention);
DECLARE_int64(vocab_size);
DECLARE_int64(d_model);
DECLARE_int64(n_layers);
DECLARE_int64(n_heads);
DECLARE_int64(n_kv_heads);
DECLARE_int64(head_dim);
DECLARE_int64(ffn_dim);

namespace difftron {
namespace {

bool flag_set(const char* name) { return !gflags::GetCommandLineFlagInfoOrDie(name).is_default; }

// The integer model flags and the fields they set (same names).
struct IntFlag {
  const char* name;
  const int64_t* value;
  int64_t ModelConfig::*field;
};
const std::vector<IntFlag>& int_flags() {
  static const std::vector<IntFlag> flags = {
      {"vocab_size", &FLAGS_vocab_size, &ModelConfig::vocab_size}, {"d_model", &FLAGS_d_model, &ModelConfig::d_model},
      {"n_layers", &FLAGS_n_layers, &ModelConfig::n_layers},       {"n_heads", &FLAGS_n_heads, &ModelConfig::n_heads},
      {"n_kv_heads", &FLAGS_n_kv_heads, &ModelConfig::n_kv_heads}, {"head_dim", &FLAGS_head_dim, &ModelConfig::head_dim},
      {"ffn_dim", &FLAGS_ffn_dim, &ModelConfig::ffn_dim}};
  return flags;
}

// The kind of JSON value a field holds, for messages.
const char* kind_of(const nlohmann::json& v) {
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer() || v.is_number_unsigned()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_null()) return "null";
  if (v.is_array()) return "an array";
  return "an object";
}

// `base`, then the file's fields, then the model flags given on the command line. Zeros are
// not resolved yet.
ModelConfig layered(const ModelConfigFile& file, const ModelConfig& base, int64_t seq) {
  nlohmann::json j = base;
  for (auto it = file.fields.begin(); it != file.fields.end(); ++it) j[it.key()] = it.value();
  ModelConfig c;
  try {
    c = j.get<ModelConfig>();
  } catch (const std::exception& e) {
    throw_error("--model_config: '", file.path, "': ", e.what());
  }
  for (const IntFlag& f : int_flags())
    if (flag_set(f.name)) c.*f.field = *f.value;
  if (flag_set("attention")) c.attention = parse_attention_kind(FLAGS_attention);
  if (file.has("max_seq_len")) c.max_seq_len = std::max(c.max_seq_len, seq);
  return c;
}

// The zeros that mean "follow another field", as the flags define them.
void resolve_zeros(ModelConfig& c, int64_t data_vocab) {
  if (c.vocab_size == 0) c.vocab_size = data_vocab;
  if (c.n_kv_heads == 0) c.n_kv_heads = c.n_heads;
}

}  // namespace

ModelConfigFile read_model_config_file(const std::string& path) {
  ModelConfigFile file;
  if (path.empty()) return file;
  file.path = path;
  std::ifstream f(path);
  if (!f) throw_error("--model_config: cannot open '", path, "'");
  try {
    file.fields = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw_error("--model_config: '", path, "' is not valid JSON: ", e.what());
  }
  if (!file.fields.is_object())
    throw_error("--model_config: '", path, "' holds ", kind_of(file.fields),
                ", not a JSON object of model config fields");
  // The fields are what a ModelConfig writes (a checkpoint's meta.json holds the same object).
  const nlohmann::json known = ModelConfig();
  std::vector<std::string> problems;
  for (auto it = file.fields.begin(); it != file.fields.end(); ++it) {
    const std::string& key = it.key();
    const nlohmann::json& v = it.value();
    if (!known.contains(key)) {
      problems.push_back("unknown field \"" + key + "\"");
      continue;
    }
    const nlohmann::json& like = known[key];
    const bool ok = like.is_boolean()           ? v.is_boolean()
                    : like.is_number_integer()  ? v.is_number_integer() || v.is_number_unsigned()
                    : like.is_number()          ? v.is_number()
                    : like.is_string()          ? v.is_string()
                                                : true;
    if (!ok) problems.push_back("field \"" + key + "\" must be " + kind_of(like) + ", not " + kind_of(v) + " (" + v.dump() + ")");
  }
  if (!problems.empty()) {
    std::ostringstream os;
    os << "--model_config: '" << path << "' is not a valid model config:";
    for (const std::string& p : problems) os << "\n  - " << p;
    os << "\nmodel config fields:";
    for (auto it = known.begin(); it != known.end(); ++it) os << " " << it.key();
    throw Error(os.str());
  }
  return file;
}

ModelConfig model_config_from_flags(const ModelConfigFile& file, int64_t data_vocab, int64_t seq) {
  // The flags' values (their defaults where not given) are the bottom layer.
  ModelConfig base;
  for (const IntFlag& f : int_flags()) base.*f.field = *f.value;
  base.attention = parse_attention_kind(FLAGS_attention);
  base.max_seq_len = seq;
  ModelConfig c = layered(file, base, seq);
  resolve_zeros(c, data_vocab);
  if (file.path.empty()) {
    c.resolve_and_validate();
    return c;
  }
  try {
    c.resolve_and_validate();
  } catch (const Error& e) {
    throw_error(e.what(), "\n(from --model_config=", file.path, " and the model flags given)");
  }
  return c;
}

std::string model_config_conflicts(const ModelConfigFile& file, const ModelConfig& model, int64_t seq,
                                   const std::string& existing) {
  // What was asked for, on top of the existing model: fields nobody set keep its values.
  ModelConfig want = layered(file, model, seq);
  resolve_zeros(want, model.vocab_size);
  try {
    want.resolve_and_validate();  // head_dim and ffn_dim 0: derived, as for a new model
  } catch (const Error&) {
    // an invalid combination still differs from the model: the fields that differ are listed
  }
  const nlohmann::json a = want, b = model;
  std::string lines;
  for (auto it = b.begin(); it != b.end(); ++it) {
    const std::string& key = it.key();
    if (!a.contains(key) || a[key] == it.value()) continue;
    const bool flag = (key == "attention" || key == "vocab_size" || key == "d_model" || key == "n_layers" ||
                       key == "n_heads" || key == "n_kv_heads" || key == "head_dim" || key == "ffn_dim") &&
                      flag_set(key.c_str());
    const std::string asked = a[key].is_string() ? a[key].get<std::string>() : a[key].dump();
    const std::string has = it.value().is_string() ? it.value().get<std::string>() : it.value().dump();
    if (flag)
      lines += "\n  --" + key + "=" + asked + ", " + existing + " has " + has;
    else if (file.has(key))
      lines += "\n  --model_config=" + file.path + " sets " + key + " to " + asked + ", " + existing + " has " + has;
    else
      lines += "\n  " + key + " follows from the fields above: " + asked + ", " + existing + " has " + has;
  }
  return lines;
}

}  // namespace difftron
