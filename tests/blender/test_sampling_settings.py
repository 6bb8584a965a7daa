"""The scheduler setting: a scene property that defaults to DDIM, shown in the panel, sent in both jobs."""

import importlib

import pytest

pytestmark = pytest.mark.blender


class RecordingLayout:
    """Stands in for a panel's layout: every ``prop`` call is recorded, everything else is accepted."""

    def __init__(self, props):
        self.props = props

    def prop(self, _data, name, **_kwargs):
        self.props.append(name)

    def __getattr__(self, _name):
        return lambda *args, **kwargs: self


def test_scheduler_property_defaults_to_ddim_with_a_tooltip_per_choice(scene, addon):
    from backend.sampling_options import DEFAULT_SCHEDULER, FAST_SCHEDULER, SCHEDULERS

    prop = type(scene.mvdiff).bl_rna.properties["scheduler"]
    assert scene.mvdiff.scheduler == prop.default == DEFAULT_SCHEDULER == "ddim"
    assert [item.identifier for item in prop.enum_items] == list(SCHEDULERS)
    assert prop.description
    items = {item.identifier: item for item in prop.enum_items}
    assert all(items[name].name == choice.label for name, choice in SCHEDULERS.items())
    assert "recommended" in items[FAST_SCHEDULER].description
    assert f"{SCHEDULERS[FAST_SCHEDULER].steps} steps" in items[FAST_SCHEDULER].description
    assert scene.mvdiff.steps == SCHEDULERS[DEFAULT_SCHEDULER].steps


def test_the_texture_panel_shows_the_scheduler_next_to_the_steps(scene, addon):
    import bpy

    ui = importlib.import_module(f"{addon.__name__}.ui")
    props = []
    panel = type("Panel", (), {"layout": RecordingLayout(props)})()
    ui.MVDIFF_PT_texture.draw(panel, bpy.context)
    assert props.index("scheduler") + 1 == props.index("steps")


def test_both_jobs_send_the_chosen_scheduler(scene, addon, tmp_path):
    import bpy

    from backend.protocol import read_job

    job = importlib.import_module(f"{addon.__name__}.job")
    settings = scene.mvdiff
    settings.output_dir = str(tmp_path)
    settings.world_prompt, settings.world_height, settings.world_view_size = "a meadow", 64, 64
    sent = read_job(job.prepare_world_job(bpy.context).data).settings
    assert (sent.scheduler, sent.steps) == ("ddim", 50)

    settings.scheduler, settings.steps = "dpm++2m", 20
    sent = read_job(job.prepare_world_job(bpy.context).data).settings
    assert (sent.scheduler, sent.steps) == ("dpm++2m", 20)

    bpy.ops.mesh.primitive_plane_add(size=4.0)
    settings.prompt, settings.scheduler = "a stone floor", "unipc"
    settings.camera_source, settings.orbit_views, settings.orbit_rings = "ORBIT", 2, 1
    settings.width = settings.height = 64
    bpy.context.object.select_set(True)
    prepared = job.prepare_texture_job(bpy.context)
    sent = read_job(prepared.data).settings
    assert (sent.scheduler, sent.steps) == ("unipc", 20)
    assert read_job((prepared.folder / "job.npz").read_bytes()).settings.scheduler == "unipc"


def test_consistency_mode_defaults_to_the_best_available_and_both_jobs_send_the_choice(scene, addon, tmp_path):
    import bpy

    from backend.protocol import read_job
    from backend.sampling_options import MODES

    prop = type(scene.mvdiff).bl_rna.properties["consistency_mode"]
    assert [item.identifier for item in prop.enum_items][1:] == list(MODES)
    job = importlib.import_module(f"{addon.__name__}.job")
    settings = scene.mvdiff
    settings.output_dir = str(tmp_path)
    settings.world_prompt, settings.world_height, settings.world_view_size = "a meadow", 64, 64
    assert read_job(job.prepare_world_job(bpy.context).data).settings.mode is None  # the backend decides
    settings.consistency_mode = "training_free"
    assert read_job(job.prepare_world_job(bpy.context).data).settings.mode == "training_free"

    bpy.ops.mesh.primitive_plane_add(size=4.0)
    settings.prompt, settings.consistency_mode = "a stone floor", "independent"
    settings.camera_source, settings.orbit_views, settings.orbit_rings = "ORBIT", 2, 1
    settings.width = settings.height = 64
    bpy.context.object.select_set(True)
    assert read_job(job.prepare_texture_job(bpy.context).data).settings.mode == "independent"

    ui = importlib.import_module(f"{addon.__name__}.ui")
    for panel_class in (ui.MVDIFF_PT_texture, ui.MVDIFF_PT_environment):
        props = []
        panel_class.draw(type("Panel", (), {"layout": RecordingLayout(props)})(), bpy.context)
        assert "consistency_mode" in props
