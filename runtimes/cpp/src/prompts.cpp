#include "prompts.hpp"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <functional>
#include <sstream>

#include "error.hpp"

namespace flexdit_core {
namespace {

std::string strip(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string repr_full(const std::string& s) {
  bool sq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
  char q = sq ? '"' : '\'';
  return std::string(1, q) + s + q;
}

bool valid_utf8(const std::string& s) {
  size_t i = 0, n = s.size();
  while (i < n) {
    unsigned char c = s[i];
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (!len || i + len > n) return false;
    for (int k = 1; k < len; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
    i += len;
  }
  return true;
}

size_t codepoints(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

// repr() for an error message, capped at 60 characters: a 10 MB prompt line must not come
// back whole in the one line that reports it (prompts.py: shown)
std::string repr(const std::string& s) {
  const size_t limit = 60, n = codepoints(s);
  if (n <= limit) return repr_full(s);
  size_t cut = 0, seen = 0;
  while (cut < s.size() && seen < limit) {
    ++cut;
    while (cut < s.size() && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) ++cut;
    ++seen;
  }
  std::string head = repr_full(s.substr(0, cut));
  return head.substr(0, head.size() - 1) + "...' (" + std::to_string(n) + " characters)";
}

}  // namespace

double similarity_ratio(const std::string& a, const std::string& b) {
  if (a.empty() && b.empty()) return 1.0;
  // Ratcliff-Obershelp: longest common block, recursively left and right of it
  std::function<size_t(size_t, size_t, size_t, size_t)> matches = [&](size_t alo, size_t ahi, size_t blo, size_t bhi) -> size_t {
    size_t best = 0, bi = alo, bj = blo;
    for (size_t i = alo; i < ahi; ++i)
      for (size_t j = blo; j < bhi; ++j) {
        size_t k = 0;
        while (i + k < ahi && j + k < bhi && a[i + k] == b[j + k]) ++k;
        if (k > best) best = k, bi = i, bj = j;
      }
    if (!best) return 0;
    return best + matches(alo, bi, blo, bj) + matches(bi + best, ahi, bj + best, bhi);
  };
  return 2.0 * matches(0, a.size(), 0, b.size()) / static_cast<double>(a.size() + b.size());
}

ClassIndex::ClassIndex(std::optional<std::vector<std::string>> names, int num_classes)
    : names_(std::move(names)), num_classes_(num_classes) {
  if (!names_) return;
  for (size_t i = 0; i < names_->size(); ++i) {
    const std::string& full = (*names_)[i];
    std::vector<std::string> aliases{full};
    std::stringstream ss(full);
    std::string part;
    while (std::getline(ss, part, ',')) aliases.push_back(strip(part));
    if (!full.empty() && full.back() == ',') aliases.push_back("");
    for (auto& al : aliases) {
      std::string key = lower(al);
      if (lookup_.emplace(key, static_cast<int>(i)).second) keys_in_order_.push_back(key);
    }
  }
}

int ClassIndex::resolve(const std::string& text, const std::string& where) const {
  std::string key = strip(text);
  std::string digits = key;
  digits.erase(0, digits.find_first_not_of('-'));
  if (!digits.empty() && std::all_of(digits.begin(), digits.end(), [](unsigned char c) { return std::isdigit(c); })) {
    bool negative = key[0] == '-';
    std::string trimmed = digits.substr(std::min(digits.find_first_not_of('0'), digits.size() - 1));
    bool huge = key.size() >= 20 || digits.size() != key.size() - (negative ? 1 : 0);  // as int(): '-' once
    long long id = huge ? -1 : std::stoll(trimmed) * (negative ? -1 : 1);
    if (huge || id < 0 || id >= num_classes_) {
      std::string shown = huge ? repr(key) : std::to_string(id);
      fail(ErrorKind::Prompt, where + "class id " + shown + " is outside 0.." + std::to_string(num_classes_ - 1));
    }
    return static_cast<int>(id);
  }
  auto it = lookup_.find(lower(key));
  if (it != lookup_.end()) return it->second;
  if (!names_ || names_->empty())
    fail(ErrorKind::Prompt, where + repr(key) + " is not a class id, and this bundle has no class names");
  // difflib.get_close_matches(key, keys, n=3, cutoff=0.6): best scores first
  std::vector<std::pair<double, std::string>> scored;
  std::string lk = lower(key);
  for (auto& k : (key.size() < 200 ? keys_in_order_ : std::vector<std::string>{})) {
    double r = similarity_ratio(lk, k);
    if (r >= 0.6) scored.emplace_back(r, k);
  }
  std::stable_sort(scored.begin(), scored.end(), [](auto& x, auto& y) { return x.first > y.first; });
  std::string hint;
  for (size_t i = 0; i < scored.size() && i < 3; ++i) hint += (i ? ", " : "") + repr(scored[i].second);
  fail(ErrorKind::Prompt, where + "unknown class " + repr(key) + (hint.empty() ? "" : "; did you mean " + hint + "?"));
}

std::string ClassIndex::label(int id) const {
  if (!names_) return std::to_string(id);
  const std::string& full = (*names_)[id];
  return strip(full.substr(0, full.find(',')));
}

std::vector<std::string> parse_prompts(const std::string& raw, const std::string& source) {
  // a byte-order mark (Windows editors) is not a prompt
  const std::string text = raw.compare(0, 3, "\xEF\xBB\xBF") == 0 ? raw.substr(3) : raw;
  if (!valid_utf8(text)) fail(ErrorKind::Prompt, "cannot read prompt file " + source + ": it is not UTF-8 text");
  std::vector<std::string> prompts;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find_first_of("\r\n", start);
    std::string line = text.substr(start, end == std::string::npos ? std::string::npos : end - start);
    line = strip(line.substr(0, line.find('#')));
    if (!line.empty()) prompts.push_back(line);
    if (end == std::string::npos) break;
    start = end + ((text[end] == '\r' && end + 1 < text.size() && text[end + 1] == '\n') ? 2 : 1);
  }
  if (prompts.empty())
    fail(ErrorKind::Prompt, "prompt file " + source + " has no prompts (only blank lines or comments)");
  return prompts;
}

std::vector<std::string> read_prompts(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) fail(ErrorKind::Prompt, "prompt file not found: " + path.string());
  std::ifstream f(path, std::ios::binary);
  if (!f || std::filesystem::is_directory(path, ec))
    fail(ErrorKind::Prompt, "cannot read prompt file " + path.string() + ": it is not a readable file");
  // reading stops past the limit: /dev/zero or a mistaken huge file is one error, not all memory
  std::string text(kMaxPromptFileBytes + 1, '\0');
  f.read(text.data(), static_cast<std::streamsize>(text.size()));
  if (f.bad()) fail(ErrorKind::Prompt, "cannot read prompt file " + path.string() + ": it is not a readable file");
  text.resize(static_cast<size_t>(f.gcount()));
  if (text.size() > kMaxPromptFileBytes)
    fail(ErrorKind::Prompt, "prompt file " + path.string() + " is larger than " + std::to_string(kMaxPromptFileBytes >> 20) +
                                " MiB, more than a list of prompts needs (split it into several runs)");
  return parse_prompts(text, path.string());
}

}  // namespace flexdit_core
