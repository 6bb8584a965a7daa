"""The panorama job end to end on the tiny models: files, report, progress, previews, cancel, memory."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
from hdr_reader import read_hdr

from backend.engine import ModelConfig, ModelSet
from backend.imaging.hdr import read_exr
from backend.pipelines.context import JobContext
from backend.pipelines.hdri import layout_prompts, make_panorama, run_panorama_job
from backend.pipelines.sampling import Cancelled
from backend.protocol import GenerationSettings, PanoramaJob
from backend.validation import InputError

HEIGHT, VIEW, STEPS, VIEWS = 64, 64, 2, 10


def panorama_job(prompts=("a sunny beach at noon",), **settings) -> PanoramaJob:
    settings = {"steps": STEPS, "seed": 5, **settings}
    return PanoramaJob(GenerationSettings(list(prompts), **settings), equirect_height=HEIGHT, view_size=VIEW)


@pytest.fixture(scope="module")
def models():
    return ModelSet(ModelConfig.tiny())


@pytest.fixture(scope="module")
def finished(models, tmp_path_factory):
    """One job run with every hook recording what it sees."""
    calls, previews = [], []
    ctx = JobContext(
        tmp_path_factory.mktemp("hdri"),
        on_progress=lambda *call: calls.append(call),
        on_preview=previews.append,
        preview_every=1,
    )
    report = run_panorama_job(panorama_job(), models.sampler("panorama"), ctx)
    return ctx.out_dir, report, calls, previews


def test_job_writes_matching_exr_and_hdr_with_real_highlights(finished):
    out, _, _, _ = finished
    exr, hdr = read_exr(out / "panorama.exr"), read_hdr(out / "panorama.hdr")
    assert exr.shape == hdr.shape == (HEIGHT, 2 * HEIGHT, 3)
    assert exr.max() > 1.0 and exr.min() >= 0.0
    assert np.all(np.abs(hdr - exr) <= exr.max(axis=-1, keepdims=True) / 256.0 * 1.0001)
    preview = iio.imread(out / "panorama_preview.png")
    ldr = iio.imread(out / "panorama_ldr.png")
    assert preview.shape == ldr.shape == (HEIGHT, 2 * HEIGHT, 3) and preview.dtype == np.uint8
    # The preview tone maps the radiance back to (about) the stitched image the model painted.
    assert np.abs(preview.astype(int) - ldr.astype(int)).max() <= 1
    views = sorted((out / "views").glob("view_*.png"))
    assert [v.name for v in views] == [f"view_{k:02d}.png" for k in range(VIEWS)]
    assert iio.imread(views[0]).shape == (VIEW, VIEW, 3)


def test_report_names_sizes_stages_radiance_and_settings(finished):
    out, report, _, _ = finished
    assert json.loads((out / "report.json").read_text()) == report
    assert report["kind"] == "panorama"
    assert report["equirect"] == {"width": 2 * HEIGHT, "height": HEIGHT}
    assert report["views"] == VIEWS and report["view_size"] == VIEW and report["coverage"] == 1.0
    assert set(report["seconds"]) == {"views", "stitch", "hdr", "write"}
    assert all(seconds >= 0.0 for seconds in report["seconds"].values())
    exr = read_exr(out / "panorama.exr")
    assert report["max_radiance"] == pytest.approx(float(exr.max()))
    assert 0.0 < report["mean_radiance"] < report["max_radiance"]
    assert report["seed"] == 5 and report["prompts"] == ["a sunny beach at noon"]
    assert all((out / name).is_file() for name in report["files"])


def test_progress_reports_every_denoising_step_and_previews_are_uint8(finished):
    _, _, calls, previews = finished
    assert [stage for stage, step, _ in calls if step == 0] == ["views", "stitch", "hdr", "write"]
    assert [(step, total) for stage, step, total in calls if stage == "views"] == [(0, STEPS), (1, STEPS), (2, STEPS)]
    assert len(previews) == STEPS
    assert all(p.dtype == np.uint8 and p.shape == (VIEW, VIEW, 3) for p in previews)


def test_cancel_during_the_views_stops_the_job_before_any_file(models, tmp_path):
    ctx = JobContext(tmp_path)

    def cancel_after_first_step(stage, step, total):
        if stage == "views" and step == 1:
            ctx.cancel.set()

    ctx.on_progress = cancel_after_first_step
    with pytest.raises(Cancelled):
        run_panorama_job(panorama_job(steps=4), models.sampler("panorama"), ctx)
    assert not (tmp_path / "panorama.exr").exists() and not (tmp_path / "report.json").exists()
    assert "stitch" not in ctx.seconds


def test_memory_level_splits_guidance_without_changing_the_panorama(models, tmp_path):
    sampler = models.sampler("panorama")
    batches, panoramas = {}, []
    hook = sampler.model.register_forward_pre_hook(lambda _, args: batches[level].add(args[0].shape[0]))
    try:
        for level in (0, 1, 0):
            batches[level] = set()
            ctx = JobContext(tmp_path / str(level), memory_level=level)
            panoramas.append(make_panorama(panorama_job(), sampler, ctx))
    finally:
        hook.remove()
    views = len(panoramas[0].cameras)
    # Both guidance halves per UNet call at level 0, one half per call at level 1, and the next
    # level-0 job on the same shared sampler is back to both halves at once.
    assert batches == {0: {2 * views}, 1: {views}}
    np.testing.assert_array_equal(panoramas[0].ldr, panoramas[2].ldr)
    # The same sums in other batches round differently, and guidance 9 amplifies that a little.
    plain, split, _ = panoramas
    difference = np.abs(plain.ldr - split.ldr)
    assert difference.max() < 5e-3 and difference.mean() < 1e-4


def test_prompts_are_one_or_one_per_view_and_sizes_are_checked(models, tmp_path):
    assert layout_prompts(["sky"], VIEWS) == "sky"
    per_view = [f"view {k}" for k in range(VIEWS)]
    assert layout_prompts(per_view, VIEWS) == per_view
    bad_jobs = {
        "prompts": panorama_job(["sea", "sky", "sand"]),
        "view_size": PanoramaJob(GenerationSettings(["sky"], steps=STEPS), equirect_height=HEIGHT, view_size=96),
        "equirect_height": PanoramaJob(GenerationSettings(["sky"], steps=STEPS), equirect_height=0, view_size=VIEW),
        "steps": panorama_job(steps=0),
    }
    for field, job in bad_jobs.items():
        with pytest.raises(InputError) as err:
            run_panorama_job(job, models.sampler("panorama"), JobContext(tmp_path))
        assert err.value.field == field
    assert not any(tmp_path.iterdir())


def test_a_world_from_an_image_keeps_the_image_as_its_front_view(tmp_path):
    from backend.pipelines.hdri import front_view
    from backend.server.worker import run_job

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)  # wider than high: its centre square is used
    job = PanoramaJob(GenerationSettings(["a beach"], steps=1), equirect_height=HEIGHT, view_size=VIEW, image=photo)
    outpainting = ModelSet(ModelConfig.tiny())
    report = run_job(job, outpainting, JobContext(tmp_path))
    assert report["from_image"] is True and list(outpainting.loaded()) == ["outpaint"]
    front = front_view(photo, VIEW)
    assert front.shape == (VIEW, VIEW, 3)
    np.testing.assert_array_equal(iio.imread(tmp_path / "views" / "view_00.png"), front)
    assert not np.array_equal(iio.imread(tmp_path / "views" / "view_01.png"), front)
    # The front view faces +X, the centre of the equirect: the stitched panorama shows the image there.
    ldr = iio.imread(tmp_path / "panorama_ldr.png").astype(float)
    centre = ldr[HEIGHT // 2 - 4 : HEIGHT // 2 + 4, HEIGHT - 4 : HEIGHT + 4]
    expected = front[VIEW // 2 - 4 : VIEW // 2 + 4, VIEW // 2 - 4 : VIEW // 2 + 4].astype(float)
    assert np.abs(centre.mean(axis=(0, 1)) - expected.mean(axis=(0, 1))).max() < 40
    assert json.loads((tmp_path / "report.json").read_text())["from_image"] is True


def test_front_view_is_the_centre_square_scaled():
    from backend.pipelines.hdri import front_view

    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 200  # the centre square
    np.testing.assert_array_equal(front_view(image, 20), np.full((20, 20, 3), 200, np.uint8))
    assert front_view(image, 64).shape == (64, 64, 3) and front_view(image, 64).min() >= 190
