// Embeds the flexdit runtime through the C++ wrapper (flexdit/flexdit.hpp): RAII model, exceptions
// with the status, caller-supplied noise (here: all-zero per-step noise) next to seeded sampling,
// and the step-wise sampler (two requests stepped together).
// usage: flexdit_example_cpp BUNDLE
#include <flexdit/flexdit.hpp>

#include <algorithm>
#include <cstdio>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s BUNDLE\n", argv[0]);
    return 2;
  }
  try {
    flexdit::Model model(argv[1], /*threads=*/1);
    const auto& info = model.info();
    std::printf("flexdit %s: %d stages, %d classes\n", flexdit::version().c_str(), info.num_stages, info.num_classes);
    flexdit::SampleOptions opt;
    opt.steps = 8;
    opt.sampler = "ddim";
    opt.spacing = "ddim";
    opt.cfg_scale = 3.0;
    opt.seed = 1;
    auto a = model.sample({0, 1}, opt);
    auto b = model.sample({0, 1}, opt);
    bool same = a.samples == b.samples;
    std::printf("seeded DDIM twice: %s\n", same ? "identical" : "DIFFERENT");
    opt.sampler = "ddpm";
    opt.noise_fn = [&](int, const std::vector<int>& idx, float* out) {
      std::fill(out, out + idx.size() * info.latent_channels * info.latent_height * info.latent_width, 0.0f);
    };
    auto c = model.sample({0, 1}, opt);
    std::printf("DDPM with caller noise: %zu samples, first value %.5f, %.3f s\n", c.samples.size(), c.samples[0],
                c.timing.seconds);
    opt.noise_fn = nullptr;
    auto guided = model.start({0, 1}, opt);  // the DDPM request of `a`'s length, with guidance
    flexdit::SampleOptions quick;
    quick.steps = 3;
    quick.sampler = "dpmpp-2m";
    auto few = model.start({2}, quick);
    while (!guided.done() || !few.done()) {
      std::vector<flexdit::Request*> live;
      for (auto* r : {&guided, &few})
        if (!r->done()) live.push_back(r);
      model.step(live);
    }
    bool stepped_same = guided.finish().samples == model.sample({0, 1}, opt).samples;
    std::printf("step-wise DDPM beside a 3-step dpmpp-2m request: %s\n", stepped_same ? "identical" : "DIFFERENT");
    few.finish();
    try {
      model.resolve("no such class");
    } catch (const flexdit::Error& e) {
      std::printf("unknown prompt -> status %d: %s\n", static_cast<int>(e.status()), e.what());
    }
    return same && stepped_same ? 0 : 1;
  } catch (const flexdit::Error& e) {
    std::fprintf(stderr, "flexdit_example_cpp: %s\n", e.what());
    return 1;
  }
}
