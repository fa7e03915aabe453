// safetensors read/write: see safetensors.h.
#include "io/safetensors.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "base/bf16.h"
#include "base/error.h"
#include "base/tensor.h"

namespace difftron {
namespace {

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      u = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000 | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

std::map<std::string, HostTensor> read_safetensors(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw_error(path, ": cannot open");
  f.seekg(0, std::ios::end);
  const uint64_t file_size = f.tellg();
  f.seekg(0);
  uint64_t header_len = 0;
  if (file_size < 8 || !f.read(reinterpret_cast<char*>(&header_len), 8))
    throw_error(path, ": not a safetensors file (shorter than its 8-byte header length)");
  if (header_len > file_size - 8)
    throw_error(path, ": header length ", header_len, " exceeds the file size ", file_size, " (truncated?)");
  std::string header(header_len, '\0');
  f.read(header.data(), header_len);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(header);
  } catch (const nlohmann::json::exception& e) {
    throw_error(path, ": bad safetensors header: ", e.what());
  }
  if (!j.is_object()) throw_error(path, ": bad safetensors header: not a JSON object");
  const uint64_t data_start = 8 + header_len;
  std::map<std::string, HostTensor> out;
  for (auto& [name, info] : j.items()) {
    if (name == "__metadata__") continue;
    // The header is untrusted: every size is checked against the file before it sizes an
    // allocation (negative or overflowing shapes, offsets past the end).
    std::string dtype;
    HostTensor t;
    uint64_t begin = 0, end = 0;
    try {
      dtype = info.at("dtype").get<std::string>();
      t.shape = info.at("shape").get<std::vector<int64_t>>();
      begin = info.at("data_offsets").at(0).get<uint64_t>();
      end = info.at("data_offsets").at(1).get<uint64_t>();
    } catch (const nlohmann::json::exception& e) {
      throw_error(path, ": tensor '", name, "' has a malformed header entry: ", e.what());
    }
    size_t elem = dtype == "F32" ? 4 : dtype == "F64" ? 8 : (dtype == "BF16" || dtype == "F16") ? 2 : 0;
    if (elem == 0) throw_error(path, ": tensor '", name, "' has unsupported dtype ", dtype);
    int64_t n = 1;
    for (int64_t d : t.shape) {
      if (d < 0 || (d > 0 && n > int64_t(file_size / elem) / d))
        throw_error(path, ": tensor '", name, "' has shape ", shape_str(t.shape), ", more than the file holds");
      n *= d;
    }
    if (end < begin || end - begin != uint64_t(n) * elem || end > file_size - data_start)
      throw_error(path, ": tensor '", name, "' has data offsets [", begin, ", ", end,
                  ") that do not fit its shape or the file (truncated?)");
    std::vector<char> raw(end - begin);
    f.seekg(data_start + begin);
    f.read(raw.data(), raw.size());
    t.data.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      const char* p = raw.data() + i * elem;
      if (dtype == "F32") {
        std::memcpy(&t.data[i], p, 4);
      } else if (dtype == "F64") {
        double d;
        std::memcpy(&d, p, 8);
        t.data[i] = float(d);
      } else {
        uint16_t h;
        std::memcpy(&h, p, 2);
        t.data[i] = dtype == "BF16" ? bf16_to_float(h) : f16_to_f32(h);
      }
    }
    out.emplace(name, std::move(t));
  }
  return out;
}

const char* store_dtype_name(StoreDType t) { return t == StoreDType::BF16 ? "BF16" : "F32"; }

StoreDType parse_store_dtype(const std::string& s) {
  if (s == "f32" || s == "float32") return StoreDType::F32;
  if (s == "bf16" || s == "bfloat16") return StoreDType::BF16;
  throw_error("dtype '", s, "' is not one of bf16, f32");
}

int64_t store_dtype_bytes(StoreDType t) { return t == StoreDType::BF16 ? 2 : 4; }

void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors, StoreDType dtype) {
  const uint64_t elem = uint64_t(store_dtype_bytes(dtype));
  nlohmann::json j;
  j["__metadata__"] = {{"format", "pt"}, {"writer", "difftron"}};
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (j.contains(name)) throw_error(path, ": tensor '", name, "' given twice");
    const uint64_t bytes = t.data.size() * elem;
    j[name] = {{"dtype", store_dtype_name(dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header = j.dump();
  header.append((8 - header.size() % 8) % 8, ' ');  // align the data to 8 bytes
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw_error(tmp, ": cannot create");
    uint64_t len = header.size();
    f.write(reinterpret_cast<const char*>(&len), 8);
    f.write(header.data(), header.size());
    std::vector<uint16_t> half;
    for (const auto& [name, t] : tensors) {
      if (dtype == StoreDType::F32) {
        f.write(reinterpret_cast<const char*>(t.data.data()), t.data.size() * 4);
      } else {
        half.resize(t.data.size());
        for (size_t i = 0; i < half.size(); ++i) half[i] = float_to_bf16(t.data[i]);
        f.write(reinterpret_cast<const char*>(half.data()), half.size() * 2);
      }
    }
    if (!f.flush()) throw_error(tmp, ": write failed (disk full?)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw_error(path, ": cannot rename from ", tmp);
}

void write_safetensors(const std::string& path, const std::map<std::string, HostTensor>& tensors, StoreDType dtype) {
  std::vector<NamedTensor> v;
  v.reserve(tensors.size());
  for (const auto& [name, t] : tensors) v.push_back({name, t});
  write_safetensors(path, v, dtype);
}

namespace {

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";

std::string shard_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

}  // namespace

bool is_safetensors_model_file(const std::string& name) {
  if (name == kSingleFile || name == kIndexFile) return true;
  unsigned a = 0, b = 0;
  char tail[32] = {0};
  // model-00001-of-00002.safetensors
  return name.size() == std::strlen("model-00001-of-00002.safetensors") &&
         std::sscanf(name.c_str(), "model-%5u-of-%5u.%31s", &a, &b, tail) == 3 &&
         std::string(tail) == "safetensors" && shard_name(a - 1, b) == name;
}

std::map<std::string, HostTensor> read_safetensors_model(const std::string& dir) {
  const std::string single = dir + "/" + kSingleFile, index = dir + "/" + kIndexFile;
  if (std::ifstream(single).good()) return read_safetensors(single);
  std::ifstream f(index);
  if (!f)
    throw_error(dir, ": has neither ", kSingleFile, " nor ", kIndexFile,
                " (only safetensors weights are read; a pytorch_model.bin folder must be re-saved with "
                "safe_serialization)");
  std::map<std::string, std::string> weight_map;  // tensor -> shard file
  try {
    const nlohmann::json j = nlohmann::json::parse(f);
    weight_map = j.at("weight_map").get<std::map<std::string, std::string>>();
  } catch (const nlohmann::json::exception& e) {
    throw_error(index, ": not a safetensors index (", e.what(), ")");
  }
  if (weight_map.empty()) throw_error(index, ": weight_map is empty");
  std::map<std::string, std::vector<std::string>> by_file;
  for (const auto& [tensor, file] : weight_map) {
    // The index is untrusted: shards must be files beside it, not paths elsewhere.
    if (file.empty() || file.find('/') != std::string::npos || file.find('\\') != std::string::npos ||
        file == "." || file == "..")
      throw_error(index, ": tensor '", tensor, "' maps to '", file, "', which is not a file name in ", dir);
    by_file[file].push_back(tensor);
  }
  std::map<std::string, HostTensor> out;
  for (auto& [file, names] : by_file) {
    const std::string path = dir + "/" + file;
    auto shard = read_safetensors(path);
    for (const auto& name : names) {
      auto it = shard.find(name);
      if (it == shard.end()) throw_error(index, ": lists tensor '", name, "' in ", file, ", which does not hold it");
    }
    for (auto& [name, t] : shard) {
      if (!weight_map.count(name) || weight_map.at(name) != file) continue;  // not indexed here: unused
      out.emplace(name, std::move(t));
    }
  }
  return out;
}

std::vector<std::string> write_safetensors_model(const std::string& dir, const std::vector<NamedTensor>& tensors,
                                                 StoreDType dtype, int64_t max_shard_bytes) {
  if (max_shard_bytes <= 0) throw_error("max_shard_bytes (", max_shard_bytes, ") must be positive");
  const int64_t elem = store_dtype_bytes(dtype);
  int64_t total = 0;
  std::vector<std::pair<size_t, size_t>> shards;  // [begin, end) of `tensors`
  int64_t in_shard = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t bytes = int64_t(tensors[i].tensor.data.size()) * elem;
    if (shards.empty() || (in_shard > 0 && in_shard + bytes > max_shard_bytes)) {
      shards.push_back({i, i});
      in_shard = 0;
    }
    shards.back().second = i + 1;
    in_shard += bytes;
    total += bytes;
  }
  if (shards.size() <= 1) {
    write_safetensors(dir + "/" + kSingleFile, tensors, dtype);
    return {kSingleFile};
  }
  std::vector<std::string> files;
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string name = shard_name(s, shards.size());
    std::vector<NamedTensor> part(tensors.begin() + shards[s].first, tensors.begin() + shards[s].second);
    write_safetensors(dir + "/" + name, part, dtype);
    for (const auto& t : part) weight_map[t.name] = name;
    files.push_back(name);
  }
  const nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  const std::string path = dir + "/" + kIndexFile, tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << index.dump(2) << "\n";
    if (!f.flush()) throw_error(tmp, ": write failed (disk full?)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw_error(path, ": cannot rename from ", tmp);
  files.push_back(kIndexFile);
  return files;
}

int64_t parse_byte_size(const std::string& s, const std::string& what) {
  size_t used = 0;
  double v = -1;
  try {
    v = std::stod(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  std::string unit = s.substr(used);
  for (auto& ch : unit) ch = char(std::toupper(static_cast<unsigned char>(ch)));
  static const std::map<std::string, double> kUnits = {
      {"", 1},       {"B", 1},          {"KB", 1e3},          {"MB", 1e6},          {"GB", 1e9},
      {"TB", 1e12},  {"KIB", 1024.0},   {"MIB", 1048576.0},   {"GIB", 1073741824.0}};
  auto it = kUnits.find(unit);
  if (used == 0 || it == kUnits.end() || !(v > 0) || v * it->second > 9e18)
    throw_error(what, " '", s, "' is not a positive size (bytes, or with a unit: KB, MB, GB, KiB, MiB, GiB)");
  return std::max<int64_t>(1, int64_t(v * it->second));
}

}  // namespace difftron
