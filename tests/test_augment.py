"""Checks of augment.py against independent computations: hand-computed crops, numpy mirrors and
inversions, the diffusion closed form with numpy's own schedule, diffusers' DDPMScheduler, hashlib."""
import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import augment  # noqa: E402
import common  # noqa: E402
import diffusion  # noqa: E402

SEEDS = range(8)
RANDOM_AUGMENTATIONS = [name for name in augment.AUGMENTATIONS if name != "center_crop"]


@pytest.fixture(scope="module")
def image():
    """A non-square (48 wide, 32 high) RGB image with structure and noise, so every change shows."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:32, 0:48]
    pixels = np.stack([xs * 5, ys * 7, (xs + ys) * 3], axis=-1) + rng.integers(0, 40, (32, 48, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


# ---- image-level augmentations

@pytest.mark.parametrize("name", list(augment.AUGMENTATIONS))
def test_same_seed_same_bytes_rgb_same_size(image, name):
    augmentation = augment.AUGMENTATIONS[name]
    for seed in SEEDS:
        first, second = augmentation(image, seed), augmentation(image, seed)
        assert first.tobytes() == second.tobytes()
        assert first.mode == "RGB" and first.size == image.size


@pytest.mark.parametrize("name", RANDOM_AUGMENTATIONS)
def test_different_seeds_differ(image, name):
    outputs = {augment.AUGMENTATIONS[name](image, seed).tobytes() for seed in SEEDS}
    assert len(outputs) > 1


def test_augmentations_leave_input_unchanged(image):
    before = image.tobytes()
    for augmentation in augment.AUGMENTATIONS.values():
        for seed in SEEDS:
            assert augmentation(image, seed) is not image
    assert image.tobytes() == before


def test_center_crop_is_the_hand_computed_crop(image):
    # 48 x 32 -> keep 3/4: 36 x 24, offsets ((48-36)/2, (32-24)/2) = (6, 4).
    expected = image.crop((6, 4, 42, 28)).resize((48, 32), Image.Resampling.BILINEAR)
    for seed in SEEDS:  # the seed is ignored
        assert augment.center_crop(image, seed).tobytes() == expected.tobytes()


def test_rr_crop_falls_back_to_the_centre_crop_on_a_strip():
    # On a 200 x 10 strip no crop of area >= 8% with aspect in [3/4, 4/3] fits (it would need
    # height >= sqrt(0.08 * 2000 * 3/4) = 11 > 10), so all 10 tries fail and the fallback keeps
    # height 10, width round(10 * 4/3) = 13, left (200 - 13) // 2 = 93.
    strip = Image.fromarray(np.random.default_rng(1).integers(0, 256, (10, 200, 3), dtype=np.uint8), "RGB")
    expected = strip.crop((93, 0, 106, 10)).resize((200, 10), Image.Resampling.BILINEAR)
    assert augment.rr_crop(strip, 3).tobytes() == expected.tobytes()


def test_rand_crop_is_one_of_the_possible_crops(image):
    candidates = {
        image.crop((left, top, left + 36, top + 24)).resize((48, 32), Image.Resampling.BILINEAR).tobytes()
        for left in range(48 - 36 + 1) for top in range(32 - 24 + 1)
    }
    for seed in SEEDS:
        assert augment.rand_crop(image, seed).tobytes() in candidates


def test_rand_flip_is_the_image_or_its_mirror(image):
    pixels = np.asarray(image)
    outcomes = set()
    for seed in SEEDS:
        output = np.asarray(augment.rand_flip(image, seed))
        flipped = np.array_equal(output, pixels[:, ::-1])
        assert flipped or np.array_equal(output, pixels)
        outcomes.add(flipped)
    assert outcomes == {True, False}  # p = 0.5: both happen over 8 seeds


def test_rand_invert_is_the_image_or_its_negative(image):
    pixels = np.asarray(image)
    outcomes = set()
    for seed in SEEDS:
        output = np.asarray(augment.rand_invert(image, seed))
        inverted = np.array_equal(output, 255 - pixels)
        assert inverted or np.array_equal(output, pixels)
        outcomes.add(inverted)
    assert outcomes == {True, False}


def test_rand_affine_keeps_most_content_and_fills_black():
    # A white image: pixels the transformed image does not cover are black, the rest stays white.
    white = Image.new("RGB", (64, 64), "white")
    for seed in SEEDS:
        output = np.asarray(augment.rand_affine(white, seed))
        assert set(np.unique(output)) <= {0, 255}
        assert 0.4 < (output == 255).mean() < 1.0  # scale >= 0.8, shift <= 10%: most stays covered


def test_autoaugment_policy_is_the_imagenet_table():
    assert len(augment.IMAGENET_POLICY) == 25
    for sub_policy in augment.IMAGENET_POLICY:
        assert len(sub_policy) == 2
        for op, probability, magnitude_bin in sub_policy:
            assert 0.0 <= probability <= 1.0
            assert magnitude_bin is None or 0 <= magnitude_bin <= 9
            augment._autoaugment_op(Image.new("RGB", (8, 8)), op, magnitude_bin, 1)  # every op exists


def test_autoaugment_solarize_matches_numpy(image):
    # Bin 5: threshold 255 * (1 - 5/9) = 113.3: pixels >= 114 become 255 - pixel.
    pixels = np.asarray(image).astype(np.int32)
    expected = np.where(pixels >= 114, 255 - pixels, pixels)
    output = np.asarray(augment._autoaugment_op(image, "Solarize", 5, 1))
    assert np.array_equal(output, expected)


# ---- seeds and names

def test_sample_seed_is_sha256_of_seed_and_id():
    # Second route: the first 16 hex digits of sha256("seed:id"), reduced to 63 bits.
    for seed, sample_id in [(3, "textvqa/abc.jpg"), (0, "ocr_vqa/1.jpg"), (7, 12), (123, "x")]:
        expected = int(hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()[:16], 16) % 2**63
        assert common.sample_seed(seed, sample_id) == expected


def test_sample_seed_differs_across_ids_and_run_seeds():
    seeds = {common.sample_seed(0, sample_id) for sample_id in range(100)}
    assert len(seeds) == 100
    assert common.sample_seed(0, "a") != common.sample_seed(1, "a")
    assert common.sample_seed(0, 7) == common.sample_seed(0, "7")  # ids compare by their text


def test_check_augmentation():
    for name in augment.ALL_AUGMENTATIONS:
        augment.check_augmentation(name)
    assert augment.ALL_AUGMENTATIONS[-1] == "diffusion" and len(augment.ALL_AUGMENTATIONS) == 11
    with pytest.raises(ValueError, match="rand_flip.*diffusion"):
        augment.check_augmentation("gaussian")


# ---- diffusion noise

def numpy_sigmoid_alpha_bar():
    """The VCD schedule computed a second way, in numpy."""
    betas = 1 / (1 + np.exp(-np.linspace(-6, 6, 1000))) * (5e-3 - 1e-5) + 1e-5
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 8, 8), (5, 48)])
def test_diffusion_noise_is_the_closed_form(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = diffusion.diffusion_noise(x, 500, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    abar = numpy_sigmoid_alpha_bar()[500]
    expected = math.sqrt(abar) * x + math.sqrt(1 - abar) * eps
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_diffusion_noise_keeps_dtype_and_input():
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    before = x.clone()
    out = diffusion.diffusion_noise(x, 800, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64
    assert torch.equal(x, before)
    assert diffusion.diffusion_noise(x.bfloat16(), 800).dtype == torch.bfloat16


def test_alpha_bar_matches_numpy_and_measured_values():
    abar = diffusion.alpha_bar("sigmoid")
    assert abar.shape == (1000,) and abar.dtype == torch.float64
    np.testing.assert_allclose(abar.numpy(), numpy_sigmoid_alpha_bar(), rtol=1e-12)
    # The authors' schedule, measured independently: t=500 -> 0.863 / 0.505, t=800 -> 0.467 / 0.884.
    for step, signal, noise in [(500, 0.863, 0.505), (800, 0.467, 0.884)]:
        assert abs(abar[step].sqrt().item() - signal) < 2e-3
        assert abs((1 - abar[step]).sqrt().item() - noise) < 2e-3


@pytest.mark.parametrize("step", [0, 250, 999])
def test_linear_schedule_matches_diffusers(step):
    from diffusers import DDPMScheduler  # slow import: only here

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    expected = DDPMScheduler().add_noise(x, noise, torch.tensor([step]))
    out = diffusion.diffusion_noise(x, step, generator=torch.Generator().manual_seed(3), schedule="linear")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad_step", [-1, 1000, 500.0, True, "500", None])
def test_bad_noise_step_raises(bad_step):
    with pytest.raises(ValueError, match="noise_step"):
        diffusion.diffusion_noise(torch.zeros(3, 4, 4), bad_step)


def test_bad_schedule_and_dtype_raise():
    with pytest.raises(ValueError, match="schedule"):
        diffusion.diffusion_noise(torch.zeros(3, 4, 4), 500, schedule="cosine")
    with pytest.raises(ValueError, match="floating"):
        diffusion.diffusion_noise(torch.zeros(3, 4, 4, dtype=torch.uint8), 500)
    assert diffusion.diffusion_noise(torch.zeros(3), np.int64(5)).shape == (3,)  # numpy ints are ints


# ---- grid and CLI

def grid_shape(size):
    """(width, height) of the grid: original + 10 augmentations + 9 noise steps in 5 columns."""
    panels = 1 + len(augment.AUGMENTATIONS) + len(augment.NOISE_STEPS)
    assert panels == 20
    return 5 * size, math.ceil(panels / 5) * (size + augment.LABEL_HEIGHT)


def test_draw_grid_places_each_panel(image):
    size = 32
    grid = augment.draw_grid(image, seed=4, size=size)
    assert grid.size == grid_shape(size)
    square = augment._square(image, size)

    def panel(index):
        left, top = (index % 5) * size, (index // 5) * (size + augment.LABEL_HEIGHT)
        return grid.crop((left, top, left + size, top + size)).tobytes()

    assert panel(0) == square.tobytes()
    assert panel(1) == augment.rand_flip(square, 4).tobytes()
    assert panel(10) == augment.simclr(square, 4).tobytes()


def test_cli_writes_the_grid(tmp_path, image):
    source, out = tmp_path / "in.png", tmp_path / "grid.png"
    image.save(source)
    subprocess.run([sys.executable, os.path.join(REPO, "augment.py"), str(source), "--out", str(out),
                    "--size", "24", "--seed", "1"], check=True, capture_output=True, timeout=120)
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.size == grid_shape(24)
