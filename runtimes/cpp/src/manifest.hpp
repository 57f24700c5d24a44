// A bundle's manifest: read, validated (schema + the rules a schema cannot say) and trust-checked
// (paths confined to the bundle, sha256 of every file), as flexdit_bundle/manifest.py load_bundle.
#pragma once
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "json_text.hpp"

namespace flexdit_core {

constexpr const char* kFormatName = "flexdit-bundle";
constexpr int kFormatVersion = 2;  // v1 (no shared weight files) is read unchanged

struct TensorDecl {
  std::string name, dtype;
  std::vector<int64_t> shape;
};

struct FileEntry {  // anything the manifest checksums
  std::string path, sha256;
  uint64_t bytes = 0;
};

struct WeightTensor {
  uint64_t offset = 0, bytes = 0;
  std::string dtype;
  std::vector<int64_t> shape;
};

struct WeightFile : FileEntry {
  std::string id;
  uint64_t alignment = 1;
  std::vector<WeightTensor> tensors;
};

struct WeightBindings {
  std::string file;                                     // weight file id
  std::vector<std::pair<std::string, size_t>> bindings;  // initializer name -> tensor index
};

// An ONNX stage artifact's `shared_graph`: the shared graph it can run through, and the tensors
// of that graph's weight file it feeds as the graph's stage inputs.
struct SharedGraphRef {
  std::string id;
  std::vector<std::pair<std::string, size_t>> inputs;  // stage-input name -> tensor index
};

struct Artifact : FileEntry {
  std::string backend, precision;
  std::optional<WeightBindings> weights;
  std::optional<FileEntry> external_data;
  std::optional<SharedGraphRef> shared_graph;
};

// One entry of the manifest's `shared_graphs`: a graph that several stages of one precision can
// run through (their stage graphs differ only in constants, which are its stage inputs).
struct SharedGraph {
  std::string id;
  Artifact graph;                       // path, sha256, bytes, precision, weights (backend "onnx")
  std::vector<int> stages;              // the stages whose artifacts name it
  std::vector<std::string> stage_inputs;
  std::string graph_optimization;       // verified.graph_optimization: none | basic | extended | all
};

struct Stage {
  int id = 0, t_min = 0, t_max = 0, batch = 0;
  std::vector<TensorDecl> inputs, outputs;
  std::vector<Artifact> artifacts;
  std::string default_precision;  // empty: none recorded
};

struct DecoderEntry {
  std::vector<TensorDecl> inputs, outputs;
  std::vector<Artifact> artifacts;
};

struct SamplingDefaults {
  std::string sampler = "ddpm";
  int steps = 250;
  double cfg_scale = 4.0, eta = 0.0;
  bool clip_denoised = false;
};

struct Manifest {
  int version = 0;
  // model
  int in_channels = 0, input_size = 0, num_classes = 0, null_class = 0;
  bool learn_sigma = false;
  std::optional<std::vector<std::string>> class_names;
  // diffusion
  int num_timesteps = 0;
  double beta_start = 1e-4, beta_end = 0.02;
  std::string variance_type, cfg_channels;
  SamplingDefaults defaults;
  // graphs
  std::vector<Stage> stages;  // ordered by id
  std::optional<DecoderEntry> decoder;
  double value_lo = -1.0, value_hi = 1.0;
  std::vector<WeightFile> weights;
  std::vector<SharedGraph> shared_graphs;  // optional (empty: one graph per stage)

  const Stage& stage_for(int t) const;  // the stage whose [t_min, t_max] holds original timestep t
  const WeightFile* weight_file(const std::string& id) const;
  const SharedGraph* shared_graph(const std::string& id) const;
};

// Schema + semantic rules of flexdit_bundle.manifest.validate_manifest; throws Error(Bundle).
Manifest validate_manifest(const json& m);

// Text -> validated manifest (strict JSON, format name, schema, rules); throws Error(Bundle).
// `source` names the file in messages.
Manifest parse_manifest_text(const std::string& text, const std::string& source);

struct Bundle {
  std::filesystem::path root;
  Manifest manifest;
  std::filesystem::path path_of(const FileEntry& entry) const;  // confined to root
};

// Reads, validates and checksums a bundle (weight files, shared graphs, every artifact). defer_weights: check only the size of shared weight
// files here, because the caller hashes the bytes it reads from them (weights.cpp).
Bundle load_bundle(const std::filesystem::path& dir, bool verify_checksums = true, bool defer_weights = true);

// The artifact of a stage or decoder for a backend and precision ("" = first for the backend).
const Artifact& find_artifact(const std::vector<Artifact>& artifacts, const std::string& backend,
                              const std::string& precision, const std::string& what);

size_t dtype_bytes(const std::string& dtype);  // 0 for an unknown dtype

}  // namespace flexdit_core
