"""The model zoo builds directories that sentence-transformers, transformers and tokenizers agree on."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModel, AutoTokenizer

from tests.helpers.model_zoo import (
    FAMILIES,
    POOLING_MODES,
    PROMPTS,
    assert_embeddings_close,
    build_tiny_model,
    bundled_minilm_dir,
    pool,
    read_sentence_transformers_settings,
    reference_embeddings,
    smollm2_model_dir,
    transformers_reference,
)

TEXTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "Le café était fermé, 東京 🙂 and numbers 3.14 — def f(x): return x!",
    "Embedding models turn sentences into vectors. " * 12,
    # Longer than every max_seq_length here, so truncation is exercised too.
    "word " * 300,
]
# (first, last) token of every encoded text; None where nothing is prepended.
FRAMING = {
    "bert": ("[CLS]", "[SEP]"),
    "xlm-roberta": ("<s>", "</s>"),
    "mpnet": ("<s>", "</s>"),
    "qwen2": (None, "<|endoftext|>"),
    "qwen3": (None, "<|endoftext|>"),
    "llama": ("<|begin_of_text|>", "<|end_of_text|>"),
    "mistral": ("<s>", "</s>"),
}
LEFT_PADDED = {"qwen3", "mistral"}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("zoo")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    cache = os.environ.get("TOOLKIT_TEST_CACHE")
    root = Path(cache) if cache else Path.home() / ".cache" / "toolkit-tests"
    return smollm2_model_dir(root)


@pytest.mark.parametrize("family", FAMILIES)
def test_layout(zoo: Callable[[str], Path], family: str) -> None:
    model_dir = zoo(family)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    assert (model_dir / "model.safetensors").stat().st_size < 2_000_000
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == family
    assert config["vocab_size"] >= len(AutoTokenizer.from_pretrained(model_dir))
    st_config = json.loads((model_dir / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == PROMPTS
    assert st_config["default_prompt_name"] is None
    settings = read_sentence_transformers_settings(model_dir)
    assert settings.pooling == ("mean" if family in {"bert", "xlm-roberta", "mpnet"} else "lasttoken")
    assert settings.normalize


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_file_matches_transformers(zoo: Callable[[str], Path], family: str) -> None:
    model_dir = zoo(family)
    backend = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(model_dir)
    first, last = FRAMING[family]
    for text in TEXTS:
        auto_ids = auto(text)["input_ids"]
        assert backend.encode(text).ids == auto_ids
        tokens = auto.convert_ids_to_tokens(auto_ids)
        assert tokens[-1] == last
        assert tokens[0] == first if first else tokens[0] not in auto.all_special_tokens
    assert auto.padding_side == ("left" if family in LEFT_PADDED else "right")


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_keeps_the_framing(zoo: Callable[[str], Path], family: str) -> None:
    from sentence_transformers import SentenceTransformer

    model_dir = zoo(family)
    model = SentenceTransformer(str(model_dir), device="cpu")
    ids = model.preprocess([TEXTS[-1]])["input_ids"][0].tolist()
    tokens = model[0].tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) == read_sentence_transformers_settings(model_dir).max_seq_length
    assert tokens[-1] == FRAMING[family][1]


@pytest.mark.parametrize("prompt", [None, PROMPTS["query"]], ids=["plain", "prompt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_references_agree(zoo: Callable[[str], Path], family: str, prompt: str | None) -> None:
    model_dir = zoo(family)
    settings = read_sentence_transformers_settings(model_dir)
    expected = transformers_reference(model_dir, TEXTS, settings.pooling, settings.normalize, prompt=prompt)
    actual = reference_embeddings(model_dir, TEXTS, prompt=prompt)
    assert actual.shape == (len(TEXTS), 64)
    assert_embeddings_close(actual, expected)
    # Distinct texts must give distinct embeddings, or parity would prove little (a shared
    # prompt under mean pooling brings them close, hence the loose bound).
    similarity = actual @ actual.T
    assert similarity.fill_diagonal_(0).max() < 0.999


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("family", ["bert", "mistral"], ids=["right-padded", "left-padded"])
def test_pooling_modes(tmp_path: Path, family: str, mode: str) -> None:
    model_dir = build_tiny_model(family, tmp_path, pooling=mode, normalize=False)
    expected = transformers_reference(model_dir, TEXTS, mode, normalize=False)
    # Unnormalized rows reach ~40 (mean_sqrt_len_tokens), so the absolute bound is looser.
    assert_embeddings_close(reference_embeddings(model_dir, TEXTS), expected, atol=1e-4)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pool_is_independent_of_padding_side(mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 3, 1]
    rows = [torch.randn(n, 4, generator=generator) for n in lengths]
    alone = torch.cat([pool(row[None], torch.ones(1, len(row)), mode) for row in rows])
    for left in (False, True):
        hidden = torch.full((3, 5, 4), 7.0)
        mask = torch.zeros(3, 5, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(5 - len(row), 5) if left else slice(0, len(row))
            hidden[i, span], mask[i, span] = row, 1
        torch.testing.assert_close(pool(hidden, mask, mode), alone)


@pytest.mark.parametrize(("family", "bidirectional"), [("qwen2", True), ("qwen3", False)])
def test_is_causal_flag_is_honoured(zoo: Callable[[str], Path], family: str, bidirectional: bool) -> None:
    model = AutoModel.from_pretrained(zoo(family)).eval()
    assert getattr(model.config, "is_causal", True) is not bidirectional
    with torch.inference_mode():
        a = model(input_ids=torch.tensor([[5, 6, 7, 8]])).last_hidden_state
        b = model(input_ids=torch.tensor([[5, 6, 7, 9]])).last_hidden_state
    # With bidirectional attention the first position sees the changed last token.
    assert (not torch.allclose(a[0, 0], b[0, 0])) is bidirectional


@pytest.mark.parametrize("family", ["xlm-roberta", "mpnet"])
def test_positions_start_after_padding_idx(zoo: Callable[[str], Path], family: str) -> None:
    model_dir = zoo(family)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = AutoTokenizer.from_pretrained(model_dir)(TEXTS[1], return_tensors="pt")
    length = batch["input_ids"].shape[1]
    first_position = model.config.pad_token_id + 1
    with torch.inference_mode():
        default = model(**batch).last_hidden_state
        offset = model(**batch, position_ids=torch.arange(length)[None] + first_position)
        plain = model(**batch, position_ids=torch.arange(length)[None])
    torch.testing.assert_close(offset.last_hidden_state, default)
    assert not torch.allclose(plain.last_hidden_state, default)


def test_build_is_deterministic(tmp_path: Path) -> None:
    first = build_tiny_model("qwen3", tmp_path / "a")
    second = build_tiny_model("qwen3", tmp_path / "b")
    other_seed = build_tiny_model("qwen3", tmp_path / "c", seed=1, num_hidden_layers=3)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other_seed / "model.safetensors").read_bytes()
    assert json.loads((other_seed / "config.json").read_text())["num_hidden_layers"] == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_the_same_bytes(tmp_path: Path, family: str) -> None:
    # Two references built apart must embed alike. The WordPiece and Unigram trainers break ties
    # in Rust hash-map order, which changes from one build to the next.
    first = build_tiny_model(family, tmp_path / "a")
    second = build_tiny_model(family, tmp_path / "b")
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_model("gpt2", tmp_path)


def test_bundled_minilm() -> None:
    model_dir = bundled_minilm_dir()
    for name in ("model.safetensors", "modules.json", "1_Pooling/config.json", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    settings = read_sentence_transformers_settings(model_dir)
    assert (settings.pooling, settings.normalize, settings.max_seq_length) == ("mean", True, 256)
    # Its tokenizer.json carries padding and truncation to 128; whoever reads the file with
    # tokenizers must switch both off, as transformers does.
    backend = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert len(backend.encode("hello").ids) == 128
    backend.no_padding()
    backend.no_truncation()
    auto = AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        assert backend.encode(text).ids == auto(text)["input_ids"]
    expected = transformers_reference(model_dir, TEXTS, "mean", normalize=True)
    assert_embeddings_close(reference_embeddings(model_dir, TEXTS), expected)


@pytest.mark.slow
def test_smollm2(smollm2_dir: Path) -> None:
    settings = read_sentence_transformers_settings(smollm2_dir)
    assert (settings.pooling, settings.normalize, settings.max_seq_length) == ("lasttoken", True, 512)
    backend = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(smollm2_dir)
    assert auto.chat_template is not None
    for text in TEXTS:
        auto_ids = auto(text)["input_ids"]
        assert backend.encode(text).ids == auto_ids
        # Neither BOS nor EOS is added: the last token pooled is the text's own last token.
        assert auto.convert_ids_to_tokens(auto_ids)[-1] not in auto.all_special_tokens
    # Short texts only: a 135M forward costs about a second per hundred tokens on two cores.
    texts = TEXTS[:3]
    expected = transformers_reference(smollm2_dir, texts, "lasttoken", normalize=True)
    assert_embeddings_close(reference_embeddings(smollm2_dir, texts), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_on_pooled_rows_equals_full_forward(zoo: Callable[[str], Path], family: str) -> None:
    """One-token pooling runs the last layer on the pooled tokens alone; nothing else may change."""
    from toolkit.execution.packing import pack
    from toolkit.execution.pooling import token_rows
    from toolkit.models.loader import load_model

    model = load_model(zoo(family), torch.device("cpu"), torch.float32)
    # Causal decoders offer lasttoken only; encoders and bidirectional decoders also CLS.
    assert "lasttoken" in model.row_pooling_modes
    assert ("cls" in model.row_pooling_modes) == (family not in {"qwen3", "llama", "mistral"})
    batch = pack([[5, 6, 7], [8], [9, 10, 11, 12, 13, 14]], [1, 0, 2])
    with torch.inference_mode():
        full = model.forward(batch, None)
        for mode in model.row_pooling_modes:
            rows = token_rows(batch, mode)
            # Float32 rounding only: the matrix products see fewer rows.
            difference = (model.forward(batch, rows) - full[rows]).abs().max()
            assert difference <= 1e-6 * full.abs().max(), (mode, float(difference))


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_gives_the_same_embeddings(zoo: Callable[[str], Path], family: str) -> None:
    """CUDA graphs run batches padded to a bucket shape; the real rows must not change."""
    from toolkit.execution.cuda_graphs import GraphShape, padded
    from toolkit.execution.packing import pack
    from toolkit.execution.runner import Runner
    from toolkit.models.loader import load_model

    model = load_model(zoo(family), torch.device("cpu"), torch.float32)
    batch = pack([[5, 6, 7], [8], [9, 10, 11, 12, 13, 14]], [1, 0, 2])
    shape = GraphShape.fitting(batch)
    grown = padded(batch, shape.tokens, shape.seqs, shape.max_seqlen)
    for modes in (["mean"], ["cls"], ["lasttoken"], ["max", "mean"]):
        runner = Runner(model, torch.device("cpu"), modes, normalize_output=True)
        with torch.inference_mode():
            alone, inside = runner.embed(batch), runner.embed(grown)[: batch.num_seqs]
        runner.shutdown()
        assert (alone - inside).abs().max() <= 1e-6, (modes, float((alone - inside).abs().max()))


@pytest.mark.parametrize("family", ["bert", "mpnet", "qwen2", "qwen3"])
def test_graph_view_computes_any_batch_of_its_shape(zoo: Callable[[str], Path], family: str) -> None:
    """A CUDA graph is captured on one batch and replayed on others of the same shape: the
    captured view may depend on the template's shape only, never on its lengths (on the CPU the
    view is run directly on the new contents, as a replay would)."""
    from toolkit.execution.cuda_graphs import GraphShape, graph_view, padded, write_padded
    from toolkit.execution.packing import pack
    from toolkit.execution.runner import Runner
    from toolkit.models.loader import load_model

    model = load_model(zoo(family), torch.device("cpu"), torch.float32)
    cases = [
        ([list(range(5, 20))], [list(range(30, 37))]),
        ([list(range(5, 14)), [7, 8, 9], [4]], [[5, 6], list(range(20, 28)), [9, 10, 11, 12, 13]]),
        # Five sequences in a shape of eight: two empty sequences before the padding one.
        ([[5] * n for n in (3, 4, 5, 6, 7)], [[6] * n for n in (2, 9, 1, 4, 8)]),
    ]
    for captured_on, replayed in cases:
        template_batch, batch = pack(captured_on), pack(replayed, [0, 1, 0, 0, 0][: len(replayed)])
        shape = GraphShape.fitting(batch)
        assert GraphShape.fitting(template_batch) == shape
        template = padded(template_batch, shape.tokens, shape.seqs, shape.max_seqlen)
        buffer = template.host_buffer().clone()
        write_padded(batch, buffer.numpy(), shape.tokens, shape.seqs)
        for modes in (["mean"], ["cls"], ["lasttoken"]):
            runner = Runner(model, torch.device("cpu"), modes, normalize_output=True)
            with torch.inference_mode():
                expected = runner.embed(batch)
                replay = runner.embed(graph_view(template, buffer))[: batch.num_seqs]
            runner.shutdown()
            difference = float((expected - replay).abs().max())
            assert difference <= 1e-6, (modes, replayed, difference)


# torch.compile's own imports touch torch.jit.script_method, deprecated in this torch.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_compiled_blocks_compute_what_the_eager_forward_does(zoo: Callable[[str], Path], family: str) -> None:
    """The server compiles parts of each layer on CUDA (an encoder's add + LayerNorm steps, a
    decoder's work around attention); CI has no GPU, so the same compiled code runs on the CPU."""
    from toolkit.execution.packing import pack
    from toolkit.execution.runner import Runner
    from toolkit.models.loader import load_model

    model = load_model(zoo(family), torch.device("cpu"), torch.float32)
    runner = Runner(model, torch.device("cpu"), ["mean"], normalize_output=True)
    batches = [pack([[5, 6, 7], [8], list(range(9, 30))]), pack([list(range(40, 47))])]
    with torch.inference_mode():
        eager = [runner.embed(batch) for batch in batches]
        model.module.compile_blocks()
        compiled = [runner.embed(batch) for batch in batches]
    runner.shutdown()
    for before, after in zip(eager, compiled, strict=True):
        assert float((before - after).abs().max()) <= 1e-6
