"""Operators on results already made: apply a downloaded result again, put the user's materials back.

*Apply Result* reads a job folder (``job.npz``, the add-on's ``blender.json`` and the downloaded
``result/``), so a result that could not be applied (an object was in Edit Mode, had 8 UV maps)
or that was undone is applied without running the job again. *Restore Materials* undoes what
texturing did to the selected objects' material assignment.
"""

from __future__ import annotations

import bpy
from bpy.props import StringProperty

from . import apply
from .job import JobError, read_record
from .operators import apply_texture_result, apply_world_result


class MVDIFF_OT_apply_result(bpy.types.Operator):
    bl_idname = "mvdiff.apply_result"
    bl_label = "Apply Result"
    bl_description = ("Apply a finished job's downloaded result again (the texture onto the objects it was made "
                      "for, or the panorama as the World), without running the job")
    bl_options = {"REGISTER", "UNDO"}

    directory: StringProperty(name="Job Folder", subtype="DIR_PATH",
                              description="The job's folder (in mvdiff_jobs next to the results), or its result folder")

    def invoke(self, context, event):
        if not self.directory:
            self.directory = context.window_manager.mvdiff.job_folder
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        folder = self.directory or context.window_manager.mvdiff.job_folder
        if not folder:
            self.report({"ERROR"}, "Choose the job folder whose result to apply")
            return {"CANCELLED"}
        try:
            prepared = read_record(folder)
        except JobError as err:
            self.report({"ERROR"}, str(err))
            return {"CANCELLED"}
        result_dir = prepared.folder / "result"
        if not result_dir.is_dir():
            self.report({"ERROR"}, f"{prepared.folder} has no downloaded result (no 'result' folder): the job did "
                                   "not finish, or its result was not downloaded")
            return {"CANCELLED"}
        try:
            if prepared.kind == "texture":
                summary = apply_texture_result(self, context, prepared, result_dir)
            else:
                summary = apply_world_result(context, prepared, result_dir)
        except apply.ApplyError as err:
            self.report({"ERROR"}, f"Could not apply the result: {err}")
            return {"CANCELLED"}
        state = context.window_manager.mvdiff
        state.message, state.job_folder = summary, str(prepared.folder)
        self.report({"INFO"}, summary)
        return {"FINISHED"}


class MVDIFF_OT_restore_materials(bpy.types.Operator):
    bl_idname = "mvdiff.restore_materials"
    bl_label = "Restore Materials"
    bl_description = ("Give the selected objects' faces back the materials they had before texturing and remove "
                      "the texture's material slot (the texture's UV map and image stay)")
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        if not any(_restorable(o) for o in context.selected_objects):
            cls.poll_message_set("Select objects textured by MVDiffusion")
            return False
        return True

    def execute(self, context):
        restored = []
        for obj in context.selected_objects:
            if not _restorable(obj):
                continue
            try:
                if apply.restore_materials(obj):
                    restored.append(obj.name)
            except apply.ApplyError as err:
                self.report({"ERROR"}, str(err))
                return {"CANCELLED"}
        self.report({"INFO"}, f"Restored the materials of {len(restored)} object(s)")
        return {"FINISHED"}


def _restorable(obj: bpy.types.Object) -> bool:
    if obj.type != "MESH":
        return False
    me = obj.data
    return apply.MATERIAL_INDEX_ATTRIBUTE in me.attributes or any(
        m is not None and apply.MATERIAL_TAG in m for m in me.materials)


classes = (MVDIFF_OT_apply_result, MVDIFF_OT_restore_materials)
