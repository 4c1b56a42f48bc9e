"""A second trained reference model: a tiny Wan2.1-style text-to-video ``WanPipeline`` of moving coloured shapes."""
