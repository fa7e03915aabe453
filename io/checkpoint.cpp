// Sharded checkpoints: see checkpoint.h. HDF5 (serial, one file per rank) for tensor pieces,
// nlohmann-json for metadata and the per-file piece index.
#include "io/checkpoint.h"

#include <cstdio>
#include <filesystem>
#include <fstream>

#include <hdf5.h>

#include "core/error.h"
#include "parallel/comm.h"
#include "parallel/grid.h"
#include "parallel/zero.h"

namespace fs = std::filesystem;

namespace difftron {
namespace {

constexpr int kFormatVersion = 2;

uint64_t fnv1a(const float* v, size_t n) {
  uint64_t h = 1469598103934665603ull;
  const unsigned char* p = reinterpret_cast<const unsigned char*>(v);
  for (size_t i = 0; i < n * sizeof(float); ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

std::string hex(uint64_t x) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", (unsigned long long)x);
  return buf;
}

std::string rank_file_name(int rank) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "rank_%05d.h5", rank);
  return buf;
}

// A thin RAII wrapper over one HDF5 file: 1-D f32 datasets and a JSON string attribute.
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

  void write(const std::string& name, const std::vector<float>& data) {
    hsize_t n = data.size();
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t space = H5Screate_simple(1, &n, nullptr);
    hid_t ds = H5Dcreate2(id_, name.c_str(), H5T_IEEE_F32LE, space, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = ds < 0 ? -1 : H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data());
    if (ds >= 0) H5Dclose(ds);
    H5Sclose(space);
    H5Pclose(lcpl);
    if (st < 0) throw_error(path_, ": cannot write dataset '", name, "' (disk full?)");
  }

  std::vector<float> read(const std::string& name, int64_t expect_numel) {
    hid_t ds = H5Dopen2(id_, name.c_str(), H5P_DEFAULT);
    if (ds < 0) throw_error(path_, ": missing dataset '", name, "'");
    hid_t space = H5Dget_space(ds);
    hssize_t n = H5Sget_simple_extent_npoints(space);
    H5Sclose(space);
    if (n != expect_numel) {
      H5Dclose(ds);
      throw_error(path_, ": dataset '", name, "' holds ", n, " values, its index says ", expect_numel);
    }
    std::vector<float> v(n);
    herr_t st = H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
    H5Dclose(ds);
    if (st < 0) throw_error(path_, ": cannot read dataset '", name, "' (file damaged?)");
    return v;
  }

  void write_text_attr(const char* name, const std::string& text) {
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, std::max<size_t>(text.size(), 1));
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attr = H5Acreate2(id_, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t st = attr < 0 ? -1 : H5Awrite(attr, type, text.empty() ? " " : text.data());
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    H5Tclose(type);
    if (st < 0) throw_error(path_, ": cannot write attribute '", name, "'");
  }

  std::string read_text_attr(const char* name) {
    hid_t attr = H5Aopen(id_, name, H5P_DEFAULT);
    if (attr < 0) throw_error(path_, ": missing attribute '", name, "' (not a difftron checkpoint file?)");
    hid_t type = H5Aget_type(attr);
    std::string s(H5Tget_size(type), '\0');
    herr_t st = H5Aread(attr, type, s.data());
    H5Tclose(type);
    H5Aclose(attr);
    if (st < 0) throw_error(path_, ": cannot read attribute '", name, "'");
    return s;
  }

 private:
  std::string path_;
  hid_t id_ = -1;
};

// Elements [e0, e1) of parameter `param`'s local (TP-slice) tensor that this rank stores,
// with 1-D views of its master weights and (optionally) moments.
struct OwnedPiece {
  int param = 0;
  int64_t e0 = 0, e1 = 0;
  Tensor master, m, v;
};

std::vector<OwnedPiece> owned_pieces(Model& model, AdamW* opt, int dp_rank) {
  std::vector<OwnedPiece> out;
  auto& params = model.params();
  const bool tp_lead = model.tp_rank() == 0;
  auto keep = [&](int k) { return params[k].shard_dim >= 0 || tp_lead; };  // replicated: TP rank 0
  if (opt && opt->zero()) {
    ZeroOptimizer& z = *opt->zero();
    for (const auto& zp : z.pieces()) {
      if (zp.segment < 0 || !keep(zp.segment)) continue;
      const Param& p = params[zp.segment];
      OwnedPiece o;
      o.param = zp.segment;
      o.e0 = zp.flat - p.flat_offset;
      o.e1 = o.e0 + zp.numel;
      o.master = z.shard_master().defined() ? z.shard_master().flat_slice(zp.shard, zp.numel)
                                            : model.flat_values().flat_slice(zp.flat, zp.numel);
      o.m = z.shard_m().flat_slice(zp.shard, zp.numel);
      o.v = z.shard_v().flat_slice(zp.shard, zp.numel);
      out.push_back(o);
    }
    return out;
  }
  if (dp_rank != 0) return out;  // without ZeRO the DP replicas are identical: DP rank 0 writes
  for (int k = 0; k < int(params.size()); ++k) {
    if (!keep(k)) continue;
    OwnedPiece o;
    o.param = k;
    o.e1 = params[k].value.numel();
    if (opt) {
      auto& st = opt->state()[k];
      o.master = st.master.view({o.e1});
      o.m = st.m.view({o.e1});
      o.v = st.v.view({o.e1});
    } else {
      o.master = params[k].value.view({o.e1});
    }
    out.push_back(o);
  }
  return out;
}

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

// rows x cols view of a tensor shape (1-D tensors are one column)
std::pair<int64_t, int64_t> rows_cols(const std::vector<int64_t>& s) {
  if (s.size() == 1) return {s[0], 1};
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < s.size(); ++i) rows *= s[i];
  return {rows, s.back()};
}

}  // namespace

std::string save_checkpoint(const std::string& root, const CheckpointMeta& meta, Model& model,
                            AdamW* optimizer, ParallelContext* par, const std::string& rank_data_position) {
  const int world_rank = par ? par->world_rank() : 0, world = par ? par->world_size() : 1;
  const int tp = par ? par->tp_size() : 1, dp = par ? par->dp_size() : 1;
  const int dp_rank = par ? par->dp_rank() : 0;
  auto barrier = [&] {
    if (par) par->world_host().barrier();
  };
  char name[32];
  std::snprintf(name, sizeof name, "step_%08lld", (long long)meta.step);
  const fs::path final_dir = fs::path(root) / name;
  const fs::path tmp_dir = fs::path(root) / (std::string(".tmp.") + name);
  if (world_rank == 0) {
    std::error_code ec;
    fs::create_directories(root, ec);
    if (ec) throw_error(root, ": cannot create checkpoint directory: ", ec.message());
    fs::remove_all(tmp_dir);
    fs::create_directories(tmp_dir);
  }
  barrier();

  Ops& ops = model.ops();
  auto& params = model.params();
  nlohmann::json index = nlohmann::json::array();
  {
    H5File f((tmp_dir / rank_file_name(world_rank)).string(), true);
    for (const OwnedPiece& o : owned_pieces(model, optimizer, dp_rank)) {
      const Param& p = params[o.param];
      const std::string group = p.name + "/tp" + std::to_string(std::max<int64_t>(p.shard_begin, 0)) +
                                "_e" + std::to_string(o.e0);
      nlohmann::json e = {{"name", p.name},
                          {"group", group},
                          {"full_shape", p.full_shape.empty() ? p.value.shape() : p.full_shape},
                          {"local_shape", p.value.shape()},
                          {"shard_dim", p.shard_dim},
                          {"shard_begin", p.shard_begin},
                          {"e0", o.e0},
                          {"e1", o.e1}};
      std::vector<float> w = to_host(ops, o.master);
      f.write(group + "/w", w);
      e["crc_w"] = hex(fnv1a(w.data(), w.size()));
      if (o.m.defined()) {
        std::vector<float> m = to_host(ops, o.m), v = to_host(ops, o.v);
        f.write(group + "/m", m);
        f.write(group + "/v", v);
        e["crc_m"] = hex(fnv1a(m.data(), m.size()));
        e["crc_v"] = hex(fnv1a(v.data(), v.size()));
      }
      index.push_back(e);
    }
    f.write_text_attr("index", index.dump());
    nlohmann::json info = {{"world_rank", world_rank}, {"tp_rank", model.tp_rank()}, {"dp_rank", dp_rank},
                           {"data_position", rank_data_position.empty() ? meta.data_position : rank_data_position}};
    f.write_text_attr("rank", info.dump());
  }
  barrier();  // every rank's file is complete

  if (world_rank == 0) {
    nlohmann::json j;
    j["format"] = "difftron-checkpoint";
    j["version"] = kFormatVersion;
    j["model_config"] = model.config();
    j["step"] = meta.step;
    j["tokens_seen"] = meta.tokens_seen;
    j["seed"] = meta.seed;
    j["data_position"] = meta.data_position;
    nlohmann::json files = nlohmann::json::array();
    for (int r = 0; r < world; ++r) files.push_back(rank_file_name(r));
    j["layout"] = {{"tp", tp}, {"dp", dp}, {"world", world}, {"files", files}};
    j["has_optimizer"] = optimizer != nullptr;
    j["extra"] = meta.extra;
    write_text_atomically(tmp_dir / "meta.json", j.dump(2) + "\n");
    fs::remove_all(final_dir);  // a checkpoint of the same step from an earlier, interrupted run
    fs::rename(tmp_dir, final_dir);
    write_text_atomically(fs::path(root) / "latest", std::string(name) + "\n");
  }
  barrier();  // nobody reads or rewrites the root before it is consistent
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

CheckpointMeta load_checkpoint(const std::string& dir, Model& model, AdamW* optimizer, ParallelContext* par) {
  nlohmann::json j = read_meta(dir);
  nlohmann::json stored = j.at("model_config");
  nlohmann::json ours = model.config();
  if (stored != ours)
    throw_error(dir, ": the checkpoint's model config ", stored.dump(), " differs from the model's ", ours.dump());
  const bool with_optim = optimizer != nullptr;
  if (with_optim && !j.value("has_optimizer", false))
    throw_error(dir, ": holds weights only; cannot resume the optimizer from it");

  // Open every rank file and read its index.
  struct FileIndex {
    std::unique_ptr<H5File> file;
    std::string path;
    nlohmann::json index, rank;
  };
  std::vector<FileIndex> files;
  for (const auto& name : j.at("layout").at("files")) {
    FileIndex fi;
    fi.path = dir + "/" + name.get<std::string>();
    if (!fs::exists(fi.path)) throw_error(fi.path, ": missing (the checkpoint is incomplete)");
    fi.file = std::make_unique<H5File>(fi.path, false);
    try {
      fi.index = nlohmann::json::parse(fi.file->read_text_attr("index"));
      fi.rank = nlohmann::json::parse(fi.file->read_text_attr("rank"));
    } catch (const nlohmann::json::exception& e) {
      throw_error(fi.path, ": damaged piece index: ", e.what());
    }
    files.push_back(std::move(fi));
  }

  Ops& ops = model.ops();
  auto& params = model.params();
  const int dp_rank = par ? par->dp_rank() : 0;
  for (int k = 0; k < int(params.size()); ++k) {
    Param& p = params[k];
    const Shape full = p.full_shape.empty() ? p.value.shape() : p.full_shape;
    const auto [full_rows, full_cols] = rows_cols(full);
    const auto [loc_rows, loc_cols] = rows_cols(p.value.shape());
    // this rank's slice of the full tensor: rows [r0, r0 + loc_rows), cols [c0, c0 + loc_cols)
    const int64_t r0 = p.shard_dim == 0 ? p.shard_begin : 0, c0 = p.shard_dim == 1 ? p.shard_begin : 0;
    const int64_t n_local = p.value.numel();
    std::vector<float> w(n_local), m(with_optim ? n_local : 0), v(with_optim ? n_local : 0);
    std::vector<char> have(n_local, 0);
    int64_t filled = 0;
    for (auto& fi : files) {
      for (const auto& e : fi.index) {
        if (e.at("name").get<std::string>() != p.name) continue;
        if (e.at("full_shape").get<Shape>() != full)
          throw_error(fi.path, ": tensor '", p.name, "' has full shape ", shape_str(e.at("full_shape").get<Shape>()),
                      ", the model expects ", shape_str(full));
        const Shape pshape = e.at("local_shape").get<Shape>();
        const auto [prows, pcols] = rows_cols(pshape);
        const int sd = e.at("shard_dim").get<int>();
        const int64_t sb = e.at("shard_begin").get<int64_t>();
        const int64_t e0 = e.at("e0"), e1 = e.at("e1");
        const int64_t pr0 = (sd == 0 ? sb : 0) + e0 / pcols, pr1 = (sd == 0 ? sb : 0) + (e1 - 1) / pcols + 1;
        const int64_t pc0 = sd == 1 ? sb : 0, pc1 = pc0 + pcols;
        if (pr1 <= r0 || pr0 >= r0 + loc_rows || pc1 <= c0 || pc0 >= c0 + loc_cols) continue;  // disjoint
        const std::string g = e.at("group");
        auto read_checked = [&](const char* what, const char* crc_key) {
          std::vector<float> d = fi.file->read(g + "/" + what, e1 - e0);
          if (!e.contains(crc_key) || e.at(crc_key).get<std::string>() != hex(fnv1a(d.data(), d.size())))
            throw_error(fi.path, ": checksum mismatch for '", g, "/", what, "' (file damaged)");
          return d;
        };
        std::vector<float> pw = read_checked("w", "crc_w"), pm, pv;
        if (with_optim) {
          pm = read_checked("m", "crc_m");
          pv = read_checked("v", "crc_v");
        }
        for (int64_t x = e0; x < e1; ++x) {
          const int64_t fr = (sd == 0 ? sb : 0) + x / pcols, fc = (sd == 1 ? sb : 0) + x % pcols;
          if (fr < r0 || fr >= r0 + loc_rows || fc < c0 || fc >= c0 + loc_cols) continue;
          const int64_t li = (fr - r0) * loc_cols + (fc - c0);
          if (!have[li]) ++filled;
          have[li] = 1;
          w[li] = pw[x - e0];
          if (with_optim) {
            m[li] = pm[x - e0];
            v[li] = pv[x - e0];
          }
        }
      }
    }
    (void)full_rows;
    (void)full_cols;
    if (filled != n_local)
      throw_error(dir, ": tensor '", p.name, "' is incomplete: ", n_local - filled, " of the ", n_local,
                  " elements this rank needs are in no file");
    ops.upload(p.value, w.data());
    if (!with_optim) continue;
    if (ZeroOptimizer* z = optimizer->zero()) {
      for (const auto& zp : z->pieces()) {
        if (zp.segment != k) continue;
        const int64_t e0 = zp.flat - p.flat_offset;
        if (z->shard_master().defined()) {
          Tensor t = z->shard_master().flat_slice(zp.shard, zp.numel);
          ops.upload(t, w.data() + e0);
        }
        Tensor tm = z->shard_m().flat_slice(zp.shard, zp.numel), tv = z->shard_v().flat_slice(zp.shard, zp.numel);
        ops.upload(tm, m.data() + e0);
        ops.upload(tv, v.data() + e0);
      }
    } else {
      auto& st = optimizer->state()[k];
      if (st.master.raw() != p.value.raw()) ops.upload(st.master, w.data());
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
  const int dp_now = par ? par->dp_size() : 1;
  if (j.at("layout").value("dp", 1) == dp_now) {  // same DP size: each DP rank resumes its own stream
    for (auto& fi : files)
      if (fi.rank.value("dp_rank", -1) == dp_rank && fi.rank.value("tp_rank", -1) == 0)
        meta.data_position = fi.rank.value("data_position", meta.data_position);
  }
  return meta;
}

}  // namespace difftron
