"""Import check for a vLLM GPU build brought onto a bare machine (benchmarks/gpu_vllm_install.sh runs it).

Imports what tspin's vLLM backend touches and what vLLM's V1 engine loads to run a LlamaForCausalLM on CUDA
(bf16, FlashAttention, sleep mode, in-place weight reload, LoRA): the engine core and its client, the executors,
the GPU worker and both model runners (V1 and V2: 0.26 picks V2 for dense models), the model loader and reload,
the Llama model, the FlashAttention backend, the samplers, the sleep-mode allocator, tokenizer / detokenizer, the
config parsing, LoRA, torch.compile / CUDA graph support, tspin's own vllm_* modules.

Prints one line per module that fails and, at the end, the top-level packages that were missing; exit 1 if any.
Works on a CPU-only machine too, with --stub-libcuda: vLLM's CUDA extensions link libcuda.so.1 (the driver), so
this builds a stub exporting the cu* symbols they use (needs cc and nm) and re-runs itself with it on
LD_LIBRARY_PATH. Usage: `python benchmarks/gpu_vllm_imports.py [--stub-libcuda] [--all]`; --all also walks every
submodule of the packages in WALK, which finds optional imports, most of them not needed for this use.
Compressed-tensors checkpoints would also need the compressed-tensors and loguru packages, left out of the bundle.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import traceback

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

MODULES = [
    "vllm",
    "vllm.entrypoints.llm",
    "vllm.lora.request",
    "vllm.inputs",
    "vllm.sampling_params",
    "vllm.outputs",
    "vllm.engine.arg_utils",
    "vllm.config",
    "vllm.platforms.cuda",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.engine.core",
    "vllm.v1.engine.core_client",
    "vllm.v1.engine.input_processor",
    "vllm.v1.engine.output_processor",
    "vllm.v1.engine.detokenizer",
    "vllm.v1.executor.abstract",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.core.sched.scheduler",
    "vllm.v1.core.kv_cache_manager",
    "vllm.v1.structured_output",
    "vllm.v1.worker.worker_base",
    "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.worker.gpu.model_runner",
    "vllm.v1.worker.gpu.sample.sampler",
    "vllm.v1.sample.sampler",
    "vllm.v1.sample.ops.topk_topp_sampler",
    "vllm.v1.attention.backends.flash_attn",
    "vllm.v1.attention.backends.fa_utils",
    "vllm.v1.attention.selector",
    "vllm.vllm_flash_attn",
    "vllm.vllm_flash_attn.flash_attn_interface",
    "vllm.model_executor.model_loader",
    "vllm.model_executor.model_loader.default_loader",
    "vllm.model_executor.model_loader.reload",
    "vllm.model_executor.models.registry",
    "vllm.model_executor.models.llama",
    "vllm.model_executor.layers.vocab_parallel_embedding",
    "vllm.device_allocator.cumem",
    "vllm.tokenizers",
    "vllm.transformers_utils.config",
    "vllm.lora.worker_manager",
    "vllm.lora.model_manager",
    "vllm.lora.layers",
    "vllm.lora.punica_wrapper.punica_gpu",
    "vllm.lora.ops.triton_ops",
    "vllm.v1.worker.lora_model_runner_mixin",
    "vllm.compilation.backends",
    "vllm.compilation.wrapper",
    "vllm.compilation.cuda_graph",
    "vllm.distributed.parallel_state",
    "vllm.distributed.device_communicators.cuda_communicator",
    "vllm._custom_ops",
    "tspin.generation.vllm_worker",
    "tspin.generation.vllm_engine",
    "tspin.generation.vllm_backend",
]
# --all: every submodule of these (many optional imports: informative, not required)
WALK = ["vllm.v1.worker.gpu", "vllm.v1.engine", "vllm.v1.attention.backends", "vllm.model_executor.model_loader",
        "vllm.lora", "vllm.compilation", "vllm.v1.sample", "vllm.device_allocator"]


# what vllm 0.26.0 and the bundled packages ask of packages the image has (the bundle installs --no-deps)
IMAGE_REQUIREMENTS = ["torch==2.11.0", "triton>=3.6", "transformers>=5.5.3", "tokenizers>=0.21.1",
                      "safetensors>=0.6.2", "typing_extensions>=4.14.1", "anyio>=4.0", "httpx>=0.23", "tqdm>4",
                      "protobuf>=5.29.6", "aiohttp>=3.13.3", "prometheus_client>=0.18", "tiktoken>=0.6.0",
                      "opencv-python-headless>=4.13.0", "filelock>=3.16.1", "requests>=2.26.0", "annotated-doc>=0.0.2",
                      "numpy", "psutil", "py-cpuinfo", "sentencepiece", "pillow", "einops", "cloudpickle", "pyyaml",
                      "regex", "huggingface_hub", "nvidia-ml-py"]


def check_image() -> list[str]:
    """Warnings for image packages missing or older than vllm / the bundle ask (an import may still work)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    warnings = []
    for spec in IMAGE_REQUIREMENTS:
        req = Requirement(spec)
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            warnings.append(f"{req.name} missing (wanted {spec})")
            continue
        if not req.specifier.contains(have, prereleases=True) and not req.specifier.contains(have.split("+")[0]):
            warnings.append(f"{req.name} {have} (wanted {spec})")
    return warnings


def stub_libcuda() -> None:
    """Re-exec with a stub libcuda.so.1 on LD_LIBRARY_PATH (CPU-only machines)."""
    import subprocess
    import tempfile
    from importlib.util import find_spec

    root = os.path.dirname(find_spec("vllm").origin)
    syms = set()
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".so"):
                out = subprocess.run(["nm", "-D", "--undefined-only", os.path.join(dirpath, f)], capture_output=True,
                                     text=True).stdout
                syms |= {line.split()[-1] for line in out.splitlines() if line.split()[-1][:2] == "cu"
                         and line.split()[-1][2:3].isupper()}
    d = tempfile.mkdtemp(prefix="stub-libcuda-")
    with open(os.path.join(d, "stub.c"), "w") as fh:
        fh.write("".join(f"int {s}(void) {{ return 999; }}\n" for s in sorted(syms)))
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", os.path.join(d, "libcuda.so.1"),
                    os.path.join(d, "stub.c")], check=True)
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(filter(None, [d, os.environ.get("LD_LIBRARY_PATH")])))
    args = [a for a in sys.argv if a != "--stub-libcuda"]
    os.execve(sys.executable, [sys.executable, *args], env)


def main() -> int:
    if "--stub-libcuda" in sys.argv:
        stub_libcuda()
    names = list(MODULES)
    if "--all" in sys.argv:
        for pkg in WALK:
            mod = importlib.import_module(pkg)
            names += [m.name for m in pkgutil.walk_packages(mod.__path__, pkg + ".")]
    for w in check_image():
        print(f"WARN image package: {w}", flush=True)
    failed, missing = [], set()
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            failed.append(name)
            if isinstance(e, ModuleNotFoundError) and e.name and not e.name.startswith(("vllm", "tspin")):
                missing.add(e.name.split(".")[0])
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            if os.environ.get("VLLM_IMPORTS_TRACE"):
                traceback.print_exc()
    import vllm

    print(f"vllm {vllm.__version__} from {os.path.dirname(vllm.__file__)}: {len(names) - len(failed)}/{len(names)} "
          f"modules import; missing packages: {' '.join(sorted(missing)) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
