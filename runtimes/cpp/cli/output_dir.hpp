// The CLI's output directory (flexdit-run's rules): new or empty, or with --force one that holds
// only an earlier run's images; refused before any work when it cannot be written; filled in a
// staging directory beside it (.NAME.tmp-PID-XXXXXX) and published in one rename (with --force,
// swapped with the earlier run's directory in one atomic exchange), so a reader never sees a
// half-written directory and nothing is left behind on failure, not even parent directories
// this run created.
#pragma once
#include <filesystem>
#include <functional>

namespace flexdit_cli {

std::filesystem::path fresh_output_dir(const std::filesystem::path& root = "flexdit-images");  // root/run-DATE-TIME[-N]

void check_output_dir(const std::filesystem::path& out, bool force);  // throws flexdit::Error(Io)

// write(staging_dir) creates the files; the staging directory then becomes `out`.
void write_outputs(const std::filesystem::path& out, bool replace,
                   const std::function<void(const std::filesystem::path&)>& write);

}  // namespace flexdit_cli
