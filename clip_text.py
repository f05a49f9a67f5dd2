"""CLIP's transformer and text tower (Radford et al. 2021), and OpenAI's byte-level BPE tokenizer.

One transformer serves two text towers: SD v1.5's text encoder (the ViT-L/14 text tower: `CLIPTextModel`
turns (B, 77) token ids into the (B, 77, 768) last hidden state that conditions the UNet) and the text
tower of CLIP ViT-B/16 in clip_image.py (width 512, pooled at the end-of-text token, then projected).
The encoder layers serve the image tower too (not causal there). `CLIPTokenizer` turns prompts into
(B, 77) token ids. Parameter names match transformers' / the hub's files (`text_model.embeddings...`),
so those state dicts load with strict=True.
"""
import html
import json
import math
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Model


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass
class CLIPEncoderConfig:
    """A CLIP transformer's hyper-parameters (text or image tower), named like transformers'
    `config.json` keys; defaults are SD v1.5's text encoder (and ViT-B/16's image tower)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} does not divide hidden_size "
                             f"{self.hidden_size}")


@dataclass
class CLIPTextConfig(CLIPEncoderConfig):
    """A text tower: the transformer's fields and the token and position tables; defaults are SD v1.5's."""

    vocab_size: int = 49408
    max_position_embeddings: int = 77


class CLIPAttention(nn.Module):
    """Multi-head self-attention: causal in the text towers, over all tokens in the image tower."""

    def __init__(self, config: CLIPEncoderConfig, causal: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.causal = causal
        C = config.hidden_size
        # Same order as transformers, so even the state_dict's key order matches.
        self.k_proj = nn.Linear(C, C)
        self.v_proj = nn.Linear(C, C)
        self.q_proj = nn.Linear(C, C)
        self.out_proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, nh, T, hs), scale hs**-0.5
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: CLIPEncoderConfig, causal: bool):
        super().__init__()
        self.self_attn = CLIPAttention(config, causal)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of transformer blocks."""

    def __init__(self, config: CLIPEncoderConfig, causal: bool):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, causal) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C) through the first `num_layers` blocks (all by default)."""
        for layer in self.layers[:num_layers]:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    """CLIP's text tower: token + position embeddings, causal transformer, final LayerNorm (no padding
    mask, no pooling)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.embeddings = nn.ModuleDict(dict(
            token_embedding=nn.Embedding(config.vocab_size, C),
            position_embedding=nn.Embedding(config.max_position_embeddings, C),
        ))
        self.encoder = CLIPEncoder(config, causal=True)
        self.final_layer_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden_size) last hidden state after final_layer_norm."""
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding(positions)  # (B, T, C)
        return self.final_layer_norm(self.encoder(x))


def end_of_text_states(hidden: torch.Tensor, input_ids: torch.Tensor, end_id: int) -> torch.Tensor:
    """(B, T, C) hidden states -> (B, C): each row's state at its first end-of-text token, the one that
    has attended to the whole text (the attention is causal). CLIP's text feature before its projection
    (Radford et al. 2021, Sec. 2.4); transformers' pooling for ids padded with the end token."""
    first_end = (input_ids == end_id).int().argmax(dim=1)  # (B,)
    return hidden[torch.arange(len(hidden), device=hidden.device), first_end]


class CLIPTextModel(nn.Module):
    """SD v1.x's text encoder: the text tower under transformers' name `text_model`; its last hidden
    state (B, 77, 768) conditions the UNet."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden_size) last hidden state after final_layer_norm."""
        return self.text_model(input_ids)


# ----------------------------------------------------------------------------------------------
# Tokenizer

START, END = "<|startoftext|>", "<|endoftext|>"
# Prefixes tried, in order, at each position before the letter/number/other classes (OpenAI's pattern).
SPECIALS_AND_CONTRACTIONS = (START, END, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable character table: printable Latin-1 bytes map to
    themselves, the other 68 bytes to chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_ENCODER = bytes_to_unicode()


def clean_text(text: str) -> str:
    """html-unescape (twice, as OpenAI does), NFC, collapse whitespace runs to one space, strip, lowercase."""
    text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)))
    return " ".join(text.split()).lower()


def _char_class(ch: str) -> str:
    """'L' letter, 'N' number, 'S' whitespace, 'P' anything else: the classes of OpenAI's split pattern."""
    if ch.isspace():
        return "S"
    major = unicodedata.category(ch)[0]
    return major if major in "LN" else "P"


def split_words(text: str) -> list[str]:
    """Split cleaned text as OpenAI's regex does, without the `regex` package:
    `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`,
    i.e. special tokens, contractions, letter runs, single number characters, runs of other
    non-space characters; whitespace is dropped."""
    words, i = [], 0
    while i < len(text):
        cls = _char_class(text[i])
        if cls == "S":
            i += 1
            continue
        prefix = next((p for p in SPECIALS_AND_CONTRACTIONS if text.startswith(p, i)), None)
        if prefix:
            j = i + len(prefix)
        else:
            j = i + 1
            while cls != "N" and j < len(text) and _char_class(text[j]) == cls:
                j += 1
        words.append(text[i:j])
        i = j
    return words


def _read_text(path: str | os.PathLike, what: str) -> str:
    """The file's text; one that is not UTF-8 named in the error (Python's own names no file)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"CLIP {what} file {path} is not UTF-8 text: {e}") from None


class CLIPTokenizer:
    """OpenAI CLIP byte-level BPE tokenizer with SD v1 padding (no ftfy, like transformers' fast one)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = 77):
        self.vocab = vocab
        self.bpe_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.max_length = max_length
        # Every symbol BPE can produce must have an id; check once so encode() never meets an unknown.
        symbols = {START, END, *BYTE_ENCODER.values(), *(s + "</w>" for s in BYTE_ENCODER.values())}
        missing = sorted((symbols | {a + b for a, b in self.bpe_ranks}) - vocab.keys())
        if missing:
            raise ValueError(f"CLIP vocab lacks {len(missing)} symbols its byte table/merges need, e.g. {missing[:3]}")
        self.start_id, self.end_id = vocab[START], vocab[END]
        self._cache = {START: (START,), END: (END,)}  # byte-encoded word -> its BPE symbols

    @classmethod
    def bytes_only(cls, max_length: int = 77) -> "CLIPTokenizer":
        """A tokenizer without merges and without a vocabulary file: the symbols BPE can make without
        merges, numbered in turn. Enough for the empty prompt of a model with random weights (its ids
        are not CLIP's)."""
        symbols = [START, END, *BYTE_ENCODER.values(), *(s + "</w>" for s in BYTE_ENCODER.values())]
        return cls({s: i for i, s in enumerate(symbols)}, [], max_length)

    @classmethod
    def from_files(cls, vocab_json_path: str | os.PathLike, merges_txt_path: str | os.PathLike, max_length: int = 77):
        """Load the hub's `tokenizer/vocab.json` and `tokenizer/merges.txt`."""
        try:
            vocab = json.loads(_read_text(vocab_json_path, "vocab"))
        except json.JSONDecodeError as e:
            raise ValueError(f"CLIP vocab file {vocab_json_path} is not valid JSON: {e}") from None
        if not (isinstance(vocab, dict) and all(isinstance(v, int) for v in vocab.values())):
            raise ValueError(f"CLIP vocab file {vocab_json_path} must hold a JSON object of token -> integer id")
        merges = []
        for n, line in enumerate(_read_text(merges_txt_path, "merges").splitlines(), start=1):
            if line.startswith("#version") or not line.strip():
                continue
            pair = line.split()
            if len(pair) != 2:
                raise ValueError(f"CLIP merges file {merges_txt_path} line {n}: expected 2 symbols, got {line!r}")
            merges.append(tuple(pair))
        if not merges:
            raise ValueError(f"CLIP merges file {merges_txt_path} holds no merges")
        return cls(vocab, merges, max_length)

    def bpe(self, word: str) -> tuple[str, ...]:
        """Merge the byte-encoded `word` (its last symbol marked `</w>`) pair by pair, lowest rank first."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.bpe_ranks.get(pair, math.inf))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of `best`, left to right
                if tuple(symbols[i : i + 2]) == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = tuple(symbols)
        return self._cache[word]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end tokens, padding or truncation."""
        ids = []
        for word in split_words(clean_text(text)):
            ids.extend(self.vocab[s] for s in self.bpe("".join(BYTE_ENCODER[b] for b in word.encode("utf-8"))))
        return ids

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """(B, max_length) ids: start, text (truncated), end, then end-token padding, as SD v1 does."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = [self.start_id, *self.encode(text)[: self.max_length - 2], self.end_id]
            rows.append(ids + [self.end_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)
