"""Generation: the base pipeline loaded once with adapters switched and mixed on it
(``pipeline``), the one sampler (``sampling``), merging adapters into the weights (``fuse``)."""
