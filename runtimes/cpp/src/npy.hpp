// .npy version 1.0/2.0 arrays (little-endian float32 / float64, C order): read for initial noise
// and the conformance vectors, write for samples.npy.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace flexdit_core {

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<double> values;  // converted from the file's dtype
  std::string descr;           // "<f4" or "<f8"
  size_t count() const { return values.size(); }
};

// Called with the header's shape (dtype already checked) before any data is read; throws to refuse it.
using NpyHeaderCheck = std::function<void(const std::vector<int64_t>& shape)>;
constexpr size_t kNpyMaxHeader = 1 << 16;
// Reads exactly the bytes the header declares (more or fewer: an error). Throws Error(Io) naming
// the file and the problem.
NpyArray read_npy(const std::filesystem::path& path, const NpyHeaderCheck& check_header = {});
// std::filesystem::filesystem_error with the system's reason (e.g. no space left on device)
void write_npy_f32(const std::filesystem::path& path, const float* data, const std::vector<int64_t>& shape);

}  // namespace flexdit_core
