// HDF5 token shards: see token_shards.h. HDF5 is used to write and to validate; the hot
// read path maps the file and copies tokens from the chunk addresses HDF5 reported, after
// checking that every chunk lies inside the file (a truncated file never faults).
#include "io/token_shards.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <limits>
#include <new>

#include <hdf5.h>
#include <zlib.h>

#include "base/error.h"
#include "io/hdf5.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "token shards are read by mapping little-endian data; port before use");

namespace difftron {
namespace {

// ---- HDF5 helpers -------------------------------------------------------------------


herr_t collect_error(unsigned, const H5E_error2_t* e, void* data) {
  auto* v = static_cast<std::vector<std::string>*>(data);
  if (e->desc && *e->desc) v->push_back(e->desc);
  return 0;
}

// The innermost messages of HDF5's error stack on this thread (then cleared).
std::string hdf5_detail() {
  std::vector<std::string> msgs;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect_error, &msgs);
  H5Eclear2(H5E_DEFAULT);
  if (msgs.empty()) return "no detail from HDF5";
  std::string out = msgs.back();
  if (msgs.size() >= 2 && msgs[msgs.size() - 2] != out) out = msgs[msgs.size() - 2] + ": " + out;
  return out;
}

void check_h5(herr_t rc, const std::string& path, const char* what) {
  if (rc < 0) throw_error(path, ": ", what, " failed (", hdf5_detail(), ")");
}
hid_t check_id(hid_t id, const std::string& path, const char* what) {
  if (id < 0) throw_error(path, ": ", what, " failed (", hdf5_detail(), ")");
  return id;
}

// A scalar attribute stored as `file_type`, written from `value` of `mem_type` (replaced if present).
void write_attr_scalar(hid_t obj, const char* name, hid_t file_type, hid_t mem_type, const void* value,
                       const std::string& path) {
  if (H5Aexists(obj, name) > 0) check_h5(H5Adelete(obj, name), path, "deleting an attribute");
  Hid space(check_id(H5Screate(H5S_SCALAR), path, "H5Screate"), H5Sclose);
  Hid a(check_id(H5Acreate2(obj, name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT), path,
                 "creating an attribute"),
        H5Aclose);
  check_h5(H5Awrite(a.get(), mem_type, value), path, "writing an attribute");
}

void write_attr_i64(hid_t obj, const char* name, int64_t v, const std::string& path) {
  write_attr_scalar(obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v, path);
}

void write_attr_u32(hid_t obj, const char* name, uint32_t v, const std::string& path) {
  write_attr_scalar(obj, name, H5T_STD_U32LE, H5T_NATIVE_UINT32, &v, path);
}

// Fixed-length UTF-8 string: no global heap, so with the 1.8+ file format every byte of
// metadata that describes it is covered by HDF5's own checksums.
void write_attr_str(hid_t obj, const char* name, const std::string& v, const std::string& path) {
  if (H5Aexists(obj, name) > 0) check_h5(H5Adelete(obj, name), path, "deleting an attribute");
  Hid type(check_id(H5Tcopy(H5T_C_S1), path, "H5Tcopy"), H5Tclose);
  check_h5(H5Tset_size(type.get(), v.size() + 1), path, "H5Tset_size");
  check_h5(H5Tset_strpad(type.get(), H5T_STR_NULLTERM), path, "H5Tset_strpad");
  check_h5(H5Tset_cset(type.get(), H5T_CSET_UTF8), path, "H5Tset_cset");
  Hid space(check_id(H5Screate(H5S_SCALAR), path, "H5Screate"), H5Sclose);
  Hid a(check_id(H5Acreate2(obj, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), path,
                 "creating an attribute"),
        H5Aclose);
  check_h5(H5Awrite(a.get(), type.get(), v.c_str()), path, "writing an attribute");
}

bool has_attr(hid_t obj, const char* name) { return H5Aexists(obj, name) > 0; }

Hid open_scalar_attr(hid_t obj, const char* name, const std::string& path) {
  Hid a(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
  if (!a.valid()) throw_error(path, ": cannot read attribute '", name, "' (", hdf5_detail(), ")");
  Hid space(H5Aget_space(a.get()), H5Sclose);
  if (H5Sget_simple_extent_npoints(space.get()) != 1)
    throw_error(path, ": attribute '", name, "' should hold one value");
  return a;
}

int64_t read_attr_i64(hid_t obj, const char* name, const std::string& path) {
  Hid a = open_scalar_attr(obj, name, path);
  Hid type(H5Aget_type(a.get()), H5Tclose);
  if (H5Tget_class(type.get()) != H5T_INTEGER)
    throw_error(path, ": attribute '", name, "' should be an integer");
  int64_t v = 0;
  if (H5Aread(a.get(), H5T_NATIVE_INT64, &v) < 0)
    throw_error(path, ": cannot read attribute '", name, "' (", hdf5_detail(), ")");
  return v;
}

// `file_size` bounds a fixed-length string: its bytes are stored in the file, so a larger
// declared size is a crafted or damaged attribute (and must not size an allocation).
std::string read_attr_str(hid_t obj, const char* name, const std::string& path, int64_t file_size) {
  Hid a = open_scalar_attr(obj, name, path);
  Hid ftype(H5Aget_type(a.get()), H5Tclose);
  if (H5Tget_class(ftype.get()) != H5T_STRING)
    throw_error(path, ": attribute '", name, "' should be a string");
  if (H5Tis_variable_str(ftype.get()) > 0) {
    Hid mtype(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mtype.get(), H5T_VARIABLE);
    H5Tset_cset(mtype.get(), H5Tget_cset(ftype.get()));
    char* p = nullptr;
    if (H5Aread(a.get(), mtype.get(), &p) < 0)
      throw_error(path, ": cannot read attribute '", name, "' (", hdf5_detail(), ")");
    std::string s = p ? p : "";
    if (p) H5free_memory(p);
    return s;
  }
  size_t n = H5Tget_size(ftype.get());
  if (n > uint64_t(file_size))
    throw_error(path, ": attribute '", name, "' declares ", n, " bytes, more than the whole file (", file_size,
                " bytes); the shard is damaged");
  std::string s(n, '\0');
  if (n > 0 && H5Aread(a.get(), ftype.get(), s.data()) < 0)
    throw_error(path, ": cannot read attribute '", name, "' (", hdf5_detail(), ")");
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

// ---- untrusted contents: checks made before anything from the file is used ------------------

// At most the first 200 characters of an attribute, for messages.
std::string excerpt(const std::string& v) { return v.size() <= 200 ? v : v.substr(0, 200) + "..."; }

// A `tokenizer` attribute is "bytes", "none", "" or tokenizer.json text, which load_tokenizer
// takes as-is; anything else it would open as a path. A shard is untrusted, so such a path
// may only name a file inside the shard's own folder once ".." and symlinks are resolved
// (else a crafted shard reads /etc/shadow or the like). It is returned resolved, so later
// code opens exactly the file checked here.
std::string resolve_tokenizer_attr(const std::string& v, const std::string& shard) {
  namespace fs = std::filesystem;
  if (v.empty() || v == "bytes" || v == "none") return v;
  const size_t first = v.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && v[first] == '{') return v;
  const fs::path p(v);
  if (p.is_absolute())
    throw_error(shard, ": the tokenizer attribute names the absolute path '", excerpt(v),
                "'; a shard may only name a file in its own folder (re-run difftron prepare, which stores the "
                "tokenizer in the shards themselves)");
  std::error_code ec, ec2;
  const fs::path dir = fs::weakly_canonical(fs::absolute(fs::path(shard), ec).parent_path(), ec);
  const fs::path target = fs::weakly_canonical(dir / p, ec2);
  if (ec || ec2)
    throw_error(shard, ": cannot resolve the tokenizer attribute '", excerpt(v), "': ", (ec ? ec : ec2).message());
  const auto m = std::mismatch(dir.begin(), dir.end(), target.begin(), target.end());
  if (m.first != dir.end() || m.second == target.end())
    throw_error(shard, ": the tokenizer attribute '", excerpt(v), "' leads outside the shard's folder ",
                dir.string(), " (to ", target.string(), "); refused");
  return target.string();
}

// Compressed data that claims more than this ratio is not credible (deflate's best is ~1032:1).
constexpr int64_t kMaxCompression = 2048;

// Before an allocation sized by the file's claims: dataset `d` (`what`) must have its bytes
// stored inside the file, all `bytes` of them when unfiltered (an unallocated part would
// be fill values, i.e. a damaged or crafted shard), or at least bytes / kMaxCompression
// when compressed.
void check_stored(hid_t d, int64_t bytes, int64_t file_size, const std::string& path, const char* what) {
  const int64_t stored = int64_t(H5Dget_storage_size(d));
  if (stored > file_size)
    throw_error(path, ": truncated: ", what, " has ", stored, " bytes stored but the file has ", file_size);
  Hid dcpl(H5Dget_create_plist(d), H5Pclose);
  const bool filtered = dcpl.valid() && H5Pget_nfilters(dcpl.get()) > 0;
  if (filtered ? bytes / kMaxCompression > stored : stored < bytes)
    throw_error(path, ": ", what, " should hold ", bytes, " bytes but the file stores ", stored,
                filtered ? " compressed (beyond any credible ratio)" : "",
                " for it; the shard is truncated, damaged or crafted");
}

uint32_t crc32_bytes(uint32_t crc, const uint8_t* p, size_t n) {
  while (n > 0) {
    uInt piece = uInt(std::min<size_t>(n, size_t(1) << 30));
    crc = uint32_t(::crc32(crc, p, piece));
    p += piece;
    n -= piece;
  }
  return crc;
}

}  // namespace

int token_bytes_for_vocab(int64_t vocab_size) { return vocab_size <= 65536 ? 2 : 4; }

void silence_hdf5_errors() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

// ---- writer --------------------------------------------------------------------------

TokenShardWriter::TokenShardWriter(const std::string& path, const ShardMeta& meta,
                                   int64_t chunk_tokens)
    : path_(path), meta_(meta), chunk_tokens_(chunk_tokens) {
  silence_hdf5_errors();
  if (meta_.vocab_size <= 0 || meta_.vocab_size > (int64_t(1) << 32))
    throw_error(path, ": vocab_size ", meta_.vocab_size, " must be in [1, 2^32]");
  if (meta_.eos_id >= meta_.vocab_size)
    throw_error(path, ": eos_id ", meta_.eos_id, " must be < vocab_size ", meta_.vocab_size);
  if (chunk_tokens_ <= 0) throw_error(path, ": chunk size ", chunk_tokens_, " must be positive");
  token_bytes_ = token_bytes_for_vocab(meta_.vocab_size);
  Hid fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  // The 1.10 file format: attributes of any size (the tokenizer JSON) in dense storage, and
  // checksums on all metadata, the chunk index included (readable by HDF5 1.10 and later).
  check_h5(H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V110, H5F_LIBVER_LATEST), path,
           "H5Pset_libver_bounds");
  Hid fcpl(H5Pcreate(H5P_FILE_CREATE), H5Pclose);
  check_h5(H5Pset_attr_phase_change(fcpl.get(), 0, 0), path, "H5Pset_attr_phase_change");
  file_ = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, fcpl.get(), fapl.get());
  if (file_ < 0) throw_error("cannot create token shard ", path, " (", hdf5_detail(), ")");
  offsets_.reserve(1024);
}

TokenShardWriter::~TokenShardWriter() {
  if (dset_ >= 0) H5Dclose(dset_);
  if (file_ >= 0) H5Fclose(file_);
}

void TokenShardWriter::begin_document() {
  DT_CHECK(!finished_, "shard already finished");
  if (offsets_.empty() || offsets_.back() != uint64_t(count_)) offsets_.push_back(count_);
}

void TokenShardWriter::append(const uint32_t* tokens, int64_t n) {
  DT_CHECK(!finished_, "shard already finished");
  if (n <= 0) return;
  if (offsets_.empty()) {
    // Data before any begin_document(): the shard continues the previous shard's document.
    offsets_.push_back(0);
    meta_.starts_mid_document = 1;
  }
  const uint32_t limit = uint32_t(meta_.vocab_size - 1);
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] > limit)
      throw_error(path_, ": token id ", tokens[i], " at position ", count_ + i,
                  " is >= vocab_size ", meta_.vocab_size);
  buffer_.insert(buffer_.end(), tokens, tokens + n);
  count_ += n;
  if (int64_t(buffer_.size()) >= chunk_tokens_) flush_buffer();
}

void TokenShardWriter::create_dataset(int64_t chunk) {
  hsize_t dims[1] = {0}, maxdims[1] = {H5S_UNLIMITED}, cdims[1] = {hsize_t(chunk)};
  Hid space(check_id(H5Screate_simple(1, dims, maxdims), path_, "H5Screate_simple"), H5Sclose);
  Hid dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  check_h5(H5Pset_chunk(dcpl.get(), 1, cdims), path_, "H5Pset_chunk");
  hid_t ftype = token_bytes_ == 2 ? H5T_STD_U16LE : H5T_STD_U32LE;
  dset_ = H5Dcreate2(file_, "/tokens", ftype, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT);
  if (dset_ < 0) throw_error(path_, ": cannot create /tokens (", hdf5_detail(), ")");
}

void TokenShardWriter::flush_buffer() {
  if (buffer_.empty()) return;
  if (dset_ < 0) create_dataset(chunk_tokens_);
  const int64_t n = int64_t(buffer_.size());
  std::vector<uint8_t> bytes(size_t(n) * token_bytes_);
  if (token_bytes_ == 2) {
    auto* p = reinterpret_cast<uint16_t*>(bytes.data());
    for (int64_t i = 0; i < n; ++i) p[i] = uint16_t(buffer_[i]);
  } else {
    std::memcpy(bytes.data(), buffer_.data(), bytes.size());
  }
  crc_ = crc32_bytes(crc_, bytes.data(), bytes.size());
  hsize_t newsize[1] = {hsize_t(written_ + n)};
  check_h5(H5Dset_extent(dset_, newsize), path_, "extending /tokens");
  Hid fspace(check_id(H5Dget_space(dset_), path_, "H5Dget_space"), H5Sclose);
  hsize_t start[1] = {hsize_t(written_)}, cnt[1] = {hsize_t(n)};
  check_h5(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, start, nullptr, cnt, nullptr), path_,
           "selecting a hyperslab");
  Hid mspace(check_id(H5Screate_simple(1, cnt, nullptr), path_, "H5Screate_simple"), H5Sclose);
  hid_t mtype = token_bytes_ == 2 ? H5T_NATIVE_UINT16 : H5T_NATIVE_UINT32;
  if (H5Dwrite(dset_, mtype, mspace.get(), fspace.get(), H5P_DEFAULT, bytes.data()) < 0)
    throw_error(path_, ": writing ", n, " tokens failed (", hdf5_detail(), ")");
  written_ += n;
  buffer_.clear();
}

ShardMeta TokenShardWriter::finish() {
  DT_CHECK(!finished_, "shard already finished");
  // A shard smaller than one chunk gets a chunk of exactly its size (no padding on disk).
  if (dset_ < 0) create_dataset(std::max<int64_t>(1, count_));
  flush_buffer();
  // doc_offsets = document starts + [total]; an empty trailing document is dropped.
  if (!offsets_.empty() && offsets_.back() == uint64_t(count_)) offsets_.pop_back();
  if (offsets_.empty()) offsets_.push_back(0);
  if (count_ > 0) offsets_.push_back(uint64_t(count_));
  {
    hsize_t dims[1] = {offsets_.size()};
    Hid space(check_id(H5Screate_simple(1, dims, nullptr), path_, "H5Screate_simple"), H5Sclose);
    Hid d(H5Dcreate2(file_, "/doc_offsets", H5T_STD_U64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT,
                     H5P_DEFAULT),
          H5Dclose);
    if (!d.valid()) throw_error(path_, ": cannot create /doc_offsets (", hdf5_detail(), ")");
    check_h5(H5Dwrite(d.get(), H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, offsets_.data()),
             path_, "writing /doc_offsets");
  }
  meta_.num_tokens = count_;
  meta_.num_documents = int64_t(offsets_.size()) - 1;
  meta_.tokens_crc32 = crc_;
  meta_.version = kTokenShardVersion;
  hid_t root = file_;
  write_attr_str(root, "format", kTokenShardFormat, path_);
  write_attr_i64(root, "version", meta_.version, path_);
  write_attr_i64(root, "vocab_size", meta_.vocab_size, path_);
  write_attr_str(root, "tokenizer", meta_.tokenizer, path_);
  write_attr_i64(root, "num_tokens", meta_.num_tokens, path_);
  write_attr_i64(root, "num_documents", meta_.num_documents, path_);
  write_attr_i64(root, "eos_id", meta_.eos_id, path_);
  write_attr_u32(root, "tokens_crc32", meta_.tokens_crc32, path_);
  write_attr_i64(root, "shard_index", meta_.shard_index, path_);
  write_attr_i64(root, "num_shards", meta_.num_shards, path_);
  write_attr_str(root, "split", meta_.split, path_);
  write_attr_i64(root, "starts_mid_document", meta_.starts_mid_document, path_);
  write_attr_str(root, "source", meta_.source, path_);
  if (dset_ >= 0) H5Dclose(dset_);
  dset_ = -1;
  herr_t rc = H5Fclose(file_);
  file_ = -1;
  check_h5(rc, path_, "closing the file");
  finished_ = true;
  return meta_;
}

void set_shard_position(const std::string& path, int64_t shard_index, int64_t num_shards) {
  silence_hdf5_errors();
  Hid f(H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT), H5Fclose);
  if (!f.valid()) throw_error("cannot open token shard ", path, " for writing (", hdf5_detail(), ")");
  write_attr_i64(f.get(), "shard_index", shard_index, path);
  write_attr_i64(f.get(), "num_shards", num_shards, path);
}

// ---- reader --------------------------------------------------------------------------

TokenShardReader::TokenShardReader(const std::string& path) : path_(path) {
  silence_hdf5_errors();
  struct stat st;
  if (::stat(path.c_str(), &st) != 0)
    throw_error("token shard ", path, ": ", std::strerror(errno));
  if (!S_ISREG(st.st_mode)) throw_error("token shard ", path, ": not a regular file");
  if (H5Fis_hdf5(path.c_str()) <= 0) {
    H5Eclear2(H5E_DEFAULT);
    throw_error("token shard ", path, ": not an HDF5 file (", st.st_size,
                " bytes; unreadable, truncated or another format)");
  }
  const int64_t file_size = int64_t(st.st_size);
  Hid file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!file.valid())
    throw_error("token shard ", path, ": cannot open (", hdf5_detail(),
                "); the file may be truncated or damaged");
  hid_t root = file.get();
  if (!has_attr(root, "format"))
    throw_error(path, ": not a difftron token shard (no 'format' attribute on /)");
  std::string format = read_attr_str(root, "format", path, file_size);
  if (format != kTokenShardFormat)
    throw_error(path, ": format is '", format, "', expected '", kTokenShardFormat, "'");
  for (const char* name : {"version", "vocab_size", "tokenizer", "num_tokens", "eos_id", "tokens_crc32"})
    if (!has_attr(root, name)) throw_error(path, ": missing attribute '", name, "'");
  meta_.version = read_attr_i64(root, "version", path);
  if (meta_.version < 1 || meta_.version > kTokenShardVersion)
    throw_error(path, ": shard format version ", meta_.version,
                " is not supported (this build reads version ", kTokenShardVersion, ")");
  meta_.vocab_size = read_attr_i64(root, "vocab_size", path);
  if (meta_.vocab_size <= 0 || meta_.vocab_size > (int64_t(1) << 32))
    throw_error(path, ": vocab_size ", meta_.vocab_size, " is out of range [1, 2^32]");
  meta_.tokenizer = resolve_tokenizer_attr(read_attr_str(root, "tokenizer", path, file_size), path);
  meta_.num_tokens = read_attr_i64(root, "num_tokens", path);
  // The cap keeps every size computed from it (tokens x 4 bytes, chunk counts) far from overflow.
  if (meta_.num_tokens < 0 || meta_.num_tokens > kMaxShardTokens)
    throw_error(path, ": num_tokens ", meta_.num_tokens, " is out of range [0, 2^40]");
  meta_.eos_id = read_attr_i64(root, "eos_id", path);
  if (meta_.eos_id < -1 || meta_.eos_id >= meta_.vocab_size)
    throw_error(path, ": eos_id ", meta_.eos_id, " is not -1 or in [0, vocab_size ",
                meta_.vocab_size, ")");
  meta_.tokens_crc32 = uint32_t(read_attr_i64(root, "tokens_crc32", path));
  if (has_attr(root, "shard_index")) meta_.shard_index = read_attr_i64(root, "shard_index", path);
  if (has_attr(root, "num_shards")) meta_.num_shards = read_attr_i64(root, "num_shards", path);
  if (has_attr(root, "split")) meta_.split = read_attr_str(root, "split", path, file_size);
  if (has_attr(root, "source")) meta_.source = read_attr_str(root, "source", path, file_size);
  if (has_attr(root, "starts_mid_document"))
    meta_.starts_mid_document = read_attr_i64(root, "starts_mid_document", path);

  // /doc_offsets
  if (H5Lexists(root, "/doc_offsets", H5P_DEFAULT) <= 0)
    throw_error(path, ": missing dataset /doc_offsets");
  {
    Hid d(H5Dopen2(root, "/doc_offsets", H5P_DEFAULT), H5Dclose);
    if (!d.valid()) throw_error(path, ": cannot open /doc_offsets (", hdf5_detail(), ")");
    Hid space(H5Dget_space(d.get()), H5Sclose);
    if (H5Sget_simple_extent_ndims(space.get()) != 1)
      throw_error(path, ": /doc_offsets must be 1-D");
    hsize_t n = 0;
    H5Sget_simple_extent_dims(space.get(), &n, nullptr);
    if (n < 1) throw_error(path, ": /doc_offsets is empty (it must end with num_tokens)");
    // Documents are non-empty runs of tokens, so there are at most num_tokens of them.
    if (n > uint64_t(meta_.num_tokens) + 1)
      throw_error(path, ": /doc_offsets holds ", n, " entries, more than num_tokens + 1 (", meta_.num_tokens + 1,
                  ")");
    Hid type(H5Dget_type(d.get()), H5Tclose);
    if (H5Tget_class(type.get()) != H5T_INTEGER)
      throw_error(path, ": /doc_offsets must hold integers");
    check_stored(d.get(), int64_t(n) * int64_t(H5Tget_size(type.get())), file_size, path, "/doc_offsets");
    doc_offsets_.resize(n);
    if (H5Dread(d.get(), H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, doc_offsets_.data()) < 0)
      throw_error(path, ": cannot read /doc_offsets (", hdf5_detail(),
                  "); the file may be truncated or damaged");
    if (doc_offsets_[0] != 0)
      throw_error(path, ": /doc_offsets[0] is ", doc_offsets_[0], ", expected 0");
    for (size_t i = 1; i < n; ++i)
      if (doc_offsets_[i] < doc_offsets_[i - 1])
        throw_error(path, ": /doc_offsets decreases at index ", i, " (", doc_offsets_[i - 1],
                    " then ", doc_offsets_[i], ")");
    if (doc_offsets_.back() != uint64_t(meta_.num_tokens))
      throw_error(path, ": /doc_offsets ends at ", doc_offsets_.back(),
                  " but num_tokens is ", meta_.num_tokens);
    const int64_t docs = int64_t(n) - 1;
    if (has_attr(root, "num_documents")) {
      meta_.num_documents = read_attr_i64(root, "num_documents", path);
      if (meta_.num_documents != docs)
        throw_error(path, ": num_documents attribute is ", meta_.num_documents, " but /doc_offsets holds ",
                    docs, " documents");
    } else {
      meta_.num_documents = docs;
    }
  }

  // /tokens
  if (H5Lexists(root, "/tokens", H5P_DEFAULT) <= 0) throw_error(path, ": missing dataset /tokens");
  Hid dset(H5Dopen2(root, "/tokens", H5P_DEFAULT), H5Dclose);
  if (!dset.valid()) throw_error(path, ": cannot open /tokens (", hdf5_detail(), ")");
  Hid space(H5Dget_space(dset.get()), H5Sclose);
  if (H5Sget_simple_extent_ndims(space.get()) != 1) throw_error(path, ": /tokens must be 1-D");
  hsize_t ntok = 0;
  H5Sget_simple_extent_dims(space.get(), &ntok, nullptr);
  if (int64_t(ntok) != meta_.num_tokens)
    throw_error(path, ": /tokens holds ", ntok, " tokens but the num_tokens attribute says ",
                meta_.num_tokens, " (truncated or inconsistent shard)");
  Hid ftype(H5Dget_type(dset.get()), H5Tclose);
  if (H5Tget_class(ftype.get()) != H5T_INTEGER || H5Tget_sign(ftype.get()) != H5T_SGN_NONE)
    throw_error(path, ": /tokens must be unsigned integers (uint16 or uint32)");
  const size_t width = H5Tget_size(ftype.get());
  if (width != 2 && width != 4)
    throw_error(path, ": /tokens has ", width, "-byte integers; expected uint16 or uint32");
  if (width == 2 && meta_.vocab_size > 65536)
    throw_error(path, ": vocab_size ", meta_.vocab_size, " does not fit the uint16 /tokens");
  token_bytes_ = int(width);
  const bool little = H5Tget_order(ftype.get()) == H5T_ORDER_LE;
  const int64_t n = meta_.num_tokens;

  // Where the bytes are: for unfiltered little-endian data, the chunk (or contiguous) file
  // addresses, which we map. Anything else is read through HDF5 into memory.
  struct Piece {
    int64_t first_token;
    haddr_t addr;
  };
  std::vector<Piece> pieces;
  bool mappable = little;
  Hid dcpl(H5Dget_create_plist(dset.get()), H5Pclose);
  H5D_layout_t layout = H5Pget_layout(dcpl.get());
  if (mappable && n > 0 && layout == H5D_CHUNKED && H5Pget_nfilters(dcpl.get()) == 0) {
    hsize_t cdim = 0;
    H5Pget_chunk(dcpl.get(), 1, &cdim);
    hsize_t nchunks = 0;
    check_h5(H5Dget_num_chunks(dset.get(), space.get(), &nchunks), path, "H5Dget_num_chunks");
    const int64_t expect = cdim == 0 ? -1 : (n + int64_t(cdim) - 1) / int64_t(cdim);
    if (cdim == 0 || int64_t(nchunks) != expect) {
      mappable = false;  // unallocated chunks (fill values): let HDF5 supply them
    } else {
      chunk_len_ = int64_t(cdim);
      for (hsize_t i = 0; i < nchunks; ++i) {
        hsize_t off[1] = {0};
        unsigned fmask = 0;
        haddr_t addr = 0;
        hsize_t size = 0;
        check_h5(H5Dget_chunk_info(dset.get(), space.get(), i, off, &fmask, &addr, &size), path,
                 "H5Dget_chunk_info");
        if (size != cdim * width || addr == HADDR_UNDEF || off[0] % cdim != 0)
          throw_error(path, ": /tokens chunk ", i, " has an unexpected size or position");
        if (addr > hsize_t(file_size) || size > hsize_t(file_size) - addr)
          throw_error(path, ": truncated: /tokens chunk at bytes [", addr, ", ", addr + size,
                      ") lies beyond the end of the file (", file_size, " bytes)");
        pieces.push_back({int64_t(off[0]), addr});
      }
      std::sort(pieces.begin(), pieces.end(),
                [](const Piece& a, const Piece& b) { return a.first_token < b.first_token; });
      for (size_t k = 0; k < pieces.size(); ++k)
        if (pieces[k].first_token != int64_t(k) * chunk_len_)
          throw_error(path, ": /tokens chunk table is inconsistent");
    }
  } else if (mappable && n > 0 && layout == H5D_CONTIGUOUS) {
    haddr_t addr = H5Dget_offset(dset.get());
    if (addr == HADDR_UNDEF) {
      mappable = false;
    } else {
      if (addr > hsize_t(file_size) || hsize_t(n) * width > hsize_t(file_size) - addr)
        throw_error(path, ": truncated: /tokens needs bytes up to ", int64_t(addr) + n * int64_t(width),
                    " but the file has ", file_size);
      chunk_len_ = n;
      pieces.push_back({0, addr});
    }
  } else if (n > 0) {
    mappable = false;
  }

  if (n > 0 && !mappable) {
    // Sized from the file's claims: check them against the bytes really stored first.
    check_stored(dset.get(), n * int64_t(width), file_size, path, "/tokens");
    try {
      owned_.resize(size_t(n) * width);
    } catch (const std::bad_alloc&) {
      throw_error(path, ": not enough memory to load ", n, " compressed tokens");
    }
    hid_t mtype = width == 2 ? H5T_NATIVE_UINT16 : H5T_NATIVE_UINT32;
    if (H5Dread(dset.get(), mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, owned_.data()) < 0)
      throw_error(path, ": cannot read /tokens (", hdf5_detail(), "); the file may be truncated or damaged");
    chunk_len_ = n;
    chunks_.push_back(owned_.data());
  }
  dset.reset();
  file.reset();
  if (n > 0 && mappable) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw_error("token shard ", path, ": ", std::strerror(errno));
    struct stat st2;
    if (::fstat(fd, &st2) != 0 || st2.st_size != st.st_size) {
      ::close(fd);
      throw_error(path, ": the file changed while it was being opened");
    }
    map_size_ = size_t(st.st_size);
    map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    if (map_ == MAP_FAILED) {
      map_ = nullptr;
      throw_error(path, ": mmap failed: ", std::strerror(errno));
    }
    mapped_ = true;
    for (const Piece& p : pieces) chunks_.push_back(static_cast<const uint8_t*>(map_) + p.addr);
  }
}

TokenShardReader::~TokenShardReader() {
  if (map_) ::munmap(map_, map_size_);
}

const uint8_t* TokenShardReader::token_ptr(int64_t i, int64_t* run) const {
  const int64_t k = i / chunk_len_, in = i - k * chunk_len_;
  *run = std::min(chunk_len_ - in, meta_.num_tokens - i);
  return chunks_[size_t(k)] + in * token_bytes_;
}

void TokenShardReader::read(int64_t start, int64_t n, int32_t* out, int64_t vocab_limit) const {
  DT_CHECK(start >= 0 && n >= 0 && start + n <= meta_.num_tokens, "read [", start, ", ", start + n,
           ") outside ", meta_.num_tokens, " tokens of ", path_);
  const int64_t limit = vocab_limit > 0 ? vocab_limit : meta_.vocab_size;
  int64_t i = start, done = 0;
  uint32_t maxv = 0;
  while (done < n) {
    int64_t run = 0;
    const uint8_t* p = token_ptr(i, &run);
    run = std::min(run, n - done);
    int32_t* o = out + done;
    if (token_bytes_ == 2) {
      uint16_t m = 0;
      for (int64_t j = 0; j < run; ++j) {
        uint16_t v;
        std::memcpy(&v, p + 2 * j, 2);
        o[j] = int32_t(v);
        m = std::max(m, v);
      }
      maxv = std::max<uint32_t>(maxv, m);
    } else {
      uint32_t m = 0;
      for (int64_t j = 0; j < run; ++j) {
        uint32_t v;
        std::memcpy(&v, p + 4 * j, 4);
        o[j] = int32_t(v);
        m = std::max(m, v);
      }
      maxv = std::max(maxv, m);
    }
    i += run;
    done += run;
  }
  if (n > 0 && int64_t(maxv) >= limit) {
    for (int64_t j = 0; j < n; ++j)
      if (int64_t(uint32_t(out[j])) >= limit)
        throw_error(path_, ": token id ", uint32_t(out[j]), " at position ", start + j, " is >= ",
                    vocab_limit > 0 ? "the model's vocab_size " : "the shard's vocab_size ", limit);
  }
}

void TokenShardReader::read(int64_t start, int64_t n, uint32_t* out) const {
  DT_CHECK(start >= 0 && n >= 0 && start + n <= meta_.num_tokens, "read outside ", path_);
  int64_t i = start, done = 0;
  while (done < n) {
    int64_t run = 0;
    const uint8_t* p = token_ptr(i, &run);
    run = std::min(run, n - done);
    for (int64_t j = 0; j < run; ++j) {
      if (token_bytes_ == 2) {
        uint16_t v;
        std::memcpy(&v, p + 2 * j, 2);
        out[done + j] = v;
      } else {
        std::memcpy(&out[done + j], p + 4 * j, 4);
      }
    }
    i += run;
    done += run;
  }
}

TokenShardReader::Scan TokenShardReader::scan() const {
  Scan s;
  uint32_t crc = uint32_t(::crc32(0, nullptr, 0));
  uint32_t maxv = 0;
  const uint32_t eos = meta_.eos_id >= 0 ? uint32_t(meta_.eos_id) : 0xFFFFFFFFu;
  int64_t eos_count = 0;
  const int64_t block = 1 << 16;
  for (int64_t i = 0; i < meta_.num_tokens;) {
    int64_t run = 0;
    const uint8_t* p = token_ptr(i, &run);
    for (int64_t b = 0; b < run; b += block) {
      const int64_t m = std::min(block, run - b);
      const uint8_t* q = p + b * token_bytes_;
      crc = crc32_bytes(crc, q, size_t(m) * token_bytes_);
      if (token_bytes_ == 2) {
        const uint16_t* t = reinterpret_cast<const uint16_t*>(q);
        uint16_t mx = 0;
        int64_t c = 0;
        for (int64_t j = 0; j < m; ++j) {
          mx = std::max(mx, t[j]);
          c += t[j] == eos;
        }
        maxv = std::max<uint32_t>(maxv, mx);
        eos_count += c;
      } else {
        const uint32_t* t = reinterpret_cast<const uint32_t*>(q);
        uint32_t mx = 0;
        int64_t c = 0;
        for (int64_t j = 0; j < m; ++j) {
          mx = std::max(mx, t[j]);
          c += t[j] == eos;
        }
        maxv = std::max(maxv, mx);
        eos_count += c;
      }
    }
    i += run;
  }
  s.crc32 = crc;
  s.max_token = meta_.num_tokens > 0 ? int64_t(maxv) : -1;
  s.eos_count = eos_count;
  return s;
}

void TokenShardReader::verify() const {
  Scan s = scan();
  if (s.crc32 != meta_.tokens_crc32) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%08x, the tokens_crc32 attribute says %08x", s.crc32,
                  meta_.tokens_crc32);
    throw_error(path_, ": checksum mismatch: /tokens has crc32 ", buf,
                " (the data is damaged or was modified)");
  }
  if (s.max_token >= meta_.vocab_size)
    throw_error(path_, ": token id ", s.max_token, " is >= the shard's vocab_size ", meta_.vocab_size);
}

}  // namespace difftron
