#include "precision.hpp"

#include <algorithm>
#include <cctype>
#include <regex>

#include "error.hpp"

namespace flexdit_core {
namespace {

const char* const kPrecisions[] = {"fp32", "fp16", "int8-dynamic", "int8-static", "fp8"};

[[noreturn]] void perr(const std::string& m) { fail(ErrorKind::Argument, m); }

std::string strip(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

std::string repr(const std::string& s) { return "'" + s + "'"; }

std::vector<int> stage_ids(const std::string& text, const std::string& item) {
  static const std::regex re(R"(\s*(\d+)\s*(?:-\s*(\d+)\s*)?)");
  std::smatch m;
  if (!std::regex_match(text, m, re))
    perr("precision item " + repr(item) + ": " + repr(text) + " is not a stage id or a range a-b");
  auto num = [&](const std::string& s) -> long {
    if (s.size() > 9) perr("precision item " + repr(item) + ": stage id " + s + " is out of range");
    return std::stol(s);
  };
  long lo = num(m[1].str()), hi = m[2].matched ? num(m[2].str()) : lo;
  if (hi < lo) perr("precision item " + repr(item) + ": empty range " + repr(text));
  if (hi - lo > 100000) perr("precision item " + repr(item) + ": range " + repr(text) + " is too long");
  std::vector<int> out;
  for (long i = lo; i <= hi; ++i) out.push_back(static_cast<int>(i));
  return out;
}

}  // namespace

std::string canonical_precision(const std::string& name, const std::string& backend) {
  std::string n = strip(name);
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return std::tolower(c); });
  if (n == "int8") return backend == "tensorrt" ? "int8-static" : "int8-dynamic";
  for (auto* p : kPrecisions)
    if (n == p) return n;
  perr("unknown precision " + repr(name) + " (choose from fp32, fp16, int8-dynamic, int8-static, fp8, int8)");
}

std::vector<std::pair<std::string, std::optional<std::vector<int>>>> parse_precision_items(const std::string& spec,
                                                                                           const std::string& backend) {
  if (strip(spec).empty()) perr("empty precision spec");
  static const std::regex bare(R"(\d+\s*(-\s*\d+)?)");
  std::vector<std::pair<std::string, std::optional<std::vector<int>>>> items;
  size_t start = 0;
  while (true) {
    size_t comma = spec.find(',', start);
    std::string token = strip(spec.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (token.empty()) perr("precision spec " + repr(spec) + " has an empty item");
    if (std::regex_match(token, bare)) {
      if (items.empty() || !items.back().second)
        perr("precision spec " + repr(spec) + ": stage list " + repr(token) + " does not follow a 'stages=' item");
      auto ids = stage_ids(token, token);
      items.back().second->insert(items.back().second->end(), ids.begin(), ids.end());
    } else {
      size_t colon = token.find(':');
      std::string name = token.substr(0, colon);
      std::string prec = canonical_precision(name, backend);
      if (colon == std::string::npos || colon + 1 == token.size()) {
        items.emplace_back(prec, std::nullopt);
      } else {
        std::string rest = token.substr(colon + 1);
        size_t eq = rest.find('=');
        if (eq == std::string::npos || strip(rest.substr(0, eq)) != "stages")
          perr("precision item " + repr(token) + ": expected PRECISION or PRECISION:stages=LIST");
        items.emplace_back(prec, stage_ids(rest.substr(eq + 1), token));
      }
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  int rest = 0;
  for (auto& it : items) rest += !it.second;
  if (rest > 1) perr("precision spec " + repr(spec) + " has more than one item without stages=");
  return items;
}

std::map<int, std::string> parse_precision_policy(const std::string& spec, int num_stages, const std::string& backend,
                                                  const std::string& fallback) {
  std::map<int, std::string> policy;
  std::string rest = fallback;
  for (auto& [prec, ids] : parse_precision_items(spec, backend)) {
    if (!ids) {
      rest = prec;
      continue;
    }
    for (int sid : *ids) {
      if (sid < 0 || sid >= num_stages)
        perr("precision spec " + repr(spec) + " names stage " + std::to_string(sid) + ", but the bundle has stages 0.." +
             std::to_string(num_stages - 1));
      if (policy.count(sid)) perr("precision spec " + repr(spec) + " assigns stage " + std::to_string(sid) + " twice");
      policy[sid] = prec;
    }
  }
  if (!rest.empty())
    for (int sid = 0; sid < num_stages; ++sid) policy.emplace(sid, rest);
  return policy;
}

}  // namespace flexdit_core
