#include "output_dir.hpp"

#include <cstdlib>
#include <cstring>
#include <string>
#include <unistd.h>
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
  if (!mkdtemp(buf.data())) throw fs::filesystem_error(std::strerror(errno), parent, std::error_code(errno, std::generic_category()));
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

}  // namespace

void check_output_dir(const fs::path& out) {
  std::error_code ec;
  if (fs::exists(out, ec) && !fs::is_directory(out, ec))
    fail(ErrorKind::Io, "output path " + out.string() + " exists and is not a directory");
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

void write_outputs(const fs::path& out, const std::function<void(const fs::path&)>& write) {
  std::vector<fs::path> created = missing_ancestors(out);
  fs::path tmp;
  auto cleanup = [&] {
    std::error_code ec;
    if (!tmp.empty()) fs::remove_all(tmp, ec);
  };
  try {
    fs::path parent = fs::absolute(out).parent_path();
    fs::create_directories(parent);
    tmp = make_temp_dir(parent, ".flexdit-run-");
    write(tmp);
    std::vector<fs::path> names;
    for (auto& e : fs::directory_iterator(tmp)) names.push_back(e.path().filename());
    fs::create_directories(out);
    for (auto& name : names) fs::rename(tmp / name, out / name);
    cleanup();
  } catch (const std::exception& e) {
    cleanup();
    for (auto& d : created) {  // only directories this call made, and only if empty
      std::error_code ec;
      fs::remove(d, ec);
    }
    std::string why = e.what();
    if (auto* fe = dynamic_cast<const fs::filesystem_error*>(&e)) why = fe->code().message();
    fail(ErrorKind::Io, "cannot write the output directory " + out.string() + ": " + why);
  }
}

}  // namespace flexdit_cli
