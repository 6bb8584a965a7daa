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
from ..backend.protocol import API_VERSION
from . import ADDON_ID, backend_process, compat, installer
from .connection import Connection, LocalLaunch, SetupError, normalise_url

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
    ], default="LOCAL")
    python: StringProperty(name="Backend Python", subtype="FILE_PATH",
                           description="A Python with the backend's requirements (torch, diffusers...); "
                                       "empty: the checkout's .venv when there is one")
    model_source: EnumProperty(name="Model", items=MODEL_SOURCES, default="HUB")
    model_folder: StringProperty(name="Model Folder", subtype="DIR_PATH")
    depth_caa: StringProperty(name="Depth Multi-View Weights", subtype="FILE_PATH",
                              description="Trained multi-view blocks for texturing (.safetensors or released .ckpt)")
    panorama_caa: StringProperty(name="Panorama Multi-View Weights", subtype="FILE_PATH",
                                 description="Trained multi-view blocks for panoramas")
    device: EnumProperty(name="Device", items=DEVICES, default="AUTO")
    port: IntProperty(name="Port", default=8765, min=1024, max=65535)
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
    if prefs.mode == "LOCAL":
        if backend_process.is_running():
            row.operator("mvdiff.backend_stop", icon="CANCEL")
        else:
            row.operator("mvdiff.backend_start", icon="PLAY")
        if not prefs.python and not bundled_venv_python():
            box.label(text="Set Backend Python: a Python with the backend installed (see the README)", icon="INFO")
    elif not compat.online_access_allowed():
        row.operator("screen.userpref_show", text="Open Preferences to Allow Online Access").section = "SYSTEM"


def get(context: bpy.types.Context | None = None) -> MVDIFF_AddonPreferences | None:
    """The preferences, or None when the add-on runs outside an installed extension."""
    addons = (context or bpy.context).preferences.addons
    entry = addons.get(ADDON_ID)
    return entry.preferences if entry else None


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


def _local_connection(prefs: MVDIFF_AddonPreferences | None) -> Connection:
    port = prefs.port if prefs else 8765
    python = bpy.path.abspath(prefs.python) if prefs and prefs.python else bundled_venv_python()
    args: list[str] = []
    source = prefs.model_source if prefs else "HUB"
    if source == "TINY":
        args += ["--models", "tiny"]
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
    launch = LocalLaunch(python=python, port=port, model_args=tuple(args), store=user_folder("backend-store"),
                         log=user_folder("logs") / "backend.log", extension_root=EXTENSION_ROOT,
                         offline=not compat.online_access_allowed())
    auto = prefs.start_automatically if prefs else True
    return Connection(f"http://127.0.0.1:{port}", None, launch if auto else None)


def check(context: bpy.types.Context | None = None, timeout: float = 3.0) -> tuple[bool, str, str]:
    """Health and version of the configured backend, for the status box: (ok, text, fix)."""
    try:
        conn = connection(context)
        info = BackendClient(conn.url, conn.token, timeout).version()
    except SetupError as err:
        return _remember(False, str(err), err.fix)
    except BackendError as err:
        if err.status == 401:
            return _remember(False, "The backend refused the token", "Set the backend's token")
        fix = "Press Start Backend" if get(context) is None or get(context).mode == "LOCAL" else "Check the URL"
        return _remember(False, f"Backend not reachable: {err.message}", fix)
    if info.get("api_version") != API_VERSION:
        return _remember(False, f"Backend speaks API {info.get('api_version')}, the add-on needs {API_VERSION}",
                         "Update the backend and the add-on to the same release")
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
        if backend_process.is_running():
            cls.poll_message_set("The backend is already running")
            return False
        return True

    def execute(self, context):
        try:
            conn = connection(context)
            launch = conn.launch or _local_connection(get(context)).launch
            backend_process.start(launch)
        except (SetupError, OSError) as err:
            self.report({"ERROR"}, str(err))
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


classes = (MVDIFF_AddonPreferences, MVDIFF_OT_backend_check, MVDIFF_OT_backend_start, MVDIFF_OT_backend_stop)


def unregister_extra() -> None:
    """A backend started by the add-on ends with it."""
    backend_process.stop()
