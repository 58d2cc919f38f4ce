"""CLIP's text side: the BPE tokenizer and the text transformer that turns a prompt into SD's conditioning.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").
`CLIPTokenizer` mirrors OpenAI's `clip/simple_tokenizer.py` with the text cleaning of transformers'
`CLIPTokenizer` (transformers 5, models/clip/tokenization_clip.py: NFC, whitespace runs -> one space, lower
case; OpenAI's ftfy and HTML unescaping are not done, nor transformers 4's ftfy-less fallback, which split CJK
characters apart). `CLIPTextModel` mirrors transformers' `CLIPTextModel` (models/clip/modeling_clip.py) and,
with `projection_dim` set, `CLIPTextModelWithProjection` (SDXL's second encoder: the pooled output goes
through `text_projection`). SDXL conditions on the penultimate layer's states: `output_hidden_states`.

Checkpoint contract: module names equal the keys of the Hub's `text_encoder/model.safetensors`
(`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.0.self_attn.q_proj.weight`,
`text_model.encoder.layers.11.mlp.fc2.bias`, `text_model.final_layer_norm.weight`), so official weights
load with strict=True (plus `text_projection.weight` for the projection variant). The tokenizer reads the
Hub's `tokenizer/` folder (vocab.json + merges.txt, or transformers 5's tokenizer.json) or, with no folder,
the merges file shipped in `assets/`.

Shapes: b batch, n = 77 token positions, d hidden width; input_ids (b, n), hidden states (b, n, d).
"""
import gzip
import json
import re
import sys
import unicodedata
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import hub
from attention import attention

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOS_ID = 49407  # <|endoftext|> in every SD 1.x/2.x vocab (the configs' `eos_token_id: 2` is a legacy error)
MERGES_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"  # OpenAI's, MIT licence

# ----------------------------------------------------------------------------- text cleaning and splitting

# Unicode White_Space, which the tokenizers library's `\s` matches. Python's `\s` also takes \x1c-\x1f.
SPACE = "\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@cache
def unicode_classes() -> tuple[str, str]:
    """`re` character-class bodies for \\p{L} (letters) and \\p{N} (numbers), which stdlib `re` lacks.

    `[^\\W\\d_]` comes close for letters but also matches the non-decimal numbers (½, ², Ⅻ), so we read
    the general category of every code point once (~0.3 s) and write the classes as ranges. Python's
    Unicode tables may be older than the tokenizers library's: code points they leave unassigned split apart.
    """
    ranges = {"L": [], "N": []}
    start, kind = 0, None
    for cp in range(sys.maxunicode + 2):
        k = unicodedata.category(chr(cp))[0] if cp <= sys.maxunicode else None
        k = k if k in ranges else None
        if k != kind:
            if kind is not None:
                ranges[kind].append(f"{re.escape(chr(start))}-{re.escape(chr(cp - 1))}")
            start, kind = cp, k
    return "".join(ranges["L"]), "".join(ranges["N"])


@cache
def word_pattern() -> re.Pattern:
    """OpenAI's split: English contractions, letter runs, single digits, runs of anything else but spaces."""
    letters, numbers = unicode_classes()
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]|[^{SPACE}{letters}{numbers}]+")


def clean(text: str) -> str:
    """transformers' CLIP normalizer: NFC, whitespace runs -> one space, lower case character by character
    (the tokenizers library lowers each character alone, so a final Σ becomes σ, not Python's ς)."""
    text = re.sub(f"[{SPACE}]+", " ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


@cache
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's byte -> character table: BPE runs on strings of 256 printable characters, one per byte.
    Printable Latin-1 bytes stand for themselves; the others (space, controls) map to chr(256 + i)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def shipped_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges from OpenAI's merges file, built as `SimpleTokenizer.__init__` does: 256 byte
    symbols, the same with `</w>`, one symbol per merge (the first 49152 - 256 - 2 = 48,894), the two
    specials: 49,408 entries, identical to the SD repos' `tokenizer/vocab.json`."""
    lines = gzip.open(MERGES_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:49152 - 256 - 2 + 1]]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    symbols += [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {s: i for i, s in enumerate(symbols)}, merges

# ----------------------------------------------------------------------------- tokenizer


class CLIPTokenizer:
    """Text -> token ids: clean, split into words, byte-encode, merge by BPE rank, add BOS/EOS, pad to 77."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS,
                 max_length: int = 77):
        for token in (BOS, EOS, pad_token):
            if token not in vocab:
                raise ValueError(f"CLIPTokenizer: '{token}' is not in the vocabulary")
        self.vocab = dict(vocab)
        self.inverse = {i: s for s, i in self.vocab.items()}
        self.ranks = {tuple(m): i for i, m in enumerate(merges)}  # lower rank = merged earlier
        self.pad_token, self.max_length = pad_token, max_length   # 77: CLIP's context length
        self.added: list[str] = []  # whole-word tokens from add_token (Textual Inversion), after the vocab
        self.vectors: dict[str, list[str]] = {}  # a multi-vector token -> the tokens written in its place
        self.cache: dict[str, list[str]] = {}
        self._update_specials()

    def _update_specials(self):
        # Specials and added tokens are cut out of the raw text before cleaning, as transformers' added tokens
        # are (OpenAI's tokenizer finds <|startoftext|> / <|endoftext|> in its word pattern instead). The pad
        # token is one of them: with SD2's pad '!', transformers (so diffusers) turns every '!' typed in a
        # prompt into id 0, where OpenCLIP, which SD2 was trained with, gives '!</w>' = 256. We match transformers.
        whole = sorted({BOS, EOS, self.pad_token, *self.added}, key=len, reverse=True)
        self.specials = re.compile("(" + "|".join(map(re.escape, whole)) + ")")

    @property
    def bos_token_id(self) -> int:
        return self.vocab[BOS]

    @property
    def eos_token_id(self) -> int:
        return self.vocab[EOS]

    @property
    def pad_token_id(self) -> int:
        return self.vocab[self.pad_token]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def bpe(self, word: str) -> list[str]:
        """Byte-encoded word -> vocab symbols: merge the adjacent pair of lowest rank until none is left."""
        if word not in self.cache:
            parts = [*word[:-1], word[-1] + "</w>"]  # `</w>` marks the end of a word
            while len(parts) > 1:
                best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
                if best not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(parts):  # merge every occurrence of `best`, left to right
                    if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            self.cache[word] = parts
        return self.cache[word]

    def encode(self, text: str) -> list[int]:
        """One text -> [BOS, ids..., EOS], not truncated."""
        byte_char = bytes_to_unicode()
        ids = [self.bos_token_id]
        for n, chunk in enumerate(self.specials.split(text)):
            if n % 2:  # re.split puts the matched specials at odd positions
                ids += [self.vocab[t] for t in self.vectors.get(chunk, [chunk])]
                continue
            for word in word_pattern().findall(clean(chunk)):
                ids += [self.vocab[s] for s in self.bpe("".join(byte_char[b] for b in word.encode("utf-8")))]
        return ids + [self.eos_token_id]

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Texts -> (b, 77) ids: content cut to 75 tokens (EOS stays last), then padded with the pad token."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = []
        for text in texts:
            ids = self.encode(text)
            ids = ids[:self.max_length - 1] + [self.eos_token_id] if len(ids) > self.max_length else ids
            rows.append(ids + [self.pad_token_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def dropped_words(self, text: str) -> str:
        """The (cleaned) text that truncation to 77 tokens cuts off; "" when the prompt fits."""
        return self.decode(self.encode(text)[self.max_length - 1:-1])

    def decode(self, ids) -> str:
        """ids -> cleaned text, without BOS, EOS and pad tokens."""
        byte_char = bytes_to_unicode()
        symbols = []
        for i in map(int, ids):
            if i in (self.bos_token_id, self.eos_token_id, self.pad_token_id):
                continue
            s = self.inverse[i]
            symbols.append("".join(byte_char[b] for b in s.encode("utf-8")) + "</w>" if s in self.added else s)
        char_byte = {c: b for b, c in byte_char.items()}
        text = bytes(char_byte[c] for c in "".join(symbols)).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()  # `</w>` is made of byte characters, so it survives decoding

    def add_token(self, word: str) -> int:
        """Add `word` as one new token (id = old vocab size) for Textual Inversion; returns its id.
        The word is matched exactly (case and all) wherever it appears, like transformers' `add_tokens`."""
        if not word or any(c in word for c in " \t\n\r"):
            raise ValueError(f"add_token: '{word}' must be one non-empty word")
        ids = self.encode(word)[1:-1]
        if len(ids) == 1:
            raise ValueError(f"add_token: '{word}' already is one token (id {ids[0]}); choose a word the tokenizer "
                             f"splits, such as '<{word}>'")
        i = self.vocab.setdefault(word, len(self.vocab))  # a vocab entry BPE never yields keeps its id
        self.inverse[i] = word
        self.added.append(word)
        self._update_specials()
        return i

    def add_vectors(self, word: str, n: int) -> list[int]:
        """A Textual Inversion token of n vectors: `word`, `word_1`, ..., `word_{n-1}` added (diffusers' names), and
        `word` in a text stands for all n (as diffusers' `maybe_convert_prompt` rewrites "<cat>" as
        "<cat> <cat>_1 <cat>_2"). Returns their ids; n = 1 is `add_token`."""
        names = [word] + [f"{word}_{i}" for i in range(1, n)]
        ids = [self.add_token(w) for w in names]
        if n > 1:
            self.vectors[word] = names
        return ids

    # ------------------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path=None, subfolder: str | None = "tokenizer", revision: str | None = None,
                        pad_token: str | None = None) -> "CLIPTokenizer":
        """A Hub id or local folder (pipeline root or the tokenizer folder itself); None -> the shipped
        vocabulary with SD1's pad token (EOS). `pad_token` overrides the folder's (SD2 pads with '!')."""
        if name_or_path is None:
            return cls(*shipped_vocab(), pad_token=pad_token or EOS)
        files = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json"]
        folder = hub.component_dir(name_or_path, subfolder, files, revision)
        config, added = {}, {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            if (folder / name).is_file():
                config |= {k: v for k, v in hub.read_json(folder / name).items() if v is not None}
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = hub.read_json(folder / "vocab.json")
            lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
            merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        elif (folder / "tokenizer.json").is_file():  # transformers 5: vocab and merges inside the BPE model
            data = hub.read_json(folder / "tokenizer.json")
            vocab = data["model"]["vocab"]
            merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in data["model"]["merges"]]
            added |= {t["id"]: t["content"] for t in data.get("added_tokens", []) if not t.get("special")}
        else:
            raise hub.ModelLoadError(f"no tokenizer in '{folder}': expected vocab.json + merges.txt or tokenizer.json")
        # tokens added after the vocabulary (the specials are listed too: BOS, EOS, pad are handled already)
        if (folder / "added_tokens.json").is_file():  # transformers 4's slow tokenizer
            added |= {i: s for s, i in hub.read_json(folder / "added_tokens.json").items() if s not in (BOS, EOS)}
        added |= {int(i): t["content"] for i, t in config.get("added_tokens_decoder", {}).items() if not t.get("special")}
        pad = pad_token or config.get("pad_token") or EOS
        # model_max_length: 77 in the SD repos (a few old files say 1e30, "no limit": CLIP's 77 then); the toy model 32
        max_length = min(int(config.get("model_max_length", 77)), 77)
        tokenizer = cls(vocab, merges, pad_token=pad["content"] if isinstance(pad, dict) else pad, max_length=max_length)
        for i, word in sorted(added.items()):
            if tokenizer.vocab.get(word, tokenizer.vocab_size) != i:
                raise hub.ModelLoadError(f"tokenizer in '{folder}': added token '{word}' has id {i}, expected "
                                         f"{tokenizer.vocab_size}, the next free id")
            tokenizer.add_token(word)
        return tokenizer

    def save_pretrained(self, folder) -> None:
        """Write the Hub's form (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) that
        transformers' CLIPTokenizer loads; added tokens go to `added_tokens_decoder`, as transformers writes them."""
        folder = Path(folder)
        base = {s: i for s, i in self.vocab.items() if s not in self.added}
        merges = sorted(self.ranks, key=self.ranks.get)
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
        decoder = {str(self.vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": t not in self.added}
                   for t in dict.fromkeys([BOS, EOS, self.pad_token, *self.added])}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **special,
                  "added_tokens_decoder": decoder}
        for name, content in [("vocab.json", json.dumps(base, ensure_ascii=False)),
                              ("merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)),
                              ("tokenizer_config.json", json.dumps(config, indent=2)),
                              ("special_tokens_map.json", json.dumps(special, indent=2))]:
            hub.atomic_write(folder / name, lambda p, c=content: p.write_text(c, encoding="utf-8"))

# ----------------------------------------------------------------------------- config and presets


@dataclass(frozen=True)
class TextEncoderConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"          # OpenAI CLIP: quick_gelu; OpenCLIP (SD2): gelu
    vocab_size: int = 49408                 # grows when Textual Inversion adds tokens
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None       # CLIPTextModelWithProjection's text_projection width (SDXL's 2nd: 1280)

    @classmethod
    def from_json(cls, d: dict) -> "TextEncoderConfig":
        """Read transformers' CLIPTextConfig json (`text_encoder/config.json`); missing keys take its defaults.
        Every CLIPTextConfig has a `projection_dim` (512 by default); only the WithProjection model uses it."""
        if d.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise ValueError(f"text encoder config: hidden_act={d['hidden_act']!r}, expected one of {list(ACTIVATIONS)}")
        defaults = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8}  # CLIPTextConfig's
        config = {k: d.get(k, defaults.get(k, v)) for k, v in asdict(cls()).items()}
        projects = "CLIPTextModelWithProjection" in (d.get("architectures") or [])
        return cls(**{**config, "projection_dim": d.get("projection_dim", 512) if projects else None})

    def to_json(self) -> dict:
        """A config.json that transformers' CLIPTextModel (or CLIPTextModelWithProjection) builds the same network
        from."""
        d = {k: v for k, v in asdict(self).items() if k != "projection_dim" or v is not None}
        architecture = "CLIPTextModelWithProjection" if self.projection_dim else "CLIPTextModel"
        return {"architectures": [architecture], "model_type": "clip_text_model", **d,
                "bos_token_id": 49406, "eos_token_id": EOS_ID}  # the real ids: see CLIPTextTransformer.forward

    @classmethod
    def sd15(cls):  # openai/clip-vit-large-patch14's text tower, as in stable-diffusion-v1-5 text_encoder/config.json
        return cls()

    @classmethod
    def sd21(cls):  # OpenCLIP ViT-H/14 text tower with its last of 24 layers dropped ("penultimate layer")
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu")

    @classmethod
    def tiny(cls):  # SD1-like, for tests and CPU runs; the real vocab so the real tokenizer works; an odd
        # MLP width (37) makes a swapped fc1/fc2 shape fail loudly
        return cls(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4)

    @classmethod
    def toy(cls):  # the toy world's model (pretrain.py): captions are short, so 32 positions instead of 77
        return cls(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=32)

    @classmethod
    def tiny_sd2(cls):  # SD2-like: gelu
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu")

    # SDXL has two: text_encoder/ is CLIP ViT-L/14's text tower (= sd15), text_encoder_2/ OpenCLIP ViT-bigG/14's
    @classmethod
    def sdxl_2(cls):  # stabilityai/stable-diffusion-xl-base-1.0, text_encoder_2/config.json
        return cls(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280)

    @classmethod
    def tiny_sdxl_2(cls):  # SDXL-like second encoder, 48 wide (the first is `tiny`, 32 wide), pooled projected to 24
        return cls(hidden_size=48, intermediate_size=61, num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu",
                   projection_dim=24)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's sigmoid approximation of GELU


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # transformers' "gelu" is the exact (erf) one
PRESETS = {"sd15": TextEncoderConfig.sd15(), "sd21": TextEncoderConfig.sd21(), "sdxl_2": TextEncoderConfig.sdxl_2(),
           "tiny": TextEncoderConfig.tiny(), "tiny_sd2": TextEncoderConfig.tiny_sd2(),
           "tiny_sdxl_2": TextEncoderConfig.tiny_sdxl_2()}

# ----------------------------------------------------------------------------- transformer blocks (text and vision)


class CLIPAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x, causal: bool):
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=causal))


class CLIPMLP(nn.Module):
    def __init__(self, hidden: int, mlp: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1, self.fc2 = nn.Linear(hidden, mlp), nn.Linear(mlp, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, hidden: int, heads: int, mlp: int, act: str, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(hidden, heads)
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = CLIPMLP(hidden, mlp, act)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x, causal: bool):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The layer stack; `causal` is True for text (token i sees tokens <= i), False for image patches."""

    def __init__(self, hidden: int, heads: int, mlp: int, layers: int, act: str, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(hidden, heads, mlp, act, eps) for _ in range(layers))

    def forward(self, x, causal: bool, ckpt: bool = False, hidden_states: list | None = None):
        """`hidden_states`, when given, collects the input and each layer's output (transformers' hidden_states)."""
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            x = checkpoint(layer, x, causal, use_reentrant=False) if ckpt else layer(x, causal)
        if hidden_states is not None:
            hidden_states.append(x)
        return x

# ----------------------------------------------------------------------------- the text model


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, positions: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden)
        self.position_embedding = nn.Embedding(positions, hidden)  # learned, one per position

    def forward(self, input_ids, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # on the fly: no buffer to load
        return inputs_embeds + self.position_embedding(positions)


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg.vocab_size, cfg.hidden_size, cfg.max_position_embeddings)
        self.encoder = CLIPEncoder(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                                   cfg.num_hidden_layers, cfg.hidden_act, cfg.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, inputs_embeds=None, ckpt: bool = False, hidden_states: list | None = None):
        x = self.encoder(self.embeddings(input_ids, inputs_embeds), causal=True, ckpt=ckpt, hidden_states=hidden_states)
        x = self.final_layer_norm(x)
        # Pool at the first EOS. OpenAI (and transformers when a config says `eos_token_id: 2`) take
        # input_ids.argmax(), which is the same position while EOS 49407 is the largest id, but points at the
        # new token once Textual Inversion adds ids > 49407. With SD1's pad = EOS the first one is the real end.
        eos = (input_ids == EOS_ID).int().argmax(dim=-1)
        return x, x[torch.arange(x.shape[0], device=x.device), eos]


def hub_keys(sd: dict) -> dict:
    """transformers 5 saves the keys without `text_model.`; some transformers 4 files carry the
    `embeddings.position_ids` buffer (always arange(77)), which we compute instead."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in sd.items()
            if not k.endswith("embeddings.position_ids")}


class CLIPTextModel(nn.Module):
    """input_ids (b, 77) -> (last_hidden_state (b, 77, d), pooled (b, d)). SD1/2 condition on the former.
    With `projection_dim` the pooled output goes through `text_projection` (b, p): transformers'
    CLIPTextModelWithProjection's `text_embeds`. `output_hidden_states` adds a third item, the embeddings and
    every layer's output (num_hidden_layers + 1 of them, before the final LayerNorm): SDXL reads [-2].
    `inputs_embeds` (b, 77, d) replaces the token-embedding lookup (pseudo-words); ids still locate the EOS."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids, inputs_embeds=None, output_hidden_states: bool = False):
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        states = [] if output_hidden_states else None
        x, pooled = self.text_model(input_ids, inputs_embeds, ckpt, states)
        if self.config.projection_dim:
            pooled = self.text_projection(pooled)
        return (x, pooled, tuple(states)) if output_hidden_states else (x, pooled)

    # ------------------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path, subfolder="text_encoder", dtype=torch.float32, device="cpu", variant=None,
                        revision=None) -> "CLIPTextModel":
        """A Hub id or a local folder (pipeline root or the text_encoder folder itself) -> model in eval mode."""
        stems = ["model", "pytorch_model"]
        folder = hub.fetch_component(name_or_path, subfolder, stems, variant, revision)
        config = TextEncoderConfig.from_json(hub.read_json(folder / "config.json"))
        return hub.load_model(lambda: cls(config), folder, stems, variant, dtype, device, fix_keys=hub_keys)

    def save_pretrained(self, folder, dtype=None) -> None:
        """Write config.json + model.safetensors in the Hub's form (keys under `text_model.`). The config says
        `dtype: float32`: transformers loads a model in the dtype its config names, so a file stored in half
        precision would otherwise meet diffusers' float32 UNet as a half text encoder and fail in the pipeline."""
        hub.save_model(self, folder, {**self.config.to_json(), "dtype": "float32"}, "model.safetensors", dtype)
