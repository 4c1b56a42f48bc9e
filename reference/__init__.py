"""A small trained Qwen-Image-architecture text-to-image model of handwritten digits.

The reference model gives the project a diffusers ``QwenImagePipeline`` with a meaningful denoising
trajectory (a trained transformer, VAE and prompt encoder) that runs in seconds on a CPU:

- :mod:`reference.prompt_encoder`: the word tokenizer and prompt encoder standing in for Qwen2.5-VL.
- :mod:`reference.train`: ``python -m reference.train`` trains the VAE and transformer on scikit-learn's digits.
- :mod:`reference.pipeline`: ``load_reference_pipeline`` and the sampling recipe the model was trained for.
- :mod:`reference.classifier`: a digit classifier to check what the model draws.
"""
