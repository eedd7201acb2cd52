"""Per-GPU memory estimate for a T-SPIN step: parameter / gradient / optimizer / activation arithmetic.

An estimate, not a measurement (``python -m tspin.memory`` prints the README table). Bytes per GPU::

    weights      full fine-tuning: 4 B/param fp32 master + 4 B grad + optimizer (AdamW 8, RMSProp 4)  [/N under FSDP2]
                 LoRA:             2 B/param frozen bf16 base [/N under FSDP2] + 16 B per adapter param
                 FSDP2 also holds two gathered bf16 decoder blocks (the one computing + the one prefetched)
    activations  tokens = 3 rows per triplet x T x triplets per micro-batch
                 checkpointed: L x tokens x D x 2 B (block inputs) + one block's recompute
                 not checkpointed: L x one block
                 one block = tokens x (6 D + 2 D_kv + 4 I) x 2 B  (bf16 tensors saved for backward)
    loss         the fused kernel: no [tokens x V] logits (a naive head adds tokens x V x 10 B: bf16 logits +
                 fp32 copy + fp32 log-softmax)
    + 1.5 GiB allowance for the CUDA context, allocator slack and kernel workspaces
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 1024**3
OVERHEAD = 1.5 * GIB


@dataclass(frozen=True)
class Shape:
    name: str
    d: int  # hidden size
    layers: int
    inter: int  # MLP intermediate size
    vocab: int
    d_kv: int  # num_key_value_heads x head_dim
    tied: bool
    qkv_bias: bool = False

    @property
    def block_params(self) -> int:
        bias = self.d + 2 * self.d_kv if self.qkv_bias else 0
        return self.d * (2 * self.d + 2 * self.d_kv) + 3 * self.d * self.inter + 2 * self.d + bias

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.vocab * self.d
        return self.vocab * self.d + head + self.layers * self.block_params + self.d

    def lora_params(self, r: int = 16) -> int:
        """LoRA on every linear layer of the blocks (q, k, v, o, gate, up, down); the head stays frozen."""
        d, kv, i = self.d, self.d_kv, self.inter
        per_block = r * ((d + d) + (d + kv) * 2 + (d + d) + (d + i) * 2 + (i + d))
        return self.layers * per_block


SHAPES = {
    "qwen2.5-1.5b": Shape("Qwen2.5-1.5B", 1536, 28, 8960, 151936, 256, True, qkv_bias=True),
    "mistral-7b": Shape("Mistral-7B", 4096, 32, 14336, 32000, 1024, False),
    "llama3-8b": Shape("Llama-3-8B", 4096, 32, 14336, 128256, 1024, False),
    "llama3-70b": Shape("Llama-3-70B", 8192, 80, 28672, 128256, 1024, False),
}
METHODS = ("full-ddp", "full-fsdp2", "lora", "lora-fsdp2")
EXTRA_ROWS = (("llama3-70b", "full-fsdp2", 32),)  # 70B full fine-tuning needs more than one 8-GPU node
OPTIMIZER_BYTES = {"adamw": 8, "rmsprop": 4}


def estimate_bytes(shape: Shape, method: str, *, gpus: int = 1, seq_len: int = 2048, triplets: int = 1,
                   checkpointing: bool = True, optimizer: str = "adamw", lora_rank: int = 16) -> dict[str, float]:
    """Estimated peak bytes per GPU, by part; see the module docstring for the formula."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer: expected one of {tuple(OPTIMIZER_BYTES)}, got {optimizer!r}")
    if gpus < 1:
        raise ValueError(f"gpus: expected >= 1, got {gpus}")
    shard = gpus if method.endswith("fsdp2") else 1
    if method.startswith("full"):
        weights = shape.params * (8 + OPTIMIZER_BYTES[optimizer]) / shard
    else:
        weights = shape.params * 2 / shard + shape.lora_params(lora_rank) * (8 + OPTIMIZER_BYTES[optimizer])
    if shard > 1:
        weights += 2 * shape.block_params * 2  # gathered bf16 blocks
    tokens = 3 * triplets * seq_len
    block = tokens * (6 * shape.d + 2 * shape.d_kv + 4 * shape.inter) * 2
    activations = shape.layers * tokens * shape.d * 2 + block if checkpointing else shape.layers * block
    return {"weights": weights, "activations": activations, "overhead": OVERHEAD,
            "total": weights + activations + OVERHEAD}


def markdown_table(*, seq_len: int = 2048, triplets: int = 1, gpus: int = 8) -> str:
    rows = [
        "| model (params) | method | GPUs | weights+grads+optimizer | activations (checkpointed) | total / GPU "
        "| fits 24 / 40 / 80 GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    plan = [(key, method, gpus if method.endswith("fsdp2") else 1) for key in SHAPES for method in METHODS]
    plan += list(EXTRA_ROWS)
    for key, method, n in plan:
        shape = SHAPES[key]
        est = estimate_bytes(shape, method, gpus=n, seq_len=seq_len, triplets=triplets)
        fits = " / ".join("yes" if est["total"] <= cap * GIB else "no" for cap in (24, 40, 80))
        rows.append(
            f"| {shape.name} ({shape.params / 1e9:.1f}B) | {method} | {n if method != 'full-ddp' else 'any'} "
            f"| {est['weights'] / GIB:.1f} GiB | {est['activations'] / GIB:.1f} GiB | {est['total'] / GIB:.1f} GiB "
            f"| {fits} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print the per-GPU memory estimate table (markdown).")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--triplets", type=int, default=1, help="triplets per micro-batch (3 rows each)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs for the FSDP2 rows")
    a = p.parse_args(argv)
    print(markdown_table(seq_len=a.seq_len, triplets=a.triplets, gpus=a.gpus))


if __name__ == "__main__":
    main()
