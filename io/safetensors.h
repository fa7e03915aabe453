// Reading and writing the safetensors format (an 8-byte little-endian header length, a JSON
// header of {name: {dtype, shape, data_offsets}}, then the raw little-endian data), as used
// by Hugging Face model directories. Tensors are converted to/from f32 on the host.
//
// A model folder holds its weights either in one model.safetensors or, above a size limit,
// in shards model-00001-of-0000N.safetensors listed by model.safetensors.index.json
// ({"metadata": {"total_size": bytes of tensor data}, "weight_map": {tensor: shard file}}).
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

struct NamedTensor {
  std::string name;
  HostTensor tensor;
};

// How tensors are stored in a written file (reading accepts more, see read_safetensors).
enum class StoreDType { F32, BF16 };
const char* store_dtype_name(StoreDType t);   // "F32" | "BF16" (the safetensors names)
StoreDType parse_store_dtype(const std::string& s);  // "f32" | "bf16"; throws difftron::Error
int64_t store_dtype_bytes(StoreDType t);

// Reads every tensor (F32, F16, BF16 or F64 stored) as f32; throws difftron::Error naming the
// file and the problem (truncated, bad header, unsupported dtype, offsets out of range).
std::map<std::string, HostTensor> read_safetensors(const std::string& path);
// Writes tensors in the order given, as `dtype` (bf16 rounds to nearest even), atomically: to
// path + ".tmp", then renamed. Names must be unique.
void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       StoreDType dtype = StoreDType::F32);
// The same for a name -> tensor map (written sorted by name).
void write_safetensors(const std::string& path, const std::map<std::string, HostTensor>& tensors,
                       StoreDType dtype = StoreDType::F32);

// The weights of a model folder: dir/model.safetensors when it exists (as transformers
// prefers it), else the shards named by dir/model.safetensors.index.json. Every tensor the
// index lists must be in its shard, and no tensor may appear twice.
std::map<std::string, HostTensor> read_safetensors_model(const std::string& dir);
// Writes `tensors` (in that order) into dir: one model.safetensors when their stored size is
// at most max_shard_bytes, else consecutive shards of at most max_shard_bytes each (a tensor
// larger than the limit gets a shard of its own) and the index. Returns the file names written.
std::vector<std::string> write_safetensors_model(const std::string& dir, const std::vector<NamedTensor>& tensors,
                                                 StoreDType dtype, int64_t max_shard_bytes);
// "5GB", "200MB", "64KB" (decimal units, as transformers' max_shard_size), "1GiB"/"1MiB"/"1KiB"
// or a plain byte count -> bytes; throws difftron::Error naming `what` on anything else.
int64_t parse_byte_size(const std::string& s, const std::string& what);

// True for the file names write_safetensors_model may write (model.safetensors, its index,
// model-NNNNN-of-NNNNN.safetensors): what an export replaces in a folder.
bool is_safetensors_model_file(const std::string& name);

}  // namespace difftron
