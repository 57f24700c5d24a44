// The CLI's output directory (flexdit-run's rules, runtimes/python/flexdit_runtime/cli.py and
// flexdit_bundle/files.py): new or empty, or with --force one that holds only an earlier run's
// files (regular files named as this CLI names them); never a symbolic link; refused before any
// work when it cannot be written. Filled in a staging directory (.NAME.tmp-PID-XXXXXX) beside it
// and published in one rename (with --force, swapped with the earlier run's directory in one
// atomic exchange), so a reader never sees a half-written directory; where the directory cannot
// be replaced (a mount point, or a parent that takes no new entry) the staging directory is made
// inside it and its files are moved in. Whatever else is found in it when publishing stops the
// run with nothing changed; on failure nothing is left behind, not even parent directories this
// run created.
#pragma once
#include <filesystem>
#include <functional>

namespace flexdit_cli {

std::filesystem::path fresh_output_dir(const std::filesystem::path& root = "flexdit-images");  // root/run-DATE-TIME[-N]

void check_output_dir(const std::filesystem::path& out, bool force);  // throws flexdit_core::Error(Io)

// write(staging_dir) creates the files (std::filesystem::filesystem_error on a write error); the
// staging directory then becomes `out`.
void write_outputs(const std::filesystem::path& out, bool replace,
                   const std::function<void(const std::filesystem::path&)>& write);

}  // namespace flexdit_cli
