"""Where a model's blocks and final norm live, and what `hidden_states[i]` means (docs/design.md §3).

All architecture knowledge is here. For the supported families, `output_hidden_states=True`
returns num_blocks + 1 tensors: index 0 the token embeddings, index b + 1 the residual stream
after block b — except the last, which Hugging Face returns *after* the final norm.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# model_type -> (attribute of the base model holding the final norm, add BOS/EOS-like special tokens?)
_FAMILIES: dict[str, tuple[str | None, bool]] = {
    "gpt_neox": ("final_layer_norm", False),  # Pythia: no BOS/EOS added (docs/design.md §3)
    "llama": ("norm", False),
    "mistral": ("norm", False),
    "qwen2": ("norm", False),
    "gpt2": ("ln_f", False),
    "bert": (None, True),  # post-norm encoder: every hidden state is already normed, no final norm
    "roberta": (None, True),
}


@dataclass(frozen=True)
class Anatomy:
    """What the encoder needs to know about a model family."""

    model_type: str
    num_blocks: int
    final_norm_attr: str | None  # None: the family has no final norm
    add_special_tokens: bool

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        """The final norm module of a base (AutoModel) model, or None when the family has none."""
        return None if self.final_norm_attr is None else getattr(model, self.final_norm_attr)

    def last_is_normed(self) -> bool:
        """True when `hidden_states[num_blocks]` already has the final norm applied."""
        return self.final_norm_attr is not None


def anatomy(config) -> Anatomy:
    """The anatomy of a transformers config; NotImplementedError for families we have not checked."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise NotImplementedError(
            f"model_type {model_type!r} is not supported yet (known: {', '.join(sorted(_FAMILIES))}); "
            "add where its blocks and final norm live to layertime/architecture.py"
        )
    norm_attr, special = _FAMILIES[model_type]
    return Anatomy(model_type, num_blocks(config), norm_attr, special)


def num_blocks(config) -> int:
    """Number of transformer blocks L (hidden_states has L + 1 entries)."""
    for attr in ("num_hidden_layers", "n_layer"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    raise NotImplementedError(f"cannot tell how many blocks a {type(config).__name__} has")


def hidden_size(config) -> int:
    """Width d of every hidden state (the embedding dimension of each layer)."""
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    raise NotImplementedError(f"cannot tell the hidden size of a {type(config).__name__}")
