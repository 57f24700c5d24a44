// Shared stage graphs (manifest `shared_graphs`): on a bundle the real compiler converted (the
// ctest fixture's fp32 bundle: two sparse stages that share a graph + a dense one), the model
// opens one session for the group, samples bit-identically with and without it, and refuses
// manifests that break the rules of flexdit_bundle.manifest._validate_shared_graphs (same
// messages), tampered or missing shared graph files, bindings and stage constants the graph
// does not take.   usage: test_shared_graphs FP32_BUNDLE [CASE_FILTER]
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "check.hpp"
#include "error.hpp"
#include "files.hpp"
#include "json_text.hpp"
#include "manifest.hpp"
#include "model.hpp"

namespace fs = std::filesystem;
using namespace flexdit_core;

static fs::path g_bundle;

static json manifest_json() { return parse_json_strict(read_text_file(g_bundle / "manifest.json")); }

static fs::path copy_bundle(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("flexdit-cpp-shared-" + std::to_string(getpid())) / name;
  fs::remove_all(p);
  fs::create_directories(p.parent_path());
  fs::copy(g_bundle, p, fs::copy_options::recursive);
  return p;
}

static void write_manifest(const fs::path& dir, const json& m) { std::ofstream(dir / "manifest.json") << m.dump(1); }

static std::string shared_path() { return manifest_json()["shared_graphs"][0]["path"].get<std::string>(); }
static std::string stage_path(int s) { return manifest_json()["stages"][s]["artifacts"][0]["path"].get<std::string>(); }

static LoadOptions options(bool shared) {
  LoadOptions o;
  o.shared_graphs = shared;
  return o;
}

TEST_CASE(fixture_has_a_shared_graph) {
  // without this every other case could pass vacuously
  Manifest m = load_bundle(g_bundle).manifest;
  CHECK(m.shared_graphs.size() == 1) << m.shared_graphs.size();
  if (m.shared_graphs.empty()) return;
  const SharedGraph& g = m.shared_graphs[0];
  CHECK(g.stages == std::vector<int>({0, 1}) && g.graph_optimization == "basic" && !g.stage_inputs.empty());
  CHECK(m.stages.size() == 3 && m.stages[0].artifacts[0].shared_graph && m.stages[1].artifacts[0].shared_graph &&
        !m.stages[2].artifacts[0].shared_graph);
  CHECK(m.stages[0].artifacts[0].shared_graph->inputs.size() == g.stage_inputs.size());
}

TEST_CASE(one_session_for_the_group) {
  auto shared = Model::load(g_bundle.string()), own = Model::load(g_bundle.string(), options(false));
  CHECK(shared->session_count() == 2 && own->session_count() == 3) << shared->session_count() << " " << own->session_count();
  CHECK(shared->shared_graph_paths() == std::vector<std::string>({shared_path(), shared_path(), ""}));
  CHECK(own->shared_graph_paths() == std::vector<std::string>({"", "", ""}));
}

TEST_CASE(same_samples_with_and_without_the_shared_graph) {
  auto shared = Model::load(g_bundle.string()), own = Model::load(g_bundle.string(), options(false));
  struct Case {
    const char* sampler;
    int steps;
    double cfg, eta;
  } cases[] = {{"ddpm", 12, 4.0, 0.0}, {"ddim", 10, 3.0, 0.0}, {"ddim", 9, 2.5, 0.5}, {"ddpm", 8, 1.0, 0.0}};
  for (auto& c : cases) {
    SampleOptions o;
    o.sampler = std::string(c.sampler);
    o.steps = c.steps;
    o.cfg_scale = c.cfg;
    o.eta = c.eta;
    o.seed = 11;
    auto a = shared->sample({1, 7, 3}, o), b = own->sample({1, 7, 3}, o);
    for (size_t s = 0; s < a.stage_seconds.size(); ++s) CHECK(a.stage_seconds[s] > 0) << "stage " << s << " not crossed";
    CHECK(a.samples == b.samples) << c.sampler << " " << c.steps << ": rel error "
                                  << testing_min::rel_max_error(a.samples, b.samples);
    CHECK(a.images.pixels == b.images.pixels);
  }
}

TEST_CASE(concurrent_sampling_through_one_shared_session) {
  auto model = Model::load(g_bundle.string());
  SampleOptions o;
  o.steps = 6;
  o.cfg_scale = 2.0;
  o.seed = 4;
  auto reference = model->sample({0, 1, 2}, o).samples;
  std::vector<std::vector<float>> got(3);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < got.size(); ++i) threads.emplace_back([&, i] { got[i] = model->sample({0, 1, 2}, o).samples; });
  for (auto& t : threads) t.join();
  for (auto& g : got) CHECK(g == reference);
}

TEST_CASE(semantic_rules) {
  const std::string sp = shared_path(), s0 = stage_path(0);
  json m = manifest_json();
  m["shared_graphs"].push_back(m["shared_graphs"][0]);
  CHECK_THROWS_WITH(validate_manifest(m), "shared graph id 'shared.fp32' appears twice");
  m = manifest_json();
  m["shared_graphs"][0]["weights"]["file"] = "nope";
  CHECK_THROWS_WITH(validate_manifest(m), sp + " uses weight file 'nope', which the manifest does not list");
  m = manifest_json();
  std::string wpath = m["weights"][0]["path"].get<std::string>();
  m["shared_graphs"][0]["weights"]["bindings"]["model.pos_embed"] = 100000;
  CHECK_THROWS_WITH(validate_manifest(m), sp + " binds an initializer to a tensor that " + wpath + " does not have");
  m = manifest_json();
  m["stages"][0]["artifacts"][0]["shared_graph"]["id"] = "nope";
  CHECK_THROWS_WITH(validate_manifest(m), s0 + " names shared graph 'nope', which the manifest does not list for its "
                                               "backend and precision");
  m = manifest_json();
  m["shared_graphs"][0]["precision"] = "fp16";
  CHECK_THROWS_WITH(validate_manifest(m), s0 + " names shared graph 'shared.fp32', which the manifest does not list");
  m = manifest_json();
  std::string first = m["shared_graphs"][0]["stage_inputs"][0].get<std::string>();
  m["stages"][0]["artifacts"][0]["shared_graph"]["inputs"].erase(first);
  CHECK_THROWS_WITH(validate_manifest(m), s0 + ": its shared-graph inputs do not match " + sp + "'s stage inputs");
  m = manifest_json();
  m["stages"][0]["artifacts"][0]["shared_graph"]["inputs"][first] = 100000;
  CHECK_THROWS_WITH(validate_manifest(m), s0 + ": its shared-graph inputs do not match " + sp + "'s stage inputs");
  m = manifest_json();
  m["shared_graphs"][0]["stages"] = {0, 2};
  CHECK_THROWS_WITH(validate_manifest(m), "shared graph 'shared.fp32' lists stages [0, 2], but stages [0, 1] use it");
  m = manifest_json();
  m["stages"][1]["artifacts"][0].erase("shared_graph");
  CHECK_THROWS_WITH(validate_manifest(m), "shared graph 'shared.fp32' lists stages [0, 1], but stages [0] use it");
  m = manifest_json();  // absent: every stage has its own session (the old behaviour)
  m.erase("shared_graphs");
  for (auto& st : m["stages"])
    for (auto& a : st["artifacts"]) a.erase("shared_graph");
  CHECK(validate_manifest(m).shared_graphs.empty());
}

TEST_CASE(schema_rules) {
  json m = manifest_json();
  m["shared_graphs"][0]["stages"] = {0};
  CHECK_THROWS_WITH(validate_manifest(m), "manifest does not match the schema at shared_graphs/0/stages");
  m = manifest_json();
  m["shared_graphs"][0]["verified"]["graph_optimization"] = "fast";
  CHECK_THROWS_WITH(validate_manifest(m), "manifest does not match the schema at shared_graphs/0/verified/graph_optimization");
  m = manifest_json();
  m["shared_graphs"][0]["path"] = "../outside.onnx";
  CHECK_THROWS_WITH(validate_manifest(m), "manifest does not match the schema at shared_graphs/0/path");
  m = manifest_json();
  m["shared_graphs"][0].erase("verified");
  CHECK_THROWS_WITH(validate_manifest(m), "'verified' is a required property");
  m = manifest_json();
  std::string first = m["shared_graphs"][0]["stage_inputs"][0].get<std::string>();
  m["stages"][0]["artifacts"][0]["shared_graph"]["inputs"][first] = -1;
  CHECK_THROWS_WITH(validate_manifest(m), "manifest does not match the schema at stages/0/artifacts/0/shared_graph/inputs/" + first);
}

TEST_CASE(shared_graph_file_checksummed) {
  const std::string sp = shared_path();
  fs::path b = copy_bundle("tampered");
  {
    std::fstream f(b / sp, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(200);
    char c = static_cast<char>(f.get());
    f.seekp(200);
    f.put(static_cast<char>(c ^ 1));
  }
  CHECK_THROWS_WITH(load_bundle(b), "checksum mismatch for " + sp + ": the bundle was modified or truncated");
  // every file the manifest lists is checked, whether or not this load would open it
  CHECK_THROWS_WITH(Model::load(b.string(), options(false)), "checksum mismatch for " + sp);
  b = copy_bundle("missing");
  fs::remove(b / sp);
  CHECK_THROWS_WITH(Model::load(b.string()), "bundle file missing: " + sp);
  b = copy_bundle("symlink");
  fs::path outside = b.parent_path() / "shared-moved-out.onnx";
  fs::rename(b / sp, outside);
  fs::create_symlink(outside, b / sp);
  CHECK_THROWS_WITH(load_bundle(b), sp + " points outside the bundle directory");
}

TEST_CASE(shared_graph_bindings_checked_against_the_graph) {
  const std::string sp = shared_path();
  fs::path b = copy_bundle("binding");
  json m = manifest_json();
  m["shared_graphs"][0]["weights"]["bindings"]["model.pos_embed"] = 1;  // in range, another tensor
  write_manifest(b, m);
  CHECK_THROWS_WITH(Model::load(b.string()), sp + ": the manifest binds initializer 'model.pos_embed' to tensor 1 of");
  auto own = Model::load(b.string(), options(false));  // the stages' own graphs do not use it
  CHECK(own->session_count() == 3);
}

TEST_CASE(stage_constants_checked_against_the_graph) {
  const std::string sp = shared_path();
  json m = manifest_json();
  json& inputs = m["stages"][0]["artifacts"][0]["shared_graph"]["inputs"];
  // the pooling table fed from an int64 tensor (another stage input's): not what the graph takes
  std::string int_name;
  for (auto it = inputs.begin(); it != inputs.end(); ++it)
    if (it.key() != "rs.pool") int_name = it.key();
  CHECK(inputs.contains("rs.pool") && !int_name.empty());
  inputs["rs.pool"] = inputs[int_name];
  fs::path b = copy_bundle("constant-dtype");
  write_manifest(b, m);
  CHECK_THROWS_WITH(Model::load(b.string()), sp + ": stage 0 feeds 'rs.pool' as int64 [");
  CHECK_THROWS_WITH(Model::load(b.string()), "which the graph does not take; re-run flexdit-export convert");
  CHECK(Model::load(b.string(), options(false))->session_count() == 3);
  // a stage input the graph does not have at all (renamed consistently, so the manifest is valid)
  m = manifest_json();
  for (auto& name : m["shared_graphs"][0]["stage_inputs"])
    if (name == int_name) name = "not_an_input";
  for (int s : {0, 1}) {
    json& in = m["stages"][s]["artifacts"][0]["shared_graph"]["inputs"];
    in["not_an_input"] = in[int_name];
    in.erase(int_name);
  }
  b = copy_bundle("constant-name");
  write_manifest(b, m);
  CHECK_THROWS_WITH(Model::load(b.string()), sp + ": stage ");  // 0 or 1: the stages load in parallel
  CHECK_THROWS_WITH(Model::load(b.string()), " feeds 'not_an_input' as int64 [");
}

TEST_CASE(declared_io_still_checked_through_the_shared_graph) {
  json m = manifest_json();
  m["stages"][1]["inputs"][0]["name"] = "latent";
  fs::path b = copy_bundle("io-name");
  write_manifest(b, m);
  CHECK_THROWS_WITH(Model::load(b.string()),
                    shared_path() + " (stage 1): the manifest names the inputs ['latent', 't', 'y'] but the graph has");
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s FP32_BUNDLE [CASE_FILTER]\n", argv[0]);
    return 2;
  }
  g_bundle = argv[1];
  int rc = testing_min::run_all(argc - 1, argv + 1);
  std::error_code ec;
  fs::remove_all(fs::temp_directory_path() / ("flexdit-cpp-shared-" + std::to_string(getpid())), ec);
  return rc;
}
