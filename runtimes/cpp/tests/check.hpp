// A minimal test harness: CHECK(cond) << context; a test binary exits 1 when any check failed.
#pragma once
#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace testing_min {

inline int& failures() {
  static int n = 0;
  return n;
}
inline int& checks() {
  static int n = 0;
  return n;
}

struct Reporter {
  bool ok;
  std::ostringstream msg;
  const char* expr;
  const char* file;
  int line;
  ~Reporter() {
    ++checks();
    if (!ok) {
      ++failures();
      std::cerr << file << ":" << line << ": CHECK(" << expr << ") failed " << msg.str() << "\n";
    }
  }
  template <typename T>
  Reporter& operator<<(const T& v) {
    msg << v;
    return *this;
  }
};

struct Case {
  std::string name;
  std::function<void()> body;
};
inline std::vector<Case>& cases() {
  static std::vector<Case> c;
  return c;
}
struct Register {
  Register(const char* name, std::function<void()> body) { cases().push_back({name, std::move(body)}); }
};

// Runs every case (or those whose name contains argv[1]); exceptions count as failures.
inline int run_all(int argc, char** argv) {
  std::string filter = argc > 1 ? argv[1] : "";
  int ran = 0;
  for (auto& c : cases()) {
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    int before = failures();
    try {
      c.body();
    } catch (const std::exception& e) {
      ++failures();
      std::cerr << c.name << ": unexpected exception: " << e.what() << "\n";
    }
    ++ran;
    std::cout << (failures() == before ? "ok   " : "FAIL ") << c.name << "\n";
  }
  std::cout << ran << " cases, " << checks() << " checks, " << failures() << " failures\n";
  return failures() || !ran ? 1 : 0;
}

// max |got - ref| / max |ref| (the conformance vectors' tolerance rule)
template <typename A, typename B>
double rel_max_error(const A& got, const B& ref) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(static_cast<double>(got[i]))) return INFINITY;
    err = std::max(err, std::abs(static_cast<double>(got[i]) - static_cast<double>(ref[i])));
    scale = std::max(scale, std::abs(static_cast<double>(ref[i])));
  }
  return err / scale;
}

}  // namespace testing_min

#define CHECK(cond) testing_min::Reporter{static_cast<bool>(cond), {}, #cond, __FILE__, __LINE__}
#define TEST_CASE(name)                                                       \
  static void name();                                                         \
  static testing_min::Register register_##name(#name, name);                  \
  static void name()
// Expects `expr` to throw flexdit_core::Error whose message contains `needle`.
#define CHECK_THROWS_WITH(expr, needle)                                                                  \
  do {                                                                                                   \
    std::string _what = "(no exception)";                                                               \
    try {                                                                                                \
      expr;                                                                                              \
    } catch (const flexdit_core::Error& _e) {                                                                 \
      _what = _e.what();                                                                                 \
    }                                                                                                    \
    CHECK(_what.find(needle) != std::string::npos) << "expected '" << (needle) << "', got: " << _what; \
  } while (0)
