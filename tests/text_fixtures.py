"""Tiny tokenizer files made inside the tests (no downloads): a sentencepiece model (T5), a `tokenizer.json` (UMT5)
and a `vocab.json` + `merges.txt` pair (CLIP), each laid out like the published ones."""

import json
import random
from pathlib import Path

import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

WORDS = (
    "the quick brown fox jumps over lazy dog café naïve résumé déjà vu photo of a cat sitting on mat high quality "
    "detailed ünïcödé tèxt with àccents emoji 😀 🐱 漢字 かな restoration hazy rainy snowy blurry dark images videos "
    "light rain snow blur haze clean sharp don't it's we're 2024 3.5 x4"
).split()


def corpus(lines: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(lines)]


def make_spiece(folder: Path) -> Path:
    """A unigram sentencepiece model with T5's special ids: <pad> 0, </s> 1, <unk> 2, no <s>."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(corpus()))
    prefix = folder / "spiece"
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(prefix), vocab_size=80, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return folder / "spiece.model"


def make_umt5_tokenizer_json(path: Path) -> Path:
    """A unigram `tokenizer.json` shaped like google/umt5-xxl's: Metaspace pre-tokenizer, `</s>` appended."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizers.Tokenizer(models.Unigram())
    tokenizer.normalizer = tokenizers.normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.save(str(path))
    return path


def make_clip_bpe(folder: Path) -> tuple[Path, Path]:
    """`vocab.json` + `merges.txt` laid out like CLIP's: the 256 byte symbols, the same with `</w>`, the merged
    symbols in merge order, then `<|startoftext|>` and `<|endoftext|>` as the two highest ids."""
    folder.mkdir(parents=True, exist_ok=True)
    trainer_tokenizer = tokenizers.Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    trainer_tokenizer.normalizer = tokenizers.normalizers.Lowercase()
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>"
    )
    trainer_tokenizer.train_from_iterator(corpus(), trainer)
    saved = json.loads(trainer_tokenizer.to_str())["model"]["merges"]  # [a, b] pairs, or "a b" in older versions
    merges = [tuple(pair.split(" ") if isinstance(pair, str) else pair) for pair in saved]
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += [a + b for a, b in merges if a + b not in vocab]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    return folder / "vocab.json", folder / "merges.txt"
