// File rules of the bundle contract (flexdit_bundle/files.py): sha256 of files and buffers,
// relative paths confined to their directory with every symbolic link resolved.
#pragma once
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace flexdit_core {

std::string sha256_hex(const void* data, size_t size);
std::string sha256_file(const std::filesystem::path& path);  // throws Error(Io) when unreadable

// root/rel with every symbolic link resolved; throws Error(Bundle, "REL points outside the
// bundle directory; refusing to read it") when rel is absolute or ends up outside root.
std::filesystem::path resolve_inside(const std::filesystem::path& root, const std::string& rel);

std::string read_text_file(const std::filesystem::path& path);  // throws Error(Io)

}  // namespace flexdit_core
