// Sharded checkpoints: see checkpoint.h. HDF5 (serial, one file per rank) for tensor pieces,
// nlohmann-json for metadata and the per-file piece index.
#include "io/checkpoint.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <system_error>
#include <thread>

#include <glog/logging.h>
#include <hdf5.h>

#include "base/bf16.h"
#include "base/error.h"
#include "io/hdf5.h"
#include "parallel/comm.h"
#include "parallel/grid.h"

namespace fs = std::filesystem;

namespace difftron {
namespace {

// 3: the piece index is a dataset (no size limit). 2: an attribute (HDF5 limits those to
// 64 KiB, ~20 layers); still read.
constexpr int kFormatVersion = 3;
constexpr int kOldestReadable = 2;

uint64_t fnv1a(const float* v, size_t n) {
  uint64_t h = 1469598103934665603ull;
  const unsigned char* p = reinterpret_cast<const unsigned char*>(v);
  for (size_t i = 0; i < n * sizeof(float); ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

// Version 3's checksum: four independent multiply-rotate lanes over 8-byte words (several GB/s
// where byte-serial FNV-1a manages ~1), folded and finished with splitmix64's mixer. It only
// has to catch damage, not resist forgery.
uint64_t hash64(const float* v, size_t n) {
  constexpr uint64_t P1 = 0x9E3779B185EBCA87ull, P2 = 0xC2B2AE3D27D4EB4Full;
  auto rotl = [](uint64_t x, int r) { return (x << r) | (x >> (64 - r)); };
  const unsigned char* p = reinterpret_cast<const unsigned char*>(v);
  const size_t bytes = n * sizeof(float);
  uint64_t h[4] = {P1 + P2, P2, 0, uint64_t(0) - P1};
  size_t i = 0;
  for (; i + 32 <= bytes; i += 32)
    for (int l = 0; l < 4; ++l) {
      uint64_t w;
      std::memcpy(&w, p + i + 8 * l, 8);
      h[l] = rotl(h[l] + w * P2, 31) * P1;
    }
  uint64_t x = rotl(h[0], 1) + rotl(h[1], 7) + rotl(h[2], 12) + rotl(h[3], 18) + uint64_t(bytes);
  for (; i < bytes; ++i) x = rotl(x ^ (uint64_t(p[i]) * P1), 11) * P2;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
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

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", (long long)step);
  return buf;
}

std::string os_error(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

// The innermost message of HDF5's error stack: for I/O failures the file driver's, which
// carries the OS error ("... errno = 5, error message = 'Input/output error'").
std::string hdf5_error_text() {
  std::string text;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD,
           [](unsigned, const H5E_error2_t* e, void* out) -> herr_t {
             if (e->desc && *e->desc) *static_cast<std::string*>(out) = e->desc;
             return 0;
           },
           &text);
  if (text.empty()) return "HDF5 reported no detail";
  // the file driver's message: keep its OS error, drop the buffer addresses and sizes
  const auto at = text.find("errno = ");
  if (at != std::string::npos) {
    const auto msg = text.find("error message = '", at);
    const auto end = msg == std::string::npos ? msg : text.find('\'', msg + 17);
    if (end != std::string::npos) return text.substr(msg + 17, end - msg - 17) + " (" + text.substr(at, text.find(',', at) - at) + ")";
  }
  return text;
}

// fsync a file or directory; throws naming it and the OS error.
void fsync_path(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_error(path.string(), ": cannot open to sync: ", os_error(errno));
  const int rc = ::fsync(fd), err = errno;
  ::close(fd);
  if (rc != 0) throw_error(path.string(), ": fsync failed: ", os_error(err));
}

int64_t file_size(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? int64_t(st.st_size) : -1;
}


// One HDF5 file of a checkpoint: 1-D datasets of f32 values or bytes, text attributes. Every
// call is checked; close() reports what HDF5 could not flush.
class H5File {
 public:
  H5File(const std::string& path, bool create) : path_(path) {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // our own messages instead of HDF5's stack
    id_ = create ? H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT)
                 : H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    if (id_ < 0) throw_error(path, create ? ": cannot create HDF5 file: " : ": cannot open as HDF5: ", hdf5_error_text());
    if (!create) size_ = file_size(path);
  }
  ~H5File() {
    if (id_ >= 0) H5Fclose(id_);
  }
  H5File(const H5File&) = delete;
  H5File& operator=(const H5File&) = delete;

  // Closes the file (HDF5 writes its metadata here) and checks that it succeeded.
  void close() {
    const herr_t st = H5Fclose(id_);
    id_ = -1;
    if (st < 0) throw_error(path_, ": cannot finish writing (close failed): ", hdf5_error_text());
  }

  void write(const std::string& name, hid_t mem_type, hid_t file_type, const void* data, size_t n) {
    hsize_t dims = n;
    Hid lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
    H5Pset_create_intermediate_group(lcpl.get(), 1);
    Hid space(H5Screate_simple(1, &dims, nullptr), H5Sclose);
    Hid ds(H5Dcreate2(id_, name.c_str(), file_type, space.get(), lcpl.get(), H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
    if (!ds.valid() || H5Dwrite(ds.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
      throw_error(path_, ": cannot write dataset '", name, "': ", hdf5_error_text());
  }
  void write_floats(const std::string& name, const float* v, size_t n) {
    write(name, H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, v, n);
  }
  void write_text(const std::string& name, const std::string& text) {
    write(name, H5T_NATIVE_UCHAR, H5T_STD_U8LE, text.data(), text.size());
  }

  bool has(const std::string& name) const { return H5Lexists(id_, name.c_str(), H5P_DEFAULT) > 0; }

  // Reads a 1-D dataset of `expect` elements of `elem_size` bytes; refuses, before allocating,
  // a dataset whose size differs or could not fit in the file.
  void read(const std::string& name, hid_t mem_type, size_t elem_size, int64_t expect, void* out) {
    Hid ds(H5Dopen2(id_, name.c_str(), H5P_DEFAULT), H5Dclose);
    if (!ds.valid()) throw_error(path_, ": missing dataset '", name, "'");
    Hid space(H5Dget_space(ds.get()), H5Sclose);
    const hssize_t n = space.valid() ? H5Sget_simple_extent_npoints(space.get()) : -1;
    if (n != expect) throw_error(path_, ": dataset '", name, "' holds ", int64_t(n), " values, its index says ", expect);
    if (H5Dread(ds.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0)
      throw_error(path_, ": cannot read dataset '", name, "' (file damaged?): ", hdf5_error_text());
  }
  int64_t numel(const std::string& name) {
    Hid ds(H5Dopen2(id_, name.c_str(), H5P_DEFAULT), H5Dclose);
    if (!ds.valid()) throw_error(path_, ": missing dataset '", name, "'");
    Hid space(H5Dget_space(ds.get()), H5Sclose);
    const hssize_t n = space.valid() ? H5Sget_simple_extent_npoints(space.get()) : -1;
    if (n < 0) throw_error(path_, ": dataset '", name, "' has no readable shape");
    return int64_t(n);
  }
  std::vector<float> read_floats(const std::string& name, int64_t expect) {
    if (expect < 0 || expect > size_ / int64_t(sizeof(float)))
      throw_error(path_, ": dataset '", name, "' would hold ", expect, " values, more than the file's ", size_,
                  " bytes can (file damaged or forged)");
    std::vector<float> v(expect);
    read(name, H5T_NATIVE_FLOAT, sizeof(float), expect, v.data());
    return v;
  }
  std::string read_text(const std::string& name) {
    const int64_t n = numel(name);
    if (n > size_) throw_error(path_, ": dataset '", name, "' claims ", n, " bytes, more than the file holds");
    std::string s(n, '\0');
    read(name, H5T_NATIVE_UCHAR, 1, n, s.data());
    return s;
  }

  void write_text_attr(const char* name, const std::string& text) {
    Hid type(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(type.get(), std::max<size_t>(text.size(), 1));
    Hid space(H5Screate(H5S_SCALAR), H5Sclose);
    Hid attr(H5Acreate2(id_, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    if (!attr.valid() || H5Awrite(attr.get(), type.get(), text.empty() ? " " : text.data()) < 0)
      throw_error(path_, ": cannot write attribute '", name, "': ", hdf5_error_text());
  }
  std::string read_text_attr(const char* name) {
    Hid attr(H5Aopen(id_, name, H5P_DEFAULT), H5Aclose);
    if (!attr.valid()) throw_error(path_, ": missing attribute '", name, "' (not a difftron checkpoint file?)");
    Hid type(H5Aget_type(attr.get()), H5Tclose);
    const size_t n = H5Tget_size(type.get());
    if (n == 0 || int64_t(n) > size_) throw_error(path_, ": attribute '", name, "' has a bad size");
    std::string s(n, '\0');
    if (H5Aread(attr.get(), type.get(), s.data()) < 0) throw_error(path_, ": cannot read attribute '", name, "'");
    return s;
  }

 private:
  std::string path_;
  hid_t id_ = -1;
  int64_t size_ = 0;
};

// Writes `text` to `path` through a temporary file: written, fsynced, renamed, and the
// directory fsynced, so `path` is always the old or the new content, on disk.
void write_file_durably(const fs::path& path, const std::string& text) {
  fs::path tmp = path;
  tmp += ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw_error(tmp.string(), ": cannot create: ", os_error(errno));
  size_t done = 0;
  int err = 0;
  while (done < text.size() && !err) {
    const ssize_t w = ::write(fd, text.data() + done, text.size() - done);
    if (w < 0 && errno != EINTR) err = errno;
    if (w > 0) done += size_t(w);
  }
  if (!err && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && !err) err = errno;
  if (err) {
    ::unlink(tmp.c_str());
    throw_error(tmp.string(), ": write failed: ", os_error(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) throw_error(path.string(), ": cannot rename into place: ", os_error(errno));
  fsync_path(path.parent_path());
}

// Moves `from` onto `to`, which may exist: atomically exchanged where the file system can
// (renameat2 RENAME_EXCHANGE, then the old copy, now under `from`, is removed); else the old
// copy is first moved aside to `aside`, where latest_checkpoint() finds it if we die between
// the two renames.
void replace_directory(const fs::path& from, const fs::path& to, const fs::path& aside) {
  if (!fs::exists(to)) {
    if (::rename(from.c_str(), to.c_str()) != 0) throw_error(to.string(), ": cannot rename into place: ", os_error(errno));
    return;
  }
#ifdef SYS_renameat2
  constexpr unsigned kRenameExchange = 2;  // RENAME_EXCHANGE
  if (::syscall(SYS_renameat2, AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), kRenameExchange) == 0) {
    std::error_code ec;
    fs::remove_all(from, ec);  // the replaced copy
    return;
  }
#endif
  std::error_code ec;
  fs::remove_all(aside, ec);
  if (::rename(to.c_str(), aside.c_str()) != 0) throw_error(to.string(), ": cannot move aside: ", os_error(errno));
  if (::rename(from.c_str(), to.c_str()) != 0) throw_error(to.string(), ": cannot rename into place: ", os_error(errno));
  fs::remove_all(aside, ec);
}

void agree(ParallelContext* par, const std::string& my_error, const std::string& what) {
  agree_or_throw(par ? &par->world_host() : nullptr, my_error, what);
}

template <typename F>
std::string capture(F&& f) {
  try {
    f();
    return "";
  } catch (const std::exception& e) {
    return e.what();
  }
}

std::vector<float> to_host(Ops& ops, const Tensor& t) {
  std::vector<float> v(t.numel());
  ops.download(t, v.data());
  return v;
}

// rows x cols view of a tensor shape (1-D tensors are one column)
std::pair<int64_t, int64_t> rows_cols(const Shape& s) {
  if (s.size() == 1) return {s[0], 1};
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < s.size(); ++i) rows *= s[i];
  return {rows, s.back()};
}

std::string index_entry_group(const ShardPiece& p) {
  return p.name + "/tp" + std::to_string(p.shard_begin) + "_e" + std::to_string(p.e0);
}

}  // namespace

// One array of a snapshot: the tensor's bytes as stored, in the snapshot's host buffer.
struct HostArray {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t numel = 0;
};

// The host buffer snapshots are copied into, kept from one save to the next (page-locked
// where the backend can: a GPU-to-host copy then runs at bus speed, and allocating it is paid
// once, not per save).
struct SnapshotArena {
  Ops* ops = nullptr;
  void* data = nullptr;
  size_t bytes = 0;
  bool pinned = false;
  ~SnapshotArena() { release(); }
  void release() {
    if (data) pinned ? ops->free_pinned(data) : std::free(data);
    data = nullptr;
    bytes = 0;
  }
  void reserve(Ops& o, size_t need) {
    if (data && bytes >= need && ops == &o) return;
    release();
    ops = &o;
    data = o.alloc_pinned(need);
    pinned = data != nullptr;
    if (!data) data = std::malloc(need);
    if (!data) throw_error("checkpoint snapshot: cannot allocate ", need, " bytes of host memory");
    bytes = need;
  }
};

namespace {

// The values of a snapshot array as floats: the buffer itself for f32, else converted.
const float* as_floats(const HostArray& a, std::vector<float>& converted) {
  if (a.dtype == DType::F32) return static_cast<const float*>(a.data);
  converted.resize(a.numel);
  if (a.dtype == DType::BF16) {
    const uint16_t* b = static_cast<const uint16_t*>(a.data);
    for (int64_t i = 0; i < a.numel; ++i) converted[i] = bf16_to_float(b[i]);
  } else if (a.dtype == DType::F64) {
    const double* d = static_cast<const double*>(a.data);
    for (int64_t i = 0; i < a.numel; ++i) converted[i] = float(d[i]);
  } else {
    throw_error("checkpoint: cannot store a ", dtype_name(a.dtype), " array");
  }
  return converted.data();
}

// Writes, closes and fsyncs one rank's file. The values of array j (in piece order) are
// host[j] when given (a snapshot), else downloaded from the tensor through `ops` one at a time.
void write_rank_file(const fs::path& path, const std::vector<ShardPiece>& pieces,
                     const std::vector<HostArray>* host, Ops* ops, const nlohmann::json& rank_info) {
  nlohmann::json index = nlohmann::json::array();
  H5File f(path.string(), true);
  size_t j = 0;
  for (const ShardPiece& p : pieces) {
    const std::string group = index_entry_group(p);
    nlohmann::json e = {{"name", p.name},         {"group", group},          {"full_shape", p.global_shape},
                        {"local_shape", p.local_shape}, {"shard_dim", p.shard_dim}, {"shard_begin", p.shard_begin},
                        {"e0", p.e0},             {"e1", p.e1}};
    for (const ShardArray& a : p.arrays) {
      std::vector<float> values;
      const float* v = nullptr;
      size_t n = 0;
      if (host) {
        v = as_floats(host->at(j), values);
        n = size_t(host->at(j).numel);
      } else {
        values = to_host(*ops, a.data);
        v = values.data();
        n = values.size();
      }
      ++j;
      f.write_floats(group + "/" + a.kind, v, n);
      e["crc_" + a.kind] = hex(hash64(v, n));
    }
    index.push_back(e);
  }
  f.write_text("index", index.dump());
  f.write_text_attr("rank", rank_info.dump());
  f.close();
  fsync_path(path);
}

// A checked index entry of a rank file (see validate_entry).
struct Entry {
  std::string name, group;
  Shape full, local;
  int shard_dim = -1;
  int64_t shard_begin = 0, e0 = 0, e1 = 0;
  nlohmann::json crc;
};

// An index entry as the file states it, checked so that no later arithmetic can divide by
// zero, overflow or index out of range: shapes positive, the slice inside the full tensor,
// [e0, e1) inside the slice.
Entry validate_entry(const std::string& path, const nlohmann::json& e) {
  Entry x;
  try {
    x.name = e.at("name").get<std::string>();
    x.group = e.at("group").get<std::string>();
    x.full = e.at("full_shape").get<Shape>();
    x.local = e.at("local_shape").get<Shape>();
    x.shard_dim = e.at("shard_dim").get<int>();
    x.shard_begin = e.at("shard_begin").get<int64_t>();
    x.e0 = e.at("e0").get<int64_t>();
    x.e1 = e.at("e1").get<int64_t>();
    x.crc = e;
  } catch (const nlohmann::json::exception& err) {
    throw_error(path, ": damaged piece index entry ", e.dump().substr(0, 200), ": ", err.what());
  }
  auto bad = [&](const std::string& why) { throw_error(path, ": bad index entry for '", x.name, "': ", why); };
  if (x.full.empty() || x.full.size() > 2 || x.local.size() != x.full.size()) bad("shapes must be 1-D or 2-D and alike");
  int64_t numel = 1;
  for (size_t d = 0; d < x.full.size(); ++d) {
    if (x.full[d] <= 0 || x.local[d] <= 0 || x.local[d] > x.full[d]) bad("shape " + shape_str(x.local) + " of " + shape_str(x.full));
    numel *= x.local[d];
  }
  if (x.shard_dim < -1 || x.shard_dim >= int(x.full.size())) bad("shard_dim " + std::to_string(x.shard_dim));
  if (x.shard_dim < 0 ? x.local != x.full || x.shard_begin != 0
                      : x.shard_begin < 0 || x.shard_begin > x.full[x.shard_dim] - x.local[x.shard_dim])
    bad("the slice lies outside the tensor");
  for (size_t d = 0; d < x.full.size(); ++d)
    if (int(d) != x.shard_dim && x.local[d] != x.full[d]) bad("only shard_dim may be split");
  if (x.e0 < 0 || x.e0 >= x.e1 || x.e1 > numel) bad("element range [" + std::to_string(x.e0) + ", " + std::to_string(x.e1) + ")");
  return x;
}

struct RankFile {
  std::unique_ptr<H5File> file;
  std::string path;
  std::vector<Entry> entries;
  nlohmann::json rank;
  int version = kFormatVersion;  // which checksum: FNV-1a up to 2, hash64 from 3
};

// Opens every rank file `meta` lists and reads its index (a dataset; an attribute in version 2).
std::vector<RankFile> open_rank_files(const std::string& dir, const nlohmann::json& meta) {
  std::vector<RankFile> files;
  const nlohmann::json& names = meta.at("layout").at("files");
  if (!names.is_array()) throw_error(dir, "/meta.json: layout.files is not a list");
  const int version = meta.value("version", 0);
  for (const auto& name_json : names) {
    const std::string name = name_json.is_string() ? name_json.get<std::string>() : "";
    if (name.empty() || name.find('/') != std::string::npos || name[0] == '.')
      throw_error(dir, "/meta.json: bad rank file name ", name_json.dump(), " (must be a plain file name)");
    RankFile fi;
    fi.path = dir + "/" + name;
    if (!fs::exists(fi.path)) throw_error(fi.path, ": missing (the checkpoint is incomplete)");
    fi.file = std::make_unique<H5File>(fi.path, false);
    fi.version = version;
    nlohmann::json index;
    try {
      index = nlohmann::json::parse(version >= 3 ? fi.file->read_text("index") : fi.file->read_text_attr("index"));
      fi.rank = nlohmann::json::parse(fi.file->read_text_attr("rank"));
    } catch (const nlohmann::json::exception& e) {
      throw_error(fi.path, ": damaged piece index: ", e.what());
    }
    if (!index.is_array() || !fi.rank.is_object()) throw_error(fi.path, ": damaged piece index (wrong JSON types)");
    for (const auto& e : index) fi.entries.push_back(validate_entry(fi.path, e));
    files.push_back(std::move(fi));
  }
  return files;
}

// Fills one target piece's arrays from whichever file pieces overlap it.
// Verified arrays of the tensor being filled, keyed "file:group/kind": the pieces of one
// tensor (its whole slice, then its ZeRO shards) overlap the same stored pieces, which are
// then read and checksummed once.
using ReadCache = std::map<std::string, std::vector<float>>;

void fill_piece(const ShardPiece& t, bool with_optim, std::vector<RankFile>& files, Ops& ops, ReadCache& cache) {
  const auto [loc_rows, loc_cols] = rows_cols(t.local_shape);
  (void)loc_rows;
  // the target slice's origin in the full tensor
  const int64_t r0 = t.shard_dim == 0 ? t.shard_begin : 0, c0 = t.shard_dim == 1 ? t.shard_begin : 0;
  // the target's elements [e0, e1) cover local rows [tr0, tr1)
  const int64_t tr0 = r0 + t.e0 / loc_cols, tr1 = r0 + (t.e1 - 1) / loc_cols + 1;
  const int64_t n = t.e1 - t.e0;
  std::map<std::string, std::vector<float>> buf;
  for (const ShardArray& a : t.arrays)
    if (with_optim || a.kind == "w") buf[a.kind].assign(n, 0.0f);
  std::vector<char> have(n, 0);
  int64_t filled = 0;
  for (auto& fi : files) {
    for (const Entry& e : fi.entries) {
      if (e.name != t.name) continue;
      if (e.full != t.global_shape)
        throw_error(fi.path, ": tensor '", t.name, "' has full shape ", shape_str(e.full), ", the model expects ",
                    shape_str(t.global_shape));
      const auto [prows, pcols] = rows_cols(e.local);
      (void)prows;
      const int64_t base_r = e.shard_dim == 0 ? e.shard_begin : 0, base_c = e.shard_dim == 1 ? e.shard_begin : 0;
      const int64_t pr0 = base_r + e.e0 / pcols, pr1 = base_r + (e.e1 - 1) / pcols + 1;
      const int64_t pc0 = base_c, pc1 = base_c + pcols;
      if (pr1 <= tr0 || pr0 >= tr1 || pc1 <= c0 || pc0 >= c0 + loc_cols) continue;  // disjoint
      std::map<std::string, const std::vector<float>*> src;
      for (auto& [kind, _] : buf) {
        std::vector<float>& d = cache[fi.path + ":" + e.group + "/" + kind];
        if (d.empty()) {
          const std::string key = "crc_" + kind;
          d = fi.file->read_floats(e.group + "/" + kind, e.e1 - e.e0);
          if (!e.crc.contains(key) || !e.crc.at(key).is_string() ||
              e.crc.at(key).get<std::string>() !=
                  hex(fi.version >= 3 ? hash64(d.data(), d.size()) : fnv1a(d.data(), d.size())))
            throw_error(fi.path, ": checksum mismatch for '", e.group, "/", kind, "' (file damaged)");
        }
        src[kind] = &d;
      }
      // copy row by row: within a row of the file's piece, elements run contiguously in both
      // the file and the target (memcpy speed; a 1.3B model is ~1.3e9 elements per array)
      for (int64_t row = e.e0 / pcols; row <= (e.e1 - 1) / pcols; ++row) {
        const int64_t fr = base_r + row;  // global row
        if (fr < r0) continue;
        const int64_t x_lo = std::max(e.e0, row * pcols), x_hi = std::min(e.e1, (row + 1) * pcols);
        const int64_t fc_lo = std::max(base_c + (x_lo - row * pcols), c0);
        const int64_t fc_hi = std::min(base_c + (x_hi - row * pcols), c0 + loc_cols);
        if (fc_lo >= fc_hi) continue;
        int64_t li = (fr - r0) * loc_cols + (fc_lo - c0) - t.e0;  // index into the target piece
        int64_t x = row * pcols + (fc_lo - base_c);                 // index into the file piece
        int64_t len = fc_hi - fc_lo;
        if (li < 0) {
          x -= li;
          len += li;
          li = 0;
        }
        len = std::min(len, n - li);
        if (len <= 0) continue;
        for (int64_t i = li; i < li + len; ++i) filled += have[i] == 0;
        std::fill(have.begin() + li, have.begin() + li + len, 1);
        for (auto& [kind, v] : buf) {
          const std::vector<float>& from = *src[kind];
          std::copy(from.begin() + (x - e.e0), from.begin() + (x - e.e0) + len, v.begin() + li);
        }
      }
    }
  }
  if (filled != n)
    throw_error("tensor '", t.name, "' is incomplete: ", n - filled, " of the ", n,
                " elements this rank needs are in no file");
  for (const ShardArray& a : t.arrays)
    if (buf.count(a.kind)) {
      Tensor dst = a.data;
      if (dst.dtype() == DType::F32) ops.upload_bytes(dst, buf[a.kind].data());  // no conversion
      else ops.upload(dst, buf[a.kind].data());
    }
}

}  // namespace

// A save split into its steps: begin_save (collective: the temporary directory), optionally
// snapshot, write_rank (this rank alone, any thread), finish_save (collective: agreement and
// publish). write_checkpoint runs them in a row; AsyncCheckpointer runs write_rank on a thread.
struct PendingSave {
  std::string root, name;
  fs::path tmp_dir, final_dir;
  CheckpointMeta meta;
  nlohmann::json model_config, rank_info;
  bool has_optimizer = false;
  ParallelContext* par = nullptr;
  int world_rank = 0, world = 1;
  std::vector<ShardPiece> pieces;
  bool snapshotted = false;
  std::vector<HostArray> host;  // the snapshot: array j's bytes (in the arena), in piece order
  std::string error;            // this rank's failure so far ("" if none)
  double write_seconds = 0;
};

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// 1. rank 0 makes a fresh temporary directory (collective)
std::unique_ptr<PendingSave> begin_save(const std::string& root, const CheckpointMeta& meta,
                                        const nlohmann::json& model_config, std::vector<ShardPiece> pieces,
                                        bool has_optimizer, ParallelContext* par, int tp_rank, int dp_rank,
                                        const std::string& rank_data_position) {
  auto s = std::make_unique<PendingSave>();
  s->root = root;
  s->name = step_dir_name(meta.step);
  s->final_dir = fs::path(root) / s->name;
  s->tmp_dir = fs::path(root) / (".tmp." + s->name);
  s->meta = meta;
  s->model_config = model_config;
  s->has_optimizer = has_optimizer;
  s->par = par;
  s->world_rank = par ? par->world_rank() : 0;
  s->world = par ? par->world_size() : 1;
  s->pieces = std::move(pieces);
  s->rank_info = {{"world_rank", s->world_rank}, {"tp_rank", tp_rank}, {"dp_rank", dp_rank},
                  {"data_position", rank_data_position.empty() ? meta.data_position : rank_data_position}};
  std::string err;
  if (s->world_rank == 0)
    err = capture([&] {
      std::error_code ec;
      fs::create_directories(root, ec);
      if (ec || !fs::is_directory(root)) throw_error(root, ": cannot create checkpoint directory: ", ec.message());
      fs::remove_all(s->tmp_dir, ec);
      if (!fs::create_directory(s->tmp_dir, ec) || ec) throw_error(s->tmp_dir.string(), ": cannot create: ", ec.message());
    });
  agree(par, err, "creating " + s->tmp_dir.string());
  return s;
}

size_t aligned_bytes(size_t b) { return (b + 255) / 256 * 256; }

// Host bytes a snapshot of these pieces takes in the arena.
size_t snapshot_bytes(const std::vector<ShardPiece>& pieces) {
  size_t need = 0;
  for (const ShardPiece& p : pieces)
    for (const ShardArray& a : p.arrays) need += aligned_bytes(a.data.nbytes());
  return std::max<size_t>(need, 1);
}

// Copies every array's bytes into the arena and drops the tensors, so that the writer needs
// neither them nor `ops`. A failure (say, out of host memory) is kept for finish_save to
// report on every rank, as a failed write would be.
void snapshot(PendingSave& s, Ops& ops, SnapshotArena& arena) {
  s.error = capture([&] {
    arena.reserve(ops, snapshot_bytes(s.pieces));
    char* at = static_cast<char*>(arena.data);
    for (ShardPiece& p : s.pieces)
      for (ShardArray& a : p.arrays) {
        ops.download_bytes(a.data, at);
        s.host.push_back({at, a.data.dtype(), a.data.numel()});
        at += aligned_bytes(a.data.nbytes());
        a.data = Tensor();
      }
  });
  s.snapshotted = true;
}

// 2. this rank writes and syncs its file (from the snapshot when there is one, else through `ops`)
void write_rank(PendingSave& s, Ops* ops) {
  const auto t0 = std::chrono::steady_clock::now();
  if (s.error.empty())
    s.error = capture([&] {
      write_rank_file(s.tmp_dir / rank_file_name(s.world_rank), s.pieces, s.snapshotted ? &s.host : nullptr, ops,
                      s.rank_info);
    });
  s.host.clear();  // the arena stays with the checkpointer for the next save
  s.write_seconds = seconds_since(t0);
}

// 3. the ranks agree that every file is on disk; rank 0 writes meta.json and moves the
// checkpoint into place, then `latest` (collective)
std::string finish_save(PendingSave& s) {
  const auto t0 = std::chrono::steady_clock::now();
  agree(s.par, s.error, "writing the checkpoint's rank files");
  const fs::path& tmp_dir = s.tmp_dir;
  std::string err;
  if (s.world_rank == 0)
    err = capture([&] {
      nlohmann::json j;
      j["format"] = "difftron-checkpoint";
      j["version"] = kFormatVersion;
      j["model_config"] = s.model_config;
      j["step"] = s.meta.step;
      j["tokens_seen"] = s.meta.tokens_seen;
      j["seed"] = s.meta.seed;
      j["data_position"] = s.meta.data_position;
      nlohmann::json files = nlohmann::json::array();
      for (int r = 0; r < s.world; ++r) files.push_back(rank_file_name(r));
      j["layout"] = {{"tp", s.par ? s.par->tp_size() : 1}, {"dp", s.par ? s.par->dp_size() : 1},
                     {"world", s.world}, {"files", files}};
      j["has_optimizer"] = s.has_optimizer;
      j["extra"] = s.meta.extra;
      write_file_durably(tmp_dir / "meta.json", j.dump(2) + "\n");
      fsync_path(tmp_dir);
      replace_directory(tmp_dir, s.final_dir, fs::path(s.root) / (".replaced." + s.name));
      fsync_path(s.root);
      write_file_durably(fs::path(s.root) / "latest", s.name + "\n");
    });
  if (!err.empty() && s.world_rank == 0) {
    std::error_code ec;
    fs::remove_all(tmp_dir, ec);
  }
  agree(s.par, err, "publishing the checkpoint");
  s.write_seconds += seconds_since(t0);
  return s.final_dir.string();
}

}  // namespace

std::string write_checkpoint(const std::string& root, const CheckpointMeta& meta, const nlohmann::json& model_config,
                             const std::vector<ShardPiece>& pieces, bool has_optimizer, Ops& ops,
                             ParallelContext* par, int tp_rank, int dp_rank, const std::string& rank_data_position) {
  auto s = begin_save(root, meta, model_config, pieces, has_optimizer, par, tp_rank, dp_rank, rank_data_position);
  write_rank(*s, &ops);
  return finish_save(*s);
}

std::string save_checkpoint(const std::string& root, const CheckpointMeta& meta, Model& model, AdamW* optimizer,
                            ParallelContext* par, const std::string& rank_data_position) {
  const int dp_rank = par ? par->dp_rank() : 0;
  return write_checkpoint(root, meta, nlohmann::json(model.config()), pieces_to_save(model, optimizer, dp_rank),
                          optimizer != nullptr, model.ops(), par, model.tp_rank(), dp_rank, rank_data_position);
}

AsyncCheckpointer::AsyncCheckpointer() = default;

void AsyncCheckpointer::prepare(Model& model, AdamW* optimizer, ParallelContext* par) {
  if (preparer_.joinable() || save_) return;
  if (!arena_) arena_ = std::make_unique<SnapshotArena>();
  const size_t bytes = snapshot_bytes(pieces_to_save(model, optimizer, par ? par->dp_rank() : 0));
  SnapshotArena* arena = arena_.get();
  Ops* ops = &model.ops();
  preparer_ = std::thread([arena, ops, bytes] {
    try {
      arena->reserve(*ops, bytes);
    } catch (const std::exception& e) {
      LOG(WARNING) << "checkpoint snapshot buffer: " << e.what() << " (the first save will try again)";
    }
  });
}

AsyncCheckpointer::~AsyncCheckpointer() {
  if (preparer_.joinable()) preparer_.join();
  if (!save_) return;
  if (save_->world > 1 && std::uncaught_exceptions() > 0) {
    if (writer_.joinable()) writer_.join();
    LOG(WARNING) << "checkpoint step " << save_->meta.step << " left unpublished in " << save_->tmp_dir.string()
                 << " (this rank is failing; the ranks cannot agree that it is complete)";
    return;
  }
  try {
    wait();
  } catch (const std::exception& e) {
    LOG(ERROR) << "checkpoint save failed: " << e.what();
  }
}

int64_t AsyncCheckpointer::in_flight_step() const { return save_ ? save_->meta.step : -1; }

void AsyncCheckpointer::start(const std::string& root, const CheckpointMeta& meta, Model& model, AdamW* optimizer,
                              ParallelContext* par, const std::string& rank_data_position) {
  wait();
  const auto t0 = std::chrono::steady_clock::now();
  const int dp_rank = par ? par->dp_rank() : 0;
  std::unique_ptr<PendingSave> s =
      begin_save(root, meta, nlohmann::json(model.config()), pieces_to_save(model, optimizer, dp_rank),
                 optimizer != nullptr, par, model.tp_rank(), dp_rank, rank_data_position);
  if (preparer_.joinable()) preparer_.join();
  if (!arena_) arena_ = std::make_unique<SnapshotArena>();
  snapshot(*s, model.ops(), *arena_);
  snapshot_seconds_ = seconds_since(t0);
  // The writer inherits this thread's signal mask: with SIGTERM/SIGINT blocked there, the
  // stop signal is handled by the training thread and never interrupts the writer's calls.
  sigset_t stop, old;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, &old);
  PendingSave* job = s.get();
  hbool_t threadsafe = 0;
  H5is_library_threadsafe(&threadsafe);  // else the training thread's HDF5 calls could race the writer's
  try {
    if (threadsafe) writer_ = std::thread([job] { write_rank(*job, nullptr); });
  } catch (const std::system_error&) {
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  if (!writer_.joinable()) write_rank(*job, nullptr);  // no (safe) thread: write now, as a synchronous save
  save_ = std::move(s);
}

std::string AsyncCheckpointer::wait() {
  if (!save_) return "";
  if (writer_.joinable()) writer_.join();
  const std::unique_ptr<PendingSave> s = std::move(save_);  // done with, whatever finish_save does
  const std::string dir = finish_save(*s);
  if (on_published) on_published(dir, s->meta.step, s->write_seconds);
  return dir;
}

std::string latest_checkpoint(const std::string& root) {
  std::ifstream f(fs::path(root) / "latest");
  if (!f) return "";
  std::string name;
  std::getline(f, name);
  const bool plain = !name.empty() && name.find('/') == std::string::npos && name[0] != '.';
  fs::path dir = fs::path(root) / name;
  if (plain && !fs::exists(dir / "meta.json")) {
    // a save that replaced this step died between its two renames: the old copy is aside
    fs::path aside = fs::path(root) / (".replaced." + name);
    if (fs::exists(aside / "meta.json")) {
      LOG(WARNING) << root << "/latest names " << name << ", found as " << aside.string()
                   << " (a save replacing it was interrupted); using it";
      return aside.string();
    }
  }
  if (!plain || !fs::exists(dir / "meta.json"))
    throw_error(root, "/latest names '", name, "', which is not a complete checkpoint");
  return dir.string();
}

nlohmann::json read_checkpoint_meta(const std::string& dir) {
  const std::string path = dir + "/meta.json";
  std::ifstream f(path);
  if (!f) throw_error(path, ": cannot open (is '", dir, "' a checkpoint directory?)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw_error(path, ": not valid JSON: ", e.what());
  }
  if (!j.is_object() || j.value("format", std::string()) != "difftron-checkpoint")
    throw_error(path, ": format is not 'difftron-checkpoint'");
  const int v = j.value("version", 0);
  if (v < kOldestReadable || v > kFormatVersion)
    throw_error(path, ": checkpoint version ", v, " is not supported (this build reads ", kOldestReadable, " to ",
                kFormatVersion, ")");
  for (const char* key : {"model_config", "step", "layout"})
    if (!j.contains(key)) throw_error(path, ": missing '", key, "'");
  return j;
}

ModelConfig read_checkpoint_config(const std::string& dir) {
  ModelConfig c;
  try {
    c = read_checkpoint_meta(dir).at("model_config").get<ModelConfig>();
  } catch (const nlohmann::json::exception& e) {
    throw_error(dir, "/meta.json: bad model_config: ", e.what());
  }
  try {
    c.resolve_and_validate();
  } catch (const Error& e) {
    throw_error(dir, "/meta.json: ", e.what());
  }
  return c;
}

namespace {
// Fills `pieces` from the opened rank files of checkpoint `dir` (meta.json `j`).
void fill_pieces(const std::string& dir, const nlohmann::json& j, std::vector<RankFile>& files,
                 const std::vector<ShardPiece>& pieces, bool with_optimizer, Ops& ops) {
  if (with_optimizer && !j.value("has_optimizer", false))
    throw_error(dir, ": holds weights only; cannot resume the optimizer from it");
  ReadCache cache;
  std::string cached_tensor;
  for (const ShardPiece& p : pieces) {
    if (p.name != cached_tensor) cache.clear();  // one tensor's stored pieces at a time
    cached_tensor = p.name;
    try {
      fill_piece(p, with_optimizer, files, ops, cache);
    } catch (const Error& e) {
      const std::string w = e.what();
      if (w.rfind("tensor '", 0) == 0) throw_error(dir, ": ", w);
      throw;
    }
  }
}
}  // namespace

void read_checkpoint_pieces(const std::string& dir, const std::vector<ShardPiece>& pieces, bool with_optimizer,
                            Ops& ops) {
  const nlohmann::json j = read_checkpoint_meta(dir);
  std::vector<RankFile> files = open_rank_files(dir, j);
  fill_pieces(dir, j, files, pieces, with_optimizer, ops);
}

CheckpointMeta load_checkpoint(const std::string& dir, Model& model, AdamW* optimizer, ParallelContext* par) {
  nlohmann::json j = read_checkpoint_meta(dir);
  nlohmann::json stored = j.at("model_config");
  nlohmann::json ours = model.config();
  if (stored != ours)
    throw_error(dir, ": the checkpoint's model config ", stored.dump(), " differs from the model's ", ours.dump());
  std::vector<RankFile> files = open_rank_files(dir, j);
  fill_pieces(dir, j, files, pieces_to_load(model, optimizer), optimizer != nullptr, model.ops());

  CheckpointMeta meta;
  meta.step = j.at("step");
  meta.tokens_seen = j.value("tokens_seen", int64_t(0));
  meta.seed = j.value("seed", uint64_t(0));
  meta.data_position = j.value("data_position", std::string());
  meta.extra = j.value("extra", nlohmann::json::object());
  const int dp_now = par ? par->dp_size() : 1, dp_rank = par ? par->dp_rank() : 0;
  if (j.at("layout").value("dp", 1) == dp_now) {  // same DP size: each DP rank resumes its own stream
    for (auto& fi : files)
      if (fi.rank.value("dp_rank", -1) == dp_rank && fi.rank.value("tp_rank", -1) == 0)
        meta.data_position = fi.rank.value("data_position", meta.data_position);
  }
  return meta;
}

std::map<std::string, std::string> checkpoint_digests(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (auto& fi : open_rank_files(dir, read_checkpoint_meta(dir)))
    for (const Entry& e : fi.entries)
      for (auto it = e.crc.begin(); it != e.crc.end(); ++it)
        if (it.key().rfind("crc_", 0) == 0)
          out[fs::path(fi.path).filename().string() + ":" + e.group + "/" + it.key().substr(4)] = it.value().dump();
  return out;
}

int prune_checkpoints(const std::string& root, int keep) {
  if (keep <= 0) return 0;
  const std::string latest = fs::path(latest_checkpoint(root)).filename().string();
  std::vector<std::string> steps;
  std::error_code ec;
  for (const auto& d : fs::directory_iterator(root, ec)) {
    const std::string n = d.path().filename().string();
    if (n.rfind("step_", 0) == 0 && d.is_directory()) steps.push_back(n);
  }
  std::sort(steps.begin(), steps.end());  // zero-padded: by step
  int removed = 0;
  for (size_t i = 0; i + size_t(keep) < steps.size(); ++i) {
    if (steps[i] == latest) continue;
    fs::remove_all(fs::path(root) / steps[i], ec);
    if (ec) LOG(WARNING) << (fs::path(root) / steps[i]).string() << ": cannot remove old checkpoint: " << ec.message();
    else ++removed;
  }
  return removed;
}

}  // namespace difftron
