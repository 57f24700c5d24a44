// The CLI's output directory: refused before any work when it cannot be written, and filled
// only once everything is done (files go to a staging directory beside it, then are renamed in;
// on failure nothing is left behind, not even parent directories this run created).
#pragma once
#include <filesystem>
#include <functional>

namespace flexdit_cli {

void check_output_dir(const std::filesystem::path& out);  // throws flexdit::Error(Io)

// write(staging_dir) creates the files; they are then moved into `out`.
void write_outputs(const std::filesystem::path& out, const std::function<void(const std::filesystem::path&)>& write);

}  // namespace flexdit_cli
