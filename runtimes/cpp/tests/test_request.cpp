// The step-wise C API (flexdit_request_*) as an application calls it, on the tiny conformance
// bundle: requests of different samplers, step counts and guidance stepped together through the
// stage switches give exactly flexdit_sample's bytes; a failing request stops alone; every misuse
// is a defined FLEXDIT_ERR_ARGUMENT; the versioned structs' size rules.
#include <flexdit/flexdit.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "check.hpp"

namespace fs = std::filesystem;

static const fs::path kTiny = fs::path(FLEXDIT_REPO_ROOT) / "flexdit_bundle" / "conformance" / "tiny-bundle";

static flexdit_model* load_tiny() {
  flexdit_load_options lo;
  flexdit_load_options_init(&lo);
  lo.threads = 1;
  flexdit_model* m = nullptr;
  flexdit_status s = flexdit_model_load(kTiny.string().c_str(), &lo, &m);
  CHECK(s == FLEXDIT_OK) << flexdit_last_error();
  return m;
}

static flexdit_model_info info_of(const flexdit_model* m) {
  flexdit_model_info info;
  flexdit_model_info_init(&info);
  CHECK(flexdit_model_info_get(m, &info) == FLEXDIT_OK) << flexdit_last_error();
  return info;
}

struct Case {
  std::vector<int64_t> ids;
  const char* sampler;
  int steps;
  double cfg, eta;
  uint64_t seed;
};

struct Output {
  std::vector<float> samples;
  std::vector<uint8_t> images;
  std::vector<double> stage_seconds;
  flexdit_timing timing;
};

static flexdit_sample_options options_of(const Case& c) {
  flexdit_sample_options o;
  flexdit_sample_options_init(&o);
  o.sampler = c.sampler;
  o.steps = c.steps;
  o.cfg_scale = c.cfg;
  o.eta = c.eta;
  o.seed = c.seed;
  return o;
}

static Output buffers(const flexdit_model_info& info, size_t n) {
  Output out;
  out.samples.resize(n * info.latent_channels * info.latent_height * info.latent_width);
  out.images.resize(n * info.image_height * info.image_width * info.image_channels);
  out.stage_seconds.assign(static_cast<size_t>(info.num_stages), -1.0);
  flexdit_timing_init(&out.timing, out.stage_seconds.data(), out.stage_seconds.size());
  return out;
}

static int steps_left(const flexdit_request* r) {
  int left = -1;
  CHECK(flexdit_request_steps_left(r, &left) == FLEXDIT_OK) << flexdit_last_error();
  return left;
}

// steps every request with steps left, together, until none has any; returns the steps taken
static int step_all(flexdit_model* m, const std::vector<flexdit_request*>& requests) {
  int steps = 0;
  for (;;) {
    std::vector<flexdit_request*> live;
    for (auto* r : requests)
      if (steps_left(r) > 0) live.push_back(r);
    if (live.empty()) return steps;
    flexdit_status s = flexdit_request_step(m, live.data(), live.size());
    CHECK(s == FLEXDIT_OK) << flexdit_last_error();
    if (s != FLEXDIT_OK) return steps;
    ++steps;
  }
}

TEST_CASE(requests_stepped_together_match_flexdit_sample_bit_for_bit) {
  flexdit_model* m = load_tiny();
  const flexdit_model_info info = info_of(m);
  // guided and unguided, ancestral, DDIM with noise, the three solvers; more images than one
  // graph call holds; different lengths, so requests sit in different stages at one step
  const std::vector<Case> cases = {
      {{0, 1, 2}, "ddpm", 10, 3.0, -1, 7},  {{3}, "ddim", 7, 1.0, 0.5, 5},     {{1, 2}, "dpmpp-2m", 5, 2.0, -1, 1},
      {{0}, "euler", 6, 1.0, -1, 2},        {{2, 3}, "unipc", 4, 1.0, -1, 3},  {{1}, "ddpm", 13, 1.0, -1, 9},
  };
  std::vector<flexdit_request*> requests;
  for (auto& c : cases) {
    flexdit_sample_options o = options_of(c);
    flexdit_request* r = nullptr;
    CHECK(flexdit_request_start(m, c.ids.data(), c.ids.size(), &o, &r) == FLEXDIT_OK) << flexdit_last_error();
    CHECK(steps_left(r) == c.steps) << c.sampler;
    requests.push_back(r);
  }
  CHECK(step_all(m, requests) == 13);
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    Output stepped = buffers(info, c.ids.size()), once = buffers(info, c.ids.size());
    CHECK(flexdit_request_finish(requests[i], stepped.samples.data(), stepped.samples.size(), stepped.images.data(),
                                 stepped.images.size(), &stepped.timing) == FLEXDIT_OK)
        << flexdit_last_error();
    flexdit_sample_options o = options_of(c);
    CHECK(flexdit_sample(m, c.ids.data(), c.ids.size(), &o, once.samples.data(), once.samples.size(),
                         once.images.data(), once.images.size(), &once.timing) == FLEXDIT_OK)
        << flexdit_last_error();
    CHECK(std::memcmp(stepped.samples.data(), once.samples.data(), once.samples.size() * sizeof(float)) == 0)
        << "case " << i << " (" << c.sampler << "): samples differ";
    CHECK(stepped.images == once.images) << "case " << i << " (" << c.sampler << "): images differ";
    // timings of every stage: each request crossed them all
    CHECK(stepped.timing.num_stages == 3 && once.timing.num_stages == 3);
    for (size_t s = 0; s < 3; ++s)
      CHECK(stepped.stage_seconds[s] > 0 && once.stage_seconds[s] > 0) << "case " << i << " stage " << s;
    CHECK(stepped.timing.seconds > 0 && stepped.timing.ort_seconds > 0);
    CHECK(flexdit_request_free(requests[i]) == FLEXDIT_OK);
  }
  flexdit_model_free(m);
}

static int fail_at_step_3(void* user, int k, const int*, size_t count, float* out) {
  std::fill(out, out + count * *static_cast<size_t*>(user), 0.25f);
  return k == 3 ? 1 : 0;
}

TEST_CASE(a_failing_request_stops_alone_with_its_own_error) {
  flexdit_model* m = load_tiny();
  const flexdit_model_info info = info_of(m);
  size_t per = static_cast<size_t>(info.latent_channels) * info.latent_height * info.latent_width;
  flexdit_sample_options bad, good;
  flexdit_sample_options_init(&bad);
  bad.steps = 8;
  bad.sampler = "ddpm";
  bad.noise_fn = fail_at_step_3;
  bad.noise_user = &per;
  flexdit_sample_options_init(&good);
  good.steps = 8;
  good.sampler = "ddpm";
  good.cfg_scale = 2.0;
  const int64_t ids[2] = {1, 2};
  flexdit_request *rb = nullptr, *rg = nullptr;
  CHECK(flexdit_request_start(m, ids, 2, &bad, &rb) == FLEXDIT_OK) << flexdit_last_error();
  CHECK(flexdit_request_start(m, ids, 2, &good, &rg) == FLEXDIT_OK) << flexdit_last_error();
  CHECK(step_all(m, {rb, rg}) == 8);
  CHECK(steps_left(rb) == 0);
  Output out = buffers(info, 2), once = buffers(info, 2);
  CHECK(flexdit_request_finish(rb, out.samples.data(), out.samples.size(), nullptr, 0, nullptr) == FLEXDIT_ERR_ARGUMENT);
  CHECK(std::string(flexdit_last_error()) == "the noise callback failed at step 3") << flexdit_last_error();
  CHECK(flexdit_request_finish(rg, out.samples.data(), out.samples.size(), nullptr, 0, nullptr) == FLEXDIT_OK)
      << flexdit_last_error();
  CHECK(flexdit_sample(m, ids, 2, &good, once.samples.data(), once.samples.size(), nullptr, 0, nullptr) == FLEXDIT_OK);
  CHECK(out.samples == once.samples);
  // flexdit_sample stops at the same step with the same line
  CHECK(flexdit_sample(m, ids, 2, &bad, nullptr, 0, nullptr, 0, nullptr) == FLEXDIT_ERR_ARGUMENT);
  CHECK(std::string(flexdit_last_error()) == "the noise callback failed at step 3") << flexdit_last_error();
  CHECK(flexdit_request_free(rb) == FLEXDIT_OK && flexdit_request_free(rg) == FLEXDIT_OK);
  flexdit_model_free(m);
}

static void expect_argument(flexdit_status s, const std::string& needle) {
  CHECK(s == FLEXDIT_ERR_ARGUMENT) << "status " << s << " for '" << needle << "'";
  CHECK(std::string(flexdit_last_error()).find(needle) != std::string::npos)
      << "'" << flexdit_last_error() << "' lacks '" << needle << "'";
}

TEST_CASE(misuse_is_a_defined_argument_error) {
  flexdit_model* m = load_tiny();
  flexdit_model* other = load_tiny();
  const flexdit_model_info info = info_of(m);
  flexdit_sample_options o;
  flexdit_sample_options_init(&o);
  o.steps = 2;
  const int64_t id = 1;
  flexdit_request* r = nullptr;
  CHECK(flexdit_request_start(m, &id, 1, &o, &r) == FLEXDIT_OK) << flexdit_last_error();
  Output out = buffers(info, 1);
  expect_argument(flexdit_request_finish(r, out.samples.data(), out.samples.size(), nullptr, 0, nullptr),
                  "the request has 2 steps left");
  flexdit_request* twice[2] = {r, r};
  expect_argument(flexdit_request_step(m, twice, 2), "given twice");
  flexdit_request* with_null[2] = {r, nullptr};
  expect_argument(flexdit_request_step(m, with_null, 2), "requests[1] is NULL");
  expect_argument(flexdit_request_step(other, &r, 1), "requests[0] belongs to another model");
  CHECK(steps_left(r) == 2);  // refused calls did no work
  CHECK(step_all(m, {r}) == 2);
  expect_argument(flexdit_request_step(m, &r, 1), "requests[0] has no steps left");
  expect_argument(flexdit_request_finish(r, out.samples.data(), 3, nullptr, 0, nullptr), "samples buffer holds 3");
  double one[1];
  flexdit_timing small;
  flexdit_timing_init(&small, one, 1);
  expect_argument(flexdit_request_finish(r, nullptr, 0, nullptr, 0, &small), "stage_seconds holds 1 values; 3 stages");
  CHECK(flexdit_request_finish(r, out.samples.data(), out.samples.size(), nullptr, 0, &out.timing) == FLEXDIT_OK)
      << flexdit_last_error();
  expect_argument(flexdit_request_finish(r, out.samples.data(), out.samples.size(), nullptr, 0, nullptr),
                  "finished already");
  CHECK(flexdit_request_free(r) == FLEXDIT_OK);
  expect_argument(flexdit_request_free(r), "not a live request");
  int left = 0;
  expect_argument(flexdit_request_steps_left(r, &left), "not a live request");
  expect_argument(flexdit_request_step(m, &r, 1), "not a live request");
  expect_argument(flexdit_request_finish(r, nullptr, 0, nullptr, 0, nullptr), "not a live request");
  CHECK(flexdit_request_free(nullptr) == FLEXDIT_OK);
  // a bad option is refused at start, with flexdit_sample's line, and no request made
  o.steps = 100000;
  r = reinterpret_cast<flexdit_request*>(&left);
  expect_argument(flexdit_request_start(m, &id, 1, &o, &r), "--steps must be in 1..");
  CHECK(r == nullptr);
  flexdit_model_free(other);
  flexdit_model_free(m);
}

TEST_CASE(versioned_structs_follow_the_size_rules) {
  flexdit_model* m = load_tiny();
  const int64_t id = 0;
  // not initialised
  flexdit_sample_options o;
  flexdit_sample_options_init(&o);
  o.steps = 2;
  o.struct_size = 0;
  expect_argument(flexdit_sample(m, &id, 1, &o, nullptr, 0, nullptr, 0, nullptr), "flexdit_sample_options.struct_size is 0");
  flexdit_model_info info;
  std::memset(&info, 0, sizeof info);
  expect_argument(flexdit_model_info_get(m, &info), "flexdit_model_info.struct_size is 0");
  flexdit_timing t;
  std::memset(&t, 0, sizeof t);
  o.struct_size = sizeof o;
  expect_argument(flexdit_sample(m, &id, 1, &o, nullptr, 0, nullptr, 0, &t), "flexdit_timing.struct_size is 0");
  // a caller built against a newer header: its unknown fields at zero work, set ones are refused
  struct Newer {
    flexdit_sample_options known;
    double future_field;
  } newer;
  flexdit_sample_options_init_size(&newer.known, sizeof newer);
  CHECK(newer.known.struct_size == sizeof newer && newer.future_field == 0 && newer.known.cfg_scale == -1);
  newer.known.steps = 2;
  CHECK(flexdit_sample(m, &id, 1, &newer.known, nullptr, 0, nullptr, 0, nullptr) == FLEXDIT_OK) << flexdit_last_error();
  newer.future_field = 1.5;
  expect_argument(flexdit_sample(m, &id, 1, &newer.known, nullptr, 0, nullptr, 0, nullptr),
                  "flexdit_sample_options sets fields this library (API 4) does not know");
  // timing without a stage array: totals only, num_stages 0
  flexdit_timing_init(&t, nullptr, 0);
  CHECK(flexdit_sample(m, &id, 1, &o, nullptr, 0, nullptr, 0, &t) == FLEXDIT_OK) << flexdit_last_error();
  CHECK(t.seconds > 0 && t.num_stages == 0 && t.struct_size == sizeof t);
  flexdit_model_free(m);
}

int main(int argc, char** argv) { return testing_min::run_all(argc, argv); }
