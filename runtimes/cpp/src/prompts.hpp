// prompts.txt -> class ids (runtimes/python/flexdit_runtime/prompts.py): one class name (any of
// its comma-separated aliases, case-insensitive) or class id per line; '#' starts a comment.
#pragma once
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace flexdit_core {

class ClassIndex {
 public:
  ClassIndex(std::optional<std::vector<std::string>> names, int num_classes);
  int resolve(const std::string& text, const std::string& where = "") const;  // throws Error(Prompt)
  std::string label(int id) const;
  int num_classes() const { return num_classes_; }

 private:
  std::optional<std::vector<std::string>> names_;
  int num_classes_;
  std::map<std::string, int> lookup_;
  std::vector<std::string> keys_in_order_;
};

std::vector<std::string> parse_prompts(const std::string& text, const std::string& source);  // throws Error(Prompt)
// A prompt file is a list of class names or ids: 16 MiB is over a million prompts (prompts.py).
constexpr size_t kMaxPromptFileBytes = size_t(16) << 20;
std::vector<std::string> read_prompts(const std::filesystem::path& path);                   // throws Error(Prompt)

// difflib.SequenceMatcher(None, a, b).ratio() (no junk heuristics: strings are short)
double similarity_ratio(const std::string& a, const std::string& b);

}  // namespace flexdit_core
