// flexdit-run-cpp's command line: the Python CLI's flags (flexdit_runtime/cli.py), parsed with
// the same one-line usage errors ("flexdit-run-cpp: error: ... (see --help)", exit 2).
#pragma once
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace flexdit_cli {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string prompts, bundle;
  std::optional<std::string> out;  // default: a fresh flexdit-images/run-DATE-TIME
  std::optional<int> steps, batch, threads, grid_scale;
  std::optional<std::string> sampler, spacing, precision, providers, init_noise, step_noise;
  std::optional<double> eta, cfg_scale;
  std::optional<bool> clip_denoised;
  std::string backend = "onnx";
  long long seed = 0;
  bool save_npy = false, quiet = false, force = false, json = false, help = false, version = false, prepack = true,
       shared_graphs = true;
};

Args parse_args(const std::vector<std::string>& argv);  // throws UsageError
std::string usage_text();

}  // namespace flexdit_cli
