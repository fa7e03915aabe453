// safetensors read/write: see safetensors.h.
#include "io/safetensors.h"

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

void write_safetensors(const std::string& path, const std::map<std::string, HostTensor>& tensors) {
  nlohmann::json j;
  j["__metadata__"] = {{"format", "pt"}, {"writer", "difftron"}};
  uint64_t offset = 0;
  for (auto& [name, t] : tensors) {
    uint64_t bytes = t.data.size() * 4;
    j[name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
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
    for (auto& [name, t] : tensors) f.write(reinterpret_cast<const char*>(t.data.data()), t.data.size() * 4);
    if (!f.flush()) throw_error(tmp, ": write failed (disk full?)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw_error(path, ": cannot rename from ", tmp);
}

}  // namespace difftron
