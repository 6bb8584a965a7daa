import io
import pickle
import zipfile

import numpy as np
import pytest

from backend.geometry.render import render_depth
from backend.protocol import (
    API_VERSION,
    GenerationSettings,
    PanoramaJob,
    TextureJob,
    pack_arrays,
    read_job,
    unpack_arrays,
)
from backend.scenes.demo_room import build_demo_room, trajectory
from backend.validation import InputError


@pytest.fixture(scope="module")
def texture_job():
    room = build_demo_room()
    cameras = trajectory(3, width=64, height=48)
    depths = [render_depth(room.mesh, c) for c in cameras]
    return TextureJob(GenerationSettings(["a cosy room"], steps=20, seed=7), cameras, depths, room.mesh, 512,
                      room.object_names)


def test_texture_job_round_trips_through_bytes(texture_job):
    job = read_job(texture_job.to_bytes())
    assert isinstance(job, TextureJob)
    assert job.settings.prompts == ["a cosy room"] and job.settings.seed == 7 and job.texture_size == 512
    np.testing.assert_array_equal(job.cameras[1].cam_to_world, texture_job.cameras[1].cam_to_world)
    np.testing.assert_array_equal(job.depths[2], texture_job.depths[2])
    np.testing.assert_array_equal(job.mesh.triangles, texture_job.mesh.triangles)
    assert job.object_names == texture_job.object_names


def test_occluders_travel_with_the_job_and_bad_ones_are_named(texture_job):
    from dataclasses import replace

    from backend.geometry.mesh import Mesh

    box = Mesh(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32), np.array([[0, 1, 2]]))
    job = read_job(replace(texture_job, occluders=box).to_bytes())
    np.testing.assert_array_equal(job.occluders.vertices, box.vertices)
    assert read_job(texture_job.to_bytes()).occluders is None
    arrays, meta = unpack_arrays(replace(texture_job, occluders=box).to_bytes())
    arrays["occluder_triangles"] = np.array([[0, 1, 7]])
    with pytest.raises(InputError, match="occluder_triangles"):
        read_job(pack_arrays(arrays, meta))


def test_polygon_ids_travel_with_the_job(texture_job):
    from dataclasses import replace

    mesh = texture_job.mesh
    polygons = np.arange(len(mesh.triangles)) // 2
    job = read_job(replace(texture_job, mesh=type(mesh)(mesh.vertices, mesh.triangles, None, mesh.object_ids,
                                                        polygons)).to_bytes())
    np.testing.assert_array_equal(job.mesh.polygon_ids, polygons)
    assert read_job(texture_job.to_bytes()).mesh.polygon_ids is None  # optional: jobs without it still read


def test_panorama_job_round_trips():
    job = read_job(PanoramaJob(GenerationSettings(["a beach at dawn"]), 512, 256).to_bytes())
    assert isinstance(job, PanoramaJob) and job.equirect_height == 512 and job.view_size == 256


def test_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        with archive.open("depths.npy", "w") as handle:
            np.lib.format.write_array(handle, np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="pickle"):
        unpack_arrays(buffer.getvalue())
    assert not marker.exists()
    with pytest.raises(InputError, match="body"):
        unpack_arrays(pickle.dumps({"a": 1}))


def test_oversized_contents_are_refused_before_decompressing():
    data = pack_arrays({"big": np.zeros(10_000_000, np.uint8)})  # compresses to almost nothing
    assert len(data) < 100_000
    with pytest.raises(InputError, match="limit"):
        unpack_arrays(data, max_bytes=1_000_000)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda a, m: a.__setitem__("depths", np.where(a["depths"] > 2, np.nan, a["depths"])), "depths"),
        (lambda a, m: a.__setitem__("K", a["K"] * 0), "cameras[0].K"),
        (lambda a, m: a.pop("vertices"), "vertices"),
        (lambda a, m: a.__setitem__("triangles", a["triangles"] + 10**6), "triangles"),
        (lambda a, m: m.__setitem__("api_version", API_VERSION + 1), "api_version"),
        (lambda a, m: m.__setitem__("kind", "video"), "kind"),
        (lambda a, m: m["settings"].__setitem__("steps", 0), "steps"),
        (lambda a, m: m["settings"].__setitem__("prompts", ["a", "b"]), "prompts"),
        (lambda a, m: m["settings"].__setitem__("surprise", 1), "settings"),
        (lambda a, m: m.__setitem__("texture_size", 10**6), "texture_size"),
        (lambda a, m: a.__setitem__("polygon_ids", np.zeros(3, np.int64)), "polygon_ids"),
        (lambda a, m: a.__setitem__("polygon_ids", np.full(len(a["triangles"]), -1)), "polygon_ids"),
    ],
)
def test_bad_jobs_name_the_field(texture_job, change, field):
    arrays, meta = unpack_arrays(texture_job.to_bytes())
    change(arrays, meta)
    with pytest.raises(InputError) as err:
        read_job(pack_arrays(arrays, meta))
    assert err.value.field.startswith(field.split("[")[0]) and field in str(err.value)


def test_settings_validation():
    with pytest.raises(InputError, match="prompts"):
        GenerationSettings([" "]).validate()
    with pytest.raises(InputError, match="seed"):
        GenerationSettings(["x"], seed=-1).validate()
    assert GenerationSettings("one prompt").validate().prompts == ["one prompt"]


def test_the_wire_format_imports_nothing_but_numpy_and_the_standard_library():
    import subprocess
    import sys

    code = ("import sys, backend.protocol; heavy = {'torch', 'diffusers', 'transformers', 'scipy', 'bpy'} & "
            "set(sys.modules); assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_duplicate_object_names_are_refused_when_the_job_arrives(texture_job):
    names = [texture_job.object_names[0]] * len(texture_job.object_names)
    sent = TextureJob(texture_job.settings, texture_job.cameras, texture_job.depths, texture_job.mesh, 512, names)
    with pytest.raises(InputError) as err:
        read_job(sent.to_bytes())
    assert err.value.field == "object_names"


def test_loopback_hosts_are_this_machine_only():
    from backend.protocol import is_loopback

    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "192.0.2.7", "::", "2001:db8::1", ""):
        assert not is_loopback(host), host


def test_a_panorama_job_validates_itself_as_the_add_on_and_the_backend_need():
    from backend.protocol import PANORAMA_VIEWS, PanoramaJob

    assert PanoramaJob(GenerationSettings(["sky"] * PANORAMA_VIEWS), 256, 128).validate().view_size == 128
    with pytest.raises(InputError, match=r"one per view: 8 around from \+X turning right, then top and bottom"):
        PanoramaJob(GenerationSettings(["sky", "sea", "sand"]), 256, 128).validate()
    with pytest.raises(InputError) as err:
        PanoramaJob(GenerationSettings(["sky"]), 256, 96).validate()
    assert err.value.field == "view_size" and "multiple of 64" in err.value.problem
    with pytest.raises(InputError) as err:
        read_job(PanoramaJob(GenerationSettings(["sky"]), 32, 64).to_bytes())
    assert err.value.field == "equirect_height"
