"""Defaults and limits shared by the command line, the library, evaluation and serving.

Each is defined once, here. This module imports neither torch nor Ray, so `catversion --help`
shows the defaults without loading either.
"""

# Base models: the hub's maintained copy of Stable Diffusion v1.5 (the runwayml repository was
# withdrawn), and the built-ins that need no download: one tiny model per family for tests and the demo,
# one with the real shapes and random weights per family for benchmarks (docs/families.md).
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUILTIN_MODELS = ("tiny", "tiny-sd2", "tiny-sdxl", "sd15-random", "sd2-random", "sdxl-random")

# Precision policy: the text encoder and the residual path always run in float32 (they cost a few
# milliseconds, and the residual's whole effect lives in the text embedding); the precision chosen
# here is the UNet's and the VAE's. "auto" is bf16 on a GPU and fp32 on the CPU; fp32 is the
# reference recipe's own arithmetic.
PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_CHOICES = ("auto", *PRECISIONS)
DEFAULT_PRECISION = "auto"
PRECISION_HELP = ("UNet/VAE precision: auto (bf16 on a GPU, fp32 on the CPU), fp32 (the reference recipe's "
                  "arithmetic), bf16 or fp16; the text encoder and the residual always run in fp32")

# Devices: what --device accepts (validated by argparse, so a typo is a usage error, exit status 2).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DEVICE_HELP = "auto (the GPU when there is one), cpu, cuda or cuda:N"


def device_arg(text: str) -> str:
    """argparse `type=` for --device: auto | cpu | cuda | cuda:N (N a GPU index), as given."""
    import argparse
    import re

    value = text.strip().lower()
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return value
    raise argparse.ArgumentTypeError(f"invalid device {text!r}: choose from {', '.join(DEVICE_CHOICES)}")


# Generation: the reference inference settings (DDIM 50 steps, guidance 10) and the valid ranges.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 10.0
MAX_STEPS = 1000  # a DDIM schedule cannot have more steps than SD's 1000 training timesteps
MAX_GUIDANCE = 100.0
MAX_RESIDUAL_SCALE = 10.0  # 0 = residual off, 1 = as trained
MAX_IMAGE_SIDE = 4096  # px
MAX_SEED = 2**63 - 1  # torch.Generator seeds are signed 64-bit

# Evaluation

# The metric names, defined once: columns of score tables and keys of Scores.means(). CLIP-T,
# CLIP-I and masked CLIP-I are the CatVersion paper's; DINO is DreamBooth's, reported alongside.
METRICS = ("clip_t", "clip_i", "masked_clip_i", "dino")
METRIC_LABELS = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "masked_clip_i": "masked CLIP-I", "dino": "DINO"}
# How help texts and the report's key name each metric (whose it is), and what it measures.
METRIC_TITLES = {**METRIC_LABELS, "dino": "DINO (DreamBooth's metric)"}
METRIC_DESCRIPTIONS = {
    "clip_t": "cosine between the prompt's CLIP text embedding and the image's CLIP embedding",
    "clip_i": "mean CLIP image cosine to the reference photos",
    "masked_clip_i": "CLIP-I with the background replaced in both images (CLIPSeg mask of the class word), "
                     "so that a shared background cannot inflate the score",
    "dino": "mean DINO ViT CLS-token cosine to the reference photos",
}

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the paper's CLIP ViT-B/32
DEFAULT_SEG = "CIDAS/clipseg-rd64-refined"  # the paper names no mask model; CLIPSeg is prompted by the class word
DEFAULT_DINO = "facebook/dino-vits16"  # DreamBooth's DINO ViT-S/16
DEFAULT_MASK_THRESHOLD = 0.4  # on CLIPSeg's sigmoid
SAVED_REFERENCE_SIDE = 512  # px: the evaluation report keeps reference photos shrunk to this longest side

# ---- batch jobs (catversion batch) -------------------------------------------------------------
DEFAULT_STATE_EVERY = 100  # steps between saved training states of an in-flight concept
DEFAULT_RESOURCES_TIMEOUT_S = 600.0  # no worker running this long ends the job (covers autoscaler provisioning)
DEFAULT_RESIZE_INTERVAL_S = 60.0  # elastic groups look for capacity to grow into this often
DEFAULT_STORAGE_RETRY_S = 300.0  # batch storage calls retry transient errors (an outage) this long
DEFAULT_CLAIM_TTL_S = 120.0  # a concept claim not refreshed this long belongs to a dead run
DEFAULT_CLAIM_WAIT_S = 600.0  # how long a run waits for a concept another run is training

# ---- input images (catversion/images.py; README "The manifest", docs/contracts.md "The manifest") ------
# A training photo is resized to 512 px, so nothing useful needs more than these; each is checked before
# the work it bounds: the byte cap before a byte is read (a stat or an S3 HEAD/GET header), the pixel cap
# from the image header before any pixel is decoded.
MAX_IMAGE_BYTES = 64 * 1024**2  # a full-resolution 100 MP camera JPEG is 30-50 MB, a 24 MP PNG ~50 MB
MAX_IMAGE_PIXELS = 120_000_000  # well above any camera (a 100 MP photo is 1e8 px), far below exhausting memory
# Decodes running at once in one process (validation threads, a worker's prefetch) share this many bytes:
# a 118 MP image takes 0.5-1.4 GB while it decodes (4-12 bytes per pixel), so the eight threads of one
# validation task could take 11 GB. Override per process (batch workers get the driver's CATVERSION_*
# variables) with CATVERSION_DECODE_MEMORY=<bytes>.
DEFAULT_DECODE_MEMORY_BYTES = 2 * 1024**3
DECODE_MEMORY_ENV = "CATVERSION_DECODE_MEMORY"
