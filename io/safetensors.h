// Reading and writing the safetensors format (an 8-byte little-endian header length, a JSON
// header of {name: {dtype, shape, data_offsets}}, then the raw little-endian data), as used
// by Hugging Face model directories. Tensors are converted to/from f32 on the host.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace difftron {

struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

// Reads every tensor (F32, F16, BF16 or F64 stored) as f32; throws difftron::Error naming the
// file and the problem (truncated, bad header, unsupported dtype, offsets out of range).
std::map<std::string, HostTensor> read_safetensors(const std::string& path);
// Writes f32 tensors (sorted by name) atomically: to path + ".tmp", then renamed.
void write_safetensors(const std::string& path, const std::map<std::string, HostTensor>& tensors);

}  // namespace difftron
