// Checkpoints: see checkpoint.h. HDF5 (serial) for tensors, nlohmann-json for metadata.
#include "io/checkpoint.h"

#include <cstdio>
#include <filesystem>
#include <fstream>

#include <hdf5.h>

#include "core/error.h"

namespace fs = std::filesystem;

namespace difftron {
namespace {

constexpr int kFormatVersion = 1;

uint64_t fnv1a(const std::vector<float>& v) {
  uint64_t h = 1469598103934665603ull;
  const unsigned char* p = reinterpret_cast<const unsigned char*>(v.data());
  for (size_t i = 0; i < v.size() * sizeof(float); ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

std::string hex(uint64_t x) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", (unsigned long long)x);
  return buf;
}

class H5File {
 public:
  H5File(const std::string& path, bool create) : path_(path) {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // our own messages instead of HDF5's stack
    id_ = create ? H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT)
                 : H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    if (id_ < 0) throw_error(path, create ? ": cannot create HDF5 file" : ": cannot open as HDF5");
  }
  ~H5File() {
    if (id_ >= 0) H5Fclose(id_);
  }
  H5File(const H5File&) = delete;
  H5File& operator=(const H5File&) = delete;

  void write(const std::string& name, const std::vector<float>& data, const Shape& shape) {
    std::vector<hsize_t> dims(shape.begin(), shape.end());
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t space = H5Screate_simple(int(dims.size()), dims.data(), nullptr);
    hid_t ds = H5Dcreate2(id_, name.c_str(), H5T_IEEE_F32LE, space, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = ds < 0 ? -1 : H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data());
    if (ds >= 0) {
      // the rows of the full logical tensor this dataset holds: [begin, end) of dim 0
      hsize_t two = 2;
      hid_t aspace = H5Screate_simple(1, &two, nullptr);
      hid_t attr = H5Acreate2(ds, "slice", H5T_STD_I64LE, aspace, H5P_DEFAULT, H5P_DEFAULT);
      int64_t slice[2] = {0, shape.empty() ? 1 : shape[0]};
      H5Awrite(attr, H5T_NATIVE_INT64, slice);
      H5Aclose(attr);
      H5Sclose(aspace);
      H5Dclose(ds);
    }
    H5Sclose(space);
    H5Pclose(lcpl);
    if (st < 0) throw_error(path_, ": cannot write dataset '", name, "' (disk full?)");
  }

  std::vector<float> read(const std::string& name, const Shape& expect) {
    hid_t ds = H5Dopen2(id_, name.c_str(), H5P_DEFAULT);
    if (ds < 0) throw_error(path_, ": missing dataset '", name, "'");
    hid_t space = H5Dget_space(ds);
    int nd = H5Sget_simple_extent_ndims(space);
    std::vector<hsize_t> dims(nd > 0 ? nd : 0);
    H5Sget_simple_extent_dims(space, dims.data(), nullptr);
    H5Sclose(space);
    Shape got(dims.begin(), dims.end());
    if (got != expect) {
      H5Dclose(ds);
      throw_error(path_, ": dataset '", name, "' has shape ", shape_str(got), ", the model expects ",
                  shape_str(expect));
    }
    std::vector<float> v(shape_numel(expect));
    herr_t st = H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
    H5Dclose(ds);
    if (st < 0) throw_error(path_, ": cannot read dataset '", name, "' (file damaged?)");
    return v;
  }

 private:
  std::string path_;
  hid_t id_ = -1;
};

std::vector<float> to_host(Ops& ops, const Tensor& t) {
  std::vector<float> v(t.numel());
  ops.download(t, v.data());
  return v;
}

void write_text_atomically(const fs::path& path, const std::string& text) {
  fs::path tmp = path;
  tmp += ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << text;
    f.flush();
    if (!f) throw_error(tmp.string(), ": write failed (disk full?)");
  }
  fs::rename(tmp, path);
}

}  // namespace

std::string save_checkpoint(const std::string& root, const CheckpointMeta& meta, Model& model,
                            AdamW* optimizer) {
  char name[32];
  std::snprintf(name, sizeof name, "step_%08lld", (long long)meta.step);
  const fs::path final_dir = fs::path(root) / name;
  const fs::path tmp_dir = fs::path(root) / (std::string(".tmp.") + name);
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) throw_error(root, ": cannot create checkpoint directory: ", ec.message());
  fs::remove_all(tmp_dir);
  fs::create_directories(tmp_dir);

  Ops& ops = model.ops();
  nlohmann::json checksums;
  {
    H5File f((tmp_dir / "tensors.h5").string(), true);
    auto& params = model.params();
    for (size_t i = 0; i < params.size(); ++i) {
      const Param& p = params[i];
      // the f32 master when there is one: it is what training continues from
      std::vector<float> w = to_host(ops, optimizer ? optimizer->state()[i].master : p.value);
      f.write("model/" + p.name, w, p.value.shape());
      checksums["model/" + p.name] = hex(fnv1a(w));
      if (optimizer) {
        for (const char* which : {"m", "v"}) {
          const Tensor& t = which[0] == 'm' ? optimizer->state()[i].m : optimizer->state()[i].v;
          std::vector<float> s = to_host(ops, t);
          std::string key = "optim/" + p.name + "/" + which;
          f.write(key, s, p.value.shape());
          checksums[key] = hex(fnv1a(s));
        }
      }
    }
  }
  nlohmann::json j;
  j["format"] = "difftron-checkpoint";
  j["version"] = kFormatVersion;
  j["model_config"] = model.config();
  j["step"] = meta.step;
  j["tokens_seen"] = meta.tokens_seen;
  j["seed"] = meta.seed;
  j["data_position"] = meta.data_position;
  j["layout"] = {{"tp", 1}, {"dp", 1}, {"files", {"tensors.h5"}}};
  j["has_optimizer"] = optimizer != nullptr;
  j["checksums"] = checksums;
  j["extra"] = meta.extra;
  write_text_atomically(tmp_dir / "meta.json", j.dump(2) + "\n");

  fs::remove_all(final_dir);  // a checkpoint of the same step from an earlier, interrupted run
  fs::rename(tmp_dir, final_dir);
  write_text_atomically(fs::path(root) / "latest", std::string(name) + "\n");
  return final_dir.string();
}

std::string latest_checkpoint(const std::string& root) {
  std::ifstream f(fs::path(root) / "latest");
  if (!f) return "";
  std::string name;
  std::getline(f, name);
  fs::path dir = fs::path(root) / name;
  if (name.empty() || !fs::exists(dir / "meta.json"))
    throw_error(root, "/latest names '", name, "', which is not a complete checkpoint");
  return dir.string();
}

static nlohmann::json read_meta(const std::string& dir) {
  const std::string path = dir + "/meta.json";
  std::ifstream f(path);
  if (!f) throw_error(path, ": cannot open (is '", dir, "' a checkpoint directory?)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw_error(path, ": not valid JSON: ", e.what());
  }
  if (j.value("format", std::string()) != "difftron-checkpoint")
    throw_error(path, ": format is not 'difftron-checkpoint'");
  if (j.value("version", 0) != kFormatVersion)
    throw_error(path, ": checkpoint version ", j.value("version", 0), " is not supported (this build reads ",
                kFormatVersion, ")");
  return j;
}

ModelConfig read_checkpoint_config(const std::string& dir) {
  ModelConfig c = read_meta(dir).at("model_config").get<ModelConfig>();
  c.resolve_and_validate();
  return c;
}

CheckpointMeta load_checkpoint(const std::string& dir, Model& model, AdamW* optimizer) {
  nlohmann::json j = read_meta(dir);
  nlohmann::json stored = j.at("model_config");
  nlohmann::json ours = model.config();
  if (stored != ours)
    throw_error(dir, ": the checkpoint's model config ", stored.dump(), " differs from the model's ", ours.dump());
  if (optimizer && !j.value("has_optimizer", false))
    throw_error(dir, ": holds weights only; cannot resume the optimizer from it");
  auto& checksums = j.at("checksums");
  Ops& ops = model.ops();
  H5File f(dir + "/tensors.h5", false);
  auto read_checked = [&](const std::string& key, const Shape& shape) {
    std::vector<float> v = f.read(key, shape);
    if (!checksums.contains(key) || checksums.at(key).get<std::string>() != hex(fnv1a(v)))
      throw_error(dir, "/tensors.h5: checksum mismatch for '", key, "' (file damaged)");
    return v;
  };
  auto& params = model.params();
  for (size_t i = 0; i < params.size(); ++i) {
    Param& p = params[i];
    std::vector<float> w = read_checked("model/" + p.name, p.value.shape());
    ops.upload(p.value, w.data());
    if (optimizer) {
      auto& st = optimizer->state()[i];
      if (st.master.raw() != p.value.raw()) ops.upload(st.master, w.data());
      auto m = read_checked("optim/" + p.name + "/m", p.value.shape());
      auto v = read_checked("optim/" + p.name + "/v", p.value.shape());
      ops.upload(st.m, m.data());
      ops.upload(st.v, v.data());
    }
  }
  CheckpointMeta meta;
  meta.step = j.at("step");
  meta.tokens_seen = j.value("tokens_seen", int64_t(0));
  meta.seed = j.value("seed", uint64_t(0));
  meta.data_position = j.value("data_position", std::string());
  meta.extra = j.value("extra", nlohmann::json::object());
  return meta;
}

}  // namespace difftron
