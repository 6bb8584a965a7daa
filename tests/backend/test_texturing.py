"""The whole scene-texturing job on the demo room with the tiny models (outputs are noise, files are real)."""

import json
import struct
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from backend.engine import ModelConfig, ModelSet
from backend.eval.consistency import depth_overlap_psnr
from backend.geometry.cameras import Camera, look_at
from backend.geometry.mesh import Mesh
from backend.geometry.raster import rasterize_uv
from backend.geometry.render import render_depth
from backend.geometry.uv_atlas import ensure_uvs
from backend.pipelines.context import JobContext
from backend.pipelines.sampling import Cancelled
from backend.pipelines.texturing import STAGES, run_texture_job, unwrap_padding
from backend.pipelines.texturing_outputs import encode_png16
from backend.protocol import GenerationSettings, TextureJob
from backend.scenes.demo_room import build_demo_room, trajectory
from backend.scenes.shapes import box, icosphere, orient
from backend.validation import InputError

SIZE = 128
STEPS = 2
# Eight close poses of a 72-pose loop: keyframes [0, 4, 7] with in-between frames [1, 2, 3] and [5, 6].
KEYFRAMES = [0, 4, 7]


@pytest.fixture(scope="module")
def models():
    return ModelSet(ModelConfig.tiny())


@pytest.fixture(scope="module")
def scene():
    room = build_demo_room()
    cameras = trajectory(72, width=128, height=64)[:8]
    return room, cameras, [render_depth(room.mesh, camera) for camera in cameras]


def make_job(scene, mesh=None, names=None, prompts=("a cosy living room",), **kwargs) -> TextureJob:
    room, cameras, depths = scene
    settings = GenerationSettings(list(prompts), steps=STEPS, seed=1)
    names = room.object_names if names is None else names
    return TextureJob(settings, cameras, depths, room.mesh if mesh is None else mesh, SIZE, names, **kwargs)


class Recorder:
    def __init__(self):
        self.progress, self.previews = [], []

    def context(self, out_dir: Path, **kwargs) -> JobContext:
        return JobContext(out_dir, on_progress=lambda *event: self.progress.append(event),
                          on_preview=self.previews.append, **kwargs)


@pytest.fixture(scope="module")
def default_run(models, scene, tmp_path_factory):
    """A job without UVs, 8 bits, memory level 0, a preview every step."""
    recorder = Recorder()
    out = tmp_path_factory.mktemp("texture_job")
    report = run_texture_job(make_job(scene), models.sampler("depth"), recorder.context(out, preview_every=1))
    return out, report, recorder


def read_png16(path: Path) -> np.ndarray:
    """A minimal decoder for 16-bit RGB PNGs (Pillow only reads them as 8 bits): every filter type."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat, header = 8, b"", None
    while offset < len(data):
        (length,), kind = struct.unpack(">I", data[offset : offset + 4]), data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])[0]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert (depth, colour, interlace) == (16, 2, 0)
    stride, bpp = width * 6, 6
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.int64)
    for row in range(height):
        kind, line = raw[row, 0], raw[row, 1:].astype(np.int64)
        above = out[row - 1] if row else np.zeros(stride, np.int64)
        for x in range(stride):
            left = out[row, x - bpp] if x >= bpp else 0
            upper_left = above[x - bpp] if x >= bpp else 0
            if kind == 4:
                p = left + above[x] - upper_left
                pa, pb, pc = abs(p - left), abs(p - above[x]), abs(p - upper_left)
                pred = left if pa <= pb and pa <= pc else above[x] if pb <= pc else upper_left
            else:
                pred = [0, left, above[x], (left + above[x]) // 2][kind]
            out[row, x] = (line[x] + pred) % 256
    return out.astype(np.uint8).reshape(height, width, 3, 2).astype(np.uint16) @ np.array([256, 1], np.uint16)


def test_whole_job_writes_texture_masks_frames_and_report(default_run, scene):
    out, report, _ = default_run
    cameras = scene[1]
    texture = iio.imread(out / "texture.png")
    assert texture.dtype == np.uint8 and texture.shape == (SIZE, SIZE, 3)
    assert texture.reshape(-1, 3).std(axis=0).max() > 5  # not a constant colour
    seen, filled = iio.imread(out / "seen_mask.png"), iio.imread(out / "filled_mask.png")
    assert seen.shape == filled.shape == (SIZE, SIZE) and seen.dtype == np.uint8
    assert set(np.unique(seen)) <= {0, 255} and seen.any() and not (seen & filled).any()
    frames = sorted((out / "frames").iterdir())
    assert [f.name for f in frames] == [f"frame_{k:04d}.png" for k in range(len(cameras))]
    assert all(iio.imread(f).shape == (64, 128, 3) for f in frames)

    assert json.loads((out / "report.json").read_text()) == report
    assert report["kind"] == "texture" and report["frames"] == len(cameras)
    assert report["keyframes"] == KEYFRAMES and report["windows"] == 2 and report["weak_links"] == []
    assert report["isolated_views"] == []
    assert (report["texture_size"], report["texture_bits"], report["unwrapped"]) == (SIZE, 8, True)
    assert report["memory_level"] == 0
    assert set(report["seconds"]) == set(STAGES) and all(s >= 0 for s in report["seconds"].values())
    # Coverage is the share of the atlas' texels some frame saw; eight close poses looking into one
    # corner of the room see about 6 % of all its surfaces (walls, floor, ceiling, furniture).
    covered = rasterize_uv(ensure_uvs(scene[0].mesh, SIZE, unwrap_padding(SIZE)).mesh, SIZE).covered
    assert report["coverage"] == pytest.approx(np.count_nonzero(seen) / np.count_nonzero(covered), abs=1e-5)
    assert 0.04 < report["coverage"] < 1.0
    # The reported overlap PSNR is the one of the frames the job wrote (PNG is lossless).
    written = [iio.imread(f) for f in frames]
    expected = depth_overlap_psnr(written, cameras, scene[2]).mean_psnr
    assert report["overlap_psnr_db"] == pytest.approx(expected, abs=1e-3)
    # Noise frames are less consistent than any single texture seen from the same poses.
    assert 0.0 < report["overlap_psnr_ratio"] < 1.0
    assert report["overlap_pairs"] == report["overlap_psnr_ratio_pairs"] == len(cameras) - 1  # few: all


def test_the_consistency_reference_renders_only_a_few_pairs_of_a_long_trajectory(models, scene, tmp_path,
                                                                                   monkeypatch):
    from backend.pipelines import texturing

    rendered = []
    real_render = texturing.render_textured
    monkeypatch.setattr(texturing, "REFERENCE_PAIRS", 2)
    monkeypatch.setattr(texturing, "render_textured", lambda *args: rendered.append(args[2]) or real_render(*args))
    job = make_job(scene)
    job.settings.steps = 1
    report = run_texture_job(job, models.sampler("depth"), JobContext(tmp_path))
    assert (report["overlap_pairs"], report["overlap_psnr_ratio_pairs"]) == (7, 2)
    # The first and the last pair: frames 0, 1 and 6, 7.
    assert [job.cameras.index(camera) for camera in rendered] == [0, 1, 6, 7]
    assert 0.0 < report["overlap_psnr_ratio"]


def test_progress_counts_steps_per_stage_and_previews_decode_a_view(default_run):
    _, _, recorder = default_run
    starts = [stage for stage, step, _ in recorder.progress if step == 0]
    assert starts == list(STAGES)
    keyframes = [(step, total) for stage, step, total in recorder.progress if stage == "keyframes"]
    assert keyframes == [(0, STEPS)] + [(s, STEPS) for s in range(1, STEPS + 1)]
    interpolation = [(step, total) for stage, step, total in recorder.progress if stage == "interpolation"]
    batches = 2  # [1, 2, 3] and [5, 6] each fit one batch at memory level 0
    assert interpolation == [(s, batches * STEPS) for s in range(batches * STEPS + 1)]
    assert len(recorder.previews) == (1 + batches) * STEPS
    assert all(p.shape == (64, 128, 3) and p.dtype == np.uint8 for p in recorder.previews)


def test_unwrapped_mesh_gets_uvs_per_object_in_triangle_order(default_run, scene):
    out, _, _ = default_run
    room, _, _ = scene
    with np.load(out / "uvs.npz", allow_pickle=False) as archive:
        uvs = {name: archive[name] for name in archive.files}
    assert list(uvs) == room.object_names
    for k, name in enumerate(room.object_names):
        count = int(np.count_nonzero(room.mesh.object_ids == k))
        assert uvs[name].shape == (count, 3, 2) and uvs[name].dtype == np.float32
        assert uvs[name].min() >= 0.0 and uvs[name].max() <= 1.0
    # The same UVs the backend baked with: the deterministic unwrap of the job mesh.
    atlas = ensure_uvs(room.mesh, SIZE, unwrap_padding(SIZE))
    np.testing.assert_array_equal(uvs["table"], atlas.mesh.uvs[room.mesh.object_ids == 3])


def test_given_uvs_are_baked_into_and_not_sent_back(models, scene, tmp_path):
    room, _, _ = scene
    # The mesh's own UVs squeezed into the left half of the square: the right half must stay empty.
    uvs = ensure_uvs(room.mesh, SIZE).mesh.uvs * np.array([0.5, 1.0], np.float32)
    job = make_job(scene, mesh=room.mesh.with_uvs(uvs))
    report = run_texture_job(job, models.sampler("depth"), JobContext(tmp_path))
    assert report["unwrapped"] is False
    assert not (tmp_path / "uvs.npz").exists()
    seen = iio.imread(tmp_path / "seen_mask.png") > 0
    assert seen[:, : SIZE // 2].any() and not seen[:, SIZE // 2 + 1 :].any()
    texture = iio.imread(tmp_path / "texture.png")
    assert not texture[:, SIZE // 2 + 10 :].any()  # beyond the islands' padding nothing was painted


def test_16_bit_texture_is_a_real_16_bit_png(models, scene, tmp_path):
    report = run_texture_job(make_job(scene, names=[], texture_bits=16), models.sampler("depth"), JobContext(tmp_path))
    assert report["texture_bits"] == 16
    texture = read_png16(tmp_path / "texture.png")
    assert texture.dtype == np.uint16 and texture.shape == (SIZE, SIZE, 3)
    assert (texture & 0xFF).any()  # low bytes in use: more than 8 bits of precision
    # Pillow decodes the same file independently (to 8 bits, from the high bytes).
    with Image.open(tmp_path / "texture.png") as image:
        assert image.tile[0].args == "RGB;16B"
        np.testing.assert_array_equal(np.asarray(image), (texture >> 8).astype(np.uint8))
    with np.load(tmp_path / "uvs.npz") as archive:  # a job without object names
        assert archive.files == [f"object_{k}" for k in range(scene[0].mesh.num_objects)]


def test_png16_encoder_round_trips_every_value(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    (tmp_path / "values.png").write_bytes(encode_png16(pixels))
    np.testing.assert_array_equal(read_png16(tmp_path / "values.png"), pixels)


def test_cancel_during_keyframes_stops_the_job_without_a_texture(models, scene, tmp_path):
    stages = []
    ctx = JobContext(tmp_path)

    def on_progress(stage, step, total):
        stages.append(stage)
        if stage == "keyframes" and step == 1:
            ctx.cancel.set()

    ctx.on_progress = on_progress
    with pytest.raises(Cancelled):
        run_texture_job(make_job(scene), models.sampler("depth"), ctx)
    assert "interpolation" not in stages
    assert not (tmp_path / "texture.png").exists() and not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("stage", ["keyframe_selection", "bake", "write"])
def test_cancel_inside_a_stage_stops_it_before_its_last_step(models, scene, stage, tmp_path):
    # Thousands of views take hours to select keyframes from, and a large bake minutes: cancel
    # must act between the views of a stage, not at its end.
    ctx = JobContext(tmp_path)
    events = []

    def on_progress(name, step, total):
        events.append((name, step, total))
        if name == stage and step == 2:
            ctx.cancel.set()

    ctx.on_progress = on_progress
    with pytest.raises(Cancelled):
        run_texture_job(make_job(scene), models.sampler("depth"), ctx)
    steps = [(step, total) for name, step, total in events if name == stage]
    assert max(step for step, _ in steps) == 2 and steps[-1][1] >= len(scene[1]) > 2
    assert events[-1][0] == stage  # no later stage started
    assert not (tmp_path / "texture.png").exists() and not (tmp_path / "report.json").exists()


def test_memory_level_2_splits_guidance_and_shortens_windows(models, scene, tmp_path):
    sampler = models.sampler("depth")
    batches = []
    recorder = Recorder()
    ctx = recorder.context(tmp_path, memory_level=2)
    hook = sampler.model.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    try:
        report = run_texture_job(make_job(scene), sampler, ctx)
    finally:
        hook.remove()
    # One guidance half per UNet call: the 3 keyframes, then each batch of in-between frames with its
    # two end keyframes (2 + 2, 1 + 2 and 2 + 2 views); both halves at once would double each.
    assert sorted(set(batches)) == [3, 4]
    # At most 10 >> 2 = 2 in-between frames per batch: [1, 2], [3] and [5, 6].
    totals = {total for stage, _, total in recorder.progress if stage == "interpolation"}
    assert totals == {3 * STEPS}
    assert iio.imread(tmp_path / "texture.png").shape == (SIZE, SIZE, 3)
    assert report["keyframes"] == KEYFRAMES


def test_single_frame_is_its_own_keyframe_and_has_no_overlap_score(models, scene, tmp_path):
    room, cameras, depths = scene
    job = TextureJob(GenerationSettings(["a room"], steps=1), cameras[:1], depths[:1], room.mesh, SIZE)
    report = run_texture_job(job, models.sampler("depth"), JobContext(tmp_path))
    assert report["keyframes"] == [0] and report["windows"] == 0 and report["frames"] == 1
    assert report["overlap_psnr_db"] is None and report["overlap_psnr_ratio"] is None
    assert (tmp_path / "texture.png").exists()


def test_small_textures_get_narrower_gutters_between_charts(models, scene, tmp_path):
    # 64 texels cannot hold the demo room's charts 4 texels apart; the job still fits them.
    assert unwrap_padding(64) == 2 and unwrap_padding(1024) == 4 and unwrap_padding(8192) == 8
    room, cameras, depths = scene
    job = TextureJob(GenerationSettings(["a room"], steps=1), cameras[:2], depths[:2], room.mesh, 64)
    run_texture_job(job, models.sampler("depth"), JobContext(tmp_path))
    assert iio.imread(tmp_path / "texture.png").shape == (64, 64, 3)


def test_prompt_count_must_be_one_or_one_per_view(models, scene, tmp_path):
    with pytest.raises(InputError) as err:
        run_texture_job(make_job(scene, prompts=("a", "b")), models.sampler("depth"), JobContext(tmp_path))
    assert err.value.field == "prompts"
    assert not any(tmp_path.iterdir())


def test_views_the_unet_cannot_halve_are_refused_naming_the_cameras(models, scene, tmp_path):
    room, _, _ = scene
    cameras = trajectory(72, width=96, height=64)[:2]
    job = TextureJob(GenerationSettings(["a room"], steps=1), cameras, [render_depth(room.mesh, c) for c in cameras],
                     room.mesh, SIZE)
    with pytest.raises(InputError) as err:
        run_texture_job(job, models.sampler("depth"), JobContext(tmp_path))
    assert err.value.field == "cameras"
    assert not any(tmp_path.iterdir())


def sphere_job(eyes, mesh=None, fov=70.0) -> TextureJob:
    """A job on a sphere (outward normals) from cameras at ``eyes`` looking at points beside the centre."""
    mesh = mesh or Mesh(*icosphere([0.0, 0.0, 0.0], 1.0, 2))
    cameras = [Camera.from_fov(fov, 64, 64, look_at(eye, [0.1, 0.2, 0.0])) for eye in eyes]
    return TextureJob(GenerationSettings(["stone"], steps=1), cameras, [render_depth(mesh, c) for c in cameras],
                      mesh, SIZE)


@pytest.mark.parametrize("case", ["camera inside the object", "closed room seen from outside"])
def test_cameras_that_see_only_back_faces_are_refused_before_generation(models, case, tmp_path):
    if case == "camera inside the object":
        job = sphere_job([[0.0, 0.0, 0.0], [0.2, -0.1, 0.1]])
    else:  # a room's walls face inwards; from outside, each camera sees the back of one wall
        vertices, triangles = box([0.0, 0.0, 0.0], [2.0, 2.0, 2.0], cell=0.5)
        room = Mesh(vertices, orient(vertices, triangles, [0.0, 0.0, 0.0], outward=False))
        job = sphere_job([[3.0, 0.1, 0.1], [0.1, 3.0, 0.1]], mesh=room, fov=30.0)
    stages = []
    ctx = JobContext(tmp_path, on_progress=lambda stage, step, total: stages.append(stage))
    with pytest.raises(InputError) as err:
        run_texture_job(job, models.sampler("depth"), ctx)
    assert err.value.field == "cameras" and "no camera saw anything" in err.value.problem
    assert "keyframes" not in stages  # refused before any model ran
    assert not (tmp_path / "texture.png").exists()


def test_a_camera_that_sees_nothing_is_named_in_the_report_warnings(models, tmp_path):
    job = sphere_job([[3.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.0, 3.0, 0.5]])  # camera 1 sits inside the sphere
    report = run_texture_job(job, models.sampler("depth"), JobContext(tmp_path))
    assert report["blind_cameras"] == [1]
    assert any("camera 1 saw no textured surface" in warning for warning in report["warnings"])
    assert len(report["empty_depth"]) == 3 and report["empty_depth"][1] == 0.0  # inside, every pixel hits
    assert 0.0 < report["empty_depth"][0] < 1.0  # outside, the background is empty
    assert json.loads((tmp_path / "report.json").read_text())["warnings"] == report["warnings"]
