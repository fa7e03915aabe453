// Helpers shared by the io tests: a temporary directory that removes itself, an
// independent bitwise CRC-32 (not zlib's), raw HDF5 edits used to damage shards on purpose,
// and a matcher that a call throws difftron::Error whose message contains given parts.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <hdf5.h>

#include "base/error.h"

namespace iotest {

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "difftron_io_XXXXXX").string();
    char* p = ::mkdtemp(tmpl.data());
    if (!p) throw std::runtime_error("mkdtemp failed");
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// CRC-32 (IEEE, reflected polynomial 0xEDB88320), one bit at a time.
inline uint32_t bitwise_crc32(const uint8_t* p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return c ^ 0xFFFFFFFFu;
}

// Runs f and returns the difftron::Error message ("" and a test failure if none is thrown).
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const difftron::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-difftron exception: " << e.what();
    return e.what();
  }
  ADD_FAILURE() << "expected a difftron::Error";
  return "";
}

#define EXPECT_ERROR_HAS(stmt, ...)                                                 \
  do {                                                                              \
    std::string msg_ = ::iotest::error_of([&] { stmt; });                           \
    for (const std::string& part_ : std::vector<std::string>{__VA_ARGS__})           \
      EXPECT_NE(msg_.find(part_), std::string::npos) << "message: " << msg_         \
                                                     << "\nmissing: " << part_;     \
  } while (0)

// ---- raw HDF5 edits (independent of io/token_shards.cpp) ----

inline void h5_set_attr_i64(const std::string& file, const char* name, int64_t v) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  if (H5Aexists(f, name) > 0) H5Adelete(f, name);
  hid_t s = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(f, name, H5T_STD_I64LE, s, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, H5T_NATIVE_INT64, &v);
  H5Aclose(a);
  H5Sclose(s);
  H5Fclose(f);
}

inline void h5_set_attr_str(const std::string& file, const char* name, const std::string& v) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  if (H5Aexists(f, name) > 0) H5Adelete(f, name);
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, v.size() + 1);  // fixed-length, as some other writers do
  hid_t s = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(f, name, t, s, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, t, v.c_str());
  H5Aclose(a);
  H5Sclose(s);
  H5Tclose(t);
  H5Fclose(f);
}

inline void h5_delete_attr(const std::string& file, const char* name) {
  hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  H5Adelete(f, name);
  H5Fclose(f);
}

// Overwrites /tokens[index] with value (through HDF5: the stored crc32 goes stale).
inline void h5_poke_token(const std::string& file, hsize_t index, uint32_t value) {
  hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  hid_t d = H5Dopen2(f, "/tokens", H5P_DEFAULT);
  hid_t fs = H5Dget_space(d);
  hsize_t one = 1;
  H5Sselect_hyperslab(fs, H5S_SELECT_SET, &index, nullptr, &one, nullptr);
  hid_t ms = H5Screate_simple(1, &one, nullptr);
  H5Dwrite(d, H5T_NATIVE_UINT32, ms, fs, H5P_DEFAULT, &value);
  H5Sclose(ms);
  H5Sclose(fs);
  H5Dclose(d);
  H5Fclose(f);
}

inline std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}
inline void write_file(const std::string& path, const void* data, size_t n) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), std::streamsize(n));
}
inline void write_text(const std::string& path, const std::string& s) { write_file(path, s.data(), s.size()); }

}  // namespace iotest
