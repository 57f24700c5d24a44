#include "output_dir.hpp"

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <ctime>
#include <fstream>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "error.hpp"

namespace fs = std::filesystem;
using flexdit_core::ErrorKind;
using flexdit_core::fail;

namespace flexdit_cli {
namespace {

std::error_code last_error() { return std::error_code(errno, std::generic_category()); }

fs::path make_temp_dir(const fs::path& parent, const std::string& prefix) {
  std::string templ = (parent / (prefix + "XXXXXX")).string();
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) throw fs::filesystem_error("mkdtemp", parent, last_error());
  return fs::path(buf.data());
}

// whether a new directory can be made in `parent` (made and removed at once: permission bits do
// not tell, e.g. for root in /proc or on a read-only mount)
std::error_code probe(const fs::path& parent) {
  try {
    fs::remove(make_temp_dir(parent, ".flexdit-probe-"));
  } catch (const fs::filesystem_error& e) {
    return e.code();
  }
  return {};
}

// every mount point of this process's mount namespace (bind mounts included)
std::set<std::string> mount_points() {
  std::set<std::string> points;
  std::ifstream f("/proc/self/mountinfo");
  static const std::regex octal(R"(\\([0-7]{3}))");
  for (std::string line; std::getline(f, line);) {
    std::istringstream fields(line);
    std::string field, point;
    for (int i = 0; i < 5 && fields >> field; ++i) point = i == 4 ? field : point;
    std::string out;
    std::smatch m;
    while (std::regex_search(point, m, octal)) {  // mountinfo writes a space as \040
      out += m.prefix().str() + static_cast<char>(std::stoi(m[1].str(), nullptr, 8));
      point = m.suffix().str();
    }
    points.insert(out + point);
  }
  return points;
}

bool is_real_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(fs::symlink_status(p, ec));
}

// an existing directory that a rename cannot replace, so publishing writes into it: a mount
// point (a Docker volume's root: EBUSY) or a directory whose parent takes no new entry
bool writes_into(const fs::path& target) {
  std::error_code ec;
  if (!is_real_dir(target)) return false;
  fs::path real = fs::canonical(target, ec);
  if (ec) return false;
  struct stat self {}, up {};
  if (stat(real.c_str(), &self) == 0 && stat((real / "..").c_str(), &up) == 0 &&
      (self.st_dev != up.st_dev || self.st_ino == up.st_ino))
    return true;
  return mount_points().count(real.string()) || probe(real.parent_path());
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

// an earlier run's output, which --force may replace: a regular file named as this CLI (and
// flexdit-run) names them; a directory or link named grid.png is the user's
bool ours(const fs::path& entry) {
  static const std::regex re(R"((\d{3,}_[A-Za-z0-9_-]*\.png|grid\.png|samples\.npy))");
  std::error_code ec;
  return std::regex_match(entry.filename().string(), re) && fs::is_regular_file(fs::symlink_status(entry, ec));
}

std::string label(const fs::path& entry) { return entry.filename().string() + (is_real_dir(entry) ? "/" : ""); }

std::string foreign_message(const fs::path& out, const std::vector<std::string>& labels, const std::string& end) {
  std::string list;
  for (size_t i = 0; i < labels.size() && i < 3; ++i) list += (i ? ", " : "") + labels[i];
  if (labels.size() > 3) list += ", ...";
  return "output directory " + out.string() + " holds files flexdit-run did not write (" + list + "); " + end;
}

std::vector<fs::path> entries(const fs::path& dir, const fs::path& skip = {}) {
  std::vector<fs::path> out;
  for (auto& e : fs::directory_iterator(dir))
    if (e.path() != skip) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

struct Foreign {
  std::vector<std::string> labels;
};

// the entries of `dir`; Foreign when one may not be replaced
std::vector<fs::path> checked(const fs::path& dir, bool force, const fs::path& skip = {}) {
  std::vector<fs::path> all = entries(dir, skip);
  Foreign f;
  for (auto& e : all)
    if (!force || !ours(e)) f.labels.push_back(label(e));
  if (!f.labels.empty()) throw f;
  return all;
}

void remove_entries(const std::vector<fs::path>& list) {
  for (auto& e : list) is_real_dir(e) ? (void)fs::remove_all(e) : (void)fs::remove(e);
}

void exchange(const fs::path& a, const fs::path& b) {
  if (renameat2(AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), RENAME_EXCHANGE) != 0)
    throw fs::filesystem_error("rename", a, b, last_error());
}

[[noreturn]] void created_meanwhile(const fs::path& out) {
  fail(ErrorKind::Io, "output directory " + out.string() +
                          " was created by another process meanwhile; nothing was written (use --force to replace it)");
}

// the staging directory becomes `target` (see the header); `replace`: an existing target's
// earlier-run files may go, else (an empty target) nothing may
void publish(const fs::path& out, const fs::path& staging, const fs::path& target, bool into, bool replace,
             bool force) {
  if (into) {
    if (!entries(target, staging).empty() && !replace) created_meanwhile(out);
    std::vector<fs::path> old = checked(target, force, staging), fresh = entries(staging);
    std::set<std::string> names;
    for (auto& e : fresh) names.insert(e.filename().string());
    std::vector<fs::path> in_the_way, stale;
    for (auto& e : old)
      if (!names.count(e.filename().string())) stale.push_back(e);
      else if (is_real_dir(e)) in_the_way.push_back(e);  // a file is replaced by the rename itself
    remove_entries(in_the_way);
    for (auto& e : fresh) fs::rename(e, target / e.filename());
    remove_entries(stale);
    fs::remove(staging);
    return;
  }
  if (!replace) {
    if (renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, target.c_str(), RENAME_NOREPLACE) != 0) {
      if (errno == EEXIST || errno == ENOTEMPTY) created_meanwhile(out);
      throw fs::filesystem_error("rename", staging, target, last_error());
    }
    return;
  }
  if (!is_real_dir(target)) {
    fs::rename(staging, target);
    return;
  }
  checked(target, force);
  exchange(staging, target);  // the staging name now holds the old run: what came in since the check?
  std::vector<fs::path> old;
  try {
    old = checked(staging, force);
  } catch (const Foreign&) {
    exchange(staging, target);  // back: nothing replaced
    throw;
  }
  remove_entries(old);
  fs::remove(staging);
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
  const std::string where = "cannot write the output directory " + out.string() + ": ";
  if (fs::is_symlink(fs::symlink_status(out, ec)))
    fail(ErrorKind::Io, "output path " + out.string() + " is a symbolic link; refusing to replace or write through it");
  if (fs::exists(out, ec) && !fs::is_directory(out, ec))
    fail(ErrorKind::Io, "output path " + out.string() + " exists and is not a directory");
  if (fs::is_directory(out, ec)) {
    std::vector<fs::path> list;
    for (auto it = fs::directory_iterator(out, ec); !ec && it != fs::directory_iterator(); it.increment(ec))
      list.push_back(it->path());
    if (ec) fail(ErrorKind::Io, where + ec.message());
    std::sort(list.begin(), list.end());
    if (!list.empty() && !force)
      fail(ErrorKind::Io, "output directory " + out.string() + " is not empty (use --force to replace its images, or give a new -o)");
    std::vector<std::string> foreign;
    for (auto& e : list)
      if (!ours(e)) foreign.push_back(label(e));
    if (!foreign.empty()) fail(ErrorKind::Io, foreign_message(out, foreign, "refusing to replace it"));
  }
  fs::path absolute = fs::absolute(out).lexically_normal(), parent;
  if (absolute.filename().empty() && absolute != absolute.root_path()) absolute = absolute.parent_path();  // "out/"
  parent = absolute;
  if (!writes_into(absolute)) {  // the staging directory goes beside it: its nearest existing ancestor must take it
    do parent = parent.parent_path();
    while (!fs::exists(parent, ec) && parent != parent.parent_path());
    if (!fs::is_directory(parent, ec)) fail(ErrorKind::Io, where + parent.string() + " is not a directory");
  }
  if (std::error_code e = probe(parent))
    fail(ErrorKind::Io, where + "cannot create anything in " + parent.string() + " (" + e.message() + ")");
}

void write_outputs(const fs::path& out, bool replace, const std::function<void(const fs::path&)>& write) {
  std::vector<fs::path> created = missing_ancestors(out);
  fs::path staging;
  std::error_code ec;
  fs::path target = fs::absolute(out).lexically_normal();
  if (target.filename().empty()) target = target.parent_path();
  std::optional<std::string> error;
  try {
    fs::create_directories(target.parent_path());
    bool into = writes_into(target);
    staging = make_temp_dir(into ? target : target.parent_path(),
                            "." + target.filename().string() + ".tmp-" + std::to_string(getpid()) + "-");
    fs::permissions(staging, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                                 fs::perms::others_read | fs::perms::others_exec);
    write(staging);
    bool empty = is_real_dir(target) && entries(target, staging).empty();
    publish(out, staging, target, into, replace || empty, replace);
  } catch (const Foreign& f) {
    error = replace ? foreign_message(out, f.labels, "nothing was written")
                    : "output directory " + out.string() +
                          " was created by another process meanwhile; nothing was written (use --force to replace it)";
  } catch (const flexdit_core::Error& e) {
    error = e.what();
  } catch (const fs::filesystem_error& e) {
    error = "cannot write the output directory " + out.string() + ": " + e.code().message();
  } catch (const std::exception& e) {
    error = "cannot write the output directory " + out.string() + ": " + e.what();
  }
  if (!staging.empty()) fs::remove_all(staging, ec);
  if (!error) return;
  if (!fs::exists(target, ec))
    for (size_t i = 1; i < created.size(); ++i)  // deepest first; only directories this call made, if empty
      if (!fs::remove(created[i], ec)) break;
  fail(ErrorKind::Io, *error);
}

}  // namespace flexdit_cli
