"""Base models as families (SD 1.x/2.x, SDXL): reading the family, loading the components, encoding
prompts into conditioning, the VAE's calls, the model's own defaults, and the tiny random models."""
