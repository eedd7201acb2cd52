"""Code that runs inside vLLM's worker processes: the engine is built with `worker_extension_cls` naming
:class:`PolicyLoader`, so `llm.collective_rpc("load_policy", ...)` runs its method on every worker.

Kept free of tspin's other modules (and of anything heavy): the worker imports it by name when it starts.
"""

from __future__ import annotations

import hashlib

import torch


class PolicyLoader:
    """Mixed into vLLM's worker class: loads a saved policy's full weights into the running model in place."""

    def load_policy(self, weights_path: str) -> int:
        """Reload from a saved model directory; returns how many tied layers were re-processed."""
        self.reload_weights(weights_path=weights_path)
        return refresh_shared_weight_layers(self.get_model())

    def weight_digest(self, name: str, rows: int | None = None) -> str:
        """:func:`tensor_digest` of the engine's parameter `name` (vLLM's name: q, k and v are one ``qkv_proj``;
        the embedding and norms keep Hugging Face's), of its first `rows` rows if given (vLLM pads an embedding's
        vocabulary to a multiple of 64): a check that the engine samples from the weights a trainer saved, without
        sending the tensor back."""
        params = dict(self.get_model().named_parameters())
        if name not in params:
            raise KeyError(f"weight_digest: the engine's model has no parameter {name!r}")
        return tensor_digest(params[name] if rows is None else params[name][:rows])


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (on the host)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def refresh_shared_weight_layers(model: torch.nn.Module) -> int:
    """Re-run the weight processing of every unquantized embedding-like layer whose weight another layer shares (an
    output layer tied to the input embeddings); returns how many layers were processed.

    Why: vLLM's in-place reload (0.32) copies the new values into the shared weight while loading the embedding,
    but the tied output layer has no checkpoint entry of its own, so its `process_weights_after_loading` is not run
    again. On a CPU that step packs a copy of the weight for the layer's matmul (oneDNN), so the output layer kept
    computing logits with the previous policy's embeddings. On a GPU the step does nothing for these layers and
    re-running it is free. Quantized layers are left alone: their processing is not meant to run twice.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    sharers: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            sharers.setdefault(id(weight), []).append(module)
    n = 0
    for modules in sharers.values():
        if len(modules) < 2:
            continue
        for module in modules:
            method = getattr(module, "quant_method", None)
            if isinstance(method, UnquantizedEmbeddingMethod):
                method.process_weights_after_loading(module)
                n += 1
    return n
