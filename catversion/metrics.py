"""The paper's evaluation metrics, CLIP-T, CLIP-I and masked CLIP-I, and DreamBooth's DINO
(docs/method.md, "Evaluation: the paper's metrics").

Masked CLIP-I compares reference and generated images with their backgrounds replaced by a fill
colour outside a segmentation mask of the concept (CLIPSeg prompted with the class word), full
frame as the paper does, so that a shared background cannot inflate the score. Library code: no
Ray, no HTTP.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from PIL import Image

# The metric names and default models are defined in the torch-free `limits`, which the command
# line reads for its help; they are re-exported here, where the metrics are computed.
from .limits import DEFAULT_CLIP, DEFAULT_DINO, DEFAULT_MASK_THRESHOLD, DEFAULT_SEG, METRICS
from .limits import METRIC_LABELS as METRIC_LABELS
from .models import ModelNotAvailableError
from .sd_v1 import BUILTIN_SEED, MAX_LENGTH, MIN_TOKENIZER_VOCAB, tiny_tokenizer

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

# The transformers model classes are imported where the models are built, not with this module.

TINY = "tiny"  # built-in random-weight versions of all three, for tests
DEFAULT_BATCH_SIZE = 32

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Background fill of masked images: CLIP's mean colour, which CLIP's normalization maps to zero.
FILL: tuple[int, int, int] = (123, 117, 104)

MaskLike = Image.Image | np.ndarray


@dataclass(frozen=True)
class Preprocess:
    """A model's image preprocessing, written out: resize, center crop, scale to [0, 1], normalize.

    ``resize`` is an int (the shorter side goes to it, aspect kept, as CLIP does) or (height,
    width) (the image is stretched to it, as ViT and CLIPSeg do); ``crop`` is (height, width).
    """

    resize: int | tuple[int, int]
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: Image.Resampling = Image.Resampling.BICUBIC

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """float32 [B, 3, H, W]."""
        arrays = [np.asarray(self._geometry(image.convert("RGB")), dtype=np.float32) / 255.0 for image in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def _geometry(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if isinstance(self.resize, int):
            # transformers' rounding: the shorter side becomes exactly `resize`, the longer is truncated.
            short, long = sorted((width, height))
            new_long = int(self.resize * long / short)
            size = (self.resize, new_long) if width <= height else (new_long, self.resize)
        else:
            size = (self.resize[1], self.resize[0])
        image = image.resize(size, resample=self.resample)
        if self.crop is None:
            return image
        crop_h, crop_w = self.crop
        if crop_h > image.height or crop_w > image.width:
            raise ValueError(f"center crop {self.crop} is larger than the resized image {image.size[::-1]}")
        top, left = (image.height - crop_h) // 2, (image.width - crop_w) // 2
        return image.crop((left, top, left + crop_w, top + crop_h))

    @classmethod
    def from_processor_config(cls, config: dict, square: bool, mean: tuple, std: tuple,
                              resample: int) -> Preprocess:
        """From a preprocessor_config.json; ``square`` says what a bare int size means for this
        processor class (CLIP: the shorter side; ViT/CLIPSeg: both sides), the other arguments are
        the class's defaults for keys the file leaves out."""
        size = config.get("size", 224)
        if isinstance(size, dict):
            resize = size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])
        else:
            resize = (size, size) if square else int(size)
        crop = None
        if config.get("do_center_crop", False):
            crop_size = config.get("crop_size", 224)
            crop = (crop_size["height"], crop_size["width"]) if isinstance(crop_size, dict) else (crop_size, crop_size)
        return cls(resize=resize, crop=crop, mean=tuple(config.get("image_mean", mean)),
                   std=tuple(config.get("image_std", std)),
                   resample=Image.Resampling(config.get("resample", resample)))


@dataclass
class MetricModel:
    """One frozen model with its preprocessing (and tokenizer, for the text-conditioned ones)."""

    name: str
    model: torch.nn.Module
    preprocess: Preprocess
    tokenizer: CLIPTokenizer | None = None


@dataclass
class Similarity:
    """Cosine similarity of every (reference, generated) pair."""

    matrix: np.ndarray  # float64 [references, generated]

    @property
    def mean(self) -> float:
        """The metric: the mean over all pairs."""
        return float(self.matrix.mean())

    @property
    def per_generated(self) -> list[float]:
        """Each generated image's mean over the references (their mean is ``mean``)."""
        return self.matrix.mean(axis=0).tolist()


@dataclass
class Scores:
    """Every metric for each generated image (pairwise ones averaged over the references), and the
    masks that masked CLIP-I used."""

    clip_t: list[float]
    clip_i: list[float]
    masked_clip_i: list[float]
    dino: list[float]
    reference_masks: list[np.ndarray]
    generated_masks: list[np.ndarray]

    def means(self) -> dict[str, float]:
        return {metric: float(np.mean(getattr(self, metric))) for metric in METRICS}


class Scorer:
    """Holds the three frozen metric models; reuse one Scorer for every concept.

    Embeddings are computed in batches of ``batch_size`` under ``torch.inference_mode`` in the
    models' dtype, then compared in float32. Masked CLIP-I scores full-frame images with the
    background replaced (the paper's protocol); ``masked_crop`` crops each to its object instead
    (see ``mask_out``).
    """

    def __init__(self, clip: MetricModel, seg: MetricModel, dino: MetricModel,
                 batch_size: int = DEFAULT_BATCH_SIZE, mask_threshold: float = DEFAULT_MASK_THRESHOLD,
                 fill: tuple[int, int, int] = FILL, masked_crop: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1), got {mask_threshold}")
        self.clip_model, self.seg_model, self.dino_model = clip, seg, dino
        self.batch_size = batch_size
        self.mask_threshold = mask_threshold
        self.fill = fill
        self.masked_crop = masked_crop

    @classmethod
    def load(cls, clip: str = DEFAULT_CLIP, seg: str = DEFAULT_SEG, dino: str = DEFAULT_DINO,
             device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE, mask_threshold: float = DEFAULT_MASK_THRESHOLD,
             masked_crop: bool = False) -> Scorer:
        """Load each model by hub id, local folder or "tiny". dtype None: float16 on CUDA, float32
        otherwise. Raises ModelNotAvailableError naming the model that cannot be loaded."""
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        models = [_load(role, name, device, dtype) for role, name in (("clip", clip), ("seg", seg), ("dino", dino))]
        return cls(*models, batch_size=batch_size, mask_threshold=mask_threshold, masked_crop=masked_crop)

    @property
    def device(self) -> torch.device:
        return next(self.clip_model.model.parameters()).device

    # ---- embeddings (unit length, float32, CPU) -------------------------------------------------
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        def embed(chunk):
            tokens = self._tokenize(self.clip_model, list(chunk))
            return _pooled(self.clip_model.model.get_text_features(**tokens))
        return _normalized(self._batched(prompts, embed))

    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP image embeddings."""
        return _normalized(self._batched(images, lambda chunk: _pooled(
            self.clip_model.model.get_image_features(pixel_values=self._pixels(self.clip_model, chunk)))))

    def dino_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """DINO ViT CLS tokens."""
        def embed(chunk):
            return self.dino_model.model(pixel_values=self._pixels(self.dino_model, chunk)).last_hidden_state[:, 0]
        return _normalized(self._batched(images, embed))

    # ---- metrics ----------------------------------------------------------------------------
    def clip_t(self, prompts: str | Sequence[str], images: Sequence[Image.Image]) -> list[float]:
        """Cosine between each image and its prompt (one prompt for all, or one per image)."""
        _check_images(images, "images")
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"clip_t needs one prompt per image (or a single prompt), got {len(prompts)} prompts "
                             f"for {len(images)} images")
        return self._clip_t(prompts, self.image_embeddings(images))

    def clip_i(self, references: Sequence[Image.Image], generated: Sequence[Image.Image]) -> Similarity:
        _check_images(references, "references")
        _check_images(generated, "generated")
        return _similarity(self.image_embeddings(references), self.image_embeddings(generated))

    def dino(self, references: Sequence[Image.Image], generated: Sequence[Image.Image]) -> Similarity:
        _check_images(references, "references")
        _check_images(generated, "generated")
        return _similarity(self.dino_embeddings(references), self.dino_embeddings(generated))

    def masks(self, images: Sequence[Image.Image], class_word: str) -> list[np.ndarray]:
        """Boolean [H, W] masks of the class word's object, each the size of its image: CLIPSeg's
        logits upsampled (bilinear) to the image, sigmoid > mask_threshold."""
        _check_images(images, "images")
        if not class_word or not class_word.strip():
            raise ValueError("masks need a non-empty class word to prompt the segmenter with")

        def segment(chunk):
            tokens = self._tokenize(self.seg_model, [class_word] * len(chunk))
            logits = self.seg_model.model(pixel_values=self._pixels(self.seg_model, chunk), **tokens).logits
            return logits.reshape(len(chunk), *logits.shape[-2:])  # a batch of one comes back squeezed

        logits = self._batched(images, segment)
        masks = []
        for image, logit in zip(images, logits):
            full = F.interpolate(logit[None, None], size=(image.height, image.width), mode="bilinear",
                                 align_corners=False)[0, 0]
            masks.append((torch.sigmoid(full) > self.mask_threshold).numpy())
        return masks

    def mask_out(self, images: Sequence[Image.Image], masks: Sequence[MaskLike]) -> list[Image.Image]:
        """The images masked CLIP-I embeds: this scorer's fill colour, and crop setting."""
        return mask_out(images, masks, fill=self.fill, crop=self.masked_crop)

    def masked_clip_i(self, references: Sequence[Image.Image], generated: Sequence[Image.Image], class_word: str,
                      reference_masks: Sequence[MaskLike] | None = None,
                      generated_masks: Sequence[MaskLike] | None = None) -> Similarity:
        """CLIP-I on background-removed copies; masks not given come from the segmenter."""
        _check_images(references, "references")
        _check_images(generated, "generated")
        reference_masks = self.masks(references, class_word) if reference_masks is None else reference_masks
        generated_masks = self.masks(generated, class_word) if generated_masks is None else generated_masks
        return self.clip_i(self.mask_out(references, reference_masks), self.mask_out(generated, generated_masks))

    def score(self, references: Sequence[Image.Image], generated: Sequence[Image.Image], prompts: Sequence[str],
              class_word: str, reference_masks: Sequence[MaskLike] | None = None) -> Scores:
        """All four metrics for one concept's generated images (``prompts[i]`` made ``generated[i]``)."""
        _check_images(references, "references")
        reference_masks = (self.masks(references, class_word) if reference_masks is None
                           else [_as_mask(m, image.size, f"reference mask {i}")
                                 for i, (m, image) in enumerate(zip(reference_masks, references, strict=True))])
        generated_masks = self.masks(generated, class_word)
        if len(prompts) != len(generated):
            raise ValueError(f"score needs one prompt per generated image, got {len(prompts)} for {len(generated)}")
        generated_clip = self.image_embeddings(generated)  # shared by CLIP-T and CLIP-I
        return Scores(
            clip_t=self._clip_t(list(prompts), generated_clip),
            clip_i=_similarity(self.image_embeddings(references), generated_clip).per_generated,
            masked_clip_i=self.masked_clip_i(references, generated, class_word, reference_masks,
                                             generated_masks).per_generated,
            dino=self.dino(references, generated).per_generated,
            reference_masks=reference_masks,
            generated_masks=generated_masks,
        )

    # ---- internals --------------------------------------------------------------------------
    def _clip_t(self, prompts: list[str], image_embeddings: torch.Tensor) -> list[float]:
        index = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}  # each distinct prompt encoded once
        text = self.text_embeddings(list(index))[[index[p] for p in prompts]]
        return (text * image_embeddings).sum(dim=1).double().tolist()

    def _batched(self, items: Sequence, run: Callable[[Sequence], torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            outputs = [run(items[i:i + self.batch_size]).float().cpu() for i in range(0, len(items), self.batch_size)]
        return torch.cat(outputs)

    def _pixels(self, model: MetricModel, images: Sequence[Image.Image]) -> torch.Tensor:
        parameter = next(model.model.parameters())
        return model.preprocess(images).to(device=parameter.device, dtype=parameter.dtype)

    def _tokenize(self, model: MetricModel, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = model.tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        device = next(model.model.parameters()).device
        return {"input_ids": tokens.input_ids.to(device), "attention_mask": tokens.attention_mask.to(device)}


def mask_out(images: Sequence[Image.Image], masks: Sequence[MaskLike], fill: tuple[int, int, int] = FILL,
             crop: bool = False) -> list[Image.Image]:
    """Copies with the background (mask False) set to ``fill``, full frame: the object keeps its size
    and place, as in the paper's masked CLIP-I. With ``crop``, each copy is cut to its mask's
    bounding box and padded to a square with ``fill``, so that a center crop keeps the whole object
    (scores then ignore the object's size and position). An empty mask gives an image of ``fill``
    alone, the image's size (nothing of the concept to compare)."""
    if len(images) != len(masks):
        raise ValueError(f"mask_out needs one mask per image, got {len(masks)} masks for {len(images)} images")
    out = []
    for i, (image, mask) in enumerate(zip(images, masks)):
        mask = _as_mask(mask, image.size, f"mask {i}")
        if not mask.any():
            out.append(Image.new("RGB", image.size, fill))
            continue
        pixels = np.array(image.convert("RGB"))
        pixels[~mask] = fill
        if not crop:
            out.append(Image.fromarray(pixels))
            continue
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = Image.fromarray(pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
        side = max(box.size)
        square = Image.new("RGB", (side, side), fill)
        square.paste(box, ((side - box.width) // 2, (side - box.height) // 2))
        out.append(square)
    return out


def _as_mask(mask: MaskLike, size: tuple[int, int], what: str) -> np.ndarray:
    """A bool [H, W] array from a bool array or a PIL image (pixels >= 128 are the object)."""
    if isinstance(mask, Image.Image):
        array = np.asarray(mask.convert("L")) >= 128
    elif isinstance(mask, np.ndarray) and mask.dtype == np.bool_:
        array = mask
    else:
        raise TypeError(f"{what}: expected a PIL image or a bool numpy array, got "
                        f"{type(mask).__name__}{f' of dtype {mask.dtype}' if isinstance(mask, np.ndarray) else ''}")
    width, height = size
    if array.shape != (height, width):
        raise ValueError(f"{what} is {array.shape[1]}x{array.shape[0]} but its image is {width}x{height}; "
                         "a mask must have its image's size")
    return array


def _check_images(images: Sequence[Image.Image], what: str) -> None:
    if isinstance(images, Image.Image):
        raise TypeError(f"{what}: expected a list of images, got a single image; wrap it as [image]")
    if not images:
        raise ValueError(f"{what}: no images given")


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalized(embeddings: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings.float(), dim=-1)


def _similarity(references: torch.Tensor, generated: torch.Tensor) -> Similarity:
    return Similarity((references @ generated.T).double().numpy())


# ---- loading ---------------------------------------------------------------------------------

ROLES = {"clip": "CLIP model", "seg": "segmentation model", "dino": "DINO model"}  # as messages name them
DEFAULTS = {"clip": DEFAULT_CLIP, "seg": DEFAULT_SEG, "dino": DEFAULT_DINO}


def _load(role: str, name: str, device: torch.device, dtype: torch.dtype) -> MetricModel:
    build, load = {"clip": (_tiny_clip, _pretrained_clip), "seg": (_tiny_seg, _pretrained_seg),
                   "dino": (_tiny_dino, _pretrained_dino)}[role]
    how_to_get = (f"to fix: download it with network access (HF_HUB_OFFLINE unset), e.g. `hf download "
                  f"{DEFAULTS[role] + ' --local-dir ' + name if _is_path(name) else name}`, or pass a local folder "
                  f"holding its config.json, weights and preprocessor_config.json, or {TINY!r} for tests")
    if name == TINY:
        loaded = build()
    elif _is_path(name) and not os.path.isdir(os.path.expanduser(name)):
        # A clearer message than from_pretrained's, which would take the path for a malformed hub id.
        raise ModelNotAvailableError(f"{ROLES[role]} folder {name!r} does not exist; {how_to_get}")
    else:
        try:
            loaded = load(name)
        except (OSError, HfHubHTTPError, HFValidationError) as error:
            reason = (str(error).splitlines() or [""])[0]
            raise ModelNotAvailableError(
                f"{ROLES[role]} {name!r}: cannot load it ({type(error).__name__}: {reason}); {how_to_get}"
            ) from error
    loaded.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return loaded


def _is_path(name: str) -> bool:
    """Whether a model name means a local folder rather than a hub id."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return os.path.exists(os.path.expanduser(name))


def _tokenizer(name: str) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(name)
    # Offline, transformers may hand back a tiny placeholder vocabulary instead of failing.
    if len(tokenizer) < MIN_TOKENIZER_VOCAB:
        raise OSError(f"its tokenizer is missing or broken (a vocabulary of {len(tokenizer)} tokens)")
    return tokenizer


def _processor_config(name: str) -> dict:
    from transformers.image_processing_base import ImageProcessingMixin

    return ImageProcessingMixin.get_image_processor_dict(name)[0]


def _pretrained_clip(name: str) -> MetricModel:
    from transformers import CLIPModel

    preprocess = Preprocess.from_processor_config(_processor_config(name), square=False, mean=CLIP_MEAN,
                                                  std=CLIP_STD, resample=Image.Resampling.BICUBIC)
    return MetricModel(name, CLIPModel.from_pretrained(name), preprocess, _tokenizer(name))


def _pretrained_seg(name: str) -> MetricModel:
    from transformers import CLIPSegForImageSegmentation

    preprocess = Preprocess.from_processor_config(_processor_config(name), square=True, mean=IMAGENET_MEAN,
                                                  std=IMAGENET_STD, resample=Image.Resampling.BILINEAR)
    return MetricModel(name, CLIPSegForImageSegmentation.from_pretrained(name), preprocess, _tokenizer(name))


def _pretrained_dino(name: str) -> MetricModel:
    from transformers import ViTModel

    preprocess = Preprocess.from_processor_config(_processor_config(name), square=True, mean=IMAGENET_MEAN,
                                                  std=IMAGENET_STD, resample=Image.Resampling.BILINEAR)
    return MetricModel(name, ViTModel.from_pretrained(name, add_pooling_layer=False), preprocess)


# The tiny built-ins: random weights from fixed seeds (one per model), built in float32 on CPU so
# they are identical on every machine; 32 px inputs and the project's tiny tokenizer.
TINY_IMAGE_SIZE = 32


def _tiny_text_config(tokenizer: CLIPTokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _tiny_vision_config() -> dict:
    return dict(image_size=TINY_IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4)


def _seeded(offset: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(BUILTIN_SEED + offset)
        return build()


def _tiny_clip() -> MetricModel:
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_tokenizer()
    config = CLIPConfig(text_config=_tiny_text_config(tokenizer), vision_config=_tiny_vision_config(),
                        projection_dim=16)
    preprocess = Preprocess(TINY_IMAGE_SIZE, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), CLIP_MEAN, CLIP_STD)
    return MetricModel(TINY, _seeded(100, lambda: CLIPModel(config)), preprocess, tokenizer)


def _tiny_seg() -> MetricModel:
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    tokenizer = tiny_tokenizer()
    config = CLIPSegConfig(text_config=_tiny_text_config(tokenizer), vision_config=_tiny_vision_config(),
                           projection_dim=16, extract_layers=[0, 1], reduce_dim=16, conditional_layer=0,
                           decoder_num_attention_heads=2, decoder_intermediate_size=32)
    preprocess = Preprocess((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), None, IMAGENET_MEAN, IMAGENET_STD,
                            Image.Resampling.BILINEAR)
    return MetricModel(TINY, _seeded(101, lambda: CLIPSegForImageSegmentation(config)), preprocess, tokenizer)


def _tiny_dino() -> MetricModel:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(**_tiny_vision_config())
    preprocess = Preprocess((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), None, IMAGENET_MEAN, IMAGENET_STD,
                            Image.Resampling.BILINEAR)
    return MetricModel(TINY, _seeded(102, lambda: ViTModel(config, add_pooling_layer=False)), preprocess)
