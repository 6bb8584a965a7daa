"""The sidebar panel in the 3D View (N panel, tab "MVDiffusion"): Texture, Environment, Job, Backend."""

from __future__ import annotations

import bpy

from . import multiview_weights, operators, preferences

CATEGORY = "MVDiffusion"


class _Panel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = CATEGORY


class MVDIFF_PT_texture(_Panel, bpy.types.Panel):
    bl_idname = "MVDIFF_PT_texture"
    bl_label = "Texture"

    def draw(self, context):
        settings = context.scene.mvdiff
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        col = layout.column()
        col.prop(settings, "prompt")
        col.prop(settings, "prompts_text")
        col.prop(settings, "negative_prompt", text="Negative")

        col = layout.column(heading="Cameras")
        col.prop(settings, "camera_source")
        source = settings.camera_source
        if source == "ANIMATED":
            col.prop(settings, "animated_camera")
            row = col.row(align=True)
            row.prop(settings, "frame_start")
            row.prop(settings, "frame_end")
            col.prop(settings, "frame_step")
        elif source == "ORBIT":
            col.prop(settings, "orbit_views")
            col.prop(settings, "orbit_rings")
            col.prop(settings, "orbit_elevation")
            col.prop(settings, "orbit_distance")
            col.prop(settings, "lens")
        elif source == "WALK":
            col.prop(settings, "walk_curve")
            col.prop(settings, "walk_views")
            col.prop(settings, "lens")
        if source in ("ORBIT", "WALK"):
            col.operator("mvdiff.place_cameras", icon="OUTLINER_OB_CAMERA")
        col = layout.column(align=True)
        col.prop(settings, "width", text="View Size X")
        col.prop(settings, "height", text="Y")

        col = layout.column()
        col.prop(settings, "consistency_mode")
        col.prop(settings, "scheduler")
        col.prop(settings, "steps")
        col.prop(settings, "guidance")
        col.prop(settings, "seed")
        col.prop(settings, "uv_source")
        col.prop(settings, "make_uv_active")
        col.prop(settings, "make_single_user")
        col.prop(settings, "texture_size")
        col.prop(settings, "texture_16bit")
        col.prop(settings, "output_dir")
        col.prop(settings, "result_name")
        multiview_weights.draw(layout.column(), ("depth",), show_result=False)
        layout.operator("mvdiff.texture", icon="TEXTURE")
        layout.operator("mvdiff.restore_materials", icon="MATERIAL")


class MVDIFF_PT_environment(_Panel, bpy.types.Panel):
    bl_idname = "MVDIFF_PT_environment"
    bl_label = "Environment"

    def draw(self, context):
        settings = context.scene.mvdiff
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        col = layout.column()
        col.prop(settings, "world_prompt")
        col.prop(settings, "world_source")
        if settings.world_source == "IMAGE":
            col.template_ID(settings, "world_image", open="image.open")
        col.prop(settings, "consistency_mode")
        col.prop(settings, "world_height")
        col.prop(settings, "world_view_size")
        col.prop(settings, "world_strength")
        col.prop(settings, "world_replace_current")
        col.prop(settings, "world_result_name")
        multiview_weights.draw(layout.column(), ("panorama",), show_result=False)
        layout.operator("mvdiff.make_world", icon="WORLD")


class MVDIFF_PT_job(_Panel, bpy.types.Panel):
    bl_idname = "MVDIFF_PT_job"
    bl_label = "Job"

    def draw(self, context):
        state = context.window_manager.mvdiff
        layout = self.layout
        if state.running:
            layout.progress(factor=state.progress, type="BAR", text=state.message or state.stage)
            image = bpy.data.images.get(state.preview_image) if state.preview_image else None
            if image is not None and image.preview is not None:
                layout.template_icon(icon_value=image.preview.icon_id, scale=8.0)
            layout.operator("mvdiff.cancel", icon="CANCEL")
        else:
            layout.label(text=state.message or "No job running")
            layout.operator("mvdiff.apply_result", icon="IMPORT")
        session = operators.active_session()
        if session is not None and session.snapshot.job_id:
            layout.label(text=f"Job {session.snapshot.job_id[:8]}")


class MVDIFF_PT_backend(_Panel, bpy.types.Panel):
    bl_idname = "MVDIFF_PT_backend"
    bl_label = "Backend"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        prefs = preferences.get(context)
        if prefs is None:
            self.layout.label(text="Preferences unavailable (not installed as an extension)")
            return
        preferences.draw_status(self.layout, prefs)


classes = (MVDIFF_PT_texture, MVDIFF_PT_environment, MVDIFF_PT_job, MVDIFF_PT_backend)
