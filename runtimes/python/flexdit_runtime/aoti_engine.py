"""AOTInductor stage engines: one ``.pt2`` package per stage, compiled by ``flexdit-export
convert --backend aoti``, sharing one weight file per precision; on CUDA each stage and batch
runs as one CUDA graph captured at load.

This is the only engine that needs torch, and it imports it lazily: the ONNX Runtime path of
the runtime never does.

Compatibility: a package is native code for one torch build and one device (CUDA version and
GPU compute capability, or CPU architecture and vector ISA). The manifest records that key per
artifact (``aoti.compat``); ``open`` compares it with this process and refuses a foreign package
with one line that gives the rebuild command.

Weights: packages are compiled with their constants kept out of the shared object
(``aot_inductor.package_constants_in_so=False``); the bundle stores every stage's constants once
per precision (``stages/weights.aoti-<precision>.bin``, a format-v2 weight file) and the
manifest binds each package's constant names to tensors of that file. The file is read and
hashed once per process; each tensor becomes one torch tensor on the device (one copy on the
device, whatever the number of stages) that every stage's package uses in place
(``load_constants(..., user_managed=True)``).

CUDA graphs: a stage has static shapes, so at load its engine allocates static input/output
buffers, warms the package up on a side stream and captures one call (``torch.cuda.graph``); a
call then copies into the static inputs and replays. The whole denoising loop can stay on the
device (``run_device``; ``torch_sampler.run_on_device``): no host round trip per step.
"""

from __future__ import annotations

import platform
import threading
import weakref

import numpy as np

from flexdit_bundle.manifest import Bundle, BundleError
from flexdit_bundle.spec import Artifact, Stage

from .settings import RuntimeSettings
from .stage_engine import NotChosen, StageEngine
from .weights import read_weight_file as weight_bytes

INSTALL_HINT = "the aoti backend needs PyTorch (pip install torch); the onnx backend does not"
TORCH_DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool")


def torch_module():
    try:
        import torch
    except ImportError:
        raise BundleError(INSTALL_HINT) from None
    return torch


def cpu_isa() -> str:
    """The CPU architecture and the vector ISA Inductor generates code for (its choice on this machine)."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        isa = "+".join(str(pick_vec_isa()).split()) or "novec"
    except Exception:  # an Inductor without this probe: the architecture alone
        isa = "unknown"
    return f"{platform.machine()}-{isa}"


def environment(device: str) -> dict:
    """The compatibility key of this process for packages on ``device`` ("cpu" or "cuda")."""
    torch = torch_module()
    env = {"torch": torch.__version__, "device": device}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise BundleError(f"CUDA is not available to this torch ({torch.__version__}); the bundle's AOTI packages "
                              "were built for a GPU")
        major, minor = torch.cuda.get_device_capability()
        env.update(cuda=torch.version.cuda, compute_capability=f"{major}.{minor}")
        env["key"] = f"torch-{env['torch']}/cuda-{env['cuda']}/sm_{major}{minor}"
    elif device == "cpu":
        env["cpu_isa"] = cpu_isa()
        env["key"] = f"torch-{env['torch']}/cpu-{env['cpu_isa']}"
    else:
        raise BundleError(f"unknown AOTI device {device!r} (cpu or cuda)")
    return env


def rebuild_command(bundle: Bundle, artifact: Artifact) -> str:
    src = (bundle.model.source or {}).get("file", "CHECKPOINT")
    device = artifact.aoti.device if artifact.aoti else "cuda"
    return (f"flexdit-export convert {src} -o {bundle.root} --force --backend aoti "
            f"--device {device} --precision {artifact.precision}")


def torch_cuda() -> str | None:
    """None when torch can run CUDA packages here, else why not (without importing torch's CUDA
    state when torch is absent)."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    return None


def aoti_devices(bundle: Bundle) -> set:
    """The devices the bundle's AOTI packages were compiled for (empty: it has none)."""
    return {a.aoti.device if a.aoti else "cuda" for st in bundle.stages for a in st.artifacts
            if a.backend == "aoti"}


def _rebuild(bundle: Bundle, device: str) -> str:
    src = (bundle.model.source or {}).get("file", "CHECKPOINT")
    return f"flexdit-export convert {src} -o {bundle.root} --force --backend aoti --device {device}"


def check_compatible(bundle: Bundle, stage: Stage, artifact: Artifact) -> dict:
    """-> this process's key; a package built for another one is refused with one line."""
    info = artifact.aoti
    if info is None or info.compat is None:
        raise BundleError(f"{artifact.path}: the manifest records no AOTI compatibility key; "
                          f"rebuild with: {rebuild_command(bundle, artifact)}")
    here = environment(info.device)
    built = info.compat.key
    if built != here["key"]:
        raise BundleError(f"stage {stage.id}: {artifact.path} was compiled for {built}, this process is "
                          f"{here['key']}; rebuild with: {rebuild_command(bundle, artifact)}")
    return here


# ---------------------------------------------------------------- shared weights

_TORCH_WEIGHTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def read_weight_file(bundle: Bundle, file_id: str, device: str) -> list:
    """The tensors of weight file ``file_id`` as torch tensors on ``device``, after checking the
    sha256 of the bytes read (one read, one hash). On the CPU they are views of that one buffer."""
    torch = torch_module()
    entry = bundle.weight_files.get(file_id)
    if entry is None:
        raise BundleError(f"the manifest lists no weight file {file_id!r}; re-run flexdit-export convert")
    raw = torch.from_numpy(weight_bytes(bundle, entry))
    out = []
    for t in entry.tensors:
        dtype = getattr(torch, t.dtype if t.dtype != "bool" else "bool")
        v = raw[t.offset:t.offset + t.bytes].view(dtype).reshape(t.shape)
        out.append(v if device == "cpu" else v.to(device))
    return out


def shared_tensors(weights, bundle: Bundle, file_id: str, device: str) -> list:
    """One set of device tensors per (bundle weights, file, device), whatever the number of
    stage engines that ask: the weight-sharing point of the AOTI backend."""
    with _LOCK:
        per = _TORCH_WEIGHTS.setdefault(weights, {})
        key = (file_id, device)
        if key not in per:
            per[key] = read_weight_file(bundle, file_id, device)
        return per[key]


def loaded_weight_sets(weights) -> int:
    """How many weight files were turned into torch tensors for ``weights`` (tests: once)."""
    return len(_TORCH_WEIGHTS.get(weights, {}))


# ---------------------------------------------------------------- packages

def load_package(path, device: str):
    """An ``AOTICompiledModel`` for ``path`` on ``device``."""
    torch = torch_module()
    from torch._inductor.package import load_package as _load

    try:
        return _load(str(path), device_index=(torch.cuda.current_device() if device == "cuda" else -1))
    except TypeError:  # torch without device_index
        return _load(str(path))
    except Exception as e:  # the loader raises RuntimeError with a long C++ trace
        raise BundleError(f"cannot load AOTI package {path}: {str(e).strip().splitlines()[0][:300]}") from None


def bind_constants(runner, constants: dict) -> None:
    """Hand the package the constants it uses, in place (no copy): the caller keeps them alive.
    (A stage module's constants the compiled graph dropped, e.g. an unused table, are left out.)"""
    needed = set(runner.get_constant_fqns())
    constants = {k: v for k, v in constants.items() if k in needed}
    try:
        runner.load_constants(constants, check_full_update=True, user_managed=True)
    except TypeError:  # older torch: positional (map, use_inactive, check_full_update[, user_managed])
        runner.loader.load_constants(constants, False, True, True)


def constants_for(artifact: Artifact, tensors: list, runner, path: str) -> dict:
    ref = artifact.weights
    if not ref:
        raise BundleError(f"{path}: the manifest binds no weights to this AOTI package; re-run flexdit-export convert")
    constants = {name: tensors[i] for name, i in ref.bindings.items()}
    missing = [n for n in runner.get_constant_fqns() if n not in constants]
    if missing:
        raise BundleError(f"{path}: the package needs constant {missing[0]!r}, which the manifest does not bind; "
                          "re-run flexdit-export convert")
    return constants


class AotiStageEngine(StageEngine):
    """A stage's AOTInductor package on the CPU or one CUDA device (the package decides)."""

    kind = "aoti"
    devices = ("cpu", "cuda")  # the one each package was compiled for
    default_on = {"cuda": 0}  # --device cuda prefers packages built for the GPU; the CPU default stays torch-free
    keeps_trajectory_on_device = True

    @classmethod
    def library(cls) -> str | None:
        try:
            torch_module()
        except BundleError as e:
            return str(e)
        return None

    @classmethod
    def preflight(cls, bundle: Bundle, stage: Stage, artifact: Artifact, settings: RuntimeSettings) -> None:
        check_compatible(bundle, stage, artifact)

    @classmethod
    def on_device(cls, bundle: Bundle, device: str, settings: RuntimeSettings, probes: dict,
                  explicit: bool) -> RuntimeSettings:
        """Runs where the bundle's packages were compiled for: that device must be ``device``
        (and, for CUDA, torch must see a GPU)."""
        built = aoti_devices(bundle)
        if device == "cpu":
            if not built:
                raise BundleError(f"--device cpu --backend aoti: the bundle has no AOTI packages; run its ONNX graphs "
                                  f"(--backend onnx) or build them with: {_rebuild(bundle, 'cpu')}")
            if "cpu" not in built:
                raise BundleError(f"--device cpu: the bundle's AOTI packages were compiled for "
                                  f"{', '.join(sorted(built))}; run its ONNX graphs (--backend onnx) or rebuild "
                                  f"with: {_rebuild(bundle, 'cpu')}")
            return settings
        if device != "cuda":
            return super().on_device(bundle, device, settings, probes, explicit)
        if "cuda" in built:
            why = probes.get("torch_cuda", torch_cuda)()
            if why is None:
                return settings
            why = f"the bundle's AOTI packages need CUDA, but {why}"
            if explicit:
                raise BundleError(f"--device cuda: {why}")
            raise NotChosen(why)
        if explicit:
            state = f"were compiled for {', '.join(sorted(built))}" if built else "do not exist"
            raise BundleError(f"--device cuda: the bundle's AOTI packages {state}; "
                              f"rebuild with: {_rebuild(bundle, 'cuda')}")
        raise NotChosen("the bundle's AOTI packages were compiled for the CPU" if built
                        else "the bundle has no AOTI packages")

    @classmethod
    def run_trajectory(cls, model, request, progress) -> None:
        """The sampler state stays a torch tensor on the device for the whole trajectory."""
        from .torch_sampler import run_on_device

        run_on_device(model, request, progress)

    def __init__(self, stage: Stage, artifact: Artifact, runner, device: str, constants: dict, env: dict):
        super().__init__(stage, artifact)
        torch = torch_module()
        self.torch, self.runner, self.device, self.env = torch, runner, device, env
        self.constants = constants  # keeps the shared tensors alive as long as the package uses them
        self._lock = threading.Lock()
        self.graph = None
        self.graph_error = None
        shapes = [e.shape for e in stage.inputs]
        self.static_in = (torch.zeros(shapes[0], dtype=torch.float32, device=device),
                          torch.zeros(shapes[1], dtype=torch.float32, device=device),
                          torch.zeros(shapes[2], dtype=torch.int64, device=device))
        with torch.inference_mode():
            out = runner(*self.static_in)  # one dry run: the package's output must be the manifest's
        want = list(stage.outputs[0].shape)
        if list(out.shape) != want or out.dtype != torch.float32:
            raise BundleError(f"{artifact.path} (stage {stage.id}): the package returns {out.dtype} "
                              f"{list(out.shape)}, the manifest declares float32 {want}; re-run flexdit-export convert")
        self.static_out = out

    @classmethod
    def open(cls, bundle: Bundle, stage: Stage, artifact: Artifact, settings: RuntimeSettings, weights) -> "AotiStageEngine":
        env = check_compatible(bundle, stage, artifact)
        device = env["device"]
        path = bundle.path(artifact)
        runner = load_package(path, device)
        tensors = shared_tensors(weights, bundle, artifact.weights.file, device)
        constants = constants_for(artifact, tensors, runner, artifact.path)
        bind_constants(runner, constants)
        engine = cls(stage, artifact, runner, device, constants, env)
        if device == "cuda":
            engine.capture()
        return engine

    def capture(self) -> None:
        """One CUDA graph of one call on the static buffers (warm-up on a side stream first, as
        torch.cuda.graph requires). If capture fails the engine runs the package directly and
        says so in ``describe()``."""
        torch = self.torch
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.inference_mode():
                for _ in range(2):
                    self.runner(*self.static_in)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g), torch.inference_mode():
                self.static_out = self.runner(*self.static_in)
            g.replay()
            torch.cuda.synchronize()
            self.graph = g
        except Exception as e:  # capture is an optimisation: fall back to plain calls
            self.graph, self.graph_error = None, str(e).strip().splitlines()[0][:200] if str(e).strip() else repr(e)
            torch.cuda.synchronize()

    def run_device(self, x, t, y):
        """One call on tensors already on the device (exactly ``batch`` rows); -> the output on
        the device, the caller's own: with a CUDA graph, a copy of the graph's static output made
        under the lock (another thread's replay would overwrite that buffer)."""
        with self._lock:
            if self.graph is not None:
                sx, st, sy = self.static_in
                sx.copy_(x)
                st.copy_(t)
                sy.copy_(y)
                self.graph.replay()
                return self.static_out.clone()
            with self.torch.inference_mode():
                return self.runner(x, t, y)

    def _run(self, feeds: dict) -> np.ndarray:
        torch = self.torch
        x, t, y = (torch.from_numpy(feeds[n]).to(self.device) for n in self.input_names)
        out = self.run_device(x, t, y)
        return out.detach().to("cpu").numpy().copy()

    def describe(self) -> dict:
        return {**super().describe(), "device": self.device, "compat": self.env["key"],
                "cuda_graph": self.graph is not None if self.device == "cuda" else None,
                **({"cuda_graph_error": self.graph_error} if self.graph_error else {}),
                "recipe": self.artifact.aoti.recipe if self.artifact.aoti else None}
