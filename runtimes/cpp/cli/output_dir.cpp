#include "output_dir.hpp"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <regex>
#include <string>
#include <vector>

#include "error.hpp"

namespace fs = std::filesystem;
using flexdit::ErrorKind;
using flexdit::fail;

namespace flexdit_cli {
namespace {

fs::path make_temp_dir(const fs::path& parent, const std::string& prefix) {
  std::string templ = (parent / (prefix + "XXXXXX")).string();
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) throw fs::filesystem_error("mkdtemp", parent, std::error_code(errno, std::generic_category()));
  return fs::path(buf.data());
}

std::vector<fs::path> missing_ancestors(const fs::path& out) {
  std::vector<fs::path> created;  // deepest first
  for (fs::path a = fs::absolute(out); !a.empty(); a = a.parent_path()) {
    std::error_code ec;
    if (fs::exists(a, ec)) break;
    created.push_back(a);
    if (a == a.parent_path()) break;
  }
  return created;
}

// what flexdit-run (and this CLI) writes into an output directory
bool ours(const std::string& name) {
  static const std::regex re(R"((\d{3,}_[A-Za-z0-9_-]*\.png|grid\.png|samples\.npy))");
  return std::regex_match(name, re);
}

}  // namespace

fs::path fresh_output_dir(const fs::path& root) {
  char stamp[32];
  std::time_t now = std::time(nullptr);
  std::strftime(stamp, sizeof stamp, "run-%Y%m%d-%H%M%S", std::localtime(&now));
  fs::path out = root / stamp;
  std::error_code ec;
  for (int n = 2; fs::exists(out, ec); ++n) out = root / (std::string(stamp) + "-" + std::to_string(n));
  return out;
}

void check_output_dir(const fs::path& out, bool force) {
  std::error_code ec;
  if (fs::exists(out, ec) && !fs::is_directory(out, ec))
    fail(ErrorKind::Io, "output path " + out.string() + " exists and is not a directory");
  if (fs::is_directory(out, ec)) {
    std::vector<std::string> names;
    for (auto it = fs::directory_iterator(out, ec); !ec && it != fs::directory_iterator(); it.increment(ec))
      names.push_back(it->path().filename().string());
    if (ec) fail(ErrorKind::Io, "cannot write the output directory " + out.string() + ": " + ec.message());
    std::sort(names.begin(), names.end());
    if (!names.empty() && !force)
      fail(ErrorKind::Io, "output directory " + out.string() + " is not empty (use --force to replace its images, or give a new -o)");
    std::vector<std::string> foreign;
    for (auto& n : names)
      if (!ours(n)) foreign.push_back(n);
    if (!foreign.empty()) {
      std::string list;
      for (size_t i = 0; i < foreign.size() && i < 3; ++i) list += (i ? ", " : "") + foreign[i];
      if (foreign.size() > 3) list += ", ...";
      fail(ErrorKind::Io, "output directory " + out.string() + " holds files flexdit-run did not write (" + list +
                              "); refusing to replace it");
    }
  }
  fs::path parent = fs::absolute(out);
  while (!fs::exists(parent, ec) && parent != parent.parent_path()) parent = parent.parent_path();
  if (!fs::is_directory(parent, ec))
    fail(ErrorKind::Io, "cannot write the output directory " + out.string() + ": " + parent.string() + " is not a directory");
  try {
    fs::remove(make_temp_dir(parent, ".flexdit-run-probe-"));
  } catch (const fs::filesystem_error& e) {
    fail(ErrorKind::Io, "cannot write the output directory " + out.string() + ": " + e.code().message() + " in " +
                            parent.string());
  }
}

void write_outputs(const fs::path& out, bool replace, const std::function<void(const fs::path&)>& write) {
  std::vector<fs::path> created = missing_ancestors(out);
  fs::path staging;
  std::error_code ec;
  try {
    fs::path target = fs::absolute(out).lexically_normal();
    if (target.filename().empty()) target = target.parent_path();
    fs::create_directories(target.parent_path());
    staging = make_temp_dir(target.parent_path(), "." + target.filename().string() + ".tmp-" + std::to_string(getpid()) + "-");
    fs::permissions(staging, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                                 fs::perms::others_read | fs::perms::others_exec);
    write(staging);
    bool exists = fs::is_directory(target, ec);
    bool empty = exists && fs::is_empty(target, ec);
    if (exists && (replace || empty)) {  // one atomic exchange; the staging name then holds the old run
      if (renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) != 0)
        throw fs::filesystem_error("rename", staging, target, std::error_code(errno, std::generic_category()));
    } else if (renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, target.c_str(), RENAME_NOREPLACE) != 0) {
      if (errno == EEXIST || errno == ENOTEMPTY)
        fail(ErrorKind::Io, "output directory " + out.string() +
                                " was created by another process meanwhile; nothing was written (use --force to replace it)");
      throw fs::filesystem_error("rename", staging, target, std::error_code(errno, std::generic_category()));
    }
    fs::remove_all(staging, ec);
  } catch (const flexdit::Error&) {
    if (!staging.empty()) fs::remove_all(staging, ec);
    throw;
  } catch (const std::exception& e) {
    if (!staging.empty()) fs::remove_all(staging, ec);
    for (auto& d : created) fs::remove(d, ec);  // only directories this call made, and only if empty
    std::string why = e.what();
    if (auto* fe = dynamic_cast<const fs::filesystem_error*>(&e)) why = fe->code().message();
    fail(ErrorKind::Io, "cannot write the output directory " + out.string() + ": " + why);
  }
}

}  // namespace flexdit_cli
