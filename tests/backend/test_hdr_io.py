"""HDR helpers: the inverse tone curve and its forward preview, OpenEXR and Radiance .hdr files."""

import numpy as np
import pytest
from hdr_reader import read_hdr

from backend.imaging.hdr import (
    DEFAULT_PEAK,
    inverse_tone_map,
    read_exr,
    rgbe_encode,
    srgb_to_linear,
    tone_map_preview,
    write_exr,
    write_hdr,
)
from backend.validation import InputError


def grey_ramp(count: int = 1001) -> np.ndarray:
    return np.repeat(np.linspace(0.0, 1.0, count)[None, :, None], 3, axis=2)


def radiance_sample(seed: int = 0) -> np.ndarray:
    """Colours over six orders of magnitude, with black pixels and black channels among them."""
    rng = np.random.default_rng(seed)
    rgb = rng.uniform(0.0, 1.0, (12, 20, 3)) * 10.0 ** rng.uniform(-3.0, 3.0, (12, 20, 1))
    rgb[0, :4] = 0.0
    rgb[1, :4, 1] = 0.0
    return rgb.astype(np.float32)


# --- the tone curves ---------------------------------------------------------------------------


def test_inverse_tone_map_is_monotonic_from_zero_to_peak():
    grey = inverse_tone_map(grey_ramp())[0, :, 0]
    assert grey[0] == 0.0
    assert np.all(np.diff(grey) > 0)
    assert grey[-1] == pytest.approx(DEFAULT_PEAK, rel=1e-6)
    assert inverse_tone_map(np.ones((1, 1, 3)), peak=20.0)[0, 0] == pytest.approx([20.0] * 3, rel=1e-6)
    # Raising any one channel never lowers any output channel (the curve is convex through 0).
    rng = np.random.default_rng(1)
    base = rng.uniform(0.0, 0.95, (64, 64, 3))
    for channel in range(3):
        brighter = base.copy()
        brighter[..., channel] += rng.uniform(0.0, 0.05, (64, 64))
        assert np.all(inverse_tone_map(brighter) >= inverse_tone_map(base))


def test_mid_tones_keep_their_linear_values_and_highlights_become_hdr():
    mid_grey = np.full((1, 1, 3), 0.5)
    assert inverse_tone_map(mid_grey)[0, 0] == pytest.approx([float(srgb_to_linear(0.5))] * 3, rel=1e-6)
    assert srgb_to_linear(0.5) == pytest.approx(0.21404, abs=1e-5)
    near_white = inverse_tone_map(np.full((1, 1, 3), 0.99))[0, 0, 0]
    assert 5.0 < near_white < DEFAULT_PEAK
    # Hue is kept: channels scale together, so a clipped orange sun stays orange but bright.
    orange = np.array([[[1.0, 0.8, 0.4]]])
    out = inverse_tone_map(orange)[0, 0]
    assert out[0] == pytest.approx(DEFAULT_PEAK, rel=1e-6)
    assert out / out[0] == pytest.approx(srgb_to_linear(orange[0, 0]), rel=1e-5)
    # knee 0 is Banterle's plain inverse Reinhard: it brightens mid-tones as well.
    assert inverse_tone_map(mid_grey, knee=0.0)[0, 0, 0] > 1.1 * srgb_to_linear(0.5)


def test_uint8_input_is_read_as_display_values():
    image = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(inverse_tone_map(image), inverse_tone_map(image / 255.0))


def test_preview_is_the_forward_operator():
    ldr = np.random.default_rng(3).uniform(0.0, 1.0, (32, 32, 3))
    ldr[0, :8] = 1.0
    back = tone_map_preview(inverse_tone_map(ldr))
    assert back.dtype == np.uint8 and back.shape == ldr.shape
    assert np.abs(back.astype(int) - np.rint(ldr * 255.0)).max() <= 1
    assert np.all(tone_map_preview(np.full((1, 1, 3), 1.0e4)) == 255)  # above peak: white


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: inverse_tone_map(np.zeros((4, 4))), "ldr"),
        (lambda: inverse_tone_map(np.full((2, 2, 3), np.nan)), "ldr"),
        (lambda: inverse_tone_map(np.full((2, 2, 3), -0.1)), "ldr"),
        (lambda: inverse_tone_map(np.full((2, 2, 3), 1.5)), "ldr"),
        (lambda: inverse_tone_map(np.zeros((0, 4, 3))), "ldr"),
        (lambda: inverse_tone_map(np.zeros((2, 2, 3)), peak=0.5), "peak"),
        (lambda: inverse_tone_map(np.zeros((2, 2, 3)), knee=1.0), "knee"),
        (lambda: tone_map_preview(np.full((2, 2, 3), np.inf)), "radiance"),
        (lambda: tone_map_preview(np.zeros((2, 2, 4))), "radiance"),
    ],
)
def test_bad_tone_map_input_names_the_field(call, field):
    with pytest.raises(InputError) as err:
        call()
    assert err.value.field == field


# --- OpenEXR -----------------------------------------------------------------------------------


def test_exr_round_trips_float32_exactly_and_half_closely(tmp_path):
    rgb = radiance_sample()
    write_exr(tmp_path / "full.exr", rgb)
    back = read_exr(tmp_path / "full.exr")
    assert back.dtype == np.float32 and np.array_equal(back, rgb)
    write_exr(tmp_path / "half.exr", rgb, half=True)
    half = read_exr(tmp_path / "half.exr")
    assert half.shape == rgb.shape and half.max() > 100.0
    assert np.allclose(half, rgb, rtol=1e-3, atol=1e-7)


def test_bad_exr_input_names_the_field(tmp_path):
    for bad in (np.zeros((4, 4)), np.full((2, 2, 3), -1.0), np.full((2, 2, 3), np.nan)):
        with pytest.raises(InputError) as err:
            write_exr(tmp_path / "bad.exr", bad)
        assert err.value.field == "rgb"
    (tmp_path / "not.exr").write_bytes(b"not an exr file")
    for path in (tmp_path / "missing.exr", tmp_path / "not.exr"):
        with pytest.raises(InputError) as err:
            read_exr(path)
        assert err.value.field == "path"


# --- Radiance .hdr -----------------------------------------------------------------------------


def test_hdr_is_a_flat_radiance_file_and_round_trips_within_rgbe_precision(tmp_path):
    rgb = radiance_sample()
    write_hdr(tmp_path / "a.hdr", rgb)
    data = (tmp_path / "a.hdr").read_bytes()
    header = b"#?RADIANCE\n# mvdiff-blender\nFORMAT=32-bit_rle_rgbe\n\n-Y 12 +X 20\n"
    assert data.startswith(header) and len(data) == len(header) + 12 * 20 * 4
    back = read_hdr(tmp_path / "a.hdr")
    assert back.shape == rgb.shape and back.dtype == np.float32
    # 8 bits per channel relative to the pixel's largest channel: error <= max / 256.
    bound = rgb.max(axis=-1, keepdims=True) / 256.0
    assert np.all(np.abs(back - rgb) <= bound * 1.0001)
    bright = rgb.max(axis=-1) > 1.0
    assert bright.any() and np.allclose(back.max(-1)[bright], rgb.max(-1)[bright], rtol=0.005)
    assert np.all(back[0, :4] == 0.0)  # black pixels stay exactly black


def rle_channel(values: bytes) -> bytes:
    """Standard new-style RLE of one channel of one row: runs of >= 3 as (128 + n, byte), else literals."""
    out, i = bytearray(), 0
    while i < len(values):
        run = 1
        while i + run < len(values) and run < 127 and values[i + run] == values[i]:
            run += 1
        if run >= 3:
            out += bytes([128 + run, values[i]])
            i += run
            continue
        start = i
        while i < len(values) and i - start < 128:
            if i + 2 < len(values) and values[i] == values[i + 1] == values[i + 2]:
                break
            i += 1
        out += bytes([i - start]) + values[start:i]
    return bytes(out)


def rle_row(pixels: np.ndarray) -> bytes:
    width = len(pixels)
    row = bytes([2, 2, width >> 8, width & 0xFF])
    return row + b"".join(rle_channel(pixels[:, c].tobytes()) for c in range(4))


def test_hdr_reader_takes_run_length_rows_bottom_up_order_and_exposure(tmp_path):
    height, width = 3, 300
    rgb = np.zeros((height, width, 3), np.float32)
    rgb[0] = [4.0, 2.0, 1.0]  # one colour: runs of 127, 127 and 46
    rgb[1] = np.random.default_rng(4).uniform(0.0, 50.0, (width, 3))  # mostly literals
    rgb[2, :150] = [0.5, 0.25, 0.125]
    rgb[2, 150:] = np.linspace(0.0, 3.0, 150)[:, None]
    rgbe = rgbe_encode(rgb)
    rows = [rle_row(rgbe[0]), rle_row(rgbe[1]), rgbe[2].tobytes()]  # each row decides: the last is flat
    assert len(rows[0]) < 40 and rows[0][4] == 128 + 127
    header = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 3 +X 300\n"
    (tmp_path / "rle.hdr").write_bytes(header + b"".join(rows))
    back = read_hdr(tmp_path / "rle.hdr")
    assert back.shape == (height, width, 3)
    assert np.all(np.abs(back - rgb) <= rgb.max(axis=-1, keepdims=True) / 256.0 * 1.0001)
    assert np.allclose(back[0], [4.0, 2.0, 1.0], atol=4.0 / 256.0)

    flipped = b"#?RGBE\nEXPOSURE=2.0\nFORMAT=32-bit_rle_rgbe\n\n+Y 3 +X 300\n"
    (tmp_path / "flipped.hdr").write_bytes(flipped + b"".join(rows))
    assert np.allclose(read_hdr(tmp_path / "flipped.hdr"), back[::-1] / 2.0)


def test_bad_hdr_files_and_input_name_the_field(tmp_path):
    for bad in (np.zeros((2, 2, 2)), np.full((2, 2, 3), -1.0), np.full((2, 2, 3), np.nan)):
        with pytest.raises(InputError) as err:
            write_hdr(tmp_path / "bad.hdr", bad)
        assert err.value.field == "rgb"
    write_hdr(tmp_path / "good.hdr", radiance_sample())
    good = (tmp_path / "good.hdr").read_bytes()
    broken = {
        "missing.hdr": None,
        "signature.hdr": b"P6\n" + good,
        "truncated.hdr": good[:-10],
        "xyze.hdr": good.replace(b"32-bit_rle_rgbe", b"32-bit_rle_xyze"),
        "rotated.hdr": good.replace(b"-Y 12 +X 20", b"+X 20 -Y 12"),
        "bad_run.hdr": b"#?RADIANCE\n\n-Y 1 +X 8\n" + bytes([2, 2, 0, 8, 128 + 9, 1]) + bytes(32),
    }
    for name, data in broken.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError) as err:
            read_hdr(tmp_path / name)
        assert err.value.field == "path", name
