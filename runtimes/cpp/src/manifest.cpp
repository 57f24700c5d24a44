#include "manifest.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>

#include "error.hpp"
#include "files.hpp"
#include "schema_check.hpp"

namespace fs = std::filesystem;

namespace flexdit_core {
namespace {

[[noreturn]] void bundle_error(const std::string& msg) { fail(ErrorKind::Bundle, msg); }

// Numeric rules a schema cannot state: flexdit_bundle/manifest.py's constants, same messages.
constexpr double kMinBeta = 1e-10;
constexpr double kMinAlphasCumprod = 1e-30;
constexpr double kMinValueSpan = 1e-6;

std::string fmt(const char* spec, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, spec, v);
  return buf;
}

// The linear schedule must give finite sampler tables (manifest.py: _validate_diffusion).
void check_diffusion(const json& d, const Manifest& m) {
  const int T = m.num_timesteps;
  const double b0 = m.beta_start * 1000 / T, b1 = m.beta_end * 1000 / T;
  for (auto [name, b] : {std::pair<const char*, double>{"beta_start", b0}, {"beta_end", b1}})
    if (!(kMinBeta <= b && b < 1))
      bundle_error(std::string("diffusion ") + name + " " + d.at(name).dump() + " gives the beta " + fmt("%g", b) +
                   " at T = " + std::to_string(T) + " (betas are scaled by 1000 / T); the linear schedule's betas must lie in [" +
                   fmt("%g", kMinBeta) + ", 1)");
  const double step = (b1 - b0) / (T - 1);
  double log_ac = 0;
  for (int i = 0; i < T; ++i) log_ac += std::log1p(-(b0 + i * step));
  if (log_ac < std::log(kMinAlphasCumprod))
    bundle_error("diffusion betas " + fmt("%g", b0) + ".." + fmt("%g", b1) + " over " + std::to_string(T) +
                 " timesteps leave alphas_cumprod 10^" + fmt("%.1f", log_ac / std::log(10.0)) + " at the last timestep, below " +
                 fmt("%g", kMinAlphasCumprod) + ": the sampler's coefficients would overflow float32");
  if (d.contains("defaults") && d["defaults"].contains("steps") && m.defaults.steps > T)
    bundle_error("diffusion defaults.steps " + std::to_string(m.defaults.steps) + " is more than num_timesteps " +
                 std::to_string(T));
}

// an integer field that must fit an int (the schema admits any JSON integer)
int get_int(const json& j) {
  if (j.is_number_unsigned() && j.get<uint64_t>() > static_cast<uint64_t>(INT32_MAX))
    bundle_error("manifest holds the integer " + j.dump() + ", which is out of range for this field");
  int64_t v = j.get<int64_t>();
  if (v < INT32_MIN || v > INT32_MAX)
    bundle_error("manifest holds the integer " + j.dump() + ", which is out of range for this field");
  return static_cast<int>(v);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::vector<TensorDecl> tensors(const json& arr) {
  std::vector<TensorDecl> out;
  for (auto& e : arr) out.push_back({e.at("name").get<std::string>(), e.at("dtype").get<std::string>(),
                                     e.at("shape").get<std::vector<int64_t>>()});
  return out;
}

FileEntry file_entry(const json& e) {
  FileEntry f;
  f.path = e.at("path").get<std::string>();
  f.sha256 = e.at("sha256").get<std::string>();
  f.bytes = e.contains("bytes") ? e["bytes"].get<uint64_t>() : 0;
  return f;
}

std::vector<Artifact> artifacts(const json& arr) {
  std::vector<Artifact> out;
  for (auto& a : arr) {
    Artifact art;
    static_cast<FileEntry&>(art) = file_entry(a);
    art.backend = a.at("backend").get<std::string>();
    art.precision = a.at("precision").get<std::string>();
    if (a.contains("weights") && a["weights"].is_object()) {
      WeightBindings wb;
      wb.file = a["weights"].at("file").get<std::string>();
      for (auto it = a["weights"].at("bindings").begin(); it != a["weights"]["bindings"].end(); ++it)
        wb.bindings.emplace_back(it.key(), it.value().get<size_t>());
      art.weights = wb;
    }
    if (a.contains("external_data") && a["external_data"].is_object()) art.external_data = file_entry(a["external_data"]);
    if (a.contains("shared_graph") && a["shared_graph"].is_object()) {
      SharedGraphRef ref;
      ref.id = a["shared_graph"].at("id").get<std::string>();
      for (auto it = a["shared_graph"].at("inputs").begin(); it != a["shared_graph"]["inputs"].end(); ++it)
        ref.inputs.emplace_back(it.key(), it.value().get<size_t>());
      art.shared_graph = std::move(ref);
    }
    out.push_back(std::move(art));
  }
  return out;
}

void check_stage_io(const Stage& st, const Manifest& m) {
  std::string where = "stage " + std::to_string(st.id);
  if (st.inputs.size() != 3 || st.outputs.empty())
    bundle_error(where + " must declare 3 inputs (latent, timestep, class label) and an output, not " +
                 std::to_string(st.inputs.size()) + " and " + std::to_string(st.outputs.size()));
  std::set<std::string> names;
  size_t count = 0;
  for (auto* list : {&st.inputs, &st.outputs})
    for (auto& e : *list) names.insert(e.name), ++count;
  if (names.size() != count) bundle_error(where + " declares a tensor name twice");
  int64_t B = st.batch, C = m.in_channels, H = m.input_size, cout = m.learn_sigma ? 2 * C : C;
  std::pair<const TensorDecl*, std::vector<int64_t>> expect[] = {
      {&st.inputs[0], {B, C, H, H}}, {&st.inputs[1], {B}}, {&st.inputs[2], {B}}, {&st.outputs[0], {B, cout, H, H}}};
  for (auto& [e, shape] : expect)
    if (e->shape != shape)
      bundle_error(where + " declares '" + e->name + "' with shape " + shape_str(e->shape) + ", but batch " +
                   std::to_string(B) + " and the model config make it " + shape_str(shape));
}

std::string int_list(const std::vector<int>& v) {  // Python's repr of a list of ints
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}

// The rules of flexdit_bundle.manifest._validate_shared_graphs, with its messages: unique ids,
// the weight file listed, every binding and stage constant a tensor of it, and each graph naming
// exactly the stages whose artifacts point at it.
void check_shared_graphs(const Manifest& m) {
  std::set<std::string> ids;
  for (auto& g : m.shared_graphs) {
    if (!ids.insert(g.id).second) bundle_error("shared graph id '" + g.id + "' appears twice");
    const WeightFile* w = m.weight_file(g.graph.weights->file);
    if (!w)
      bundle_error(g.graph.path + " uses weight file '" + g.graph.weights->file + "', which the manifest does not list");
    for (auto& [name, index] : g.graph.weights->bindings)
      if (index >= w->tensors.size())
        bundle_error(g.graph.path + " binds an initializer to a tensor that " + w->path + " does not have");
  }
  std::map<std::string, std::vector<int>> users;
  for (auto& g : m.shared_graphs) users[g.id];
  for (auto& st : m.stages)
    for (auto& a : st.artifacts) {
      if (!a.shared_graph) continue;
      const SharedGraph* g = m.shared_graph(a.shared_graph->id);
      if (!g || a.backend != "onnx" || a.precision != g->graph.precision)
        bundle_error(a.path + " names shared graph '" + a.shared_graph->id +
                     "', which the manifest does not list for its backend and precision");
      const WeightFile* w = m.weight_file(g->graph.weights->file);
      std::vector<std::string> names, want = g->stage_inputs;
      bool fits = true;
      for (auto& [name, index] : a.shared_graph->inputs) {
        names.push_back(name);
        fits = fits && index < w->tensors.size();
      }
      std::sort(names.begin(), names.end());
      std::sort(want.begin(), want.end());
      if (names != want || !fits)
        bundle_error(a.path + ": its shared-graph inputs do not match " + g->graph.path + "'s stage inputs");
      users[g->id].push_back(st.id);
    }
  for (auto& g : m.shared_graphs) {
    std::vector<int> used = users[g.id], listed = g.stages;
    std::sort(used.begin(), used.end());
    std::sort(listed.begin(), listed.end());
    if (used != listed)
      bundle_error("shared graph '" + g.id + "' lists stages " + int_list(g.stages) + ", but stages " +
                   int_list(users[g.id]) + " use it");
  }
}

void check_weights(const Manifest& m) {
  std::set<std::string> ids;
  for (auto& w : m.weights) {
    if (m.version < 2) bundle_error("a format v1 manifest cannot have shared weight files");
    if (!ids.insert(w.id).second) bundle_error("weight file id '" + w.id + "' appears twice");
    for (size_t i = 0; i < w.tensors.size(); ++i) {
      auto& t = w.tensors[i];
      uint64_t n = dtype_bytes(t.dtype);
      for (auto d : t.shape) n *= static_cast<uint64_t>(d);
      if (n != t.bytes || t.offset + t.bytes > w.bytes || t.offset + t.bytes < t.offset || t.offset % w.alignment)
        bundle_error("weight file " + w.path + ": tensor " + std::to_string(i) + " (" + t.dtype + " " + shape_str(t.shape) +
                     " at " + std::to_string(t.offset) + ", " + std::to_string(t.bytes) +
                     " bytes) does not fit the file; re-run flexdit-export convert");
    }
  }
  auto check = [&](const std::vector<Artifact>& arts) {
    for (auto& a : arts) {
      if (!a.weights) continue;
      const WeightFile* w = m.weight_file(a.weights->file);
      if (!w) bundle_error(a.path + " uses weight file '" + a.weights->file + "', which the manifest does not list");
      for (auto& [name, index] : a.weights->bindings)
        if (index >= w->tensors.size())
          bundle_error(a.path + " binds '" + name + "' to a tensor that " + w->path + " does not have");
    }
  };
  for (auto& st : m.stages) check(st.artifacts);
  if (m.decoder) check(m.decoder->artifacts);
  check_shared_graphs(m);
}

}  // namespace

size_t dtype_bytes(const std::string& d) {
  static const std::map<std::string, size_t> sizes = {{"float32", 4}, {"float16", 2}, {"bfloat16", 2}, {"int8", 1},
                                                      {"uint8", 1},   {"int32", 4},   {"int64", 8},    {"bool", 1}};
  auto it = sizes.find(d);
  return it == sizes.end() ? 0 : it->second;
}

const Stage& Manifest::stage_for(int t) const {
  for (auto& st : stages)
    if (st.t_min <= t && t <= st.t_max) return st;
  bundle_error("no stage serves timestep " + std::to_string(t));
}

const WeightFile* Manifest::weight_file(const std::string& id) const {
  for (auto& w : weights)
    if (w.id == id) return &w;
  return nullptr;
}

const SharedGraph* Manifest::shared_graph(const std::string& id) const {
  for (auto& g : shared_graphs)
    if (g.id == id) return &g;
  return nullptr;
}

Manifest validate_manifest(const json& j) {
  SchemaViolation v;
  if (!schema_validate(j, manifest_schema(), &v))
    bundle_error("manifest does not match the schema at " + v.path + ": " + v.message.substr(0, 200));
  Manifest m;
  try {
    m.version = get_int(j["format"]["version"]);
    if (m.version > kFormatVersion)
      bundle_error("bundle format version " + std::to_string(m.version) + " is newer than this runtime supports (" +
                   std::to_string(kFormatVersion) + "); upgrade flexdit-export");
    if (m.version != 1 && m.version != 2)
      bundle_error("bundle format version " + std::to_string(m.version) +
                   " is no longer supported; re-convert the checkpoint with flexdit-export convert");
    const json& model = j["model"];
    const json& cfg = model["config"];
    m.in_channels = get_int(cfg.at("in_channels"));
    m.input_size = get_int(cfg.at("input_size"));
    m.learn_sigma = cfg.at("learn_sigma").get<bool>();
    m.num_classes = get_int(model.at("num_classes"));
    m.null_class = get_int(model.at("null_class"));
    if (!model["class_names"].is_null()) m.class_names = model["class_names"].get<std::vector<std::string>>();
    const json& d = j["diffusion"];
    m.num_timesteps = get_int(d.at("num_timesteps"));
    m.beta_start = d.at("beta_start").get<double>();
    m.beta_end = d.at("beta_end").get<double>();
    m.variance_type = d.at("variance_type").get<std::string>();
    m.cfg_channels = d.at("cfg_channels").get<std::string>();
    if (d.contains("defaults")) {
      const json& def = d["defaults"];
      if (def.contains("sampler")) m.defaults.sampler = def["sampler"].get<std::string>();
      if (def.contains("steps")) m.defaults.steps = get_int(def["steps"]);
      if (def.contains("cfg_scale")) m.defaults.cfg_scale = def["cfg_scale"].get<double>();
      if (def.contains("eta")) m.defaults.eta = def["eta"].get<double>();
      if (def.contains("clip_denoised")) m.defaults.clip_denoised = def["clip_denoised"].get<bool>();
    }
    for (auto& s : j["stages"]) {
      Stage st;
      st.id = get_int(s.at("id"));
      st.t_min = get_int(s.at("t_min"));
      st.t_max = get_int(s.at("t_max"));
      st.batch = get_int(s.at("batch"));
      st.inputs = tensors(s.at("inputs"));
      st.outputs = tensors(s.at("outputs"));
      st.artifacts = artifacts(s.at("artifacts"));
      if (s.contains("default_precision") && s["default_precision"].is_string())
        st.default_precision = s["default_precision"].get<std::string>();
      m.stages.push_back(std::move(st));
    }
    if (j.contains("decoder") && j["decoder"].is_object()) {
      DecoderEntry dec;
      dec.inputs = tensors(j["decoder"].at("inputs"));
      dec.outputs = tensors(j["decoder"].at("outputs"));
      dec.artifacts = artifacts(j["decoder"].at("artifacts"));
      m.decoder = std::move(dec);
    }
    if (j.contains("output") && j["output"].contains("value_range")) {
      m.value_lo = j["output"]["value_range"].at(0).get<double>();
      m.value_hi = j["output"]["value_range"].at(1).get<double>();
    }
    if (j.contains("weights") && j["weights"].is_array()) {
      for (auto& w : j["weights"]) {
        WeightFile wf;
        static_cast<FileEntry&>(wf) = file_entry(w);
        wf.id = w.at("id").get<std::string>();
        wf.alignment = w.contains("alignment") ? w["alignment"].get<uint64_t>() : 1;
        if (wf.alignment == 0) wf.alignment = 1;
        for (auto& t : w.at("tensors"))
          wf.tensors.push_back({t.at("offset").get<uint64_t>(), t.at("bytes").get<uint64_t>(),
                                t.at("dtype").get<std::string>(), t.at("shape").get<std::vector<int64_t>>()});
        m.weights.push_back(std::move(wf));
      }
    }
    if (j.contains("shared_graphs") && j["shared_graphs"].is_array()) {
      for (auto& g : j["shared_graphs"]) {
        SharedGraph sg;
        sg.id = g.at("id").get<std::string>();
        static_cast<FileEntry&>(sg.graph) = file_entry(g);
        sg.graph.backend = "onnx";
        sg.graph.precision = g.at("precision").get<std::string>();
        WeightBindings wb;
        wb.file = g.at("weights").at("file").get<std::string>();
        for (auto it = g["weights"].at("bindings").begin(); it != g["weights"]["bindings"].end(); ++it)
          wb.bindings.emplace_back(it.key(), it.value().get<size_t>());
        sg.graph.weights = std::move(wb);
        for (auto& s : g.at("stages")) sg.stages.push_back(get_int(s));
        sg.stage_inputs = g.at("stage_inputs").get<std::vector<std::string>>();
        sg.graph_optimization = g.at("verified").at("graph_optimization").get<std::string>();
        m.shared_graphs.push_back(std::move(sg));
      }
    }
  } catch (const json::exception& e) {
    // the schema admitted something the reader cannot take (e.g. an integer beyond 64 bits)
    bundle_error(std::string("manifest holds a value this runtime cannot read: ") + e.what());
  }
  check_weights(m);
  if (j.at("model").at("config").at("num_classes") != j["model"]["num_classes"])
    bundle_error("model num_classes " + std::to_string(m.num_classes) + " disagrees with its config (" +
                 j["model"]["config"]["num_classes"].dump() + ")");
  if (m.null_class < 0 || m.null_class > m.num_classes)
    bundle_error("null class " + std::to_string(m.null_class) + " is outside 0.." + std::to_string(m.num_classes) +
                 " (the model has " + std::to_string(m.num_classes) + " classes)");
  if (m.null_class != m.num_classes)
    bundle_error("null class " + std::to_string(m.null_class) + " is one of the real classes 0.." +
                 std::to_string(m.num_classes - 1) + ": the unconditional half of guidance would use that class (the null class is " +
                 std::to_string(m.num_classes) + ")");
  if (m.class_names && static_cast<int>(m.class_names->size()) != m.num_classes)
    bundle_error("the manifest lists " + std::to_string(m.class_names->size()) + " class names for " +
                 std::to_string(m.num_classes) + " classes");
  check_diffusion(j["diffusion"], m);
  if (!(m.value_hi - m.value_lo >= kMinValueSpan)) {
    const json& vr = j["output"]["value_range"];
    bundle_error("output value_range [" + vr[0].dump() + ", " + vr[1].dump() + "] must have lo < hi, hi - lo at least " +
                 fmt("%g", kMinValueSpan));
  }
  for (auto& st : m.stages) check_stage_io(st, m);
  if (m.decoder && (m.decoder->inputs.size() != 1 || m.decoder->outputs.size() != 1))
    bundle_error("the decoder must declare exactly one input and one output");
  int T = m.num_timesteps;  // at most 1000000: the schema's maximum
  std::vector<int> seen(T > 0 ? T : 0, 0);
  for (auto& st : m.stages) {
    if (!(0 <= st.t_min && st.t_min <= st.t_max && st.t_max < T))
      bundle_error("stage " + std::to_string(st.id) + " range [" + std::to_string(st.t_min) + ", " +
                   std::to_string(st.t_max) + "] is outside 0.." + std::to_string(T - 1));
    for (int t = st.t_min; t <= st.t_max; ++t) ++seen[t];
  }
  for (int t = 0; t < T; ++t)
    if (seen[t] != 1)
      bundle_error("stages do not cover timesteps 0.." + std::to_string(T - 1) + " exactly once (timestep " +
                   std::to_string(t) + ")");
  std::vector<int> ids;
  for (auto& st : m.stages) ids.push_back(st.id);
  std::sort(ids.begin(), ids.end());
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] != static_cast<int>(i)) bundle_error("stage ids must be 0..n-1");
  std::sort(m.stages.begin(), m.stages.end(), [](const Stage& a, const Stage& b) { return a.id < b.id; });
  return m;
}

Manifest parse_manifest_text(const std::string& text, const std::string& source) {
  json j;
  try {
    j = parse_json_strict(text);
  } catch (const std::invalid_argument& e) {
    bundle_error("cannot read " + source + ": " + e.what());
  }
  if (!j.is_object() || !j.contains("format") || !j["format"].is_object() || !j["format"].contains("name") ||
      j["format"]["name"] != kFormatName)
    bundle_error(source + " is not a " + std::string(kFormatName) + " manifest");
  return validate_manifest(j);
}

fs::path Bundle::path_of(const FileEntry& entry) const { return resolve_inside(root, entry.path); }

Bundle load_bundle(const fs::path& dir, bool verify_checksums, bool defer_weights) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) bundle_error("bundle directory not found: " + dir.string());
  fs::path mf = dir / "manifest.json";
  if (!fs::is_regular_file(mf, ec)) bundle_error(dir.string() + " is not a bundle: manifest.json is missing");
  std::string text;
  try {
    text = read_text_file(mf);
  } catch (const Error& e) {
    bundle_error("cannot read " + mf.string() + ": " + e.what());
  }
  Bundle b{dir, parse_manifest_text(text, mf.string())};
  if (!verify_checksums) return b;
  auto check = [&](const FileEntry& e, bool size_only) {
    fs::path p = b.path_of(e);
    if (!fs::is_regular_file(p, ec))
      bundle_error("bundle file missing: " + e.path + " (the bundle is incomplete; re-run flexdit-export convert)");
    bool ok = size_only ? fs::file_size(p, ec) == e.bytes && !ec : sha256_file(p) == e.sha256;
    if (!ok)
      bundle_error("checksum mismatch for " + e.path +
                   ": the bundle was modified or truncated; re-run flexdit-export convert");
  };
  for (auto& w : b.manifest.weights) check(w, defer_weights);
  for (auto& g : b.manifest.shared_graphs) check(g.graph, false);
  auto arts = [&](const std::vector<Artifact>& list) {
    for (auto& a : list) {
      check(a, false);
      if (a.external_data) check(*a.external_data, false);
    }
  };
  for (auto& st : b.manifest.stages) arts(st.artifacts);
  if (b.manifest.decoder) arts(b.manifest.decoder->artifacts);
  return b;
}

const Artifact& find_artifact(const std::vector<Artifact>& artifacts, const std::string& backend,
                              const std::string& precision, const std::string& what) {
  for (auto& a : artifacts)
    if (a.backend == backend && (precision.empty() || a.precision == precision)) return a;
  std::string have;
  for (auto& a : artifacts) have += (have.empty() ? "" : ", ") + a.backend + "/" + a.precision;
  std::string want = backend + (precision.empty() ? "" : "/" + precision);
  bundle_error("bundle has no " + want + " artifact for " + what + " (it has: " + have +
               "); build it with flexdit-export convert --precision/--extra-precisions");
}

}  // namespace flexdit_core
