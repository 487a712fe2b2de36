"""Tiny random models with a head on top, for the tests and the fidelity notebook: a masked-language
model (SPLADE's input) and a causal LM whose vocabulary holds "yes" and "no" (a decoder
reranker's). Every weight is random and seeded; the same arguments give the same model."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.model_zoo import build_tiny_model

# Written for these tests in the shape of Qwen3-Reranker's: a system turn, the pair in a user
# turn, an assistant turn opened with an empty thought.
CHAT_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: Given a web search query, retrieve relevant passages\n"
    "{% for message in messages %}{% if message['role'] == 'query' %}<Query>: {{ message['content'] }}\n"
    "{% else %}<Document>: {{ message['content'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)

# Shifts the head's vocabulary bias down, so a random model leaves most entries at zero (as a
# trained SPLADE does) and the non-zero indices say something.
SPARSITY_SHIFT = 1.4


def build_splade(family: str, dest: Path, *, seed: int = 0) -> Path:
    """A masked-language model of `family`, every weight random, in transformers' format."""
    from transformers import AutoModelForMaskedLM

    base = build_tiny_model(family, dest, seed=seed)
    model = AutoModelForMaskedLM.from_pretrained(str(base))
    generator = torch.Generator().manual_seed(seed + 1)
    head = model.get_output_embeddings()
    for name, parameter in model.named_parameters():
        if not name.startswith(("bert.", "roberta.", "mpnet.")):  # the head, freshly initialised
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3
    head.bias.data -= SPARSITY_SHIFT
    model.save_pretrained(str(dest))
    return dest


def build_causal_lm(dest: Path) -> Path:
    """A tiny random Qwen3 causal LM whose vocabulary holds "yes" and "no"."""
    from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM

    base = build_tiny_model("qwen3", dest / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["yes", "no"])
    config = AutoConfig.from_pretrained(base)
    assert len(tokenizer) <= config.vocab_size  # the table is rounded up past the tokenizer
    config.architectures = ["Qwen3ForCausalLM"]
    model = Qwen3ForCausalLM.from_pretrained(base, config=config)
    generator = torch.Generator().manual_seed(5)
    embeddings = model.get_input_embeddings().weight  # tied to the LM head
    embeddings.data[len(tokenizer) - 2 : len(tokenizer)] = (
        torch.randn(2, config.hidden_size, generator=generator) * 0.3
    )
    model.save_pretrained(dest / "causal")
    tokenizer.save_pretrained(dest / "causal")
    return dest / "causal"


def save_chat_reranker(causal_lm: Path, dest: Path) -> Path:
    """`causal_lm` saved as sentence-transformers saves a causal CrossEncoder: a text-generation
    Transformer with CHAT_TEMPLATE, then LogitScore of "yes" against "no"."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(causal_lm), device="cpu")
    model.tokenizer.chat_template = CHAT_TEMPLATE
    model.save(str(dest))
    return dest
