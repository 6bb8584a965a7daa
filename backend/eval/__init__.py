"""Weight-free quality metrics: overlap PSNR, panorama seams, texture coverage."""
