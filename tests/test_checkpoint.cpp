// Checkpoints: save at step 10, load into fresh objects, continue: the losses of steps 10..20
// equal an uninterrupted run's bit for bit. Damaged, forged or mismatched checkpoints fail
// clearly (an Error naming the file, never a crash or a huge allocation); an interrupted save
// leaves `latest` on the previous complete checkpoint; re-saving an existing step replaces it
// without a moment where `latest` names nothing; version-2 files (index as an attribute) load.
// The read path: the staging ring never overlaps live spans; verification on worker threads
// catches one flipped bit; resharded slices are assembled; bf16 targets are rounded to nearest even.
#include <algorithm>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <hdf5.h>
#include <nlohmann/json.hpp>

#include "base/bf16.h"
#include "base/ring_spans.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "core/trainer.h"
#include "io/checkpoint.h"
#include "io/synthetic_data.h"
#include "tests/checkpoint_test_util.h"

namespace fs = std::filesystem;

namespace difftron {
namespace {

ModelConfig cfg() { return testing::small_checkpoint_config(); }
using TrainingRun = testing::TrainingRunOf<20, 3>;

fs::path temp_root(const char* tag) {
  fs::path p = fs::temp_directory_path() / (std::string("difftron_ckpt_") + tag + "_" + std::to_string(getpid()));
  fs::remove_all(p);
  return p;
}

TEST(Checkpoint, ResumeContinuesBitForBit) {
  TrainingRun straight;
  straight.model.init_weights(1);
  auto full = Trainer(straight.model, straight.opt, *straight.data, nullptr, straight.to).run().losses;

  fs::path root = temp_root("resume");
  {
    TrainingRun first;
    first.model.init_weights(1);
    first.to.steps = 10;
    Trainer(first.model, first.opt, *first.data, nullptr, first.to).run();
    CheckpointMeta meta;
    meta.step = 10;
    meta.data_position = first.data->position();
    save_checkpoint(root.string(), meta, first.model, &first.opt);
  }
  TrainingRun second;
  second.model.init_weights(999);  // overwritten by the load
  std::string dir = latest_checkpoint(root.string());
  ASSERT_EQ(fs::path(dir).filename(), "step_00000010");
  CheckpointMeta meta = load_checkpoint(dir, second.model, &second.opt);
  EXPECT_EQ(meta.step, 10);
  second.data->restore_position(meta.data_position);
  auto rest = Trainer(second.model, second.opt, *second.data, nullptr, second.to).run(meta.step).losses;
  ASSERT_EQ(rest.size(), 10u);
  for (size_t i = 0; i < rest.size(); ++i) EXPECT_EQ(rest[i], full[10 + i]) << "step " << 10 + i;
  fs::remove_all(root);
}

TEST(Checkpoint, ChecksumMismatchIsReported) {
  fs::path root = temp_root("sum");
  TrainingRun r;
  r.model.init_weights(2);
  CheckpointMeta meta;
  meta.step = 1;
  std::string dir = save_checkpoint(root.string(), meta, r.model, &r.opt);
  {  // silent corruption: one stored value changes behind the checksum's back
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    hid_t f = H5Fopen((dir + "/rank_00000.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    hid_t ds = H5Dopen2(f, "model.norm.weight/tp0_e0/w", H5P_DEFAULT);
    ASSERT_GE(ds, 0);
    std::vector<float> w(32);
    ASSERT_GE(H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, w.data()), 0);
    w[7] += 0.5f;
    ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, w.data()), 0);
    H5Dclose(ds);
    H5Fclose(f);
  }
  try {
    load_checkpoint(dir, r.model, &r.opt);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("checksum mismatch for 'model.norm.weight/tp0_e0/w'"), std::string::npos)
        << e.what();
  }
  fs::remove_all(root);
}

TEST(Checkpoint, ModelConfigMismatchIsReported) {
  fs::path root = temp_root("cfg");
  TrainingRun r;
  CheckpointMeta meta;
  std::string dir = save_checkpoint(root.string(), meta, r.model, nullptr);
  ModelConfig other = cfg();
  other.n_layers = 3;
  auto ops = make_cpu_ops();
  Model m(other, *ops, ModelPrecision::uniform(DType::F32), 1, 4);
  try {
    load_checkpoint(dir, m, nullptr);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("differs from the model's"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_checkpoint_config(dir).n_layers, 2);
  fs::remove_all(root);
}

TEST(Checkpoint, InterruptedSaveLeavesLatestOnTheLastCompleteOne) {
  fs::path root = temp_root("atomic");
  TrainingRun r;
  CheckpointMeta meta;
  meta.step = 5;
  save_checkpoint(root.string(), meta, r.model, &r.opt);
  // a save of step 6 that died half-way: its temporary directory exists, `latest` untouched
  fs::create_directories(root / ".tmp.step_00000006");
  std::ofstream(root / ".tmp.step_00000006" / "tensors.h5") << "partial";
  EXPECT_EQ(fs::path(latest_checkpoint(root.string())).filename(), "step_00000005");
  // `latest` naming a directory that is gone is an error, not a silent fresh start
  std::ofstream(root / "latest") << "step_00000099\n";
  EXPECT_THROW(latest_checkpoint(root.string()), Error);
  EXPECT_EQ(latest_checkpoint((root / "nothing_here").string()), "");
  fs::remove_all(root);
}

// ---- forged files ---------------------------------------------------------------------------

// The rank file's piece index (a JSON dataset).
nlohmann::json read_index(const fs::path& file) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  hid_t ds = H5Dopen2(f, "index", H5P_DEFAULT);
  hid_t sp = H5Dget_space(ds);
  std::string text(H5Sget_simple_extent_npoints(sp), '\0');
  H5Dread(ds, H5T_NATIVE_UCHAR, H5S_ALL, H5S_ALL, H5P_DEFAULT, text.data());
  H5Sclose(sp);
  H5Dclose(ds);
  H5Fclose(f);
  return nlohmann::json::parse(text);
}

// Replaces the rank file's index with `text`, as a dataset (version 3) or as the attribute
// version 2 used.
void write_index(const fs::path& file, const std::string& text, bool as_attribute = false) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  H5Ldelete(f, "index", H5P_DEFAULT);
  if (as_attribute) {
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, text.size());
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, "index", type, sp, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(H5Awrite(a, type, text.data()), 0);
    H5Aclose(a);
    H5Sclose(sp);
    H5Tclose(type);
  } else {
    hsize_t n = text.size();
    hid_t sp = H5Screate_simple(1, &n, nullptr);
    hid_t ds = H5Dcreate2(f, "index", H5T_STD_U8LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_UCHAR, H5S_ALL, H5S_ALL, H5P_DEFAULT, text.data()), 0);
    H5Dclose(ds);
    H5Sclose(sp);
  }
  H5Fclose(f);
}

TEST(Checkpoint, ForgedIndexEntriesAreRefusedNamingTheFile) {
  fs::path root = temp_root("forged");
  TrainingRun r;
  r.model.init_weights(4);
  CheckpointMeta meta;
  meta.step = 1;
  const std::string dir = save_checkpoint(root.string(), meta, r.model, &r.opt);
  const fs::path file = fs::path(dir) / "rank_00000.h5";
  const nlohmann::json good = read_index(file);
  // each forgery edits the entry of model.norm.weight ([32], whole)
  auto entry = [&] {
    for (size_t i = 0; i < good.size(); ++i)
      if (good[i]["name"] == "model.norm.weight") return i;
    return size_t(0);
  }();
  struct Forgery {
    const char* what;
    const char* key;
    nlohmann::json value;
  };
  const Forgery forgeries[] = {
      {"zero-sized dimension", "local_shape", nlohmann::json::array({64, 0})},
      {"empty shape", "local_shape", nlohmann::json::array()},
      {"empty full shape", "full_shape", nlohmann::json::array()},
      {"1e12 elements", "e1", int64_t(1000000000000)},
      {"negative start", "e0", -5},
      {"empty range", "e1", 0},
      {"slice outside the tensor", "shard_begin", 7},
      {"bad shard_dim", "shard_dim", 5},
      {"name of the wrong type", "name", 12},
      {"missing group", "group", nullptr},
  };
  for (const Forgery& fg : forgeries) {
    nlohmann::json bad = good;
    if (fg.value.is_null()) bad[entry].erase(fg.key);
    else bad[entry][fg.key] = fg.value;
    write_index(file, bad.dump());
    TrainingRun fresh_run;
    try {
      load_checkpoint(dir, fresh_run.model, &fresh_run.opt);
      ADD_FAILURE() << fg.what << ": accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(file.string()), std::string::npos) << fg.what << ": " << e.what();
    }
  }
  // an index that is not a list, not JSON, or a dataset claiming more bytes than the file
  for (const std::string text : {std::string("{}"), std::string("[{\"name\": "), std::string("42")}) {
    write_index(file, text);
    TrainingRun fresh_run;
    try {
      load_checkpoint(dir, fresh_run.model, &fresh_run.opt);
      ADD_FAILURE() << text << ": accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(file.string()), std::string::npos) << text << ": " << e.what();
    }
  }
  // meta.json naming a rank file outside the checkpoint
  write_index(file, good.dump());
  {
    std::ifstream in(fs::path(dir) / "meta.json");
    nlohmann::json m = nlohmann::json::parse(in);
    m["layout"]["files"] = {"../../../../etc/passwd"};
    std::ofstream(fs::path(dir) / "meta.json") << m.dump();
  }
  TrainingRun fresh_run;
  try {
    load_checkpoint(dir, fresh_run.model, &fresh_run.opt);
    ADD_FAILURE() << "a rank file path leaving the checkpoint was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad rank file name"), std::string::npos) << e.what();
  }
  fs::remove_all(root);
}

TEST(Checkpoint, VersionTwoCheckpointsStillLoad) {
  fs::path root = temp_root("v2");
  TrainingRun r;
  r.model.init_weights(6);
  CheckpointMeta meta;
  meta.step = 3;
  const std::string dir = save_checkpoint(root.string(), meta, r.model, &r.opt);
  // rewrite it the way version 2 stored it: the index as a string attribute, and 64-bit
  // FNV-1a checksums of each array's bytes
  const fs::path file = fs::path(dir) / "rank_00000.h5";
  nlohmann::json index = read_index(file);
  {
    hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    for (auto& e : index)
      for (const char* kind : {"w", "m", "v"}) {
        const std::string name = e["group"].get<std::string>() + "/" + kind;
        hid_t ds = H5Dopen2(f, name.c_str(), H5P_DEFAULT);
        ASSERT_GE(ds, 0) << name;
        std::vector<float> d(e["e1"].get<int64_t>() - e["e0"].get<int64_t>());
        H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, d.data());
        H5Dclose(ds);
        uint64_t h = 1469598103934665603ull;
        const unsigned char* p = reinterpret_cast<const unsigned char*>(d.data());
        for (size_t i = 0; i < d.size() * sizeof(float); ++i) h = (h ^ p[i]) * 1099511628211ull;
        char hex[17];
        std::snprintf(hex, sizeof hex, "%016llx", (unsigned long long)h);
        e[std::string("crc_") + kind] = hex;
      }
    H5Fclose(f);
  }
  write_index(file, index.dump(), true);
  {
    std::ifstream in(fs::path(dir) / "meta.json");
    nlohmann::json m = nlohmann::json::parse(in);
    m["version"] = 2;
    std::ofstream(fs::path(dir) / "meta.json") << m.dump();
  }
  TrainingRun loaded;
  loaded.model.init_weights(7);
  EXPECT_EQ(load_checkpoint(dir, loaded.model, &loaded.opt).step, 3);
  for (size_t k = 0; k < r.model.params().size(); ++k) {
    const Tensor &a = r.model.params()[k].value, &b = loaded.model.params()[k].value;
    EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.numel() * sizeof(float)), 0) << r.model.params()[k].name;
  }
  fs::remove_all(root);
}

TEST(Checkpoint, ResavingAStepNeverLeavesLatestNamingNothing) {
  fs::path root = temp_root("resave");
  TrainingRun r;
  r.model.init_weights(8);
  CheckpointMeta meta;
  meta.step = 4;
  const std::string first = save_checkpoint(root.string(), meta, r.model, &r.opt);
  const auto before = checkpoint_digests(first);
  r.model.init_weights(9);  // other weights, same step (a re-run job)
  const std::string second = save_checkpoint(root.string(), meta, r.model, &r.opt);
  EXPECT_EQ(first, second);
  EXPECT_NE(checkpoint_digests(second), before) << "the step was not replaced";
  EXPECT_EQ(latest_checkpoint(root.string()), second);
  EXPECT_FALSE(fs::exists(root / ".tmp.step_00000004"));
  // where the file system cannot exchange directories, the old copy is moved aside first;
  // a crash between the two renames leaves it there, and latest_checkpoint() finds it
  fs::rename(second, root / ".replaced.step_00000004");
  EXPECT_EQ(latest_checkpoint(root.string()), (root / ".replaced.step_00000004").string());
  TrainingRun loaded;
  EXPECT_EQ(load_checkpoint(latest_checkpoint(root.string()), loaded.model, &loaded.opt).step, 4);
  fs::remove_all(root);
}

TEST(Checkpoint, KeepsTheNewestN) {
  fs::path root = temp_root("keep");
  TrainingRun r;
  for (int64_t s = 1; s <= 5; ++s) {
    CheckpointMeta meta;
    meta.step = s;
    save_checkpoint(root.string(), meta, r.model, nullptr);
  }
  EXPECT_EQ(prune_checkpoints(root.string(), 2), 3);
  std::vector<std::string> left;
  for (const auto& d : fs::directory_iterator(root))
    if (d.path().filename().string().rfind("step_", 0) == 0) left.push_back(d.path().filename().string());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"step_00000004", "step_00000005"}));
  fs::remove_all(root);
}

// ---- the read and write paths: staging ring, parallel checksums, resharding, bf16 ---------

// A ring that lets two live spans overlap would hand a worker memory that a verified array
// still waits in: a random mix of takes and give-backs must keep every live span apart and
// inside the buffer, and wrap only as far as it must.
TEST(Checkpoint, StagingRingNeverOverlapsLiveSpans) {
  std::mt19937 rng(5);
  for (size_t capacity : {size_t(1000), size_t(4096), size_t(100000)}) {
    RingSpans ring(capacity);
    std::deque<std::pair<size_t, size_t>> live;  // offset, size; oldest first
    size_t taken = 0;
    for (int step = 0; step < 20000; ++step) {
      if (!live.empty() && rng() % 3 == 0) {
        ring.give_back_oldest();
        live.pop_front();
        continue;
      }
      const size_t bytes = 1 + rng() % (capacity / 3);
      const std::optional<size_t> at = ring.take(bytes);
      if (live.empty()) ASSERT_TRUE(at.has_value()) << "an empty ring refused " << bytes << " of " << capacity;
      if (!at) continue;
      ++taken;
      ASSERT_LE(*at + bytes, capacity);
      for (const auto& [o, n] : live)
        ASSERT_TRUE(*at + bytes <= o || o + n <= *at) << "[" << *at << ", +" << bytes << ") overlaps [" << o << ", +" << n << ")";
      live.emplace_back(*at, bytes);
      ASSERT_EQ(ring.live(), live.size());
    }
    EXPECT_GT(taken, 5000u);
  }
  // wrapping: after [0,40) [40,80) with [0,40) given back, 30 bytes fit at 0 but not 50
  RingSpans ring(100);
  EXPECT_EQ(ring.take(40), size_t(0));
  EXPECT_EQ(ring.take(40), size_t(40));
  ring.give_back_oldest();
  EXPECT_FALSE(ring.take(50).has_value());
  EXPECT_EQ(ring.take(30), size_t(0));
  EXPECT_FALSE(ring.take(20).has_value());  // [30, 40) is free, but only 10 bytes
  EXPECT_EQ(ring.take(10), size_t(30));
  EXPECT_FALSE(ring.take(101).has_value());
}

// Pieces of whole [rows, cols] tensors t0, t1, ... with arrays w, m, v of distinct values.
struct StoredTensors {
  std::unique_ptr<Ops> ops = make_cpu_ops();
  std::vector<ShardPiece> pieces;
  StoredTensors(int count, int64_t rows, int64_t cols) {
    for (int i = 0; i < count; ++i) {
      ShardPiece p;
      p.name = "t" + std::to_string(i);
      p.global_shape = p.local_shape = {rows, cols};
      p.e1 = rows * cols;
      for (const char* kind : {"w", "m", "v"}) {
        Tensor t = ops->empty({p.e1}, DType::F32);
        ops->init_normal(t, 7, uint64_t(i * 3 + (kind[0] == 'w' ? 0 : kind[0] == 'm' ? 1 : 2)), 1.0, p.e1, 0, 0);
        p.arrays.push_back({kind, t});
      }
      pieces.push_back(std::move(p));
    }
  }
  // The same pieces with fresh zeroed arrays of `dtype` to load into.
  std::vector<ShardPiece> targets(DType dtype = DType::F32) const {
    std::vector<ShardPiece> out = pieces;
    for (ShardPiece& p : out)
      for (ShardArray& a : p.arrays) {
        a.data = ops->empty({p.e1 - p.e0}, dtype);
        ops->fill_zero(a.data);
      }
    return out;
  }
  std::string save(const fs::path& root) {
    CheckpointMeta meta;
    meta.step = 1;
    return write_checkpoint(root.string(), meta, nlohmann::json(cfg()), pieces, true, *ops, nullptr, 0, 0, "");
  }
};

// Many arrays verified on worker threads at once: all arrive bit for bit, and one flipped bit in
// the middle of one large array (neither the first nor the last read) fails the load, naming
// the file and the array.
TEST(Checkpoint, ParallelVerificationCatchesOneFlippedBitInALargeArray) {
  const fs::path root = temp_root("flip");
  StoredTensors stored(12, 256, 1024);  // 36 arrays of 1 MiB
  const std::string dir = stored.save(root);
  CheckpointTimings tm;
  std::vector<ShardPiece> back = stored.targets();
  read_checkpoint_pieces(dir, back, true, *stored.ops, &tm);
  for (size_t i = 0; i < back.size(); ++i)
    for (size_t a = 0; a < back[i].arrays.size(); ++a)
      ASSERT_EQ(std::memcmp(back[i].arrays[a].data.raw(), stored.pieces[i].arrays[a].data.raw(),
                            stored.pieces[i].arrays[a].data.nbytes()), 0)
          << back[i].name << "/" << back[i].arrays[a].kind;
  EXPECT_EQ(tm.bytes, int64_t(36) * 256 * 1024 * 4);
  EXPECT_GE(tm.threads, 1);

  const std::string file = dir + "/rank_00000.h5";
  {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    hid_t ds = H5Dopen2(f, "t7/tp0_e0/m", H5P_DEFAULT);
    ASSERT_GE(ds, 0);
    std::vector<float> v(256 * 1024);
    ASSERT_GE(H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), 0);
    unsigned char* bytes = reinterpret_cast<unsigned char*>(v.data());
    bytes[v.size() * 2 + 1] ^= 0x04;  // one bit of the middle value
    ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), 0);
    H5Dclose(ds);
    H5Fclose(f);
  }
  try {
    std::vector<ShardPiece> again = stored.targets();
    read_checkpoint_pieces(dir, again, true, *stored.ops);
    ADD_FAILURE() << "a flipped bit went unnoticed";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(file + ": checksum mismatch for 't7/tp0_e0/m'"), std::string::npos)
        << e.what();
  }
  fs::remove_all(root);
}

// A slice of another layout (a TP column block, a ZeRO-like element range of it) is assembled
// from the stored pieces it overlaps; one missing element fails before anything is read.
TEST(Checkpoint, ReshardedSlicesAreAssembledAndGapsRefused) {
  const fs::path root = temp_root("reshard");
  auto ops = make_cpu_ops();
  std::vector<float> full(8 * 6);
  for (size_t i = 0; i < full.size(); ++i) full[i] = float(i) + 0.25f;
  // stored as two element ranges of the whole tensor: [0, 20) and [20, 48)
  std::vector<ShardPiece> pieces;
  for (auto [e0, e1] : {std::pair<int64_t, int64_t>{0, 20}, {20, 48}}) {
    ShardPiece p;
    p.name = "a";
    p.global_shape = p.local_shape = {8, 6};
    p.e0 = e0;
    p.e1 = e1;
    Tensor t = ops->empty({e1 - e0}, DType::F32);
    ops->upload(t, full.data() + e0);
    p.arrays.push_back({"w", t});
    pieces.push_back(std::move(p));
  }
  CheckpointMeta meta;
  const std::string dir = write_checkpoint(root.string(), meta, nlohmann::json(cfg()), pieces, false, *ops, nullptr, 0, 0, "");
  // columns [3, 6) of every row, elements [5, 20) of that [8, 3] slice
  ShardPiece t;
  t.name = "a";
  t.global_shape = {8, 6};
  t.local_shape = {8, 3};
  t.shard_dim = 1;
  t.shard_begin = 3;
  t.e0 = 5;
  t.e1 = 20;
  t.arrays.push_back({"w", ops->empty({15}, DType::F32)});
  read_checkpoint_pieces(dir, {t}, false, *ops);
  for (int64_t i = 0; i < 15; ++i) {
    const int64_t local = t.e0 + i, row = local / 3, col = 3 + local % 3;
    EXPECT_EQ(t.arrays[0].data.data<float>()[i], full[row * 6 + col]) << "element " << i;
  }
  // without the second stored piece, elements [20, 48) of the whole tensor are nowhere
  fs::remove_all(root);
  pieces.pop_back();
  const std::string partial =
      write_checkpoint(root.string(), meta, nlohmann::json(cfg()), pieces, false, *ops, nullptr, 0, 0, "");
  ShardPiece whole = pieces[0];
  whole.e1 = 48;
  whole.arrays = {{"w", ops->empty({48}, DType::F32)}};
  try {
    read_checkpoint_pieces(partial, {whole}, false, *ops);
    ADD_FAILURE() << "an incomplete tensor was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(partial + ": tensor 'a' is incomplete: 28 of the 48 elements"), std::string::npos)
        << e.what();
  }
  fs::remove_all(root);
}

// bf16 tensors filled from stored f32 values (the GPU's working weights) are rounded to nearest,
// ties to even, and an f32 array of the same kind (the master copy) gets the values exactly.
TEST(Checkpoint, Bf16TargetsAreRoundedToNearestEven) {
  const fs::path root = temp_root("bf16");
  auto ops = make_cpu_ops();
  const float ulp = 1.0f / 128;  // bf16's spacing in [1, 2)
  const std::vector<float> values = {1.0f, 1.0f + ulp / 2, 1.0f + 3 * ulp / 2, 1.0f + ulp / 2 + ulp / 4096,
                                     -2.5f, 3.0e38f, 1.0e-40f, 65504.0f};
  // 1.0; a tie rounds down to the even 1.0; a tie rounds up to the even 1 + 2 ulp; just above a
  // tie rounds up; exact; 0x7F61B1E6 rounds up; the denormal 0x000116C2 rounds down; 65504
  // (0x477FE000) rounds up to 65536
  const std::vector<uint16_t> want = {0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x7F62, 0x0001, 0x4780};
  const int64_t n = int64_t(values.size());
  ShardPiece p;
  p.name = "model.norm.weight";
  p.global_shape = p.local_shape = {n};
  p.e1 = n;
  Tensor stored = ops->empty({n}, DType::F32);
  ops->upload_bytes(stored, values.data());
  p.arrays = {{"w", stored}};
  CheckpointMeta meta;
  const std::string dir = write_checkpoint(root.string(), meta, nlohmann::json(cfg()), {p}, false, *ops, nullptr, 0, 0, "");
  ShardPiece t = p;
  t.arrays = {{"w", ops->empty({n}, DType::BF16)}, {"w", ops->empty({n}, DType::F32)}};
  read_checkpoint_pieces(dir, {t}, false, *ops);
  const uint16_t* got = t.arrays[0].data.data<uint16_t>();
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(got[i], want[i]) << "value " << values[i] << " (element " << i << ")";
    EXPECT_EQ(got[i], float_to_bf16(values[i])) << "element " << i;
  }
  EXPECT_EQ(std::memcmp(t.arrays[1].data.raw(), values.data(), values.size() * sizeof(float)), 0);
  fs::remove_all(root);
}

}  // namespace
}  // namespace difftron
