// Deterministic fuzz loop over the parsers that take untrusted text: the manifest (strict JSON +
// schema + rules), prompt files, the precision grammar, ONNX initializer tables and .npy headers.
// Seeded mutations (byte flips, insertions, deletions, truncations, splices of interesting
// tokens, JSON value swaps) run a fixed number of iterations; the only acceptable outcomes are
// success or flexdit_core::Error / std::invalid_argument. Anything else (a crash, another exception,
// a sanitizer report in the ASan/UBSan build) fails the test.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "check.hpp"
#include "error.hpp"
#include "files.hpp"
#include "json_text.hpp"
#include "manifest.hpp"
#include "npy.hpp"
#include "onnx_scan.hpp"
#include "precision.hpp"
#include "prompts.hpp"

namespace fs = std::filesystem;
using namespace flexdit_core;

static const fs::path kTiny = fs::path(FLEXDIT_REPO_ROOT) / "flexdit_bundle" / "conformance" / "tiny-bundle";
static const int kIterations = 4000;  // per target; fixed so the suite's time is fixed

static const char* const kTokens[] = {"NaN", "-Infinity", "1e999", "-1", "0", "null", "true", "[]", "{}", "\"\"",
                                      "[[[[[[[[", "]]]]", "\"..\"", "\"/etc/passwd\"", "18446744073709551616",
                                      "9223372036854775807", "-9223372036854775808", "1.5", "\\u0000", "\xff\xfe",
                                      ",", ":", "\"", "#", "-", "=", "stages=", "int8", "\r\n", "4294967296"};

static std::string mutate(const std::string& seed, std::mt19937_64& rng) {
  std::string s = seed;
  int rounds = 1 + rng() % 4;
  for (int r = 0; r < rounds; ++r) {
    size_t pos = s.empty() ? 0 : rng() % (s.size() + 1);
    switch (rng() % 6) {
      case 0:
        if (!s.empty() && pos < s.size()) s[pos] = static_cast<char>(s[pos] ^ (1 << (rng() % 8)));
        break;
      case 1: s.insert(pos, 1, static_cast<char>(rng() % 256)); break;
      case 2: s.erase(pos, rng() % 16); break;
      case 3: s.resize(pos); break;
      case 4: s.insert(pos, kTokens[rng() % (sizeof kTokens / sizeof *kTokens)]); break;
      case 5: {  // duplicate a slice elsewhere
        if (s.empty()) break;
        size_t a = rng() % s.size(), n = rng() % 64;
        s.insert(pos, s.substr(a, n));
        break;
      }
    }
  }
  return s;
}

// replace a random JSON value somewhere in the manifest with a value of another kind
static void mutate_json(json& j, std::mt19937_64& rng, int depth = 0) {
  if ((j.is_object() || j.is_array()) && !j.empty() && depth < 12 && rng() % 4) {
    auto it = j.begin();
    std::advance(it, rng() % j.size());
    mutate_json(*it, rng, depth + 1);
    return;
  }
  switch (rng() % 9) {
    case 0: j = nullptr; break;
    case 1: j = -1; break;
    case 2: j = static_cast<int64_t>(rng() % 3000); break;
    case 3: j = "../x"; break;
    case 4: j = json::array(); break;
    case 5: j = json::object(); break;
    case 6: j = 1e300; break;
    case 7: j = true; break;
    case 8: j = static_cast<int64_t>(1) << 40; break;
  }
}

template <typename F>
static int survive(F&& f) {  // 0: accepted, 1: refused with a proper error
  try {
    f();
    return 0;
  } catch (const Error&) {
    return 1;
  } catch (const std::invalid_argument&) {
    return 1;
  }
}

TEST_CASE(fuzz_manifest_text) {
  std::string seed = read_text_file(kTiny / "manifest.json");
  std::mt19937_64 rng(20240611);
  int refused = 0;
  for (int i = 0; i < kIterations; ++i) refused += survive([&] { parse_manifest_text(mutate(seed, rng), "m.json"); });
  CHECK(refused > kIterations / 2) << refused;  // most mutations must be caught
}

TEST_CASE(fuzz_manifest_values) {
  json seed = parse_json_strict(read_text_file(kTiny / "manifest.json"));
  std::mt19937_64 rng(7);
  int refused = 0;
  for (int i = 0; i < kIterations; ++i) {
    json m = seed;
    for (int r = 0, n = 1 + rng() % 3; r < n; ++r) mutate_json(m, rng);
    refused += survive([&] {
      Manifest v = validate_manifest(m);
      for (int t = 0; t < v.num_timesteps; t += 97) v.stage_for(t);
    });
  }
  CHECK(refused > 0);
}

TEST_CASE(fuzz_prompts) {
  std::string seed = "# prompts\nsneaker\n3\n  Ankle boot # x\n\r\n-1\n";
  ClassIndex names(std::vector<std::string>{"T-shirt/top", "Trouser", "Sneaker, trainer", "Ankle boot"}, 4);
  ClassIndex ids(std::nullopt, 10);
  std::mt19937_64 rng(99);
  for (int i = 0; i < kIterations; ++i) {
    std::string text = mutate(seed, rng);
    survive([&] {
      for (auto& p : parse_prompts(text, "p.txt")) {
        survive([&] { names.resolve(p); });
        survive([&] { ids.resolve(p); });
      }
    });
  }
}

TEST_CASE(fuzz_precision_specs) {
  std::mt19937_64 rng(5);
  const std::string seeds[] = {"int8:stages=0-2,fp16:stages=3", "fp16,int8:stages=0,1", "fp32"};
  for (int i = 0; i < kIterations; ++i)
    survive([&] { parse_precision_policy(mutate(seeds[i % 3], rng), 4); });
}

TEST_CASE(fuzz_onnx_scan) {
  std::string seed = read_text_file(kTiny / "stages/stage0_s2.onnx");
  std::mt19937_64 rng(11);
  for (int i = 0; i < kIterations / 5; ++i) {
    std::string bytes = mutate(seed, rng);
    survive([&] { onnx_initializers(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()); });
  }
}

TEST_CASE(fuzz_npy_reader) {
  fs::path dir = fs::temp_directory_path() / ("flexdit-fuzz-" + std::to_string(getpid()));
  fs::create_directories(dir);
  std::string seed = read_text_file(fs::path(FLEXDIT_REPO_ROOT) / "flexdit_bundle/conformance/vectors/steps/x.npy");
  std::mt19937_64 rng(3);
  for (int i = 0; i < kIterations / 5; ++i) {
    std::string bytes = mutate(seed.substr(0, 200), rng) + seed.substr(std::min<size_t>(200, seed.size()));
    std::ofstream(dir / "f.npy", std::ios::binary) << bytes;
    survive([&] { read_npy(dir / "f.npy"); });
  }
  fs::remove_all(dir);
}

int main(int argc, char** argv) { return testing_min::run_all(argc, argv); }
