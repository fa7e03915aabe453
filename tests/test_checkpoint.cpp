// Checkpoints: save at step 10, load into fresh objects, continue: the losses of steps 10..20
// equal an uninterrupted run's bit for bit. Damaged or mismatched checkpoints fail clearly,
// and an interrupted save leaves `latest` on the previous complete checkpoint.
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

namespace fs = std::filesystem;

namespace difftron {
namespace {

ModelConfig cfg() {
  ModelConfig c;
  c.vocab_size = 16;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.max_seq_len = 16;
  return c;
}

struct TrainingRun {
  std::unique_ptr<Ops> ops = make_cpu_ops();
  Model model{cfg(), *ops, ModelPrecision::uniform(DType::F32), 4, 16};
  OptimizerConfig oc = [] {
    OptimizerConfig o;
    o.lr = 3e-3;
    o.warmup_steps = 3;
    o.total_steps = 20;
    return o;
  }();
  AdamW opt{oc, model};
  std::unique_ptr<BatchSource> data = make_synthetic_source("copy", 16, 9);
  TrainOptions to = [] {
    TrainOptions t;
    t.batch = 4;
    t.seq = 16;
    t.steps = 20;
    t.log_every = 0;
    return t;
  }();
};

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

}  // namespace
}  // namespace difftron
