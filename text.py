"""Text conditioning: prompts -> text-encoder states for FLUX and Wan, with the tokenizers and a disk cache.

    txt, pooled = flux_text(["", "a photo"], "ckpt/FLUX.1-dev", length=512, device="cuda", dtype=torch.bfloat16,
                            cache_dir="cache/text")      # [B, 512, 4096], [B, 768]
    context = wan_text([""], "ckpt/Wan2.1-T2V-1.3B", length=512, device="cuda", dtype=torch.bfloat16)   # [B, 512, 4096]

FLUX (as its pipelines do): T5-v1.1-XXL states for the padded ids WITHOUT an attention mask (padding tokens are
attended to and their states are kept), plus CLIP-L's pooled vector. FLUX.1-dev uses length 512, schnell 256.
Wan (as its pipelines do): UMT5-XXL states computed WITH the attention mask, then zeroed past each text's length.
Wan's official length is 512; the paper's authors used 226 (their prompt banks have 226 tokens).

The encoders are multi-GB, so each call loads one encoder at a time, runs every text that is not cached yet in one
batch, and frees it. With `cache_dir`, each text's outputs are stored in one safetensors file (written atomically)
whose name is a digest of: the backbone, the model files (resolved path, size and modification time of every
weight and tokenizer file read), the text, the length and the dtype. Path/size/mtime rather than a content digest:
it costs nothing on 10 GB files and any replaced or edited file misses; a copied snapshot misses too (recomputed
once, never wrong). When every requested text is cached, no encoder is loaded at all.

The tokenizers live here, not in the model files, because they are the string side of this conversion (the model
files stay pure torch):
- T5 (FLUX `tokenizer_2/spiece.model`): sentencepiece; `</s>` appended, truncated to the length keeping `</s>`,
  padded with `<pad>` (0). Literal special-token strings inside a prompt ("</s>", "<extra_id_0>") are split as
  text here, whereas transformers' tokenizer maps them to their special ids.
- UMT5 (Wan `google/umt5-xxl/tokenizer.json`): the `tokenizers` library with the file's own normalizer and
  post-processor (which appends `</s>`), padded with `<pad>`. Prompts are first cleaned as Wan does (HTML entities
  unescaped twice, whitespace runs collapsed), except that Wan's `ftfy.fix_text` is not applied (ftfy is not a
  dependency: prompts with mojibake, curly quotes or other text ftfy repairs may tokenize differently).
- CLIP (FLUX `tokenizer/vocab.json` + `merges.txt`): byte-level BPE with the `</w>` end-of-word suffix, after NFC,
  whitespace collapsing and lower-casing, split by CLIP's regex; `<|startoftext|>` ... `<|endoftext|>`, truncated to
  77 keeping the end token, padded with `<|endoftext|>` (the pad token of FLUX's tokenizer_config.json). ftfy is
  not applied here either.
"""

import hashlib
import html
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import sentencepiece
import tokenizers
import torch
from tokenizers import normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from model import clip, t5
from weights import CheckpointError, build, find_file, read_state_dict, save_safetensors

# The published architectures; module attributes so that tests can point them at tiny models.
FLUX_T5 = t5.CONFIGS["t5-v1_1-xxl"]
FLUX_CLIP = clip.CONFIGS["clip-l"]
WAN_UMT5 = t5.CONFIGS["umt5-xxl"]

CLIP_LENGTH = 77
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_FILE = "google/umt5-xxl/tokenizer.json"


# ---------------------------------------------------------------------------------------------- tokenizers


def _pad(rows: list[list[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists (each at most `length` long) -> ids [B, length] and mask [B, length] (1 = token)."""
    if any(len(row) > length for row in rows):
        raise ValueError(f"length {length} is too short to hold the special tokens")
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


class T5Tokenizer:
    """T5's sentencepiece tokenizer: texts -> (ids [B, length], mask [B, length]), each text ending with `</s>`."""

    def __init__(self, spiece_model: str | os.PathLike):
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(spiece_model))
        self.eos_id, self.pad_id = self.processor.piece_to_id("</s>"), self.processor.piece_to_id("<pad>")
        if self.processor.unk_id() in (self.eos_id, self.pad_id):  # unknown pieces map to <unk>
            raise ValueError(f"{spiece_model}: no </s> or no <pad> piece (not T5's sentencepiece model)")

    def __call__(self, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.processor.encode(text)[: length - 1] + [self.eos_id] for text in texts]
        return _pad(rows, length, self.pad_id)


def wan_clean(text: str) -> str:
    """Wan's prompt cleaning without ftfy: HTML entities unescaped (twice), whitespace runs -> one space, stripped."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class UMT5Tokenizer:
    """UMT5's tokenizer from `tokenizer.json`: texts -> (ids [B, length], mask [B, length]), Wan's cleaning first."""

    def __init__(self, tokenizer_json: str | os.PathLike):
        self.tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_id, eos_id = self.tokenizer.token_to_id("<pad>"), self.tokenizer.token_to_id("</s>")
        if self.pad_id is None or self.tokenizer.encode("").ids != [eos_id]:
            raise ValueError(f"{tokenizer_json}: no <pad> token, or `</s>` is not appended (not UMT5's tokenizer)")

    def __call__(self, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The library truncates the text so that the special tokens added by the post-processor (`</s>`) still fit.
        self.tokenizer.enable_truncation(max_length=length)
        encodings = self.tokenizer.encode_batch([wan_clean(text) for text in texts], add_special_tokens=True)
        return _pad([encoding.ids for encoding in encodings], length, self.pad_id)


# CLIP's pre-split: its special tokens, English contractions, runs of letters, single digits, runs of other symbols.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_START, CLIP_END, CLIP_PAD = "<|startoftext|>", "<|endoftext|>", "<|endoftext|>"


class CLIPTokenizer:
    """CLIP's byte-level BPE from `vocab.json` + `merges.txt`: texts -> (ids [B, length], mask [B, length])."""

    def __init__(self, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike):
        bpe = BPE.from_file(str(vocab_json), str(merges_txt), end_of_word_suffix="</w>", unk_token=CLIP_END)
        tokenizer = tokenizers.Tokenizer(bpe)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable characters
            ]
        )
        start, end = tokenizer.token_to_id(CLIP_START), tokenizer.token_to_id(CLIP_END)
        self.pad_id = tokenizer.token_to_id(CLIP_PAD)
        if start is None or end is None:
            raise ValueError(f"{vocab_json}: no {CLIP_START} / {CLIP_END} tokens (not CLIP's vocabulary)")
        tokenizer.add_special_tokens([CLIP_START, CLIP_END])  # literal occurrences in a prompt map to their ids
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{CLIP_START} $A {CLIP_END}", special_tokens=[(CLIP_START, start), (CLIP_END, end)]
        )
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str], length: int = CLIP_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        self.tokenizer.enable_truncation(max_length=length)
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        return _pad([encoding.ids for encoding in encodings], length, self.pad_id)


# ---------------------------------------------------------------------------------------------- encoders


def empty_t5_ids(length: int) -> torch.Tensor:
    """Ids [1, length] of the empty prompt for T5/UMT5 without a tokenizer file: `</s>` then `<pad>`s (both
    vocabularies put `<pad>` at 0 and `</s>` at 1). Used by the miniature, whose tiny encoders have no tokenizer."""
    ids = torch.zeros(1, length, dtype=torch.long)
    ids[0, 0] = 1
    return ids


def empty_clip_ids(config: clip.CLIPTextConfig) -> torch.Tensor:
    """Ids [1, max_positions] of the empty prompt for CLIP without a tokenizer file: start, end, then end tokens as
    padding (FLUX's pad token); CLIP's vocabulary ends with its start and end tokens."""
    ids = torch.full((1, config.max_positions), config.vocab_size - 1, dtype=torch.long)
    ids[0, 0] = config.vocab_size - 2
    return ids


def caption_ids(words: list[str], vocabulary: dict[str, int], length: int,
                clip_config: clip.CLIPTextConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of a caption for the miniature's tokenizer-less encoders, whose vocabulary is a few whole words
    (`vocabulary`: word -> id, recorded in miniature.json): T5 [1, length] = [w_1 .. w_n, </s>, <pad> ...] and
    CLIP [1, max_positions] = [<start>, w_1 .. w_n, <end> ...]. No words gives the empty prompt's ids."""
    unknown = [w for w in words if w not in vocabulary]
    if unknown:
        raise ValueError(f"the miniature's vocabulary has no word {unknown[0]!r}; its words: {', '.join(vocabulary)}")
    if len(words) >= min(length, clip_config.max_positions - 1):
        raise ValueError(f"a caption of {len(words)} words does not fit the miniature's {length} text tokens")
    ids = torch.tensor([[vocabulary[w] for w in words]], dtype=torch.long)
    t5_ids = torch.cat([ids, empty_t5_ids(length)[:, : length - len(words)]], dim=1)
    clip_empty = empty_clip_ids(clip_config)
    clip_ids = torch.cat([clip_empty[:, :1], ids, clip_empty[:, 1 : clip_config.max_positions - len(words)]], dim=1)
    return t5_ids, clip_ids


def load_t5(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> t5.T5Encoder:
    """FLUX's T5-v1.1-XXL from its `text_encoder_2/` folder (sharded index or single file), in eval mode."""
    path = find_file(folder, ["model.safetensors.index.json", "model.safetensors"])
    return build(t5.T5Encoder, FLUX_T5, t5.fold_tied_embedding(read_state_dict(path)), dtype, device)


def load_clip(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> clip.CLIPTextEncoder:
    """FLUX's CLIP-L text encoder from its `text_encoder/` folder, in eval mode."""
    path = find_file(folder, ["model.safetensors.index.json", "model.safetensors"])
    return build(clip.CLIPTextEncoder, FLUX_CLIP, clip.drop_position_ids(read_state_dict(path)), dtype, device)


def load_umt5(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> t5.UMT5Encoder:
    """Wan's UMT5-XXL encoder from `models_t5_umt5-xxl-enc-bf16.pth` (Wan's key names), in eval mode."""
    return build(t5.UMT5Encoder, WAN_UMT5, path, dtype, device)


def _free(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _flux_encode(texts: list[str], snapshot: Path, length: int, device, dtype) -> list[dict[str, torch.Tensor]]:
    clip_ids, _ = CLIPTokenizer(snapshot / "tokenizer/vocab.json", snapshot / "tokenizer/merges.txt")(texts)
    t5_ids, _ = T5Tokenizer(snapshot / "tokenizer_2/spiece.model")(texts, length)
    with torch.no_grad():
        encoder = load_clip(snapshot / "text_encoder", dtype, device)
        _, pooled = encoder(clip_ids.to(device))
        del encoder
        _free(device)
        encoder = load_t5(snapshot / "text_encoder_2", dtype, device)
        txt = encoder(t5_ids.to(device))  # no attention mask, as in FLUX's pipelines
        del encoder
        _free(device)
    return [{"txt": txt[i], "pooled": pooled[i]} for i in range(len(texts))]


def _wan_encode(texts: list[str], snapshot: Path, length: int, device, dtype) -> list[dict[str, torch.Tensor]]:
    ids, mask = UMT5Tokenizer(snapshot / WAN_TOKENIZER_FILE)(texts, length)
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        encoder = load_umt5(snapshot / WAN_T5_FILE, dtype, device)
        states = encoder(ids, mask) * mask[..., None].to(dtype)  # zero past each text's tokens, as Wan does
        del encoder
        _free(device)
    return [{"txt": states[i]} for i in range(len(texts))]


# ---------------------------------------------------------------------------------------------- learned input tokens


class TokenSite:
    """The frozen text encoders kept in memory for the text-token baseline, which learns K vectors at the encoders'
    INPUT embedding: the empty prompt's ids with the learned vectors spliced in before its end-of-text token,
    run through the encoders at every step (so gradients reach the vectors through the frozen encoders).

    FLUX: T5 on [v_1 .. v_K, </s>, <pad> ...] (no attention mask, as FLUX does) and CLIP on
    [<start>, w_1 .. w_Kc, <end>, <end> ...] (pooled at the end token). Wan: UMT5 on [v_1 .. v_K, </s>, <pad> ...]
    with the attention mask, zeroed past the K + 1 tokens, as Wan does for real text.
    """

    def __init__(self, t5: t5.T5Encoder | t5.UMT5Encoder, length: int, masked: bool,
                 clip_encoder: clip.CLIPTextEncoder | None = None):
        self.t5, self.length, self.masked, self.clip = t5, length, masked, clip_encoder

    @property
    def t5_width(self) -> int:
        return self.t5.config.d_model

    @property
    def clip_width(self) -> int:
        return 0 if self.clip is None else self.clip.config.width

    def initial_vectors(self, count: int, encoder: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """Embeddings [1, count, width] of `count` random vocabulary tokens (encoder "t5" or "clip"): a start for
        learned input vectors that the encoder has seen the like of."""
        model = self.t5 if encoder == "t5" else self.clip
        vocab = model.config.vocab_size
        ids = torch.randint(2, vocab - 2, (1, count), generator=generator)
        return model.embed(ids.to(next(model.parameters()).device)).detach().float().cpu()

    def __call__(self, t5_vectors: torch.Tensor, clip_vectors: torch.Tensor | None = None):
        """(T5/UMT5 states [1, length, C], pooled CLIP [1, width] or None) for the learned vectors."""
        count = t5_vectors.shape[1]
        if count >= self.length:
            raise ValueError(f"{count} learned tokens leave no room for </s> in {self.length} text positions")
        device = next(self.t5.parameters()).device
        ids = empty_t5_ids(self.length).to(device)
        embeds = self.t5.embed(ids)
        embeds = torch.cat([t5_vectors.to(embeds), embeds[:, : self.length - count]], dim=1)  # vectors, </s>, pads
        if self.masked:
            mask = (torch.arange(self.length, device=device) <= count).long()[None]
            states = self.t5(inputs_embeds=embeds, attention_mask=mask) * mask[..., None].to(embeds.dtype)
        else:
            states = self.t5(inputs_embeds=embeds)
        if self.clip is None:
            return states, None
        ids = empty_clip_ids(self.clip.config).to(device)
        if clip_vectors.shape[1] + 2 > ids.shape[1]:
            raise ValueError(f"{clip_vectors.shape[1]} learned CLIP tokens do not fit in {ids.shape[1]} positions")
        width = clip_vectors.shape[1]
        ids = torch.cat([ids[:, :1], torch.zeros_like(ids[:, :width]), ids[:, 1 : ids.shape[1] - width]], dim=1)
        embeds = self.clip.embed(ids)  # the zero ids are placeholders: argmax(ids) still finds the end token
        embeds = torch.cat([embeds[:, :1], clip_vectors.to(embeds), embeds[:, 1 + width :]], dim=1)
        _, pooled = self.clip(ids, inputs_embeds=embeds)
        return states, pooled


# ---------------------------------------------------------------------------------------------- cache


def _files_with_shards(path: Path) -> list[Path]:
    """A checkpoint file, and for a `*.index.json` also the shards it lists."""
    if not path.name.endswith(".index.json"):
        return [path]
    shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    return [path] + [path.parent / shard for shard in shards]


def _fingerprint(files: list[Path]) -> list[list]:
    """Resolved path, size and modification time (ns) of each file: any replaced or rewritten file changes it."""
    rows = []
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (is this the right snapshot folder?)")
        stat = path.stat()
        rows.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return rows


def _with_cache(
    texts: list[str],
    cache_dir: str | os.PathLike | None,
    key: dict,
    encode: Callable[[list[str]], list[dict[str, torch.Tensor]]],
) -> list[dict[str, torch.Tensor]]:
    """Per-text outputs, read from `cache_dir` where present; the missing texts go through `encode` in one batch."""
    if cache_dir is None:
        return encode(texts)
    paths = {}
    for text in texts:
        digest = hashlib.sha256(json.dumps({**key, "text": text}, sort_keys=True).encode()).hexdigest()
        paths[text] = Path(cache_dir) / f"{key['backbone']}-{digest[:40]}.safetensors"
    results = {}
    for text in dict.fromkeys(texts):
        if paths[text].is_file():
            try:
                results[text] = read_state_dict(paths[text])
            except CheckpointError as err:  # a truncated or corrupt entry: computed again below, and replaced
                print(f"text cache: {err}; encoding this text again", file=sys.stderr)
    missing = [text for text in dict.fromkeys(texts) if text not in results]
    for text, tensors in zip(missing, encode(missing) if missing else []):
        results[text] = tensors
        try:
            save_safetensors(tensors, paths[text], metadata={**key, "text": text})
        except OSError as err:  # a read-only or full cache: the outputs are still right, only not kept
            print(f"text cache: cannot write {paths[text]} ({err.strerror or err}); not cached", file=sys.stderr)
    return [results[text] for text in texts]


def _check_request(texts: list[str], length: int) -> None:
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts) or len(texts) == 0:
        raise ValueError(f"texts: expected a non-empty list of strings, got {texts!r}")
    if length < 1:
        raise ValueError(f"length: expected a positive number of tokens, got {length}")


def flux_text(
    texts: list[str],
    snapshot: str | os.PathLike,
    length: int = 512,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.1 conditioning: (T5 states [B, length, 4096], pooled CLIP [B, 768]) on `device`, in `dtype`.

    `snapshot` holds `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`. length: 512 dev, 256 schnell.
    """
    _check_request(texts, length)
    snapshot = Path(snapshot)
    checkpoints = ["model.safetensors.index.json", "model.safetensors"]
    files = [
        *_files_with_shards(find_file(snapshot / "text_encoder", checkpoints)),
        *_files_with_shards(find_file(snapshot / "text_encoder_2", checkpoints)),
        snapshot / "tokenizer/vocab.json",
        snapshot / "tokenizer/merges.txt",
        snapshot / "tokenizer_2/spiece.model",
    ]
    key = {"backbone": "flux", "files": _fingerprint(files), "length": length, "dtype": str(dtype)}
    outputs = _with_cache(texts, cache_dir, key, lambda missing: _flux_encode(missing, snapshot, length, device, dtype))
    txt = torch.stack([out["txt"].to(device) for out in outputs])
    pooled = torch.stack([out["pooled"].to(device) for out in outputs])
    return txt, pooled


def wan_text(
    texts: list[str],
    snapshot: str | os.PathLike,
    length: int = 512,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Wan2.1 conditioning: UMT5 states [B, length, 4096] on `device`, in `dtype`, zero past each text's tokens.

    `snapshot` holds `models_t5_umt5-xxl-enc-bf16.pth` and `google/umt5-xxl/tokenizer.json`.
    """
    _check_request(texts, length)
    snapshot = Path(snapshot)
    files = [snapshot / WAN_T5_FILE, snapshot / WAN_TOKENIZER_FILE]
    key = {"backbone": "wan", "files": _fingerprint(files), "length": length, "dtype": str(dtype)}
    outputs = _with_cache(texts, cache_dir, key, lambda missing: _wan_encode(missing, snapshot, length, device, dtype))
    return torch.stack([out["txt"].to(device) for out in outputs])
