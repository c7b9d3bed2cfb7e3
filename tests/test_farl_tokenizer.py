"""The offline CLIP tokenizer (lafs_jax.input.tokenizer) against open_clip's (test-only reference).

open_clip's package __init__ imports torchvision (broken beside the CPU torch here), so its
`tokenizer.py` is loaded alone by file path; it needs ftfy, regex and torch only.
"""
import hashlib
import importlib.util
import os
import random

import numpy as np

from lafs_jax.input import tokenizer as tok_lib


def _open_clip_tokenizer():
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None, ("open_clip_torch, the reference tokenizer, is not installed: "
                              "pip install --no-deps -r requirements-test-nodeps.txt")
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_only", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _strings(n=300, seed=0):
    rng = random.Random(seed)
    words = ["face", "photo", "smiling", "woman", "man's", "don't", "we'll", "they're", "I've", "GLASSES",
             "beard", "2022", "3.14", "#hashtag", "@user", "e-mail", "x-ray", "naïve", "café", "Ærøskøbing",
             "東京", "顔写真", "Привет", "مرحبا", "😀", "👩‍🔬", "&amp;", "&lt;b&gt;", "&quot;", "!!!", "?!", "...",
             "(", ")", "[face]", "{x}", "--", "_under_", "ＦＵＬＬ", "ﬁne", "Â£5", "can’t", "“quoted”", "tab\there",
             "new\nline", "  spaces  ", "x" * 40, "supercalifragilisticexpialidocious", "ß", "İstanbul", "ǅ",
             "<|endoftext|>", "<|startoftext|>", "<end_of_text>", "1234567", "a1b2c3", "«»", "½", "™", "°C", "\u200b", "é" * 5]
    out = ["", " ", "a photo of a face", "A Photo Of A FACE with eyeglasses.", "&amp;amp; nested entities"]
    while len(out) < n:
        k = rng.choice([1, 3, 8, 20, 60])
        out.append(" ".join(rng.choice(words) for _ in range(k)))
    return out


def test_vocabulary_file_is_the_recorded_one():
    with open(tok_lib.VOCAB_FILE, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == tok_lib.VOCAB_SHA256
    tok = tok_lib.default_tokenizer()
    assert len(tok.encoder) == tok_lib.VOCAB_SIZE == 49408
    assert (tok.sot, tok.eot) == (49406, 49407)


def test_ids_match_open_clip_on_hundreds_of_strings():
    ref = _open_clip_tokenizer().SimpleTokenizer()
    texts = _strings()
    ours, truncated = tok_lib.default_tokenizer().tokenize(texts, context_length=77)
    theirs = ref(texts, context_length=77).numpy()
    bad = [t for t, a, b in zip(texts, ours, theirs) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} strings differ, e.g. {bad[:3]!r}"
    assert truncated.any() and not truncated.all()
    assert (ours[truncated, -1] == 49407).all()


def test_truncation_keeps_the_end_token_and_short_contexts_work():
    tok = tok_lib.default_tokenizer()
    ids, truncated = tok.tokenize(["one two three four five six", "one"], context_length=5)
    assert truncated.tolist() == [True, False]
    assert ids[0].tolist() == [49406, *tok.encode("one two three")[:3], 49407]
    assert ids[1, :3].tolist() == [49406, tok.encode("one")[0], 49407] and ids[1, 3:].tolist() == [0, 0]
    assert tok.decode(tok.tokenize("A  Photo of a FACE!")[0][0]) == "a photo of a face !"
