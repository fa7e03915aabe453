// Training checkpoints, sharded and reshardable (docs/CHECKPOINTS.md has the format).
// ROOT/step_00000100/ holds meta.json (format, model config, step, tokens seen, data
// position, the TP x DP layout that wrote it, the file list) and one HDF5 file per rank,
// rank_00000.h5 ... Each file stores the pieces of tensors that rank owned (named shard
// descriptors, core/checkpoint_state.h), under the tensor's full Hugging Face name, with an
// index dataset saying which elements of the full tensor each piece holds and its checksums:
// f32 master weights (w), AdamW moments (m, v). Every element of every tensor is stored once,
// so a run can resume on any TP x DP layout: each rank assembles the slices it needs.
//
// Durability: every rank writes, closes (checked) and fsyncs its file in ROOT/.tmp.step_N;
// the ranks agree that all succeeded; rank 0 then writes meta.json, fsyncs, swaps the
// directory into place and replaces ROOT/latest atomically (fsynced). Any failure throws
// difftron::Error naming the file and the OS error on every rank and leaves `latest` on the
// previous checkpoint. Readers treat files as untrusted: every index entry is checked against
// the model and the file's real size before anything is allocated.
//
// Asynchronous saves (AsyncCheckpointer): the same steps, with this rank's file written and
// fsynced on a background thread from a host copy of its pieces; the agreement and rank 0's
// publish (meta.json, rename, latest) run on the training thread in wait().
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/checkpoint_state.h"
#include "core/model.h"
#include "core/optimizer.h"

namespace difftron {

class ParallelContext;

// Where one rank's save or load spent its time (seconds; a field a call has no such phase for
// stays 0). The *_busy fields add up the worker threads' time, so they may exceed `seconds`.
struct CheckpointTimings {
  double seconds = 0;        // the whole call
  int64_t bytes = 0;         // bytes of arrays this rank read or wrote
  int threads = 0;           // worker threads that read, verified or hashed
  // load, on the calling thread
  double open = 0;           // meta.json, the rank files' indexes, which stored pieces fill what
  double wait = 0;           // waiting for the workers to read and verify the arrays needed next
  double upload = 0;         // assembling resharded slices, host -> device copies, conversions
  // save, on the thread that writes the file
  double download = 0;       // device -> host copies (a synchronous save's; a snapshot's is apart)
  double write = 0;          // writing the arrays and the index (HDF5)
  double sync = 0;           // closing and fsyncing the file
  double publish = 0;        // the ranks' agreement, meta.json, renames, `latest`
  // worker threads
  double read_busy = 0;      // load: reading arrays from the files
  double verify_busy = 0;    // load: checking checksums; save: computing them
};

struct CheckpointMeta {
  int64_t step = 0;            // optimizer steps completed
  int64_t tokens_seen = 0;
  uint64_t seed = 0;
  std::string data_position;   // BatchSource::position() of the training data (DP rank 0's)
  nlohmann::json extra;        // free-form (flags of the run, tokenizer spec, ...)
};

// Writes ROOT/step_<step>/ from this rank's pieces (collective over `parallel`; null: one
// process) and updates ROOT/latest; returns the checkpoint directory. `model_config` is
// stored in meta.json; `rank_data_position` is this rank's data position.
std::string write_checkpoint(const std::string& root, const CheckpointMeta& meta, const nlohmann::json& model_config,
                             const std::vector<ShardPiece>& pieces, bool has_optimizer, Ops& ops,
                             ParallelContext* parallel, int tp_rank, int dp_rank,
                             const std::string& rank_data_position, CheckpointTimings* timings = nullptr);
// The same for a model and its optimizer (null: weights only, e.g. for export). Synchronous:
// streams the arrays to the file through a bounded host buffer (checksums computed on worker
// threads meanwhile), so it needs no host copy of the whole state.
std::string save_checkpoint(const std::string& root, const CheckpointMeta& meta, Model& model,
                            AdamW* optimizer, ParallelContext* parallel = nullptr,
                            const std::string& rank_data_position = "", CheckpointTimings* timings = nullptr);

struct PendingSave;    // a save between its snapshot and its publish (io/checkpoint.cpp)
struct SnapshotArena;  // the host buffer snapshots are copied into, kept across saves

// Saves while training goes on, one save in flight at a time. start() copies this rank's
// pieces to host buffers (the only part the step loop waits for; host memory for one copy of
// this rank's state) and starts a thread that writes and fsyncs this rank's file; that thread
// touches no tensor, Ops or MPI, only HDF5 (written synchronously in start() where the HDF5
// library is not built thread-safe, as other threads may use it meanwhile). wait() joins that thread, then, on the calling thread, the ranks agree
// that every file is on disk and rank 0 publishes: MPI runs at MPI_THREAD_FUNNELED
// (parallel/mpi_comm.cpp), so only the thread that initialised it may call it. The durability
// is write_checkpoint's: `latest` moves only after every rank's file is on disk.
// Collective over `parallel` like write_checkpoint: every rank calls start() and wait() in the
// same order (start() first waits for the previous save).
class AsyncCheckpointer {
 public:
  AsyncCheckpointer();
  // Waits for a save in flight and publishes it; logs a failure instead of throwing. While an
  // exception unwinds a multi-rank run it only joins the writer: the other ranks may never
  // come to agree, so that save is left unpublished (`latest` stays on the previous one).
  ~AsyncCheckpointer();
  AsyncCheckpointer(const AsyncCheckpointer&) = delete;
  AsyncCheckpointer& operator=(const AsyncCheckpointer&) = delete;

  // Waits for the previous save (rethrowing its failure), makes ROOT/.tmp.step_N (collective),
  // snapshots this rank's pieces and starts the write. A snapshot failure is reported by wait().
  void start(const std::string& root, const CheckpointMeta& meta, Model& model, AdamW* optimizer,
             ParallelContext* parallel = nullptr, const std::string& rank_data_position = "");
  // Finishes the save in flight: joins the writer, agrees, publishes, calls on_published; returns
  // the checkpoint directory ("" when none was in flight). A failure on any rank throws
  // difftron::Error on every rank (naming the file and the OS error where it happened) and
  // leaves `latest` on the previous checkpoint; the checkpointer can then start again.
  std::string wait();
  // Allocates the host buffer snapshots need (page-locked where the backend can) on a
  // background thread, so that the first save's snapshot does not pay for it (for a 1.3B
  // model, 15.6 GB: seconds). The first start() waits for it if it has not finished.
  void prepare(Model& model, AdamW* optimizer, ParallelContext* parallel = nullptr);

  bool in_flight() const { return save_ != nullptr; }
  int64_t in_flight_step() const;  // the step of the save in flight, -1 if none
  double last_snapshot_seconds() const { return snapshot_seconds_; }
  // Called by wait() on every rank after a save is published: its directory, step and the seconds
  // its writing took (this rank's file, plus the agreement and publish; not the time the
  // finished write waited for wait()), e.g. to log or to prune old checkpoints.
  std::function<void(const std::string& dir, int64_t step, double write_seconds)> on_published;

 private:
  std::unique_ptr<SnapshotArena> arena_;  // declared first: destroyed after the save using it
  std::thread preparer_;                  // prepare()'s allocation
  std::unique_ptr<PendingSave> save_;
  std::thread writer_;
  double snapshot_seconds_ = 0;
};

// The directory ROOT/latest names, or "" when ROOT has no checkpoint yet.
std::string latest_checkpoint(const std::string& root);
// The model config stored in a checkpoint directory.
ModelConfig read_checkpoint_config(const std::string& dir);
// meta.json of a checkpoint directory, checked for format and version.
nlohmann::json read_checkpoint_meta(const std::string& dir);
// Fills `pieces` from a checkpoint (each array by its kind; "m"/"v" only when has_optimizer),
// verifying checksums and that every element is present. Worker threads read and verify the
// stored arrays ahead of the calling thread, which alone uploads (f32 values into bf16 tensors
// are converted on the device where the backend can). Nothing is read before every piece is
// known to be complete in the files' indexes.
void read_checkpoint_pieces(const std::string& dir, const std::vector<ShardPiece>& pieces, bool with_optimizer,
                            Ops& ops, CheckpointTimings* timings = nullptr);
// Loads weights (and, when `optimizer` is given, its master weights and moments) into a model
// built from read_checkpoint_config(dir), on whatever TP x DP layout the model and optimizer
// use. The returned data_position is this DP rank's own when the writing run had the same DP
// size, else DP rank 0's (a global position the token-dataset loader can re-slice).
CheckpointMeta load_checkpoint(const std::string& dir, Model& model, AdamW* optimizer,
                               ParallelContext* parallel = nullptr, CheckpointTimings* timings = nullptr);
// Every array's checksum in a checkpoint, keyed "file:group/kind": two checkpoints of the same
// layout hold bit-identical tensors exactly when these maps are equal.
std::map<std::string, std::string> checkpoint_digests(const std::string& dir);
// Removes all but the newest `keep` step_* directories under ROOT (never the one `latest`
// names); returns how many were removed.
int prune_checkpoints(const std::string& root, int keep);

}  // namespace difftron
