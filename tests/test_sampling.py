"""sampling.py, the one sampler of class images, validation and eval: class images made by the training run's
own modules in memory are the images the `class-images` command makes from the model folder (CPU, bit for
bit), and sampling leaves the modules, their devices and the global RNG as it found them."""

import numpy as np
import torch

from peftbooth.inference.sampling import image_seeds, in_memory_pipeline, sample, sample_images, sampling_state
from peftbooth.models.loading import load_components
from peftbooth.precision import for_training
from peftbooth.training.prior import class_images_from_components, generate_class_images


def test_class_images_from_memory_equal_those_loaded_from_disk(tiny_model, tmp_path):
    disk = generate_class_images(tiny_model, "a photo of a dog", tmp_path / "disk", 3, sample_batch_size=2,
                                 num_inference_steps=2, seed=5, show_progress=False)
    c = load_components(tiny_model)
    c.unet.train()  # a flag the caller had must come back
    torch.manual_seed(123)
    memory = class_images_from_components(c, "a photo of a dog", tmp_path / "memory", 3, 2, 2, 5,
                                          for_training("no", torch.device("cpu"), "sd", True), show_progress=False)
    assert [p.name for p in memory] == [p.name for p in disk]  # names carry the content hash
    assert [p.read_bytes() for p in memory] == [p.read_bytes() for p in disk]
    assert c.unet.training and not c.vae.training


def test_sampling_leaves_the_global_rng_and_flags_as_they_were(tiny_model):
    c = load_components(tiny_model)
    pipe = in_memory_pipeline(c)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with sampling_state(torch.device("cpu"), c.vae, [c.unet, c.vae, c.text_encoder], [c.vae]):
        assert not c.unet.training and not torch.is_grad_enabled()
        rows = sample(pipe, ["a photo of a dog", "a cat"], image_seeds(0, 2), 32, 2, 7.5)
        one = sample_images(pipe, "a cat", [1], 2, 7.5, 32)
    assert torch.equal(torch.rand(3), expected)
    assert [len(r) for r in rows] == [2, 2] and rows[0][0].size == (32, 32)
    # image 1 of a prompt starts from the same noise whether it is drawn with image 0 or alone (a batch of 2 may
    # round differently from a batch of 1: within one level of 255)
    diff = np.abs(np.asarray(one[0], dtype=np.int16) - np.asarray(rows[1][1], dtype=np.int16))
    assert int(diff.max()) <= 1
