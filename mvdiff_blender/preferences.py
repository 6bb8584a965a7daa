"""Add-on preferences: start the bundled backend here, or connect to one by URL; plus a status box.

The status box is the setup guide: it says whether the backend answers and speaks this add-on's
API version, and offers the one button that fixes what is wrong (start it, point at the
checkout's virtual environment, allow online access).
"""

from __future__ import annotations

import time
from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from ..backend.client import BackendClient, BackendError
from ..backend.models.catalog import default_base_model
from ..backend.protocol import API_VERSION
from . import ADDON_ID, backend_process, compat, installer, multiview_weights
from .connection import Connection, LocalLaunch, SetupError, normalise_url, with_fix

EXTENSION_ROOT = Path(__file__).resolve().parent.parent
MODEL_SOURCES = [
    ("HUB", "Stable Diffusion 2 (download)", "The SD 2 depth and base models by hub id; downloaded on first use"),
    ("FOLDER", "Local Folder", "A folder holding depth/ and base/ diffusers models"),
    ("TINY", "Tiny Test Model", "Random weights built in code: offline and fast, but the images are noise"),
]
DEVICES = [("AUTO", "Automatic", "A CUDA GPU when there is one, else the CPU"), ("CUDA", "CUDA GPU", ""),
           ("CPU", "CPU", "Very slow with real models")]

# The last health check, for drawing: (time, ok, text). Kept outside properties so that
# drawing never writes to Blender data.
_status: dict = {"checked": 0.0, "ok": False, "text": "Not checked yet", "fix": ""}


def _launch_settings_changed(self, context) -> None:
    """A setting the backend was started with changed: say so at once, restart on the next use.

    The running process is not stopped here (a job may be running on it, and a path is often typed
    in several steps); the next job or Start compares the settings and restarts it.
    """
    if backend_process.is_running():
        _remember(False, "The backend runs with earlier settings; it restarts with the new ones on the next job",
                  "Press Restart Backend to restart it now")


def bundled_venv_python() -> str:
    """The checkout's own virtual environment (a development install), if there is one."""
    for candidate in (EXTENSION_ROOT / ".venv" / "bin" / "python", EXTENSION_ROOT / ".venv" / "Scripts" / "python.exe"):
        if candidate.is_file():
            return str(candidate)
    return ""


class MVDIFF_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    mode: EnumProperty(name="Backend", items=[
        ("LOCAL", "Start on This Machine", "The add-on starts the bundled backend with the Python below"),
        ("REMOTE", "Connect to URL", "A backend already running, e.g. on a GPU server"),
    ], default="LOCAL", description="Where jobs run: a backend the add-on starts here, or one at a URL")
    python: StringProperty(name="Backend Python", subtype="FILE_PATH", update=_launch_settings_changed,
                           description="A Python with the backend's requirements (torch, diffusers...); "
                                       "empty: the checkout's .venv when there is one")
    model_source: EnumProperty(name="Model", items=MODEL_SOURCES, default="HUB", update=_launch_settings_changed,
                               description="Which weights the local backend loads")
    depth_model: StringProperty(name="Depth Model", default=default_base_model("depth"),
                                update=_launch_settings_changed,
                                description="Hugging Face id of the SD 2 depth model textures are made with "
                                            "(a mirror, or your own copy)")
    base_model: StringProperty(name="Base Model", default=default_base_model("base"),
                               update=_launch_settings_changed,
                               description="Hugging Face id of the SD 2 base model 360 Worlds are made with")
    model_folder: StringProperty(name="Model Folder", subtype="DIR_PATH", update=_launch_settings_changed,
                                 description="A folder with the depth/ and base/ model folders (Model: Local Folder)")
    depth_caa: StringProperty(name="Depth Multi-View Weights", subtype="FILE_PATH", update=_launch_settings_changed,
                              description="Trained multi-view blocks for texturing (.safetensors or released .ckpt)")
    panorama_caa: StringProperty(name="Panorama Multi-View Weights", subtype="FILE_PATH",
                                 update=_launch_settings_changed,
                                 description="Trained multi-view blocks for panoramas")
    device: EnumProperty(name="Device", items=DEVICES, default="AUTO", update=_launch_settings_changed,
                         description="Where the local backend runs the models")
    port: IntProperty(name="Port", default=8765, min=1024, max=65535, update=_launch_settings_changed,
                      description="The port the local backend listens on (127.0.0.1 only)")
    url: StringProperty(name="URL", default="http://127.0.0.1:8765",
                        description="Where the backend listens, e.g. http://gpu-box:8765")
    token: StringProperty(name="Token", subtype="PASSWORD",
                          description="The backend's access token (needed off this machine)")
    start_automatically: BoolProperty(name="Start When Needed", default=True,
                                      description="Start the local backend when a job needs it")

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.prop(self, "mode", expand=True)
        col = layout.column()
        if self.mode == "LOCAL":
            col.prop(self, "python")
            installer.draw(col)
            if not self.python and bundled_venv_python():
                col.label(text=f"Using {bundled_venv_python()}", icon="INFO")
            col.prop(self, "model_source")
            if self.model_source == "HUB":
                col.prop(self, "depth_model")
                col.prop(self, "base_model")
            if self.model_source == "FOLDER":
                col.prop(self, "model_folder")
            col.prop(self, "depth_caa")
            col.prop(self, "panorama_caa")
            row = col.row()
            row.prop(self, "device")
            row.prop(self, "port")
            col.prop(self, "start_automatically")
        else:
            col.prop(self, "url")
            col.prop(self, "token")
        draw_status(layout, self)


def draw_status(layout: bpy.types.UILayout, prefs: MVDIFF_AddonPreferences) -> None:
    box = layout.box()
    header = box.row()
    header.label(text=_status["text"], icon="CHECKMARK" if _status["ok"] else "ERROR")
    header.operator("mvdiff.backend_check", text="", icon="FILE_REFRESH")
    if _status["fix"]:
        box.label(text=_status["fix"], icon="INFO")
    row = box.row()
    orphan = backend_process.orphan()
    if orphan is not None:
        box.label(text=f"A backend from an earlier Blender session is running on port {orphan.port}", icon="ERROR")
        orphan_row = box.row()
        orphan_row.operator("mvdiff.backend_orphan_stop", icon="CANCEL")
        orphan_row.operator("mvdiff.backend_orphan_use", icon="LINKED")
    if prefs.mode == "LOCAL":
        if backend_process.is_running():
            if _restart_needed(prefs):
                row.operator("mvdiff.backend_start", text="Restart Backend", icon="FILE_REFRESH")
            row.operator("mvdiff.backend_stop", icon="CANCEL")
        else:
            row.operator("mvdiff.backend_start", icon="PLAY")
        if not prefs.python and not bundled_venv_python():
            box.label(text="Press Install Backend above, or set Backend Python to a Python with the backend installed",
                      icon="INFO")
    elif not compat.online_access_allowed():
        row.operator("screen.userpref_show", text="Open Preferences to Allow Online Access").section = "SYSTEM"
    if _status["ok"] or multiview_weights.running():
        multiview_weights.draw(box)


def get(context: bpy.types.Context | None = None) -> MVDIFF_AddonPreferences | None:
    """The preferences, or None when the add-on runs outside an installed extension."""
    addons = (context or bpy.context).preferences.addons
    entry = addons.get(ADDON_ID)
    return entry.preferences if entry else None


def _restart_needed(prefs) -> bool:
    """The running backend was started with other settings than the preferences now say."""
    try:
        return backend_process.is_stale(_local_connection(prefs).launch)
    except SetupError:
        return False


def record_dir() -> Path:
    """Where the add-on notes the backend processes it started (for the next session to find)."""
    return user_folder("backend")


def user_folder(name: str) -> Path:
    """A folder of this extension's that survives updates (never inside the add-on folder)."""
    try:
        return Path(bpy.utils.extension_path_user(ADDON_ID, path=name, create=True))
    except (ValueError, AttributeError):  # not loaded as an extension (a legacy install)
        folder = Path(bpy.utils.user_resource("DATAFILES", path=f"mvdiff_blender/{name}", create=True))
        return folder


def connection(context: bpy.types.Context | None = None) -> Connection:
    """The preferences as a :class:`Connection` a worker thread may use."""
    prefs = get(context)
    if prefs is None or prefs.mode == "LOCAL":
        return _local_connection(prefs)
    conn = Connection(normalise_url(prefs.url), prefs.token or None)
    conn.check_online_access(compat.online_access_allowed())
    return conn


def local_launch(context: bpy.types.Context | None = None) -> LocalLaunch:
    """How the add-on starts its backend on this machine, whether or not it starts it by itself."""
    return _launch(get(context))


def _local_connection(prefs: MVDIFF_AddonPreferences | None) -> Connection:
    launch = _launch(prefs)
    auto = prefs.start_automatically if prefs else True
    return Connection(f"http://127.0.0.1:{launch.port}", backend_process.token(), launch if auto else None, local=True)


def _launch(prefs: MVDIFF_AddonPreferences | None) -> LocalLaunch:
    port = prefs.port if prefs else 8765
    python = bpy.path.abspath(prefs.python) if prefs and prefs.python else bundled_venv_python()
    args: list[str] = []
    source = prefs.model_source if prefs else "HUB"
    if source == "TINY":
        args += ["--models", "tiny"]
    elif source == "HUB" and prefs is not None:
        hub_ids = (("--depth-model", prefs.depth_model, "depth"), ("--base-model", prefs.base_model, "base"))
        for flag, value, kind in hub_ids:
            if value.strip() and value.strip() != default_base_model(kind):
                args += [flag, value.strip()]
    elif source == "FOLDER":
        if not prefs.model_folder:
            raise SetupError("The model source is Local Folder but no folder is set", "Set Model Folder")
        args += ["--models", bpy.path.abspath(prefs.model_folder)]
    if prefs is not None:
        for flag, value in (("--depth-caa", prefs.depth_caa), ("--panorama-caa", prefs.panorama_caa)):
            if value:
                args += [flag, bpy.path.abspath(value)]
        if prefs.device != "AUTO":
            args += ["--device", prefs.device.lower()]
    return LocalLaunch(python=python, port=port, model_args=tuple(args), store=user_folder("backend-store"),
                       log=user_folder("logs") / "backend.log", extension_root=EXTENSION_ROOT,
                       offline=not compat.online_access_allowed(), record_dir=record_dir())


def check(context: bpy.types.Context | None = None, timeout: float = 3.0) -> tuple[bool, str, str]:
    """Health and version of the configured backend, for the status box: (ok, text, fix)."""
    prefs = get(context)
    local = prefs is None or prefs.mode == "LOCAL"
    try:
        conn = connection(context)
        launch = conn.launch or (_local_connection(prefs).launch if local else None)
        if local:
            if backend_process.orphan() is None:
                backend_process.scan(record_dir())
            if launch is not None:
                backend_process.check_no_orphan(launch.port)
            if backend_process.is_stale(launch):
                return _remember(False, "The backend runs with earlier settings (Backend Python, Model, Device "
                                        "or Port changed)", "Press Restart Backend, or start a job")
        client = BackendClient(conn.url, conn.token, timeout)
        info = backend_process.identify(client) if conn.local else client.version()
    except SetupError as err:
        return _remember(False, str(err), err.fix)
    except BackendError as err:
        if err.status == 401:
            return _remember(False, "The backend refused the token", "Set the backend's token")
        if local and launch is not None and not backend_process.is_running():
            try:
                backend_process.check_python(launch.python)
            except SetupError as setup:
                return _remember(False, str(setup), setup.fix)
        fix = "Press Start Backend" if local else "Check the URL"
        return _remember(False, f"Backend not reachable: {err.message}", fix)
    if info.get("api_version") != API_VERSION:
        return _remember(False, f"Backend speaks API {info.get('api_version')}, the add-on needs {API_VERSION}",
                         "Update the backend and the add-on to the same release")
    multiview_weights.remember(info.get("tasks"))
    device = info.get("device") or ""
    where = f"{conn.url} ({device})" if device else conn.url
    return _remember(True, f"Backend {info.get('backend_version')} ready at {where}", "")


def _remember(ok: bool, text: str, fix: str) -> tuple[bool, str, str]:
    _status.update(checked=time.time(), ok=ok, text=text, fix=fix)
    return ok, text, fix


class MVDIFF_OT_backend_check(bpy.types.Operator):
    bl_idname = "mvdiff.backend_check"
    bl_label = "Check Backend"
    bl_description = "Ask the backend whether it runs and speaks this add-on's API version"

    def execute(self, context):
        ok, text, fix = check(context)
        self.report({"INFO"} if ok else {"WARNING"}, text + (f". {fix}" if fix else ""))
        return {"FINISHED"}


class MVDIFF_OT_backend_start(bpy.types.Operator):
    bl_idname = "mvdiff.backend_start"
    bl_label = "Start Backend"
    bl_description = "Start the bundled backend on this machine"

    @classmethod
    def poll(cls, context):
        prefs = get(context)
        if prefs is not None and prefs.mode != "LOCAL":
            cls.poll_message_set("The backend is set to a URL; it runs elsewhere")
            return False
        if backend_process.is_running() and not _restart_needed(prefs):
            cls.poll_message_set("The backend is already running with these settings")
            return False
        return True

    def execute(self, context):
        try:
            conn = connection(context)
            launch = conn.launch or _local_connection(get(context)).launch
            backend_process.start(launch)  # stops one started with other settings first
        except (SetupError, OSError) as err:
            _remember(False, str(err), getattr(err, "fix", ""))
            self.report({"ERROR"}, with_fix(err))
            return {"CANCELLED"}
        _remember(False, "Backend starting...", "Press the refresh button in a few seconds")
        self.report({"INFO"}, f"Backend starting; its log is {launch.log}")
        return {"FINISHED"}


class MVDIFF_OT_backend_stop(bpy.types.Operator):
    bl_idname = "mvdiff.backend_stop"
    bl_label = "Stop Backend"
    bl_description = "Stop the backend this add-on started (frees its GPU memory)"

    @classmethod
    def poll(cls, context):
        if not backend_process.is_running():
            cls.poll_message_set("No backend started by this add-on is running")
            return False
        return True

    def execute(self, context):
        backend_process.stop()
        _remember(False, "Backend stopped", "")
        return {"FINISHED"}


class MVDIFF_OT_backend_orphan_stop(bpy.types.Operator):
    bl_idname = "mvdiff.backend_orphan_stop"
    bl_label = "Stop It"
    bl_description = ("Stop the backend an earlier Blender session left running (after checking that the "
                      "process really is that backend)")

    @classmethod
    def poll(cls, context):
        if backend_process.orphan() is None:
            cls.poll_message_set("No backend from an earlier session was found")
            return False
        return True

    def execute(self, context):
        port = backend_process.orphan().port
        if backend_process.stop_orphan():
            _remember(False, f"Stopped the earlier session's backend on port {port}", "")
            self.report({"INFO"}, f"Stopped the earlier session's backend on port {port}")
        else:
            _remember(False, "The earlier session's backend had already ended", "")
            self.report({"INFO"}, "The earlier session's backend had already ended; nothing was stopped")
        return {"FINISHED"}


class MVDIFF_OT_backend_orphan_use(bpy.types.Operator):
    bl_idname = "mvdiff.backend_orphan_use"
    bl_label = "Use It"
    bl_description = ("Keep the backend an earlier Blender session left running and use it; it stops with "
                      "this Blender, and restarts if its settings differ from the preferences")

    @classmethod
    def poll(cls, context):
        if backend_process.orphan() is None:
            cls.poll_message_set("No backend from an earlier session was found")
            return False
        return True

    def execute(self, context):
        port = backend_process.orphan().port
        if not backend_process.adopt_orphan():
            _remember(False, "The earlier session's backend has ended", "Press Start Backend")
            self.report({"WARNING"}, "The earlier session's backend has ended. Press Start Backend")
            return {"CANCELLED"}
        prefs = get(context)
        note = "" if prefs is None or prefs.port == port else (
            f"; it listens on port {port}, not on the Port set ({prefs.port}), so the next job restarts it")
        check(context)
        self.report({"INFO"}, f"Using the earlier session's backend on port {port}{note}")
        return {"FINISHED"}


classes = (MVDIFF_AddonPreferences, MVDIFF_OT_backend_check, MVDIFF_OT_backend_start, MVDIFF_OT_backend_stop,
           MVDIFF_OT_backend_orphan_stop, MVDIFF_OT_backend_orphan_use)


def register_extra() -> None:
    """Look for a backend that an earlier Blender session (one that crashed) left running."""
    try:
        if backend_process.scan(record_dir()) is not None:
            _remember(False, f"A backend from an earlier Blender session is running on port "
                             f"{backend_process.orphan().port}", "Press Stop It to end it, or Use It to keep it")
    except OSError:
        pass  # an unreadable user folder must not stop the add-on from loading


def unregister_extra() -> None:
    """A backend started by the add-on ends with it."""
    backend_process.stop()
