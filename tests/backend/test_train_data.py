"""Training data: the ScanNet and Matterport readers on tiny fake layouts, and the procedural data sets."""

from __future__ import annotations

import math
import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from backend.eval.consistency import depth_overlap_psnr
from backend.eval.image_metrics import psnr
from backend.geometry.cameras import Camera, look_at, yaw_pitch_rotation
from backend.geometry.equirect import stitch_equirect
from backend.geometry.panorama import panorama_layout
from backend.train.released_data import (
    MatterportSkybox,
    ScanNetScenes,
    resize_bilinear,
    resize_nearest,
    skybox_face_cameras,
    skybox_face_rotations,
    skybox_to_perspective,
)
from backend.train.samples import MultiViewSample
from backend.train.synthetic import PALETTE, PATTERN_WORDS, SyntheticDepthData
from backend.train.synthetic_panorama import SyntheticPanoramaData
from backend.validation import InputError

# ---------------------------------------------------------------------------------------------- fake ScanNet
DEPTH_W, DEPTH_H = 40, 30  # 2.5 x the 16 x 12 output, as ScanNet's 640 x 480 is of 256 x 192
COLOUR_W, COLOUR_H = 80, 60
K_DEPTH = np.array([[36.0, 0.0, 19.5, 0.0], [0.0, 36.5, 14.5, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def _pose(frame: int) -> np.ndarray:
    eye = np.array([0.1 * frame, 0.05 * frame, 1.4])
    return look_at(eye, eye + [math.cos(0.2 * frame), math.sin(0.2 * frame), -0.2])


def _raw_depth(frame: int) -> np.ndarray:
    rows, cols = np.mgrid[0:DEPTH_H, 0:DEPTH_W]
    return (1000 + 50 * frame + 40 * rows + cols).astype(np.uint16)


def _write_scene(root, scene: str, frames: range, keyframes=None, valid=None, bad_poses=None) -> None:
    folder = root / scene
    for sub in ("color", "depth", "pose", "prompt", "intrinsic"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    np.savetxt(folder / "intrinsic" / "intrinsic_depth.txt", K_DEPTH)
    ys, xs = np.mgrid[0:COLOUR_H, 0:COLOUR_W]
    for frame in frames:
        colour = np.stack([xs * 3, ys * 4, np.full_like(xs, 10 * frame)], axis=-1).astype(np.uint8)
        iio.imwrite(folder / "color" / f"{frame}.jpg", colour, quality=95)
        iio.imwrite(folder / "depth" / f"{frame}.png", _raw_depth(frame))
        pose = (bad_poses or {}).get(frame, _pose(frame))
        np.savetxt(folder / "pose" / f"{frame}.txt", pose)
        (folder / "prompt" / f"{frame}.txt").write_text(f"frame {frame} of {scene}\nsecond line\n")
    if keyframes is not None:
        (folder / "key_frame_0.6.txt").write_text("".join(f"{k}\n" for k in keyframes))
    if valid is not None:
        np.save(folder / "valid_frames.npy", np.asarray(valid))


@pytest.fixture
def scannet(tmp_path):
    root = tmp_path / "scannet"
    _write_scene(root, "scene0000_00", range(12), keyframes=[0, 2, 3, 5, 6, 8, 9, 11])
    _write_scene(root, "scene0001_00", range(2))  # too short for 3 views
    return root


def test_scannet_sample_shapes_units_poses_and_intrinsics(scannet):
    data = ScanNetScenes(scannet, views=3, width=16, height=12)
    assert "scene0001_00" in data.skipped and len(data) == 6  # 8 keyframes, windows of 3 starting at 0..5
    sample = data[0]
    assert isinstance(sample, MultiViewSample) and sample.validate() is sample
    assert sample.task == "depth" and sample.keyframes == [0, 1, 2]
    assert sample.images.shape == (3, 12, 16, 3) and sample.images.dtype == np.uint8
    assert sample.depths.shape == (3, 12, 16) and sample.depths.dtype == np.float32
    assert sample.meta["frame_ids"] == [0, 2, 3]
    assert sample.prompts == [f"frame {k} of scene0000_00" for k in (0, 2, 3)]
    # Depth: millimetres -> metres, nearest as cv2.INTER_NEAREST (source index floor(i * 2.5)).
    rows, cols = np.floor(np.arange(12) * 2.5).astype(int), np.floor(np.arange(16) * 2.5).astype(int)
    for view, frame in enumerate((0, 2, 3)):
        expected = _raw_depth(frame)[rows[:, None], cols[None, :]] / 1000.0
        np.testing.assert_allclose(sample.depths[view], expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(sample.cameras[view].cam_to_world, _pose(frame), atol=1e-6)
    # Intrinsics as released: rows 0 and 1 of the depth K divided by 30 / 12 = 2.5, shared by colour.
    expected_K = K_DEPTH[:3, :3].copy()
    expected_K[:2] /= 2.5
    for camera in sample.cameras:
        np.testing.assert_allclose(camera.K, expected_K)
        assert (camera.width, camera.height) == (16, 12)
    # Colour: bilinear from the 80 x 60 JPEG; the red channel is a ramp 3 * x.
    expected_red = np.clip(((np.arange(16) + 0.5) * 5 - 0.5) * 3, 0, 255)
    assert np.abs(sample.images[0, 6, :, 0].astype(float) - expected_red).max() <= 4


def test_resizes_match_opencv_conventions():
    image = np.arange(8 * 6, dtype=np.float32).reshape(6, 8)
    half = resize_bilinear(image, 4, 3)  # exact factor 2: INTER_LINEAR averages 2 x 2 blocks
    np.testing.assert_allclose(half, image.reshape(3, 2, 4, 2).mean(axis=(1, 3)))
    upscaled = resize_bilinear(np.array([[0.0, 10.0]], np.float32), 4, 1)
    np.testing.assert_allclose(upscaled, [[0.0, 2.5, 7.5, 10.0]])  # half-pixel centres, clamped ends
    np.testing.assert_array_equal(resize_nearest(np.arange(10)[None, :], 4, 1), [[0, 2, 5, 7]])


def test_scannet_keyframes_valid_frames_and_stride(tmp_path):
    _write_scene(tmp_path, "s", range(7), valid=[0, 1, 2, 4, 5, 6])  # no keyframe file: every valid frame
    data = ScanNetScenes(tmp_path, views=3, width=16, height=12, stride=3)
    assert [data.window(i)[1] for i in range(len(data))] == [(0, 1, 2), (4, 5, 6)]  # frame 3 is not valid
    assert ScanNetScenes(tmp_path, split=["s"], views=6, width=16, height=12).window(0)[1] == (0, 1, 2, 4, 5, 6)
    with pytest.raises(InputError, match="consecutive usable frames"):
        ScanNetScenes(tmp_path, views=7, width=16, height=12)


def test_scannet_invalid_poses_split_the_windows(tmp_path):
    singular = np.eye(4)
    singular[:3, :3] = 0.0
    not_rotation = np.eye(4)
    not_rotation[:3, :3] *= 2.0
    bad = {4: np.full((4, 4), -np.inf), 7: singular}
    _write_scene(tmp_path, "a", range(12), bad_poses=bad)
    _write_scene(tmp_path, "b", range(4), bad_poses={1: not_rotation})
    data = ScanNetScenes(tmp_path, views=3, width=16, height=12, stride=2)
    windows = [data.window(i) for i in range(len(data))]
    # Runs of valid poses in "a": 0-3, 5-6 (too short), 8-11; "b" has only 2-3 left and is skipped.
    assert windows == [("a", (0, 1, 2)), ("a", (1, 2, 3)), ("a", (8, 9, 10)), ("a", (9, 10, 11))]
    assert "b" in data.skipped
    for i in range(len(data)):
        assert np.isfinite(data[i].cameras[0].cam_to_world).all()


def test_scannet_errors_name_the_missing_file(tmp_path):
    _write_scene(tmp_path, "s", range(4))
    (tmp_path / "s" / "depth" / "2.png").unlink()
    data = ScanNetScenes(tmp_path, views=3, width=16, height=12)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "s" / "depth" / "2.png"))):
        data[0]
    (tmp_path / "s" / "intrinsic" / "intrinsic_depth.txt").unlink()
    with pytest.raises(FileNotFoundError, match="intrinsic_depth.txt"):
        ScanNetScenes(tmp_path, views=3, width=16, height=12)
    (tmp_path / "s" / "pose" / "1.txt").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "s" / "pose" / "1.txt"))):
        ScanNetScenes(tmp_path, views=3, width=16, height=12)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ScanNetScenes(tmp_path / "nowhere")


def test_scannet_missing_prompts_are_skipped_or_defaulted(tmp_path):
    _write_scene(tmp_path, "s", range(4))
    (tmp_path / "s" / "prompt" / "3.txt").unlink()
    assert len(ScanNetScenes(tmp_path, views=3, width=16, height=12)) == 1  # frames 0-2, as released
    data = ScanNetScenes(tmp_path, views=3, width=16, height=12, default_prompt="a room")
    assert data[len(data) - 1].prompts[-1] == "a room"


# ---------------------------------------------------------------------------------------------- fake Matterport
FACE = 48


def _direction_colour(dirs: np.ndarray) -> np.ndarray:
    unit = dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)
    return 0.5 + 0.45 * unit  # each channel follows one world axis, so a wrong face or flip shows


@pytest.fixture
def matterport(tmp_path):
    return _write_skybox(tmp_path / "mp3d_skybox")


def _write_skybox(root: Path) -> Path:
    """One panorama in the released Matterport3D skybox layout: faces coloured by direction, captions per 45 degrees."""
    faces_dir = root / "scene1" / "matterport_skybox_images"
    faces_dir.mkdir(parents=True)
    paths = []
    for k, camera in enumerate(skybox_face_cameras(FACE)):
        face = np.rint(_direction_colour(camera.ray_directions()) * 255).astype(np.uint8)
        name = f"pano1_skybox{k}_sami.png"
        iio.imwrite(faces_dir / name, face)
        paths.append(f"scene1/matterport_skybox_images/{name}")
    np.save(root / "train.npy", np.array([paths]))
    np.save(root / "test.npy", np.array([paths]))
    (root / "scene1" / "blip3").mkdir()
    for degree in range(0, 360, 45):
        (root / "scene1" / "blip3" / f"pano1_{degree}.txt").write_text(f"caption {degree}\nmore\n")
    return root


def _released_rotation(theta: float, phi: float) -> np.ndarray:
    """R of the released get_K_R (cv2.Rodrigues written with scipy); its warp maps face pixels by K R K^-1."""
    R1 = Rotation.from_rotvec(np.array([0.0, 1.0, 0.0]) * math.radians(theta)).as_matrix()
    R2 = Rotation.from_rotvec(R1 @ np.array([1.0, 0.0, 0.0]) * math.radians(phi)).as_matrix()
    return R2 @ R1


@pytest.mark.parametrize("target_yaw", [0.0, 30.0, 135.0, 300.0])
def test_skybox_faces_follow_the_released_warp(target_yaw):
    # Face pixel p lands at K R K^-1 p in the target, i.e. face rays map to target rays by R,
    # so R must equal target^T @ face for our cameras (same K, FOV 90, for both).
    target = yaw_pitch_rotation(target_yaw, 0.0)
    for k, (vx, vy) in enumerate(zip((-90, 270, 0, 90, 180, -90), (90, 0, 0, 0, 0, -90), strict=True)):
        ours = target.T @ skybox_face_rotations()[k]
        np.testing.assert_allclose(ours, _released_rotation(vx - target_yaw, vy), atol=1e-9, err_msg=f"face {k}")


def test_skybox_warp_reproduces_the_direction_function(matterport):
    data = MatterportSkybox(matterport, "train", view_size=32, yaw_offset=10.0)
    sample = data[0].validate()
    assert sample.task == "panorama" and sample.depths is None and sample.images.shape == (8, 32, 32, 3)
    assert sample.meta["yaws_deg"] == [10.0 + 45 * k for k in range(8)]
    for image, camera in zip(sample.images, sample.cameras, strict=True):
        expected = _direction_colour(camera.ray_directions())
        assert np.abs(image / 255.0 - expected).max() < 0.02
    # Oblique views cross face edges and corners too.
    pose = np.eye(4)
    pose[:3, :3] = yaw_pitch_rotation(45.0, 50.0)
    camera = Camera.from_fov(100.0, 40, 30, pose)
    faces = [np.asarray(iio.imread(matterport / p)) for p in data.panoramas[0]]
    view = skybox_to_perspective(faces, camera, supersample=2)
    assert np.abs(view / 255.0 - _direction_colour(camera.ray_directions())).max() < 0.02


def test_matterport_cameras_prompts_and_yaws(matterport):
    test = MatterportSkybox(matterport, "test", view_size=16)
    sample = test[0]
    ring = panorama_layout(16, pole_views=False)
    for ours, theirs in zip(sample.cameras, ring, strict=True):
        np.testing.assert_allclose(ours.cam_to_world, theirs.cam_to_world, atol=1e-12)
        np.testing.assert_allclose(ours.K, theirs.K)
    assert sample.prompts == [f"This is one view of a scene. caption {45 * k}" for k in range(8)]
    shifted = MatterportSkybox(matterport, "test", view_size=16, yaw_offset=30.0, prompt_prefix="")
    assert shifted[0].prompts[0] == "caption 45"  # 30 degrees rounds to the 45 degree caption
    train = MatterportSkybox(matterport, "train", view_size=16, seed=3)
    yaw = train.initial_yaw(0)
    assert yaw == int(yaw) and 0 <= yaw < 360
    assert yaw == MatterportSkybox(matterport, view_size=16, seed=3).initial_yaw(0)
    train.set_epoch(1)
    assert [train.initial_yaw(0) for _ in range(2)] == [train.initial_yaw(0)] * 2


def test_matterport_errors_name_the_missing_file(matterport):
    (matterport / "scene1" / "blip3" / "pano1_90.txt").unlink()
    with pytest.raises(FileNotFoundError, match="pano1_90.txt"):
        MatterportSkybox(matterport, "test", view_size=16)[0]
    sample = MatterportSkybox(matterport, "test", view_size=16, default_prompt="a room", prompt_prefix="")[0]
    assert sample.prompts[2] == "a room" and sample.prompts[1] == "caption 45"
    (matterport / "scene1" / "matterport_skybox_images" / "pano1_skybox3_sami.png").unlink()
    with pytest.raises(FileNotFoundError, match="pano1_skybox3_sami.png"):
        MatterportSkybox(matterport, "test", view_size=16)[0]
    with pytest.raises(FileNotFoundError, match="train.npy"):
        MatterportSkybox(matterport / "..", "train")  # no train.npy there
    with pytest.raises(InputError, match="split"):
        MatterportSkybox(matterport, "val")


# ---------------------------------------------------------------------------------------------- sample checks
def test_sample_validation_names_the_field():
    camera = Camera.from_fov(60.0, 8, 6)
    images = np.zeros((2, 6, 8, 3), np.uint8)
    depths = np.ones((2, 6, 8), np.float32)
    good = MultiViewSample("depth", images, [camera, camera], depths, ["a", "b"], [0, 1])
    good.validate()
    cases = {
        "task": dict(task="video"),
        "images": dict(images=images.astype(np.float32)),
        "cameras": dict(cameras=[camera]),
        "depths": dict(depths=depths[:, :, :4]),
        "prompts": dict(prompts=["a"]),
        "keyframes": dict(keyframes=[1, 0]),
    }
    for field, change in cases.items():
        args = dict(task="depth", images=images, cameras=[camera, camera], depths=depths, prompts=["a", "b"],
                    keyframes=[0, 1])
        args.update(change)
        with pytest.raises(InputError) as info:
            MultiViewSample(**args).validate()
        assert info.value.field.startswith(field), (field, info.value)
    with pytest.raises(InputError, match="depths"):
        MultiViewSample("panorama", images, [camera, camera], depths, ["a", "b"]).validate()


# ---------------------------------------------------------------------------------------------- synthetic data
def test_synthetic_depth_is_deterministic_and_consistent():
    data = SyntheticDepthData(4, views=6, width=64, height=48, seed=5)
    first, again = data[1], SyntheticDepthData(4, views=6, width=64, height=48, seed=5)[1]
    first.validate()
    assert first.images.shape == (6, 48, 64, 3) and first.depths.shape == (6, 48, 64)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.depths, again.depths)
    assert first.prompts == again.prompts
    assert not np.array_equal(first.images, data[2].images)
    assert (first.depths > 0).all(), "the room is closed: every pixel sees a surface"
    score = depth_overlap_psnr(list(first.images), first.cameras, list(first.depths))
    assert not score.empty_pairs and min(score.valid_share.values()) > 0.2
    assert score.mean_psnr > 25.0, score.per_pair


def test_synthetic_heldout_trajectories_never_occur_in_train():
    train = SyntheticDepthData(200, views=8, seed=0, split="train")
    heldout = SyntheticDepthData(50, views=8, seed=0, split="heldout")
    train_centres = np.array([[c.center for c in train.cameras(i)] for i in range(len(train))])
    heldout_centres = np.array([[c.center for c in heldout.cameras(i)] for i in range(len(heldout))])
    assert heldout_centres[..., 2].min() > train_centres[..., 2].max() + 0.01
    distance = np.linalg.norm(heldout_centres[:, None] - train_centres[None], axis=-1).mean(axis=-1)
    assert distance.min() > 0.02
    # Same index, other split: other textures too; cameras() is what __getitem__ renders.
    a, b = train[0], heldout[0]
    recipe = [(m["pattern"], m["colours"]) for m in a.meta["materials"].values()]
    assert recipe != [(m["pattern"], m["colours"]) for m in b.meta["materials"].values()]
    for camera, again in zip(b.cameras, heldout.cameras(0), strict=True):
        np.testing.assert_array_equal(camera.cam_to_world, again.cam_to_world)


def test_synthetic_camera_step_sets_how_many_neighbours_a_view_has():
    """Smaller turns between views: more overlap, so more CAA neighbours per view; bad ranges are refused."""
    from backend.train.geometry import trajectory_neighbours

    def neighbours(step_deg):
        sample = SyntheticDepthData(1, views=8, width=64, height=64, seed=3, step_deg=step_deg)[0]
        assert 15.0 * (step_deg == (15.0, 25.0)) <= sample.meta["trajectory"]["step_deg"] <= step_deg[1]
        return np.mean([len(n) for n in trajectory_neighbours(sample.cameras, list(sample.depths))])

    assert neighbours((6.0, 10.0)) >= 3.0 > 2.0 >= neighbours((15.0, 25.0))
    for bad in [(0.0, 5.0), (10.0, 5.0), (5.0, 120.0)]:
        with pytest.raises(InputError, match="step_deg"):
            SyntheticDepthData(1, step_deg=bad)


def test_synthetic_prompts_name_what_each_view_shows():
    data = SyntheticDepthData(6, views=4, width=64, height=48, seed=2)
    checked_solid = 0
    for index in range(len(data)):
        sample = data[index]
        materials = sample.meta["materials"]
        names = list(materials)
        for view, (prompt, shares) in enumerate(zip(sample.prompts, sample.meta["visible"], strict=True)):
            for name, share in shares.items():
                material = materials[name]
                mentioned = re.search(rf"\b{name}\b", prompt) is not None
                assert mentioned == (share >= 0.03), (name, share, prompt)
                if not mentioned:
                    continue
                for colour in material["colours"]:
                    assert colour in prompt
                word = PATTERN_WORDS[material["pattern"]]
                if word:
                    assert re.search(rf"{word} {name}\b", prompt), (word, name, prompt)
                pixels = sample.images[view][sample.meta["object_ids"][view] == names.index(name)] / 255.0
                if material["pattern"] == "solid" and share >= 0.05:
                    mean = pixels.mean(axis=0)
                    nearest = min(PALETTE, key=lambda c: np.linalg.norm(np.array(PALETTE[c]) - mean))
                    assert nearest == material["colours"][0], (name, mean, prompt)
                    checked_solid += 1
    assert checked_solid >= 3


def test_synthetic_panoramas_cut_the_layout_and_stitch_back():
    data = SyntheticPanoramaData(3, view_size=64, seed=1)
    sample = data[0].validate()
    cameras = panorama_layout(64)
    assert sample.images.shape == (len(cameras), 64, 64, 3) and len(sample.prompts) == len(cameras)
    for ours, theirs in zip(sample.cameras, cameras, strict=True):
        np.testing.assert_allclose(ours.cam_to_world, theirs.cam_to_world)
    np.testing.assert_array_equal(sample.images, SyntheticPanoramaData(3, view_size=64, seed=1)[0].images)
    equirect = sample.meta["equirect"]
    stitched, weight = stitch_equirect(list(sample.images), sample.cameras, height=equirect.shape[0])
    assert (weight > 0).all()
    assert psnr(equirect, stitched, weight > 0) > 30.0
    sky = sample.meta["recipe"]["sky"]
    assert all(f"{sky} sky" in prompt for prompt in sample.prompts[:9])  # ring and the upward view
    ground = sample.meta["recipe"]["ground"]
    assert ground in sample.prompts[9] and "sky" not in sample.prompts[9]  # the downward view
    heldout = SyntheticPanoramaData(3, view_size=64, seed=1, split="heldout")[0]
    assert not np.array_equal(heldout.images, sample.images)
