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
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>

#include <glog/logging.h>
#include <hdf5.h>

#include "base/bf16.h"
#include "base/error.h"
#include "base/ring_spans.h"
#include "base/thread_pool.h"
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

// Host memory a load reads ahead into (and so the most it reads ahead of its uploads), unless a
// tensor needs more; a synchronous save stages its downloads in up to a quarter of it.
constexpr size_t kStagingBytes = size_t(1) << 30;
// Worker threads for reads and checksums: the machine's hardware threads up to this many (the
// calling thread uploads or writes meanwhile; beyond this they would contend for memory
// bandwidth, and every rank of a node has its own).
constexpr int kMaxWorkers = 16;
// The device f32 buffer a load converts f32 values through into bf16 tensors, at most (elements).
constexpr int64_t kConvertChunk = int64_t(1) << 26;

using steady = std::chrono::steady_clock;
double seconds_since(steady::time_point t0) { return std::chrono::duration<double>(steady::now() - t0).count(); }

size_t aligned_bytes(size_t b) { return (b + 255) / 256 * 256; }

// Host memory used as a ring (RingSpans): spans are taken in order and given back oldest
// first, the order in which a load uploads (a save writes) the arrays that workers read (hash)
// in it meanwhile. Allocated once per load or save, page-locked where `ops` can (a copy from it
// then runs at bus speed; allocating that per array would cost more than the copies); null
// `ops`: plain memory.
class HostRing {
 public:
  HostRing(Ops* ops, size_t bytes) : ops_(ops), spans_(aligned_bytes(std::max<size_t>(bytes, 1))) {
    if (ops_) data_ = static_cast<char*>(ops_->alloc_pinned(spans_.capacity()));
    pinned_ = data_ != nullptr;
    if (!data_) data_ = static_cast<char*>(std::malloc(spans_.capacity()));
    if (!data_)
      throw_error("checkpoint: cannot allocate ", spans_.capacity(), " bytes of host memory to stage arrays in");
  }
  ~HostRing() { pinned_ ? ops_->free_pinned(data_) : std::free(data_); }
  HostRing(const HostRing&) = delete;
  HostRing& operator=(const HostRing&) = delete;

  // `bytes` contiguous bytes after the newest span, or null while older spans hold them.
  char* take(size_t bytes) {
    const std::optional<size_t> at = spans_.take(aligned_bytes(bytes));
    return at ? data_ + *at : nullptr;
  }
  void give_back_oldest() { spans_.give_back_oldest(); }

 private:
  Ops* ops_;
  RingSpans spans_;
  char* data_ = nullptr;
  bool pinned_ = false;
};

// Worker threads for reads and checksums, started with SIGTERM and SIGINT blocked: a stop
// signal is handled by the training thread (as for the async writer), never by a worker.
std::unique_ptr<ThreadPool> start_workers() {
  sigset_t stop, old;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, &old);
  auto pool = std::make_unique<ThreadPool>(ThreadPool::hardware_threads(kMaxWorkers));
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return pool;
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
    if (create) return;
    size_ = file_size(path);
    Hid fcpl(H5Fget_create_plist(id_), H5Pclose);  // HDF5's addresses count from after a user block
    hsize_t user_block = 0;
    if (fcpl.valid() && H5Pget_userblock(fcpl.get(), &user_block) >= 0) base_ = int64_t(user_block);
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

  // Reads a 1-D dataset of `expect` elements into `out`; refuses a dataset whose size differs.
  void read(const std::string& name, hid_t mem_type, int64_t expect, void* out) {
    Hid ds = open_sized(name, expect);
    if (H5Dread(ds.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0)
      throw_error(path_, ": cannot read dataset '", name, "' (file damaged?): ", hdf5_error_text());
  }
  // Where in the file a 1-D dataset of `expect` f32 values keeps them, when HDF5 stores them
  // there as they are (contiguous, allocated, native f32: how difftron writes them) and the
  // bytes lie inside the file; else -1 (then read() them). Refuses, like read(), a dataset
  // that is missing or whose size differs.
  int64_t locate_floats(const std::string& name, int64_t expect) {
    Hid ds = open_sized(name, expect);
    Hid dcpl(H5Dget_create_plist(ds.get()), H5Pclose);
    Hid type(H5Dget_type(ds.get()), H5Tclose);
    if (!dcpl.valid() || !type.valid() || H5Pget_layout(dcpl.get()) != H5D_CONTIGUOUS ||
        H5Pget_external_count(dcpl.get()) != 0 || H5Tequal(type.get(), H5T_NATIVE_FLOAT) <= 0)
      return -1;
    const haddr_t at = H5Dget_offset(ds.get());
    if (at == HADDR_UNDEF || at > haddr_t(size_)) return -1;
    const int64_t offset = base_ + int64_t(at);
    return offset <= size_ && expect <= (size_ - offset) / int64_t(sizeof(float)) ? offset : -1;
  }
  // Refuses, before anything is allocated for it, a dataset of more values than the file holds.
  void check_fits(const std::string& name, int64_t expect) const {
    if (expect < 0 || expect > size_ / int64_t(sizeof(float)))
      throw_error(path_, ": dataset '", name, "' would hold ", expect, " values, more than the file's ", size_,
                  " bytes can (file damaged or forged)");
  }
  int64_t numel(const std::string& name) {
    Hid ds(H5Dopen2(id_, name.c_str(), H5P_DEFAULT), H5Dclose);
    if (!ds.valid()) throw_error(path_, ": missing dataset '", name, "'");
    Hid space(H5Dget_space(ds.get()), H5Sclose);
    const hssize_t n = space.valid() ? H5Sget_simple_extent_npoints(space.get()) : -1;
    if (n < 0) throw_error(path_, ": dataset '", name, "' has no readable shape");
    return int64_t(n);
  }
  std::string read_text(const std::string& name) {
    const int64_t n = numel(name);
    if (n > size_) throw_error(path_, ": dataset '", name, "' claims ", n, " bytes, more than the file holds");
    std::string s(n, '\0');
    read(name, H5T_NATIVE_UCHAR, n, s.data());
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
  Hid open_sized(const std::string& name, int64_t expect) {
    Hid ds(H5Dopen2(id_, name.c_str(), H5P_DEFAULT), H5Dclose);
    if (!ds.valid()) throw_error(path_, ": missing dataset '", name, "'");
    Hid space(H5Dget_space(ds.get()), H5Sclose);
    const hssize_t n = space.valid() ? H5Sget_simple_extent_npoints(space.get()) : -1;
    if (n != expect) throw_error(path_, ": dataset '", name, "' holds ", int64_t(n), " values, its index says ", expect);
    return ds;
  }

  std::string path_;
  hid_t id_ = -1;
  int64_t size_ = 0;
  int64_t base_ = 0;  // file offset of HDF5's address 0
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

// A snapshot array's values as floats, into `out` (numel of them), for arrays not stored as f32.
void convert_to_floats(const HostArray& a, float* out) {
  if (a.dtype == DType::BF16) {
    const uint16_t* b = static_cast<const uint16_t*>(a.data);
    for (int64_t i = 0; i < a.numel; ++i) out[i] = bf16_to_float(b[i]);
  } else if (a.dtype == DType::F64) {
    const double* d = static_cast<const double*>(a.data);
    for (int64_t i = 0; i < a.numel; ++i) out[i] = float(d[i]);
  } else {
    throw_error("checkpoint: cannot store a ", dtype_name(a.dtype), " array");
  }
}

// Writes, closes and fsyncs one rank's file. The values of array j (in piece order) are
// host[j] when given (a snapshot), else downloaded from the tensor through `ops` into a ring
// of host memory. This thread alone calls HDF5 (and `ops`), one array after the other; worker
// threads compute the checksums meanwhile, which the index, written last, records.
void write_rank_file(const fs::path& path, const std::vector<ShardPiece>& pieces,
                     const std::vector<HostArray>* host, Ops* ops, const nlohmann::json& rank_info,
                     CheckpointTimings& tm) {
  std::vector<const ShardArray*> arrays;
  for (const ShardPiece& p : pieces)
    for (const ShardArray& a : p.arrays) arrays.push_back(&a);
  // (a snapshot has dropped its tensors: its arrays say how many values they hold)
  auto numel = [&](size_t j) { return size_t(host ? host->at(j).numel : arrays[j]->data.numel()); };
  // Staged: every array of a download, a snapshot's only where they are not f32 already.
  auto staged = [&](size_t j) { return !host || host->at(j).dtype != DType::F32; };
  size_t stage_total = 0, stage_largest = 0;
  for (size_t j = 0; j < arrays.size(); ++j)
    if (staged(j)) {
      const size_t b = aligned_bytes(numel(j) * sizeof(float));
      stage_total += b;
      stage_largest = std::max(stage_largest, b);
    }
  // The ring needs to hold an array while it is written and hashed; twice the largest lets
  // the next download overlap. The writer thread of an async save touches no Ops: plain memory.
  std::unique_ptr<HostRing> ring;
  if (stage_total > 0)
    ring = std::make_unique<HostRing>(host ? nullptr : ops,
                                      std::min(stage_total, std::max(kStagingBytes / 4, 2 * stage_largest)));

  struct Checksums {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<uint64_t> value;
    std::vector<char> done;
    double busy = 0;
  } sums;
  sums.value.assign(arrays.size(), 0);
  sums.done.assign(arrays.size(), 0);
  std::deque<size_t> in_ring;  // the staged arrays whose spans the ring still holds, oldest first
  // Gives the ring back the spans whose checksum is done, in order; `wait`: at least the oldest.
  auto reclaim = [&](bool wait) {
    std::unique_lock<std::mutex> lock(sums.mu);
    while (!in_ring.empty()) {
      if (!sums.done[in_ring.front()]) {
        if (!wait) break;
        sums.cv.wait(lock, [&] { return bool(sums.done[in_ring.front()]); });
      }
      ring->give_back_oldest();
      in_ring.pop_front();
      wait = false;
    }
  };
  // Declared after what its jobs use, so that it joins them first on the way out of a failure.
  std::unique_ptr<ThreadPool> workers = start_workers();
  tm.threads = workers->size();

  nlohmann::json index = nlohmann::json::array();
  H5File f(path.string(), true);
  size_t j = 0;
  for (const ShardPiece& p : pieces) {
    const std::string group = index_entry_group(p);
    index.push_back({{"name", p.name},         {"group", group},          {"full_shape", p.global_shape},
                     {"local_shape", p.local_shape}, {"shard_dim", p.shard_dim}, {"shard_begin", p.shard_begin},
                     {"e0", p.e0},             {"e1", p.e1}});
    for (const ShardArray& a : p.arrays) {
      const size_t n = numel(j);
      const float* v = nullptr;
      if (!staged(j)) {
        v = static_cast<const float*>(host->at(j).data);
      } else {
        char* span = nullptr;
        while (!(span = ring->take(n * sizeof(float)))) {
          if (in_ring.empty()) throw_error("checkpoint: ", n, " values do not fit the staging buffer");  // a bug
          reclaim(true);
        }
        in_ring.push_back(j);
        float* out = reinterpret_cast<float*>(span);
        const auto t0 = steady::now();
        if (host) convert_to_floats(host->at(j), out);
        else if (a.data.dtype() == DType::F32) ops->download_bytes(a.data, out);
        else ops->download(a.data, out);
        tm.download += seconds_since(t0);
        v = out;
      }
      workers->submit([&sums, j, v, n] {
        const auto t0 = steady::now();
        const uint64_t h = hash64(v, n);
        std::lock_guard<std::mutex> lock(sums.mu);
        sums.value[j] = h;
        sums.done[j] = 1;
        sums.busy += seconds_since(t0);
        sums.cv.notify_all();
      });
      const auto t0 = steady::now();
      f.write_floats(group + "/" + a.kind, v, n);
      tm.write += seconds_since(t0);
      tm.bytes += int64_t(n * sizeof(float));
      if (ring) reclaim(false);
      ++j;
    }
  }
  {
    std::unique_lock<std::mutex> lock(sums.mu);
    sums.cv.wait(lock, [&] { return std::all_of(sums.done.begin(), sums.done.end(), [](char d) { return d != 0; }); });
    tm.verify_busy += sums.busy;
  }
  j = 0;
  for (size_t i = 0; i < pieces.size(); ++i)
    for (const ShardArray& a : pieces[i].arrays) index[i]["crc_" + a.kind] = hex(sums.value[j++]);
  auto t0 = steady::now();
  f.write_text("index", index.dump());
  f.write_text_attr("rank", rank_info.dump());
  tm.write += seconds_since(t0);
  t0 = steady::now();
  f.close();
  fsync_path(path);
  tm.sync += seconds_since(t0);
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

// ---- loading: plan from the indexes, read and verify on workers, upload on this thread ----

// `len` elements from element `from` of a stored piece (source `source` of its group) to
// element `to` of a target piece.
struct Run {
  int source;
  int64_t from, to, len;
};

// A target piece and which stored elements fill it.
struct TargetPlan {
  const ShardPiece* piece = nullptr;
  std::vector<std::string> kinds;  // the kinds of its arrays to fill ("w"; "m", "v" with the optimizer)
  std::vector<Run> runs;
};

// One stored array a load reads and verifies on a worker before any target uses it.
struct StoredArray {
  int file = 0;
  std::string dataset;    // "<group>/<kind>"
  std::string checksum;   // the index's ("" if it has none: a mismatch)
  int64_t numel = 0;
  size_t group = 0;       // the target group it is read for
  float* data = nullptr;  // its span of the staging ring, once issued
  bool done = false;      // done and error: written under the loader's lock
  std::string error;
};

// Consecutive target pieces of one tensor (its slice, then its ZeRO shards): the stored pieces
// overlapping any of them are read and verified once for all of them.
struct TargetGroup {
  std::vector<TargetPlan> targets;
  std::vector<std::pair<int, const Entry*>> sources;  // (file, index entry)
  std::map<std::string, std::vector<int>> arrays;     // kind -> per source, its StoredArray (-1: none)
  size_t first_array = 0, end_array = 0;              // its StoredArrays
};

// Plans target `t` from the files' indexes alone: which stored elements fill which of its
// elements; refuses a full shape that differs from the model's and elements stored nowhere.
void plan_target(const ShardPiece& t, bool with_optim, const std::vector<RankFile>& files, TargetGroup& g) {
  TargetPlan tp;
  tp.piece = &t;
  for (const ShardArray& a : t.arrays)
    if ((with_optim || a.kind == "w") && std::find(tp.kinds.begin(), tp.kinds.end(), a.kind) == tp.kinds.end())
      tp.kinds.push_back(a.kind);
  const int64_t loc_cols = rows_cols(t.local_shape).second;
  // the target slice's origin in the full tensor
  const int64_t r0 = t.shard_dim == 0 ? t.shard_begin : 0, c0 = t.shard_dim == 1 ? t.shard_begin : 0;
  // the target's elements [e0, e1) cover local rows [tr0, tr1)
  const int64_t tr0 = r0 + t.e0 / loc_cols, tr1 = r0 + (t.e1 - 1) / loc_cols + 1;
  const int64_t n = t.e1 - t.e0;
  for (int fi = 0; fi < int(files.size()); ++fi) {
    for (const Entry& e : files[fi].entries) {
      if (e.name != t.name) continue;
      if (e.full != t.global_shape)
        throw_error(files[fi].path, ": tensor '", t.name, "' has full shape ", shape_str(e.full), ", the model expects ",
                    shape_str(t.global_shape));
      const int64_t pcols = rows_cols(e.local).second;
      const int64_t base_r = e.shard_dim == 0 ? e.shard_begin : 0, base_c = e.shard_dim == 1 ? e.shard_begin : 0;
      const int64_t pr0 = base_r + e.e0 / pcols, pr1 = base_r + (e.e1 - 1) / pcols + 1;
      const int64_t pc0 = base_c, pc1 = base_c + pcols;
      if (pr1 <= tr0 || pr0 >= tr1 || pc1 <= c0 || pc0 >= c0 + loc_cols) continue;  // disjoint
      int source = 0;
      while (source < int(g.sources.size()) && g.sources[source] != std::make_pair(fi, &e)) ++source;
      if (source == int(g.sources.size())) g.sources.emplace_back(fi, &e);
      // row by row: within a row of the file's piece, elements run contiguously in both the
      // file and the target; runs that continue each other (the same layout) merge into one
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
        Run* last = tp.runs.empty() ? nullptr : &tp.runs.back();
        if (last && last->source == source && last->from + last->len == x - e.e0 && last->to + last->len == li)
          last->len += len;
        else
          tp.runs.push_back({source, x - e.e0, li, len});
      }
    }
  }
  // every element must be found (stored pieces may overlap: count each element once)
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (const Run& r : tp.runs) spans.emplace_back(r.to, r.to + r.len);
  std::sort(spans.begin(), spans.end());
  int64_t filled = 0, reach = 0;
  for (const auto& [lo, hi] : spans) {
    filled += std::max<int64_t>(0, hi - std::max(lo, reach));
    reach = std::max(reach, hi);
  }
  if (filled != n)
    throw_error("tensor '", t.name, "' is incomplete: ", n - filled, " of the ", n,
                " elements this rank needs are in no file");
  g.targets.push_back(std::move(tp));
}

// Adds the stored arrays group `g` (number `gi`) needs to `arrays`, in the order its targets use
// them; refuses one that claims more values than its file could hold.
void plan_reads(TargetGroup& g, size_t gi, const std::vector<RankFile>& files, std::vector<StoredArray>& arrays) {
  g.first_array = arrays.size();
  for (const TargetPlan& tp : g.targets)
    for (const std::string& kind : tp.kinds) {
      std::vector<int>& of_source = g.arrays[kind];
      of_source.resize(g.sources.size(), -1);
      for (const Run& r : tp.runs) {
        if (of_source[r.source] >= 0) continue;
        const auto& [fi, e] = g.sources[r.source];
        StoredArray a;
        a.file = fi;
        a.dataset = e->group + "/" + kind;
        const std::string key = "crc_" + kind;
        if (e->crc.contains(key) && e->crc.at(key).is_string()) a.checksum = e->crc.at(key).get<std::string>();
        a.numel = e->e1 - e->e0;
        a.group = gi;
        files[fi].file->check_fits(a.dataset, a.numel);
        of_source[r.source] = int(arrays.size());
        arrays.push_back(std::move(a));
      }
    }
  g.end_array = arrays.size();
}

// Reads `bytes` at `offset` of file descriptor `fd`; returns the OS error, "" on success.
std::string read_fully(int fd, char* out, size_t bytes, int64_t offset) {
  size_t done = 0;
  while (done < bytes) {
    const ssize_t r = ::pread(fd, out + done, bytes - done, off_t(offset + int64_t(done)));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return os_error(errno);
    if (r == 0) return "the file ends before the dataset does";
    done += size_t(r);
  }
  return "";
}

// Runs a planned load: workers read (pread, where HDF5 stores an array as plain bytes; else
// HDF5 on this thread, which the library's lock would serialise anyway) and verify the stored
// arrays into a staging ring, as far ahead as it has room; this thread waits for the arrays a
// tensor needs, assembles its slices where the layouts differ, and uploads, converting f32 to
// bf16 on the device where the backend can. Errors come in plan order, whichever worker met
// them first.
class Loader {
 public:
  Loader(Ops& ops, std::vector<RankFile>& files, std::vector<StoredArray>& arrays, CheckpointTimings& tm)
      : ops_(ops), files_(files), arrays_(arrays), tm_(tm) {
    for (const RankFile& f : files_) fds_.push_back(::open(f.path.c_str(), O_RDONLY | O_CLOEXEC));  // -1: use HDF5
  }
  ~Loader() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;  // after a failure: the reads not started yet are skipped
    }
    workers_.reset();
    for (int fd : fds_)
      if (fd >= 0) ::close(fd);
  }
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  void run(const std::vector<TargetGroup>& groups) {
    // Room for the largest group's arrays while they wrap around the ring's end, else the
    // read-ahead budget (or all there is)
    size_t total = 0, largest = 0, largest_group = 0;
    for (const TargetGroup& g : groups) {
      size_t bytes = 0;
      for (size_t i = g.first_array; i < g.end_array; ++i) {
        const size_t b = aligned_bytes(size_t(arrays_[i].numel) * sizeof(float));
        bytes += b;
        largest = std::max(largest, b);
      }
      total += bytes;
      largest_group = std::max(largest_group, bytes);
    }
    if (arrays_.empty()) return;
    ring_ = std::make_unique<HostRing>(&ops_, std::max(std::min(kStagingBytes, total), largest_group + largest));
    workers_ = start_workers();
    tm_.threads = workers_->size();
    size_t next = 0;  // the next array to issue
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      const TargetGroup& g = groups[gi];
      auto t0 = steady::now();
      for (; next < arrays_.size(); ++next) {
        char* span = ring_->take(size_t(arrays_[next].numel) * sizeof(float));
        if (!span) {
          DT_CHECK(arrays_[next].group > gi, "the staging ring cannot hold tensor group ", gi);
          break;  // read ahead as far as the ring has room
        }
        arrays_[next].data = reinterpret_cast<float*>(span);
        issue(arrays_[next]);
      }
      await(g);
      tm_.wait += seconds_since(t0);
      t0 = steady::now();
      fill(g);
      tm_.upload += seconds_since(t0);
      for (size_t i = g.first_array; i < g.end_array; ++i) ring_->give_back_oldest();
    }
    ops_.synchronize();  // the last conversions ran asynchronously from buffers freed next
    std::lock_guard<std::mutex> lock(mu_);
    tm_.read_busy += read_busy_;
    tm_.verify_busy += verify_busy_;
  }

 private:
  void issue(StoredArray& a) {
    tm_.bytes += int64_t(a.numel) * int64_t(sizeof(float));
    H5File& f = *files_[a.file].file;
    int64_t offset = -1;
    const std::string error = capture([&] {
      if (fds_[a.file] >= 0) offset = f.locate_floats(a.dataset, a.numel);
      if (offset < 0) f.read(a.dataset, H5T_NATIVE_FLOAT, a.numel, a.data);
    });
    if (!error.empty()) {
      std::lock_guard<std::mutex> lock(mu_);
      a.error = error;
      a.done = true;
      return;
    }
    workers_->submit([this, &a, offset] { read_and_verify(a, offset); });
  }

  // On a worker: reads the array (unless HDF5 already did) and checks its checksum.
  void read_and_verify(StoredArray& a, int64_t offset) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cancelled_) {
        a.done = true;
        return;
      }
    }
    const RankFile& f = files_[a.file];
    std::string error;
    auto t0 = steady::now();
    if (offset >= 0) {
      const std::string os = read_fully(fds_[a.file], reinterpret_cast<char*>(a.data), size_t(a.numel) * sizeof(float), offset);
      if (!os.empty()) error = f.path + ": cannot read dataset '" + a.dataset + "' (file damaged?): " + os;
    }
    const double read_s = seconds_since(t0);
    t0 = steady::now();
    if (error.empty()) {
      const uint64_t h = f.version >= 3 ? hash64(a.data, size_t(a.numel)) : fnv1a(a.data, size_t(a.numel));
      if (a.checksum != hex(h)) error = f.path + ": checksum mismatch for '" + a.dataset + "' (file damaged)";
    }
    std::lock_guard<std::mutex> lock(mu_);
    a.error = error;
    a.done = true;
    read_busy_ += read_s;
    verify_busy_ += seconds_since(t0);
    done_.notify_all();
  }

  // Waits until group g's arrays are read and verified; throws the first failure among them.
  void await(const TargetGroup& g) {
    std::unique_lock<std::mutex> lock(mu_);
    for (size_t i = g.first_array; i < g.end_array; ++i) {
      done_.wait(lock, [&] { return arrays_[i].done; });
      if (!arrays_[i].error.empty()) throw Error(arrays_[i].error);
    }
  }

  void fill(const TargetGroup& g) {
    for (const TargetPlan& tp : g.targets) {
      const ShardPiece& t = *tp.piece;
      const int64_t n = t.e1 - t.e0;
      for (const std::string& kind : tp.kinds) {
        const std::vector<int>& of_source = g.arrays.at(kind);
        auto stored = [&](const Run& r) { return arrays_[of_source[r.source]].data + r.from; };
        const float* values = nullptr;
        if (tp.runs.size() == 1 && tp.runs[0].to == 0 && tp.runs[0].len == n) {
          values = stored(tp.runs[0]);  // the same layout: the stored array as it is
        } else {  // resharded: assembled from the pieces
          scratch_.reserve(ops_, size_t(n) * sizeof(float));
          float* out = static_cast<float*>(scratch_.data);
          for (const Run& r : tp.runs) std::memcpy(out + r.to, stored(r), size_t(r.len) * sizeof(float));
          values = out;
        }
        put(t, kind, values, n);
      }
    }
  }

  // Puts `values` into every array of kind `kind` of target `t`: f32 as bytes; bf16 converted
  // on the device, from an f32 array of the piece already there or through a device f32
  // buffer, where the backend can (the CPU reference converts only between f32 and f64: there
  // it is rounded here, to nearest even as the GPU does); other dtypes by Ops::upload.
  void put(const ShardPiece& t, const std::string& kind, const float* values, int64_t n) {
    const Tensor* f32_copy = nullptr;
    for (const ShardArray& a : t.arrays)
      if (a.kind == kind && a.data.dtype() == DType::F32) {
        Tensor dst = a.data;
        ops_.upload_bytes(dst, values);
        f32_copy = &a.data;
      }
    for (const ShardArray& a : t.arrays) {
      if (a.kind != kind || a.data.dtype() == DType::F32) continue;
      Tensor dst = a.data;
      if (dst.dtype() == DType::BF16 && ops_.device() != Device::CPU) {
        if (f32_copy) {
          ops_.copy(*f32_copy, dst);
          continue;
        }
        const int64_t chunk = std::min(n, kConvertChunk);
        if (!convert_.defined() || convert_.numel() < chunk) convert_ = ops_.empty({chunk}, DType::F32);
        for (int64_t at = 0; at < n; at += chunk) {
          const int64_t len = std::min(chunk, n - at);
          Tensor staged = convert_.flat_slice(0, len), part = dst.flat_slice(at, len);
          ops_.upload_bytes(staged, values + at);
          ops_.copy(staged, part);
        }
      } else if (dst.dtype() == DType::BF16) {
        std::vector<uint16_t> rounded(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) rounded[i] = float_to_bf16(values[i]);
        ops_.upload_bytes(dst, rounded.data());
      } else {
        ops_.upload(dst, values);
      }
    }
  }

  Ops& ops_;
  std::vector<RankFile>& files_;
  std::vector<StoredArray>& arrays_;
  CheckpointTimings& tm_;
  std::vector<int> fds_;
  std::mutex mu_;
  std::condition_variable done_;
  bool cancelled_ = false;                  // under mu_
  double read_busy_ = 0, verify_busy_ = 0;  // under mu_
  std::unique_ptr<HostRing> ring_;
  SnapshotArena scratch_;  // a resharded target's values, assembled
  Tensor convert_;         // device f32 values on their way into a bf16 tensor
  std::unique_ptr<ThreadPool> workers_;  // last: joined before what its jobs use goes
};

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
  CheckpointTimings timings;    // this rank's (the snapshot's download not included)
};

namespace {

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
  const auto t0 = steady::now();
  const fs::path path = s.tmp_dir / rank_file_name(s.world_rank);
  CheckpointTimings& tm = s.timings;
  if (s.error.empty())
    s.error = capture([&] { write_rank_file(path, s.pieces, s.snapshotted ? &s.host : nullptr, ops, s.rank_info, tm); });
  s.host.clear();  // the arena stays with the checkpointer for the next save
  s.write_seconds = seconds_since(t0);
  if (s.error.empty() && s.world_rank == 0)
    LOG(INFO) << "checkpoint rank file " << path.string() << ": " << tm.bytes / 1e9 << " GB in " << s.write_seconds
              << " s (" << (s.snapshotted ? "from the snapshot" : "download " + std::to_string(tm.download) + " s")
              << ", write " << tm.write << " s, close + fsync " << tm.sync << " s; " << tm.threads
              << " threads hashed for " << tm.verify_busy << " s)";
}

// 3. the ranks agree that every file is on disk; rank 0 writes meta.json and moves the
// checkpoint into place, then `latest` (collective)
std::string finish_save(PendingSave& s) {
  const auto t0 = steady::now();
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
  s.timings.publish = seconds_since(t0);
  s.write_seconds += s.timings.publish;
  return s.final_dir.string();
}

}  // namespace

std::string write_checkpoint(const std::string& root, const CheckpointMeta& meta, const nlohmann::json& model_config,
                             const std::vector<ShardPiece>& pieces, bool has_optimizer, Ops& ops,
                             ParallelContext* par, int tp_rank, int dp_rank, const std::string& rank_data_position,
                             CheckpointTimings* timings) {
  const auto t0 = steady::now();
  auto s = begin_save(root, meta, model_config, pieces, has_optimizer, par, tp_rank, dp_rank, rank_data_position);
  write_rank(*s, &ops);
  const std::string dir = finish_save(*s);
  if (timings) {
    *timings = s->timings;
    timings->seconds = seconds_since(t0);
  }
  return dir;
}

std::string save_checkpoint(const std::string& root, const CheckpointMeta& meta, Model& model, AdamW* optimizer,
                            ParallelContext* par, const std::string& rank_data_position, CheckpointTimings* timings) {
  const int dp_rank = par ? par->dp_rank() : 0;
  return write_checkpoint(root, meta, nlohmann::json(model.config()), pieces_to_save(model, optimizer, dp_rank),
                          optimizer != nullptr, model.ops(), par, model.tp_rank(), dp_rank, rank_data_position,
                          timings);
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
  const auto t0 = steady::now();
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
// Fills `pieces` from the opened rank files of checkpoint `dir` (meta.json `j`): plans every
// piece from the indexes first (so that a checkpoint lacking something fails before gigabytes
// are read), then reads, verifies and uploads (Loader).
void fill_pieces(const std::string& dir, const nlohmann::json& j, std::vector<RankFile>& files,
                 const std::vector<ShardPiece>& pieces, bool with_optimizer, Ops& ops, CheckpointTimings& tm) {
  if (with_optimizer && !j.value("has_optimizer", false))
    throw_error(dir, ": holds weights only; cannot resume the optimizer from it");
  auto t0 = steady::now();
  std::vector<TargetGroup> groups;
  std::vector<StoredArray> arrays;
  try {
    for (size_t i = 0; i < pieces.size(); ++i) {
      if (i == 0 || pieces[i].name != pieces[i - 1].name) groups.emplace_back();
      plan_target(pieces[i], with_optimizer, files, groups.back());
    }
  } catch (const Error& e) {
    const std::string w = e.what();
    if (w.rfind("tensor '", 0) == 0) throw_error(dir, ": ", w);
    throw;
  }
  for (size_t gi = 0; gi < groups.size(); ++gi) plan_reads(groups[gi], gi, files, arrays);
  tm.open += seconds_since(t0);
  Loader(ops, files, arrays, tm).run(groups);
}

CheckpointTimings read_pieces(const std::string& dir, const nlohmann::json& j, const std::vector<ShardPiece>& pieces,
                              bool with_optimizer, Ops& ops, std::vector<RankFile>* keep_files = nullptr) {
  const auto t0 = steady::now();
  CheckpointTimings tm;
  std::vector<RankFile> files = open_rank_files(dir, j);
  tm.open = seconds_since(t0);
  fill_pieces(dir, j, files, pieces, with_optimizer, ops, tm);
  tm.seconds = seconds_since(t0);
  if (keep_files) *keep_files = std::move(files);
  return tm;
}
}  // namespace

void read_checkpoint_pieces(const std::string& dir, const std::vector<ShardPiece>& pieces, bool with_optimizer,
                            Ops& ops, CheckpointTimings* timings) {
  const CheckpointTimings tm = read_pieces(dir, read_checkpoint_meta(dir), pieces, with_optimizer, ops);
  if (timings) *timings = tm;
}

CheckpointMeta load_checkpoint(const std::string& dir, Model& model, AdamW* optimizer, ParallelContext* par,
                               CheckpointTimings* timings) {
  const auto t0 = steady::now();
  nlohmann::json j = read_checkpoint_meta(dir);
  nlohmann::json stored = j.at("model_config");
  nlohmann::json ours = model.config();
  if (stored != ours)
    throw_error(dir, ": the checkpoint's model config ", stored.dump(), " differs from the model's ", ours.dump());
  std::vector<RankFile> files;
  CheckpointTimings tm = read_pieces(dir, j, pieces_to_load(model, optimizer), optimizer != nullptr, model.ops(), &files);
  tm.seconds = seconds_since(t0);
  if (!par || par->world_rank() == 0)
    LOG(INFO) << "checkpoint loaded from " << dir << ": " << tm.bytes / 1e9 << " GB in " << tm.seconds << " s (open "
              << tm.open << " s, waiting for reads and checksums " << tm.wait << " s, upload " << tm.upload << " s; "
              << tm.threads << " threads read for " << tm.read_busy << " s, verified for " << tm.verify_busy << " s)";
  if (timings) *timings = tm;

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
