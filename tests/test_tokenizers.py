"""Our tokenizers (text.py) against transformers' tokenizers built from the same tiny files, on tricky strings."""

import pytest
import torch
from text_fixtures import make_clip_bpe, make_spiece, make_umt5_tokenizer_json
from transformers import CLIPTokenizer as ReferenceCLIPTokenizer
from transformers import PreTrainedTokenizerFast

import text

TRICKY = [
    "",
    "A photo of a CAT",
    "  multiple   spaces\tand\nnew\r\nlines  ",
    "Café naïve résumé déjà vu",
    "e\u0301 combining accent, a\u00a0no-break space, \u200bzero width",
    "emoji 😀🐱 and 漢字かな",
    "don't it's we're THEY'LL",
    "3.5x4 in 2024!!! ... ???",
    "ﬁ ligature and ＡＢＣ full width",
    "&amp; &lt;b&gt;html&lt;/b&gt; &#39;quoted&#39;",
    "snowy " * 80,  # far past every length limit
    "x" * 300,  # one long word
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    vocab, merges = make_clip_bpe(root / "clip")
    return {
        "spiece": make_spiece(root / "t5"),
        "tokenizer_json": make_umt5_tokenizer_json(root / "umt5" / "tokenizer.json"),
        "clip_folder": root / "clip",
        "vocab": vocab,
        "merges": merges,
    }


def _reference(tokenizer, texts, length):
    out = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


@pytest.mark.parametrize("length", [16, 64])
def test_t5_sentencepiece_matches_transformers(files, length):
    pytest.importorskip("google.protobuf", reason="transformers reads spiece.model through protobuf")
    from transformers import T5Tokenizer as ReferenceT5Tokenizer

    reference = ReferenceT5Tokenizer.from_pretrained(str(files["spiece"].parent), extra_ids=0)
    ids, mask = text.T5Tokenizer(files["spiece"])(TRICKY, length)
    ref_ids, ref_mask = _reference(reference, TRICKY, length)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    # every text ends with </s> (1), also when truncated; padding is <pad> (0)
    last = mask.sum(dim=1) - 1
    assert (ids[torch.arange(len(TRICKY)), last] == 1).all()
    assert ids[0].tolist() == [1] + [0] * (length - 1)
    assert mask[-2].all()  # the long text fills the whole length


@pytest.mark.parametrize("length", [24, 96])
def test_umt5_tokenizer_json_matches_transformers(files, length):
    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(files["tokenizer_json"]), pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    ids, mask = text.UMT5Tokenizer(files["tokenizer_json"])(TRICKY, length)
    ref_ids, ref_mask = _reference(reference, [text.wan_clean(t) for t in TRICKY], length)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    last = mask.sum(dim=1) - 1
    assert (ids[torch.arange(len(TRICKY)), last] == 1).all()  # </s> kept under truncation
    assert mask[-2].all()


def test_wan_clean():
    assert text.wan_clean("  a\t\tb \n c  ") == "a b c"
    assert text.wan_clean("&amp;lt;tag&amp;gt; &quot;x&quot;") == '<tag> "x"'  # unescaped twice, as Wan does
    assert text.wan_clean("") == ""


def test_clip_bpe_matches_transformers(files):
    reference = ReferenceCLIPTokenizer.from_pretrained(str(files["clip_folder"]), pad_token="<|endoftext|>")
    tokenizer = text.CLIPTokenizer(files["vocab"], files["merges"])
    texts = TRICKY + ["literal <|endoftext|> token"]
    ids, mask = tokenizer(texts)
    ref_ids, ref_mask = _reference(reference, texts, 77)
    assert ids.shape == (len(texts), 77)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    start, end = reference.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    assert (ids[:, 0] == start).all()
    last = mask.sum(dim=1) - 1
    assert (ids[torch.arange(len(texts)), last] == end).all()  # kept under truncation
    # padding is <|endoftext|> too, so the first end token is also the first maximum (CLIP's pooled position);
    # a literal "<|endoftext|>" inside a prompt becomes that token, as in transformers, and moves the maximum
    assert torch.equal(ids[:-1].argmax(dim=1), last[:-1]) and ids[-1].argmax() < last[-1]
    assert ids[0, :3].tolist() == [start, end, end] and mask[0].sum() == 2
    assert mask[-3].all()  # "snowy " * 80 fills all 77 positions


def test_too_short_length_raises(files):
    with pytest.raises(ValueError, match="too short|length"):
        text.CLIPTokenizer(files["vocab"], files["merges"])(["a photo"], 1)
