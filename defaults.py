"""The method's numbers, in one place: the bridge, the prompts, the conditioning, the sizes.

bridge.py, the backbone table (backbone.BACKBONES), the prompt files' metadata, restore.py, training.py and the
two command lines read them from here; nothing else writes them down. Values are the paper authors' unless a
comment says otherwise.
"""

# ---------------------------------------------------------------------------------------------- the bridge

T0 = 0.4  # bridge start time: X_T0 = (1 - T0) Y + T0 eps
T_MIN = 1e-4  # the sampler's last time and the smallest training time
STEPS = 20  # sampler model evaluations
SEED = 0  # seed of the sampler's starting noise


def mix_seed(seed: int, index: int) -> int:
    """One seed per (run seed, item): video chunk `index`'s starting noise, training pair `index`'s crop."""
    return seed * 1_000_003 + index


# ---------------------------------------------------------------------------------------------- conditioning

FLUX_TEXT_LEN = {"flux-dev": 512, "flux-schnell": 256}  # T5 tokens of FLUX's text stream (BFL's max_length)
WAN_CONTEXT_LEN = 226  # UMT5 tokens the authors pad Wan's empty prompt to (the official pipeline pads to 512)
FLUX_GUIDANCE = 1.0  # FLUX.1-dev's guidance input
PROMPT_LEN = {"flux": 512, "wan": 226}  # deep-prompt tokens K of the official backbones
TINY_TEXT_LEN = 16  # text tokens (and K) of the tiny random presets (this project's choice)

# ---------------------------------------------------------------------------------------------- sizes

TRAIN_SIZE = {"flux": (1024, 1024), "wan": (480, 832)}  # training crops (H, W) of the official backbones
TRAIN_FRAMES = 33  # Wan training clip length
TILE = 1024  # FLUX.1: images larger than TILE x TILE pixels are restored in overlapping tiles
SMALL_TILE = 256  # the same for the video miniature and the tiny presets (the image miniature: 128; backbone.py)
CHUNK_FRAMES = 33  # video chunk length (4k+1) and the overlap of neighbouring chunks (this project's choice)
CHUNK_OVERLAP = 8
MAX_PIXELS = 1 << 24  # largest input sample.py (per frame) and serve.py (width x height x frames) decode (ours)
EVAL_RESIZE = 512  # the paper measures restorations resized to 512 x 512 (an option here, --resize-512)

SIZE_MULTIPLE = 16  # image height and width: 8x VAE then 2x2 patches (FLUX), 8x VAE then 1x2x2 patches (Wan)
FRAME_STRIDE = 4  # the video VAE keeps frame 0 and compresses each further 4 frames into one: 4k+1 frames


def tile_overlap(tile: int) -> int:
    """Neighbouring tiles share a quarter of a tile (pixels or latent pixels)."""
    return tile // 4


def is_clip_length(frames: int) -> bool:
    """Whether a clip of `frames` frames fits the video VAE: 4k+1 (1, 5, 9, ..., 33, ...)."""
    return frames >= 1 and (frames - 1) % FRAME_STRIDE == 0


def clip_length_at_most(frames: int) -> int:
    """The longest 4k+1 clip length <= frames (frames >= 1)."""
    return (frames - 1) // FRAME_STRIDE * FRAME_STRIDE + 1

# The all-in-one prompt's name, prompts/ALL_IN_ONE.safetensors: a miniature's default when it records no
# default_prompt (the shipped ones record "auto": the bank's estimator chooses; restore.default_prompt).
ALL_IN_ONE = "all"
