"""The image distortions T(I) that make SeVa's rejected answers (paper Alg. 1, Fig. 2, Table 1).

SeVa asks the model the same question twice: on the original image I (-> chosen answer) and on an
augmented image T(I) (-> rejected answer). This file holds every T of the paper:

  * image-level augmentations of Fig. 2 (RandFlip ... SimCLR), each `name(image, seed) -> image`,
    deterministic given its seed; `sample_seed(seed, sample_id)` gives each sample its own seed;
  * diffusion noise (the paper's default, Sec. 4.1, diffusion.py), which acts on the processor's
    normalized pixel tensor, not on the PIL image, as in the authors' code;
  * `augmented_batch`, T(I) for a batch of samples as generate.py takes it: images and a pixel transform.

torchvision cannot be imported beside our torch, so the standard recipes are re-written with PIL;
where a recipe's constants come from torchvision or the SSL papers, the comment says so.

CLI: `python augment.py IMAGE --out grid.png` draws the image under every augmentation in one grid.
"""

import argparse
import math
import os
import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

import common
import diffusion
import vlm
from common import sample_seed

BILINEAR = Image.Resampling.BILINEAR
NEAREST = Image.Resampling.NEAREST


# ---- geometric building blocks

def _random_resized_crop(image, rng, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop: 10 tries at a random area/aspect, else a centre crop."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = rng.randint(0, height - crop_height)
            left = rng.randint(0, width - crop_width)
            break
    else:  # fallback: the largest centred crop whose aspect lies inside `ratio`
        crop_width, crop_height = width, height
        if width / height < ratio[0]:
            crop_height = round(width / ratio[0])
        elif width / height > ratio[1]:
            crop_width = round(height * ratio[1])
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
    box = (left, top, left + crop_width, top + crop_height)
    # Resize back to the input size so the VLM's processor sees the same kind of image.
    return image.crop(box).resize(image.size, BILINEAR)


CROP_FRACTION = 0.75  # RandCrop / CenterCrop keep 3/4 of each side (the paper gives no size)


def _crop_size(image):
    """(width, height) of a CROP_FRACTION crop."""
    width, height = image.size
    return max(1, round(width * CROP_FRACTION)), max(1, round(height * CROP_FRACTION))


# ---- colour building blocks (torchvision's ColorJitter / RandomGrayscale / SSL blur, on PIL)

def _adjust_hue(image, hue_shift):
    """Rotate the hue by hue_shift (a fraction of the colour wheel, in [-0.5, 0.5]) in HSV."""
    hue, saturation, value = image.convert("HSV").split()
    shifted = (np.asarray(hue, dtype=np.int32) + round(hue_shift * 255)) % 256
    hue = Image.fromarray(shifted.astype(np.uint8), "L")
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def _color_jitter(image, rng, brightness, contrast, saturation, hue):
    """ColorJitter: factors drawn from [1-s, 1+s] (hue from [-h, h]), applied in a random order."""
    brightness_factor = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
    contrast_factor = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
    saturation_factor = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
    hue_shift = rng.uniform(-hue, hue)
    adjustments = [
        lambda img: ImageEnhance.Brightness(img).enhance(brightness_factor),
        lambda img: ImageEnhance.Contrast(img).enhance(contrast_factor),
        lambda img: ImageEnhance.Color(img).enhance(saturation_factor),
        lambda img: _adjust_hue(img, hue_shift),
    ]
    rng.shuffle(adjustments)
    for adjust in adjustments:
        image = adjust(image)
    return image


def _grayscale(image):
    """Grayscale kept as 3 channels, so the output is still RGB."""
    return image.convert("L").convert("RGB")


def _gaussian_blur(image, rng):
    """The SSL recipes' blur: sigma ~ U(0.1, 2.0) (PIL's `radius` is the standard deviation)."""
    return image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))


def _happens(rng, probability):
    """True with the given probability (a RandomApply coin)."""
    return rng.random() < probability


# ---- image-level augmentations of Fig. 2 (each: RGB image, seed -> RGB image of the same size)

def rand_flip(image: Image.Image, seed: int) -> Image.Image:
    """RandFlip: horizontal mirror with p=0.5."""
    rng = random.Random(seed)
    return ImageOps.mirror(image) if _happens(rng, 0.5) else image.copy()


def rr_crop(image: Image.Image, seed: int) -> Image.Image:
    """RRCrop: random resized crop, scale (0.08, 1), ratio (3/4, 4/3), resized back."""
    return _random_resized_crop(image, random.Random(seed), scale=(0.08, 1.0))


def rand_crop(image: Image.Image, seed: int) -> Image.Image:
    """RandCrop: a 3/4-side crop at a uniform random position, resized back."""
    rng = random.Random(seed)
    crop_width, crop_height = _crop_size(image)
    left = rng.randint(0, image.width - crop_width)
    top = rng.randint(0, image.height - crop_height)
    return image.crop((left, top, left + crop_width, top + crop_height)).resize(image.size, BILINEAR)


def center_crop(image: Image.Image, seed: int) -> Image.Image:
    """CenterCrop: the central 3/4-side crop, resized back (seed unused; kept for one signature)."""
    crop_width, crop_height = _crop_size(image)
    left = round((image.width - crop_width) / 2)  # torchvision rounds the offsets this way
    top = round((image.height - crop_height) / 2)
    return image.crop((left, top, left + crop_width, top + crop_height)).resize(image.size, BILINEAR)


def rand_affine(image: Image.Image, seed: int) -> Image.Image:
    """RandomAffine: rotate +-30 deg, translate 0.1, scale (0.8, 1.2), x-shear +-10 deg, about the centre."""
    rng = random.Random(seed)
    angle = math.radians(rng.uniform(-30, 30))
    shift_x = round(rng.uniform(-0.1, 0.1) * image.width)  # torchvision rounds to whole pixels
    shift_y = round(rng.uniform(-0.1, 0.1) * image.height)
    scale = rng.uniform(0.8, 1.2)
    shear = math.radians(rng.uniform(-10, 10))
    center_x, center_y = image.width * 0.5, image.height * 0.5
    # Forward map of a pixel: move the centre to the origin, scale, shear, rotate, move back, shift.
    to_origin = np.array([[1, 0, -center_x], [0, 1, -center_y], [0, 0, 1]])
    scaling = np.diag([scale, scale, 1.0])
    shearing = np.array([[1, math.tan(shear), 0], [0, 1, 0], [0, 0, 1]])
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
    back = np.array([[1, 0, center_x + shift_x], [0, 1, center_y + shift_y], [0, 0, 1]])
    forward = back @ rotation @ shearing @ scaling @ to_origin
    # PIL wants the inverse map (output pixel -> input pixel); uncovered pixels become black.
    inverse = np.linalg.inv(forward)[:2].flatten()
    return image.transform(image.size, Image.Transform.AFFINE, tuple(inverse), resample=NEAREST)


def rand_invert(image: Image.Image, seed: int) -> Image.Image:
    """RandomInvert: 255 - pixel with p=0.5."""
    rng = random.Random(seed)
    return ImageOps.invert(image) if _happens(rng, 0.5) else image.copy()


# AutoAugment's ImageNet policy (Cubuk et al. 2019): 25 sub-policies of two (op, probability,
# magnitude bin) steps. One sub-policy is picked per image. Listed as in torchvision.
IMAGENET_POLICY = [
    (('Posterize', 0.4, 8), ('Rotate', 0.6, 9)), (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)), (('Posterize', 0.6, 7), ('Posterize', 0.6, 6)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)), (('Equalize', 0.4, None), ('Rotate', 0.8, 8)),
    (('Solarize', 0.6, 3), ('Equalize', 0.6, None)), (('Posterize', 0.8, 5), ('Equalize', 1.0, None)),
    (('Rotate', 0.2, 3), ('Solarize', 0.6, 8)), (('Equalize', 0.6, None), ('Posterize', 0.4, 6)),
    (('Rotate', 0.8, 8), ('Color', 0.4, 0)), (('Rotate', 0.4, 9), ('Equalize', 0.6, None)),
    (('Equalize', 0.0, None), ('Equalize', 0.8, None)), (('Invert', 0.6, None), ('Equalize', 1.0, None)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)), (('Rotate', 0.8, 8), ('Color', 1.0, 2)),
    (('Color', 0.8, 8), ('Solarize', 0.8, 7)), (('Sharpness', 0.4, 7), ('Invert', 0.6, None)),
    (('ShearX', 0.6, 5), ('Equalize', 1.0, None)), (('Color', 0.4, 0), ('Equalize', 0.6, None)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)), (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Invert', 0.6, None), ('Equalize', 1.0, None)), (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
]
ENHANCERS = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
             "Sharpness": ImageEnhance.Sharpness}


def _autoaugment_op(image, op, magnitude_bin, sign):
    """One AutoAugment op; magnitudes follow torchvision's 10 bins (bin 9 is the strongest)."""
    level = 0.0 if magnitude_bin is None else magnitude_bin / 9
    if op == "ShearX":  # shear factor up to 0.3, about the top-left corner
        shear = (1, sign * 0.3 * level, 0, 0, 1, 0)
        return image.transform(image.size, Image.Transform.AFFINE, shear, resample=NEAREST)
    if op == "Rotate":  # up to 30 degrees
        return image.rotate(sign * 30 * level, resample=NEAREST)
    if op in ENHANCERS:  # enhancement factor 1 +- 0.9 (torchvision's range; TF's was 0.1..1.9)
        return ENHANCERS[op](image).enhance(1 + sign * 0.9 * level)
    if op == "Posterize":  # keep 8 down to 4 bits
        return ImageOps.posterize(image, 8 - round(4 * level))
    if op == "Solarize":  # invert pixels >= a threshold from 255 down to 0
        return ImageOps.solarize(image, 255 * (1 - level))
    if op == "AutoContrast":
        return ImageOps.autocontrast(image)
    if op == "Equalize":
        return ImageOps.equalize(image)
    if op == "Invert":
        return ImageOps.invert(image)
    raise ValueError(f"unknown AutoAugment op {op!r}")


def auto_augment(image: Image.Image, seed: int) -> Image.Image:
    """AutoAugment, ImageNet policy: one random sub-policy, each step applied with its probability."""
    rng = random.Random(seed)
    for op, probability, magnitude_bin in rng.choice(IMAGENET_POLICY):
        sign = rng.choice((-1, 1))  # drawn for every step so the stream of draws is fixed
        if _happens(rng, probability):
            image = _autoaugment_op(image, op, magnitude_bin, sign)
    return image.copy()


def moco(image: Image.Image, seed: int) -> Image.Image:
    """MoCo v2 mixture: rrc (0.2, 1), jitter 0.4/0.4/0.4/0.1 p=0.8, gray p=0.2, blur p=0.5, flip p=0.5."""
    # Not in the authors' code; the recipe of Chen et al. 2020 (MoCo v2), in its order.
    rng = random.Random(seed)
    image = _random_resized_crop(image, rng, scale=(0.2, 1.0))
    if _happens(rng, 0.8):
        image = _color_jitter(image, rng, 0.4, 0.4, 0.4, 0.1)
    if _happens(rng, 0.2):
        image = _grayscale(image)
    if _happens(rng, 0.5):
        image = _gaussian_blur(image, rng)
    if _happens(rng, 0.5):
        image = ImageOps.mirror(image)
    return image


def _ssl_view(image, seed, jitter, blur_probability):
    """The BYOL / SimCLR recipe: rrc (0.08, 1), flip p=0.5, colour jitter p=0.8, gray p=0.2, blur."""
    rng = random.Random(seed)
    image = _random_resized_crop(image, rng, scale=(0.08, 1.0))
    if _happens(rng, 0.5):
        image = ImageOps.mirror(image)
    if _happens(rng, 0.8):
        image = _color_jitter(image, rng, *jitter)
    if _happens(rng, 0.2):
        image = _grayscale(image)
    if blur_probability >= 1 or _happens(rng, blur_probability):  # BYOL always blurs: no coin drawn
        image = _gaussian_blur(image, rng)
    return image


def byol(image: Image.Image, seed: int) -> Image.Image:
    """BYOL view-1 mixture: rrc, flip, jitter 0.4/0.4/0.2/0.1 p=0.8, gray p=0.2, blur p=1.0."""
    # Grill et al. 2020, Table 6, first view: its solarize has p=0.0, so it never happens here.
    return _ssl_view(image, seed, (0.4, 0.4, 0.2, 0.1), 1.0)


def simclr(image: Image.Image, seed: int) -> Image.Image:
    """SimCLR mixture: rrc, flip, jitter 0.8/0.8/0.8/0.2 p=0.8, gray p=0.2, blur p=0.5."""
    # Chen et al. 2020, Appendix A: colour strength s=1 (0.8s, 0.8s, 0.8s, 0.2s).
    return _ssl_view(image, seed, (0.8, 0.8, 0.8, 0.2), 0.5)


# ---- T(I) for a batch: what seva.py and eval/ call
def noise_transform(sample_ids, noise_step: int, seed: int, schedule: str = "sigmoid"):
    """generate.py's pixel_transform for a batch whose image i belongs to sample_ids[i]: each sample's own
    diffusion noise, seeded by (seed, its id), on the processor's normalized pixels (as the authors)."""
    return lambda pixels, rows: diffusion.diffusion_noise_rows(pixels, [sample_ids[i] for i in rows], noise_step, seed,
                                                               schedule)


def augmented_batch(augmentation: str, images, sample_ids, seed: int, noise_step: int = 500,
                    schedule: str = "sigmoid"):
    """T(I) for a batch, as (images, pixel_transform) for generate.py: diffusion noise acts on the processor's
    pixels (the images stay as they are); every other augmentation transforms each image, seeded per sample."""
    if augmentation == "diffusion":
        return images, noise_transform(sample_ids, noise_step, seed, schedule)
    transform = AUGMENTATIONS[augmentation]
    return [transform(image, sample_seed(seed, i)) for image, i in zip(images, sample_ids)], None


# ---- registry

AUGMENTATIONS = {
    "rand_flip": rand_flip,
    "rr_crop": rr_crop,
    "rand_crop": rand_crop,
    "center_crop": center_crop,
    "rand_affine": rand_affine,
    "rand_invert": rand_invert,
    "auto_augment": auto_augment,
    "moco": moco,
    "byol": byol,
    "simclr": simclr,
}
ALL_AUGMENTATIONS = list(AUGMENTATIONS) + ["diffusion"]


def check_augmentation(name: str) -> None:
    """Raise ValueError unless name is one of ALL_AUGMENTATIONS."""
    if name not in ALL_AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(ALL_AUGMENTATIONS)}")


# ---- grid of every augmentation (CLI)

NOISE_STEPS = tuple(range(100, 1000, 100))
GRID_COLUMNS = 5
LABEL_HEIGHT = 14  # pixels of caption strip under each panel


def _square(image, size):
    """Pad to a square with the CLIP mean colour (as LLaVA-1.5 does), then resize to size x size."""
    return vlm.pad_to_square(image).resize((size, size), Image.Resampling.BICUBIC)


def _noised_picture(image, noise_step, seed, schedule):
    """The image under diffusion noise at noise_step, for display."""
    # Noise acts on the CLIP-normalized tensor as in training; un-normalizing and clipping it back
    # to a picture is only an illustration of what the model sees, not the model's input.
    mean, std = torch.tensor(vlm.CLIP_MEAN).view(3, 1, 1), torch.tensor(vlm.CLIP_STD).view(3, 1, 1)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)
    generator = torch.Generator().manual_seed(seed)
    noised = diffusion.diffusion_noise((pixels - mean) / std, noise_step, generator, schedule) * std + mean
    return Image.fromarray((noised.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def draw_grid(image: Image.Image, seed: int, size: int = 224, schedule: str = "sigmoid") -> Image.Image:
    """One labelled grid: the original, every image-level augmentation, then noise at steps 100..900. A random
    augmentation that leaves this image unchanged with this seed (a flip or an inversion not drawn) says so."""
    square = _square(image.convert("RGB"), size)
    panels = [("original", square)]
    for name, augment in AUGMENTATIONS.items():
        panel = augment(square, seed)
        same = panel.size == square.size and panel.convert("RGB").tobytes() == square.tobytes()
        panels.append((f"{name}: not drawn (seed {seed})" if same else name, panel))
    panels += [(f"diffusion t={step}", _noised_picture(square, step, seed, schedule)) for step in NOISE_STEPS]
    rows = math.ceil(len(panels) / GRID_COLUMNS)
    grid = Image.new("RGB", (GRID_COLUMNS * size, rows * (size + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (label, panel) in enumerate(panels):
        left, top = (index % GRID_COLUMNS) * size, (index // GRID_COLUMNS) * (size + LABEL_HEIGHT)
        grid.paste(panel, (left, top))
        draw.text((left + 2, top + size + 1), label, fill="black")
    return grid


def parse_args(argv=None):
    """The CLI's arguments."""
    parser = argparse.ArgumentParser(description="Draw an image under every SeVa augmentation (Fig. 2).",
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("image", help="path of the input image")
    parser.add_argument("--out", default="runs/augment/grid.png", help="path of the grid PNG to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of every augmentation and of the noise")
    parser.add_argument("--size", type=int, default=224, help="side of each square panel in pixels")
    parser.add_argument("--schedule", default="sigmoid", choices=["sigmoid", "linear"],
                        help="noise schedule: sigmoid (authors' VCD code) or linear (DDPM)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    grid = draw_grid(vlm.load_image(args.image, pad=False), args.seed, args.size, args.schedule)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with common.atomic_path(args.out) as tmp:
        grid.save(tmp, format="PNG")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    common.run_main(main, "augment.py")
