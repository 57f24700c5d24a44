#include "cli_args.hpp"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <map>

namespace flexdit_cli {
namespace {

int to_int(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || errno || x < INT32_MIN || x > INT32_MAX)
    throw UsageError("argument " + flag + ": invalid int value: '" + v + "'");
  return static_cast<int>(x);
}

long long to_ll(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || errno) throw UsageError("argument " + flag + ": invalid int value: '" + v + "'");
  return x;
}

double to_double(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end) throw UsageError("argument " + flag + ": invalid float value: '" + v + "'");
  return x;
}

std::string choice(const std::string& flag, const std::string& v, const std::vector<std::string>& options) {
  std::string list;
  for (auto& o : options) {
    if (o == v) return v;
    list += (list.empty() ? "'" : ", '") + o + "'";
  }
  throw UsageError("argument " + flag + ": invalid choice: '" + v + "' (choose from " + list + ")");
}

}  // namespace

std::string usage_text() {
  return R"(usage: flexdit-run-cpp [-h] --bundle BUNDLE [-o OUT] [--steps STEPS]
                       [--sampler {ddpm,ddim,dpmpp-2m,unipc,euler}] [--eta ETA] [--cfg-scale CFG_SCALE]
                       [--clip-denoised | --no-clip-denoised] [--spacing {sections,ddim,linspace}]
                       [--seed SEED] [--init-noise INIT_NOISE]
                       [--step-noise STEP_NOISE] [--batch BATCH] [--providers PROVIDERS]
                       [--threads THREADS] [--precision PRECISION] [--backend {onnx}]
                       [--no-prepack] [--no-shared-graphs] [--save-npy] [--grid-scale GRID_SCALE]
                       [--force] [-q] [--json] [--version] prompts

flexdit-run-cpp: prompts.txt -> one PNG per prompt plus a grid, from a bundle (C++ runtime).

positional arguments:
  prompts               text file: one class name or class id per line; '#' comments

options:
  -h, --help            show this help message and exit
  --bundle BUNDLE       bundle directory written by flexdit-export convert
  -o OUT, --out OUT     output directory, new or empty (default: a fresh flexdit-images/run-DATE-TIME
                        per run)
  --force               replace the files of an earlier run in a non-empty -o (its PNGs and samples.npy;
                        anything else there stops the run)
  --steps STEPS         sampling steps (default: the bundle's)
  --sampler {ddpm,ddim,dpmpp-2m,unipc,euler}
                        default: the bundle's (ddpm); dpmpp-2m, unipc and euler are few-step solvers (e.g.
                        20 steps)
  --eta ETA             DDIM eta in [0, 1] (0 = deterministic)
  --cfg-scale CFG_SCALE classifier-free guidance scale; <= 1 disables guidance
  --clip-denoised, --no-clip-denoised
                        clip the predicted x0 to [-1, 1] each step (default: the bundle's)
  --spacing {sections,ddim,linspace}
                        timestep placement: equal sections (ddpm/ddim default), DDIM striding, or linspace
                        (dpmpp-2m/unipc/euler default, as diffusers; euler takes only linspace)
  --seed SEED           noise seed (image i uses its own generator (seed, i); see README: not numpy's)
  --init-noise INIT_NOISE
                        .npy of x_T, shape (N, C, H, W) or (C, H, W)
  --step-noise STEP_NOISE
                        .npy of the per-step noise, shape (K, N, C, H, W): step k uses [k]
                        (compare with another runtime; default: the seeded generator)
  --batch BATCH         images denoised together (default: what one graph call holds)
  --providers PROVIDERS comma-separated ONNX Runtime providers (this build: cpu)
  --threads THREADS     intra-op threads of the shared pool (default: ONNX Runtime's)
  --precision PRECISION override the bundle's per-stage precision policy: one precision for every
                        stage (fp32, fp16, int8, int8-dynamic, int8-static, fp8) or per stage, e.g.
                        'int8:stages=0-2,fp16:stages=3' (unnamed stages keep the bundle's default)
  --backend {onnx}      run the ONNX graphs with ONNX Runtime
  --no-prepack          do not let ONNX Runtime pre-pack weights (as the Python runtime)
  --no-shared-graphs    one ONNX Runtime session per stage, even where the bundle has a graph shared by
                        several stages (same results; the shared graph loads faster)
  --save-npy            also write the final samples as samples.npy
  --grid-scale GRID_SCALE
                        draw grid.png this many times larger (1..16, nearest neighbour; default: enough
                        for 128-pixel images, e.g. 4 for 32x32, 1 keeps the size)
  -q, --quiet           print nothing but errors
  --json                print the run summary as JSON on stdout
  --version             print the runtime and ONNX Runtime versions
)";
}

Args parse_args(const std::vector<std::string>& argv) {
  Args a;
  bool have_bundle = false;
  std::vector<std::string> positional;
  using Setter = std::function<void(const std::string& flag, const std::string& value)>;
  std::map<std::string, Setter> with_value = {
      {"--bundle", [&](auto&, auto& v) { a.bundle = v, have_bundle = true; }},
      {"-o", [&](auto&, auto& v) { a.out = v; }},
      {"--out", [&](auto&, auto& v) { a.out = v; }},
      {"--steps", [&](auto& f, auto& v) { a.steps = to_int(f, v); }},
      {"--sampler", [&](auto& f, auto& v) { a.sampler = choice(f, v, {"ddpm", "ddim", "dpmpp-2m", "unipc", "euler"}); }},
      {"--eta", [&](auto& f, auto& v) { a.eta = to_double(f, v); }},
      {"--cfg-scale", [&](auto& f, auto& v) { a.cfg_scale = to_double(f, v); }},
      {"--spacing", [&](auto& f, auto& v) { a.spacing = choice(f, v, {"sections", "ddim", "linspace"}); }},
      {"--seed", [&](auto& f, auto& v) { a.seed = to_ll(f, v); }},
      {"--init-noise", [&](auto&, auto& v) { a.init_noise = v; }},
      {"--step-noise", [&](auto&, auto& v) { a.step_noise = v; }},
      {"--batch", [&](auto& f, auto& v) { a.batch = to_int(f, v); }},
      {"--providers", [&](auto&, auto& v) { a.providers = v; }},
      {"--threads", [&](auto& f, auto& v) { a.threads = to_int(f, v); }},
      {"--grid-scale", [&](auto& f, auto& v) { a.grid_scale = to_int(f, v); }},
      {"--precision", [&](auto&, auto& v) { a.precision = v; }},
      {"--backend", [&](auto& f, auto& v) { a.backend = choice(f, v, {"onnx", "tensorrt"}); }},
  };
  std::map<std::string, std::function<void()>> flags = {
      {"--clip-denoised", [&] { a.clip_denoised = true; }},
      {"--no-clip-denoised", [&] { a.clip_denoised = false; }},
      {"--save-npy", [&] { a.save_npy = true; }},
      {"--force", [&] { a.force = true; }},
      {"--json", [&] { a.json = true; }},
      {"--no-prepack", [&] { a.prepack = false; }},
      {"--no-shared-graphs", [&] { a.shared_graphs = false; }},
      {"-q", [&] { a.quiet = true; }},
      {"--quiet", [&] { a.quiet = true; }},
      {"-h", [&] { a.help = true; }},
      {"--help", [&] { a.help = true; }},
      {"--version", [&] { a.version = true; }},
  };
  bool only_positional = false;
  for (size_t i = 0; i < argv.size(); ++i) {
    std::string arg = argv[i];
    if (only_positional || arg.size() < 2 || arg[0] != '-' || arg == "-") {
      positional.push_back(arg);
      continue;
    }
    if (arg == "--") {
      only_positional = true;
      continue;
    }
    std::string value;
    bool inline_value = false;
    if (arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos) {
      value = arg.substr(arg.find('=') + 1);
      arg = arg.substr(0, arg.find('='));
      inline_value = true;
    }
    if (flags.count(arg)) {
      if (inline_value) throw UsageError("argument " + arg + ": ignored explicit argument '" + value + "'");
      flags[arg]();
    } else if (with_value.count(arg)) {
      if (!inline_value) {
        if (i + 1 >= argv.size() || (argv[i + 1].size() > 1 && argv[i + 1][0] == '-' &&
                                     !std::isdigit(static_cast<unsigned char>(argv[i + 1][1])) && argv[i + 1][1] != '.'))
          throw UsageError("argument " + arg + ": expected one argument");
        value = argv[++i];
      }
      with_value[arg](arg, value);
    } else {
      throw UsageError("unrecognized arguments: " + argv[i]);
    }
  }
  if (a.help || a.version) return a;
  if (positional.size() > 1) throw UsageError("unrecognized arguments: " + positional[1]);
  std::string missing;
  if (positional.empty()) missing = "prompts";
  if (!have_bundle) missing += (missing.empty() ? "" : ", ") + std::string("--bundle");
  if (!missing.empty()) throw UsageError("the following arguments are required: " + missing);
  a.prompts = positional[0];
  return a;
}

}  // namespace flexdit_cli
