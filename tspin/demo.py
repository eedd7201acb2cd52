"""`tspin demo`: the paper's comparison at laptop scale, end to end on CPU.

Task: string transformations with exact-match answers (reverse / sort / rotate a random letter string), generated
deterministically from a seed. Model: a tiny Llama built from a config, with a character-level tokenizer built here.
Runs: SFT on 25% of the data gives pi_0; T-SPIN, T-SPIN without the history term (the paper's ablation) and SPIN
then self-play for 4 iterations on the same 25%; SFT on 100% (same init, same epochs) is the reference, and SFT
continued from pi_0 on the same 25% for as many rounds and epochs as self-play is the control. Every policy is
evaluated on the same held-out prompts.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from .config import Config
from .io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl

LETTERS = "abcdefghijklmnop"
OPS = {
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "rotate": lambda s: s[1:] + s[:1],
}
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
MARKERS = ["### Instruction: ", "\n\n### Response: "] + list(OPS)


def make_task(n: int, seed: int, min_len: int = 4, max_len: int = 8) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        op = rng.choice(sorted(OPS))
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        rows.append({"prompt_id": f"{seed}-{i:05d}", "prompt": f"{op} {s}", "response": OPS[op](s)})
    return rows


def build_tokenizer(fillers: int = 0):
    """Character-level WordLevel tokenizer; the template markers and op names are single added tokens. `fillers`
    more tokens (never produced by encoding) make a model-sized vocabulary for benchmarks."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(LETTERS) + [" ", ":", "\n", "#"]
    vocab = {t: i for i, t in enumerate(SPECIAL + chars + [f"<f{i}>" for i in range(fillers)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    tok.add_tokens(MARKERS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_model(tokenizer, *, hidden: int = 96, layers: int = 3, heads: int = 4, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


# Chosen so that pi_0 (SFT on 1000 examples) is weak but not hopeless (~20% exact match) and the whole comparison
# fits in ~10 minutes on 2 CPU cores. Self-play lr: at 1e-4 both self-play methods lost accuracy from iteration 1
# on (likelihood of the references fell); 2e-5 is the largest we tried where T-SPIN did not.
DEMO_SETTINGS = dict(
    n_train=4000, n_eval=300, model=dict(hidden=128, layers=4, heads=4),
    sft_epochs=5.0, sft_lr=2e-3, selfplay_epochs=2.0, selfplay_lr=2e-5, sft_cont_lr=5e-4, iterations=4,
)


def demo_config(**overrides) -> Config:
    base = dict(prompt_template="paper", max_length=40, max_prompt_length=24, max_new_tokens=10,
                eval_max_new_tokens=10, temperature=1.0, top_p=1.0, generation_batch_size=256, eval_batch_size=256,
                per_device_train_batch_size=32, gradient_accumulation_steps=1, optimizer="adamw", weight_decay=0.0,
                lr_scheduler="linear", warmup_ratio=0.1, max_grad_norm=1.0, loss_impl="auto", seed=0, data_seed=0,
                logging_steps=5, device="cpu", alpha=1.0, beta=0.1, beta_iter0=0.0, spin_lambda=0.1)
    base.update(overrides)
    return Config(**base).validate()


def _runs(out: Path, s: dict, progress: bool, backend: str = "hf") -> list[tuple[str, str, Config]]:
    data, base = out / "data" / "train.jsonl", out / "base"
    pi0 = str(out / "sft25" / "model")
    common = dict(data_path=str(data), eval_data_path=str(out / "data" / "eval.jsonl"), progress=progress,
                  tokenizer_name_or_path=str(base), generation_backend=backend)
    q = dict(data_fraction=0.25, **common)
    sp = dict(model_name_or_path=pi0, num_iterations=s["iterations"], num_train_epochs=s["selfplay_epochs"],
              learning_rate=s["selfplay_lr"], **q)
    return [
        ("sft25", "train", demo_config(method="sft", model_name_or_path=str(base), num_train_epochs=s["sft_epochs"],
                                       learning_rate=s["sft_lr"], output_dir=str(out / "sft25"), **q)),
        ("tspin", "iterate", demo_config(method="tspin", output_dir=str(out / "tspin"), **sp)),
        ("tspin_nohist", "iterate", demo_config(method="tspin", no_history=True, output_dir=str(out / "tspin_nohist"),
                                                proto_path=str(out / "tspin" / "proto.jsonl"), **sp)),
        ("spin", "iterate", demo_config(method="spin", output_dir=str(out / "spin"),
                                        proto_path=str(out / "tspin" / "proto.jsonl"), **sp)),
        ("sft25_cont", "iterate", demo_config(method="sft", output_dir=str(out / "sft25_cont"),
                                              **{**sp, "learning_rate": s["sft_cont_lr"]})),
        ("sft100", "train", demo_config(method="sft", model_name_or_path=str(base), num_train_epochs=s["sft_epochs"],
                                        learning_rate=s["sft_lr"], output_dir=str(out / "sft100"), **common)),
    ]


def _table(summary: dict) -> str:
    """Held-out evaluation per run and iteration, with the iteration's last-epoch training diagnostics."""
    cols = [("eval/exact_match", "exact_match", 11), ("eval/logps/real", "logp(real)", 10),
            ("eval/margins/real_vs_greedy", "real-greedy", 11), ("train/rewards/accuracies", "train acc", 9),
            ("train/margins/current", "cur margin", 10), ("train/margins/history", "hist margin", 11)]
    head = f"{'run':<12} {'policy':<7}" + "".join(f" {name:>{w}}" for _, name, w in cols)
    lines = [head, "-" * len(head)]
    for run, evals in summary["runs"].items():
        for e in evals:
            label = f"iter{e['iteration']}" if e["iteration"] >= 0 else "pi_0"
            label = "final" if run in ("sft25", "sft100") else label
            cells = "".join(f" {e[k]:>{w}.3f}" if k in e else f" {'-':>{w}}" for k, _, w in cols)
            lines.append(f"{run:<12} {label:<7}{cells}")
    return "\n".join(lines)


def _plot(summary: dict, path: Path) -> str | None:
    """Write the curves to `path`, or return why not: matplotlib is the optional extra `plot`."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install 'tspin[plot]')"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "eval/exact_match", "held-out exact match"),
                           (axes[1], "eval/logps/real", "held-out log p(reference answer)")):
        for run, evals in summary["runs"].items():
            if run in ("sft25", "sft100"):
                continue
            xs = [e["iteration"] + 1 for e in evals]
            ax.plot(xs, [e[key] for e in evals], marker="o", label=run)
        ref = summary["runs"].get("sft100")
        if ref:
            ax.axhline(ref[-1][key], color="k", ls="--", label="SFT 100%")
        ax.set_xticks(range(summary["settings"]["iterations"] + 1))
        ax.set_xlabel("self-play iteration (0 = pi_0, SFT on 25%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return None


def pick_backend(backend: str = "auto") -> tuple[str, str]:
    """(backend, a line saying which one samples and why). 'auto' is HF generate: the demo runs on the CPU, where
    vLLM samples its tiny models slower than HF (below), and the demo must stay a ~10-minute run; 'vllm' when asked."""
    from . import vllm_engine

    if backend not in ("auto", "hf", "vllm"):
        raise ValueError(f"--backend={backend!r}: expected auto, hf or vllm")
    # its models have tied embeddings, which vLLM 0.32 cannot reload in place (tspin.vllm_engine): every new
    # policy needs a fresh engine, ~30-60 s to start on a CPU, more than all of the demo's sampling with HF
    slow = ("on this CPU demo it is slower than hf: each of its tied-embedding policies needs a fresh vLLM engine, "
            "~30-60 s to start")
    if backend == "vllm":
        vllm_engine.require_vllm()  # VLLMNotInstalledError, naming the extra
        return "vllm", f"vllm ({vllm_engine.version()}, chosen with --backend vllm; {slow})"
    if backend == "hf":
        return "hf", "hf (transformers generate; chosen with --backend hf)"
    if vllm_engine.available():
        return "hf", (f"hf (transformers generate; picked by --backend auto although {vllm_engine.version()} is "
                      f"installed: {slow}; --backend vllm samples with it anyway)")
    return "hf", ("hf (transformers generate; picked by --backend auto; vLLM is not installed: pip install "
                  "'tspin[vllm]' for --backend vllm)")


def run_demo(out: str | Path, *, quick: bool = False, resume: bool = False, progress: bool = True,
             threads: int = 1, backend: str = "auto") -> dict:
    import torch

    from .run_dir import check_same_config
    from .selfplay import iterate, train

    # one intra-op thread: this model's matmuls are too small to split, and on a shared 2-core box spinning
    # OpenMP workers made steps up to 10x slower
    torch.set_num_threads(threads)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    out = Path(out)
    s = dict(DEMO_SETTINGS)
    if quick:  # a smoke-sized run for tests (head_dim 32: the smallest vLLM's CPU attention takes)
        s.update(n_train=64, n_eval=16, model=dict(hidden=32, layers=1, heads=1), sft_epochs=1.0, iterations=2)
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    if previous is not None and not resume:
        raise FileExistsError(f"{out} already holds a finished demo; pass --resume or choose another --out")
    if previous is not None and previous.get("settings") != json.loads(json.dumps(s)):
        raise FileExistsError(f"{out} holds a demo with other settings ({'--quick' if quick else 'full size'} asked, "
                              "the directory has the other one); choose another --out")
    backend, backend_line = pick_backend(backend)
    t0 = time.time()
    (out / "data").mkdir(parents=True, exist_ok=True)
    if not (out / "data" / "eval.jsonl").exists():
        atomic_write_jsonl(out / "data" / "train.jsonl", make_task(s["n_train"], seed=1))
        atomic_write_jsonl(out / "data" / "eval.jsonl", make_task(s["n_eval"], seed=2))
    if not (out / "base" / "config.json").exists():
        from .io import atomic_path

        tok = build_tokenizer()
        model = build_model(tok, **s["model"])
        with atomic_path(out / "base") as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)

    print(f"[demo] generation backend: {backend_line}", flush=True)
    summary = {"settings": s, "threads": threads, "generation_backend": backend_line, "runs": {}, "seconds": {}}
    skipped = []
    for name, kind, cfg in _runs(out, s, progress=progress, backend=backend):
        t1 = time.time()
        print(f"[demo] {name}: {kind} {cfg.method} -> {cfg.output_dir}", flush=True)
        done = (Path(cfg.output_dir) / "summary.json").exists()
        if (Path(cfg.output_dir) / "config.yaml").exists():  # a stage is reused only if it ran this very recipe
            check_same_config(cfg, Path(cfg.output_dir) / "config.yaml")
        if kind == "train":
            r = json.loads((Path(cfg.output_dir) / "summary.json").read_text()) if done else train(cfg, resume=True)
            summary["runs"][name] = [{"iteration": -1, **{k: v for k, v in r.items() if k.startswith("eval/")}}]
        else:
            r = json.loads((Path(cfg.output_dir) / "summary.json").read_text()) if done else iterate(cfg, resume=True)
            summary["runs"][name] = r["evals"]
        # a skipped stage keeps the time it took when it ran
        summary["seconds"][name] = (previous["seconds"][name] if done and previous and name in previous["seconds"]
                                    else round(time.time() - t1, 1))
        skipped.append(done)
    every_stage_skipped = previous is not None and all(skipped)  # a rerun of a finished demo: keep its runtime
    summary["seconds"]["total"] = previous["seconds"]["total"] if every_stage_skipped else round(time.time() - t0, 1)

    rows = []
    for name, *_ in _runs(out, s, False):
        rows += [{"run": name, **r} for r in read_jsonl(out / name / "metrics.jsonl")]
    atomic_write_jsonl(out / "metrics.jsonl", rows)
    atomic_write_json(out / "summary.json", summary)
    table = _table(summary)
    atomic_write_text(out / "table.txt", table + "\n")
    no_plot = _plot(summary, out / "curves.png")
    print(table)
    files = "summary.json, metrics.jsonl" + ("" if no_plot else ", curves.png")
    print(f"[demo] wrote {out}/{files} in {summary['seconds']['total']:.0f}s")
    if no_plot:
        print(f"[demo] no curves.png: {no_plot}")
    return summary
