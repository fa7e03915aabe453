// Checkpoints: save at step 10, load into fresh objects, continue: the losses of steps 10..20
// equal an uninterrupted run's bit for bit. Damaged, forged or mismatched checkpoints fail
// clearly (an Error naming the file, never a crash or a huge allocation); an interrupted save
// leaves `latest` on the previous complete checkpoint; re-saving an existing step replaces it
// without a moment where `latest` names nothing; version-2 files (index as an attribute) load.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <hdf5.h>
#include <nlohmann/json.hpp>

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

}  // namespace
}  // namespace difftron
