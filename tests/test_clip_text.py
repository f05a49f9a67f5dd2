"""clip_text.py against transformers (tokenizer on the real CLIP vocabulary, model on small random configs)."""
import json
import random
import re

import pytest
import torch
import transformers

from clip_text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


@pytest.fixture(scope="module")
def ours(clip_vocab_dir):
    return CLIPTokenizer.from_files(clip_vocab_dir / "vocab.json", clip_vocab_dir / "merges.txt")


@pytest.fixture(scope="module")
def hf_ids(clip_vocab_dir):
    """transformers' (tokenizers-backed, no ftfy) CLIPTokenizer with SD v1 padding, as a list of id lists."""
    tok = transformers.CLIPTokenizer(vocab=str(clip_vocab_dir / "vocab.json"), merges=str(clip_vocab_dir / "merges.txt"))
    return lambda texts: tok(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]


# ----------------------------------------------------------------------------------------------
# Tokenizer

FRAGMENTS = [
    "a photo of a cat", "An Astronaut riding a HORSE", "oil painting, trending on artstation", "Hello!!!", "...",
    "(masterpiece:1.2)", "[[best quality]]", "--ar 16:9", "#hashtag", "@user", "e-mail@example.com", "C++", "$5.99",
    "100%", "3.14159", "2024-01-01", "1,000,000", "x²", "½", "Ⅻ", "٣٤", "１２３", "ＡＢＣ", "no.7", "R2-D2",
    "don't", "I'LL", "she's", "they're", "we've", "I'm", "you'd", "'s", "''", "rock'n'roll", "O'Neil's",
    "café", "cafe\u0301", "naïve", "Ångström", "Straße", "ﬁne", "İstanbul", "ǅemal", "Ελληνικά", "Москва",
    "東京タワー", "北京", "한국어", "ภาษาไทย", "हिन्दी", "العربية", "עברית", "😀", "👩\u200d👩\u200d👧", "👍🏽", "🇫🇷", "❤️",
    "“quoted”", "‘single’", "«guillemets»", "—", "…", "→", "©", "™", "\\back\\slash", "/path/to", "<tag>", "<|",
    "|>", "{json: 1}", "~tilde~", "^caret", "a_b_c", "`code`", "\x00", "\x7f", "\u200b", "\ufeff", "\U0001d400",
]
SEPARATORS = [" ", "  ", "\t", "\n", " \n\t ", "", ",", "\r\n", "\u00a0", "\u3000", "\u2009", "\u2028"]


def _prompts() -> list[str]:
    """A few hundred prompts mixing the fragments above; the first ones exercise the edges directly."""
    rng = random.Random(0)
    prompts = ["", " ", "\t\n  \r", "  leading and trailing  ", "<|startoftext|>", "x <|endoftext|> y",
               " ".join(FRAGMENTS), "word " * 100, "a" * 300, "😀" * 80]
    prompts += FRAGMENTS
    for _ in range(300):
        pieces = rng.choices(FRAGMENTS, k=rng.randint(1, 12))
        text = "".join(p + rng.choice(SEPARATORS) for p in pieces)
        prompts.append(text.upper() if rng.random() < 0.1 else text)
    return prompts


def test_tokenizer_matches_transformers_on_real_vocab(ours, hf_ids):
    prompts = _prompts()
    assert len(prompts) > 350
    expected = hf_ids(prompts)
    got = ours(prompts)
    assert got.dtype == torch.long and got.shape == (len(prompts), 77)
    mismatches = [(p, g, e) for p, g, e in zip(prompts, got.tolist(), expected) if g != e]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]}"
    assert len(ours.encode(" ".join(FRAGMENTS))) > 75, "the over-long prompt does not exercise truncation"


def test_known_ids_empty_prompt_and_encode(ours):
    assert ours("").tolist() == [[49406] + [49407] * 76]
    assert ours("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ours.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert ours(["a", "b"]).shape == (2, 77) and ours([]).shape == (0, 77)


def test_html_entities_are_unescaped_like_openai(ours, hf_ids):
    # transformers' fast tokenizer skips OpenAI's html.unescape: compare with the unescaped text.
    assert ours("&amp;").tolist() == hf_ids(["&"])
    assert ours("fish &amp;amp; chips &lt;3 &#233;t&eacute;").tolist() == hf_ids(["fish & chips <3 été"])


def test_openai_text_cleaning_where_transformers_differs(ours, hf_ids):
    """Two deliberate deviations from transformers' fast tokenizer, both following OpenAI's Python cleaning:
    str.lower() turns a word-final capital sigma into 'ς' (tokenizers lowercases per character: 'σ'), and
    str.split() treats the separators \\x1c-\\x1f as whitespace (tokenizers' \\s does not)."""
    assert ours("ΟΔΟΣ ΣΑΣ").tolist() == hf_ids(["οδος σας"])
    assert ours("a\x1cb\x1fc").tolist() == hf_ids(["a b c"])


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_tokenizer_file_errors_name_the_file(tmp_path, clip_vocab_dir):
    vocab, merges = clip_vocab_dir / "vocab.json", clip_vocab_dir / "merges.txt"
    missing = tmp_path / "nope.json"
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(str(missing))):
        CLIPTokenizer.from_files(missing, merges)
    bad_json = _write(tmp_path / "bad.json", '{"a": 1,')
    with pytest.raises(ValueError, match=re.escape(str(bad_json)) + ".*JSON"):
        CLIPTokenizer.from_files(bad_json, merges)
    not_a_dict = _write(tmp_path / "list.json", "[1, 2]")
    with pytest.raises(ValueError, match=re.escape(str(not_a_dict))):
        CLIPTokenizer.from_files(not_a_dict, merges)
    empty = _write(tmp_path / "empty.txt", "#version: 0.2\n")
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ".*no merges"):
        CLIPTokenizer.from_files(vocab, empty)
    bad_line = _write(tmp_path / "bad_line.txt", "#version: 0.2\ni n\nabc\n")
    with pytest.raises(ValueError, match=re.escape(str(bad_line)) + ".*line 3"):
        CLIPTokenizer.from_files(vocab, bad_line)
    not_utf8 = tmp_path / "latin1.json"
    not_utf8.write_bytes(b'{"\xe9": 1}')
    with pytest.raises(ValueError, match=re.escape(str(not_utf8))):
        CLIPTokenizer.from_files(not_utf8, merges)
    small_vocab = _write(tmp_path / "small.json", json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    with pytest.raises(ValueError, match="lacks"):
        CLIPTokenizer.from_files(small_vocab, merges)


# ----------------------------------------------------------------------------------------------
# Model

def _hf_state_dict_as_hub_names(model) -> dict:
    """The hub's text_encoder names (`text_model.*`), which transformers >= 5 no longer uses itself."""
    return {k if k.startswith("text_model.") else "text_model." + k: v
            for k, v in model.state_dict().items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("seq_len", [77, 9])
def test_model_matches_transformers(hidden_act, seq_len):
    small = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_hidden_layers=3, max_position_embeddings=77, hidden_act=hidden_act, layer_norm_eps=1e-5)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**small, bos_token_id=0, eos_token_id=1, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in ref.parameters():  # make LayerNorm scales/biases and all biases non-trivial
            p.add_(0.1 * torch.randn_like(p))
    model = CLIPTextModel(CLIPTextConfig(**small)).eval()
    model.load_state_dict(_hf_state_dict_as_hub_names(ref), strict=True)

    input_ids = torch.randint(0, small["vocab_size"], (3, seq_len))
    with torch.no_grad():
        expected = ref(input_ids).last_hidden_state
        got = model(input_ids)
    assert got.shape == expected.shape == (3, seq_len, 64)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4 * expected.abs().max().item(), f"max abs diff {diff:.3g}"


def test_model_rejects_unknown_activation_and_long_input():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")
    model = CLIPTextModel(CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                         num_hidden_layers=1, max_position_embeddings=4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 5, dtype=torch.long))
