"""The training recipe (TrainConfig), the concept to train, and the training fingerprint.

Plain data, no torch: the batch driver and the command line use these without loading a model.
The fingerprint is computed here and nowhere else, so the batch driver (deciding what is up to
date) and the trainer (recording it in the residual) can never disagree.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Union

# What a concept's image can be: a path or URI (file://, s3://), or the encoded image itself.
ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

# The reference code adds +1.0 to every residual logit (docs/method.md, "The +1 logit bias"); the authors'
# learning rate and N(0, 1) init were tuned with it, so it is the recipe's default. 0.0 is the
# paper's equation as written.
REFERENCE_PREFIX_LOGIT_BIAS = 1.0
DEFAULT_SAVE_STEPS = (250, 500, 750, 1000)  # the reference recipe's checkpoints
MAX_TRAIN_STEPS = 100_000
MAX_BATCH_SIZE = 64


@dataclass(frozen=True)
class TrainConfig:
    """Per-concept hyper-parameters; the defaults are the reference recipe (docs/method.md)."""

    steps: int = 1000
    learning_rate: float = 1e-2  # 5e-3 base × batch 2 ("scale_lr")
    batch_size: int = 2
    seed: int = 0
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    flip_p: float = 0.5
    init_std: float = 1.0  # residual init N(0, 1), as the reference code
    prefix_logit_bias: float = REFERENCE_PREFIX_LOGIT_BIAS
    save_steps: tuple[int, ...] = DEFAULT_SAVE_STEPS

    def __post_init__(self) -> None:
        problems = []
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_TRAIN_STEPS:
            problems.append(f"steps must be an integer in 1..{MAX_TRAIN_STEPS:,} (more would hold a GPU for days; "
                            f"the reference recipe uses 1,000), got {self.steps!r}")
        if not (_is_number(self.learning_rate) and math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"learning_rate must be a positive finite number, got {self.learning_rate!r}")
        if not _is_int(self.batch_size) or not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            problems.append(f"batch_size must be an integer in 1..{MAX_BATCH_SIZE}, got {self.batch_size!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            problems.append(f"seed must be a non-negative integer, got {self.seed!r}")
        if not (_is_number(self.flip_p) and 0.0 <= self.flip_p <= 1.0):
            problems.append(f"flip_p must be in [0, 1], got {self.flip_p!r}")
        if not (_is_number(self.prefix_logit_bias) and math.isfinite(self.prefix_logit_bias)):
            problems.append(f"prefix_logit_bias must be a finite number, got {self.prefix_logit_bias!r}")
        if any(not _is_int(s) or s < 1 for s in self.save_steps):
            problems.append(f"save_steps must be positive integers, got {self.save_steps!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def hyperparameters(self) -> dict:
        """What goes into a residual's metadata and its training fingerprint."""
        params = asdict(self)
        params.pop("save_steps")
        params["adam_betas"] = list(self.adam_betas)
        return params


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_class_word(word: str | None, what: str = "class word") -> str:
    """The class word, stripped; an empty one is refused (it is the prompt word the residual binds to)."""
    if word is None or not str(word).strip():
        raise ValueError(f"{what} is empty: give the plain base-class word of the concept, e.g. 'teapot'")
    return str(word).strip()


@dataclass
class Concept:
    """One concept to personalize: a few photos and the plain base-class word (e.g. "teapot")."""

    concept_id: str
    images: Sequence[ImageSource]
    class_word: str
    caption: str | None = None  # training caption; the class word alone by default
    config: TrainConfig = field(default_factory=TrainConfig)
    image_names: Sequence[str] | None = None  # names for messages (e.g. the manifest's URIs)

    def __post_init__(self):
        self.class_word = check_class_word(self.class_word, f"concept {self.concept_id!r}: class word")

    @property
    def prompt(self) -> str:
        return self.caption or self.class_word


@dataclass(frozen=True)
class TrainingTarget:
    """What a residual is trained against, besides the concept: the frozen base and the patch.

    ``training.training_target(base, ...)`` builds it from a loaded model, and the trainer uses that;
    ``modelinfo.training_target_for(model, ...)`` gives the same value from the model's name without
    loading it (tested equal), for the batch driver.
    """

    base_fingerprint: str | None  # the text encoder's fingerprint (models.text_encoder_fingerprint)
    resolution: int  # training image size in px
    layers: tuple  # patched encoder layers (layers_key: flat for one text encoder, a tuple per encoder for several)
    tokens: int  # residual tokens per layer
    precision: str = "fp32"  # the UNet/VAE precision of training (models.BaseModel.precision)


def patched_layers(depth: int, layers: Sequence[int] | None = None) -> tuple[int, ...]:
    """The encoder layers a residual patches: ``layers`` checked, or by default the last three
    of a ``depth``-layer encoder (9, 10, 11 for SD v1's CLIP ViT-L/14, as the method does)."""
    chosen = tuple(range(depth - 3, depth)) if layers is None else tuple(sorted(int(i) for i in layers))
    if not chosen or chosen[0] < 0 or chosen[-1] >= depth or len(set(chosen)) != len(chosen):
        raise ValueError(f"layers {chosen} are not distinct indices of this {depth}-layer text encoder")
    return chosen


def layer_sets(layers: Sequence | None, encoders: int) -> tuple[tuple[int, ...], ...] | None:
    """``layers`` as one tuple per text encoder (Family.resolve_layers then checks them or gives the default): None
    stays None (the family's default); a flat sequence of ints is the one encoder's (refused for several)."""
    if layers is None:
        return None
    layers = list(layers)
    if layers and all(isinstance(i, int) for i in layers):
        if encoders != 1:
            raise ValueError(f"this base model has {encoders} text encoders: give layers for each, e.g. "
                             "'8,9,10;28,29,30' (--layers) or [[8, 9, 10], [28, 29, 30]]")
        return (tuple(layers),)
    return tuple(tuple(int(i) for i in part) for part in layers)


def layers_key(sets: Sequence[Sequence[int]]) -> tuple:
    """What a training fingerprint records of the patched layers (TrainingTarget.layers): the one
    encoder's layers as a flat tuple (so SD 1.x fingerprints are what they were), a tuple per encoder for several."""
    sets = tuple(tuple(s) for s in sets)
    return sets[0] if len(sets) == 1 else sets


def format_layers(sets: Sequence[Sequence[int]]) -> str:
    """`families.parse_layers`'s inverse: "9,10,11" or "8,9,10;28,29,30"."""
    return ";".join(",".join(str(int(i)) for i in group) for group in sets)


def image_digest(data: bytes) -> str:
    """The content identity of a training image: sha256 of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()


def training_fingerprint(concept: Concept, image_digests: Sequence[str], target: TrainingTarget) -> str:
    """Everything that determines the trained residual; a rerun with the same fingerprint is skipped.

    ``image_digests`` are ``image_digest(bytes)`` of the concept's images, in order: content
    identity, so a renamed or re-uploaded identical photo does not retrain, and a changed one does.
    """
    if len(image_digests) != len(concept.images):
        raise ValueError(f"concept {concept.concept_id!r}: {len(image_digests)} image digests for "
                         f"{len(concept.images)} images")
    digest = hashlib.sha256()
    for image in image_digests:
        digest.update(image.encode())
    facts = {
        "class_word": concept.class_word, "caption": concept.prompt, "config": concept.config.hyperparameters(),
        "base": target.base_fingerprint, "resolution": target.resolution, "layers": list(target.layers),
        "tokens": target.tokens, "precision": target.precision,
    }
    digest.update(json.dumps(facts, sort_keys=True).encode())
    return "sha256:" + digest.hexdigest()
