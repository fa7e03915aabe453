// What a training state consists of, as named shard descriptors: the pieces of each full
// tensor that this rank saves or fills on load, with the arrays that hold them (weights,
// AdamW moments). io/checkpoint.h reads and writes these without knowing how the model, the
// optimizer or ZeRO store them: the layout knowledge lives here, next to those classes.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "base/tensor.h"

namespace difftron {

class Model;
class AdamW;

// One array of a piece: "w" (f32 master weights, or the working weights), "m" or "v" (AdamW
// moments); `data` is a 1-D tensor of the piece's e1 - e0 elements. On load several arrays
// may share a kind (the working weights and their f32 master copy both take "w").
struct ShardArray {
  std::string kind;
  Tensor data;
};

// Elements [e0, e1) of this rank's slice of the full tensor `name` (row-major flat index into
// the slice). The slice is the whole tensor when shard_dim < 0, else
// [shard_begin, shard_begin + local_shape[shard_dim]) along dimension shard_dim.
struct ShardPiece {
  std::string name;
  Shape global_shape;
  Shape local_shape;
  int shard_dim = -1;
  int64_t shard_begin = 0;
  int64_t e0 = 0, e1 = 0;
  std::vector<ShardArray> arrays;
};

// The pieces this rank owns and saves: every element of every tensor is saved by exactly one
// rank of the grid (ZeRO: each DP rank its shard; replicated tensors by TP rank 0; without
// ZeRO, DP rank 0). `optimizer` null: weights only.
std::vector<ShardPiece> pieces_to_save(Model& model, AdamW* optimizer, int dp_rank);
// The pieces this rank must fill to resume: the whole local slice of every parameter (the
// working weights), and the optimizer's master weights and moments where this rank holds them.
std::vector<ShardPiece> pieces_to_load(Model& model, AdamW* optimizer);

}  // namespace difftron
