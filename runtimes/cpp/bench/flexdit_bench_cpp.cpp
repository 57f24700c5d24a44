// flexdit-bench-cpp: time the C++ runtime on a bundle for benchmarks/cpp_vs_python.py. Loads the
// bundle once, runs one untimed warm-up request, then REPEATS timed requests and prints one JSON
// line: per-image seconds (median over repeats), the share of time outside ONNX Runtime Run calls,
// the process CPU time per image (robust to other load on the machine), the load time
// (Model::load) and the warm-up request's time (ONNX Runtime finishes some set-up on first runs).
//   usage: flexdit-bench-cpp BUNDLE N_IMAGES STEPS SAMPLER CFG THREADS REPEATS [--no-prepack] [--no-shared-graphs]
#include <algorithm>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "error.hpp"
#include "model.hpp"

using namespace flexdit_core;

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main(int argc, char** argv) {
  if (argc < 8) {
    std::fprintf(stderr, "usage: %s BUNDLE N_IMAGES STEPS SAMPLER CFG THREADS REPEATS [--no-prepack] [--no-shared-graphs]\n",
                 argv[0]);
    return 2;
  }
  try {
    LoadOptions lo;
    lo.threads = std::atoi(argv[6]);
    for (int i = 8; i < argc; ++i) {
      if (std::strcmp(argv[i], "--no-prepack") == 0) {
        lo.prepack_weights = false;
      } else if (std::strcmp(argv[i], "--no-shared-graphs") == 0) {
        lo.shared_graphs = false;
      } else {
        std::fprintf(stderr, "flexdit-bench-cpp: error: unknown option %s\n", argv[i]);
        return 2;
      }
    }
    double t0 = now();
    auto model = Model::load(argv[1], lo);
    double load_s = now() - t0;
    const int n = std::atoi(argv[2]), repeats = std::atoi(argv[7]);
    std::vector<int> ids(n);
    for (int i = 0; i < n; ++i) ids[i] = i % model->manifest().num_classes;
    SampleOptions o;
    o.sampler = std::string(argv[4]);
    o.cfg_scale = std::atof(argv[5]);
    o.steps = 2;
    double w0 = now();
    model->sample(ids, o);  // warm-up: every stage's first call
    double warmup_s = now() - w0;
    o.steps = std::atoi(argv[3]);
    std::vector<double> per_image, outside, cpu;
    for (int r = 0; r < repeats; ++r) {
      std::clock_t c0 = std::clock();
      SampleResult res = model->sample(ids, o);
      cpu.push_back(static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC / n);
      per_image.push_back(res.seconds / n);
      outside.push_back((res.seconds - res.ort_seconds) / res.seconds);
    }
    std::sort(per_image.begin(), per_image.end());
    std::sort(outside.begin(), outside.end());
    std::sort(cpu.begin(), cpu.end());
    std::printf("{\"per_image_s\": %.6f, \"cpu_per_image_s\": %.6f, \"outside_ort_share\": %.6f, \"load_s\": %.4f, "
                "\"warmup_s\": %.4f, \"prepack\": %s, \"shared_graphs\": %s, \"sessions\": %zu}\n",
                per_image[per_image.size() / 2], cpu[cpu.size() / 2], outside[outside.size() / 2], load_s, warmup_s,
                lo.prepack_weights ? "true" : "false", lo.shared_graphs ? "true" : "false", model->session_count());
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "flexdit-bench-cpp: error: %s\n", e.what());
    return 2;
  }
}
