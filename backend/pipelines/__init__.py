"""Multi-view generation pipelines: keyframes (depth task), interpolation, panoramas."""
