"""--masked-loss: each photo's NAME.mask.png weights its instance loss, so the background is not learned.

The maths (latent weights, the weighted MSE), the data (masks found, skipped as photos, cropped and flipped with
their photo, the same from the latent cache as from the batch) and a run that trains with them. The bad inputs
(missing, mis-sized or black masks; --unmasked-weight alone) are in test_cli.py's BAD_INPUTS table.
"""

import numpy as np
import pytest
import torch
from conftest import draw_photos, tiny_config
from PIL import Image

from peftbooth.data.dataset import DreamBoothDataset, collate
from peftbooth.data.images import list_images, load_image, load_masks, mask_path
from peftbooth.training.losses import dreambooth_loss, latent_loss_weights


def test_latent_weights_are_the_masks_area_share_with_the_background_at_unmasked_weight():
    masks = torch.zeros(1, 1, 16, 16)
    masks[..., :, :8] = 1.0  # the left half
    masks[..., :4, 8:12] = 1.0  # a quarter of the top-right latent pixel (8 x 8 patch)
    w = latent_loss_weights(masks, (2, 2), unmasked_weight=0.1)
    assert w.shape == (1, 1, 2, 2)
    torch.testing.assert_close(w[0, 0], torch.tensor([[1.0, 0.1 + 0.9 * 0.25], [1.0, 0.1]]))


def test_masked_mse_ignores_the_background_and_keeps_its_scale():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)  # 2 instance rows, 1 class row
    weights = torch.zeros(2, 1, 4, 4)
    weights[..., :2, :] = 1.0  # the top half of each instance image
    loss, inst, prior = dreambooth_loss(pred, target, 2, 0.5, instance_pixel_weights=weights)
    # the instance loss is the MSE over the masked pixels alone, the class row's is untouched
    torch.testing.assert_close(inst, (pred[:2, :, :2] - target[:2, :, :2]).pow(2).mean())
    torch.testing.assert_close(prior, (pred[2:] - target[2:]).pow(2).mean())
    torch.testing.assert_close(loss, inst + 0.5 * prior)
    # changing the prediction outside the mask changes nothing; inside, it does
    outside, inside = pred.clone(), pred.clone()
    outside[:2, :, 2:] += 5.0
    inside[:2, :, :2] += 5.0
    assert dreambooth_loss(outside, target, 2, 0.5, instance_pixel_weights=weights)[1] == inst
    assert dreambooth_loss(inside, target, 2, 0.5, instance_pixel_weights=weights)[1] > inst
    # and no gradient reaches the background
    p = pred.clone().requires_grad_(True)
    dreambooth_loss(p, target, 2, 0.5, instance_pixel_weights=weights)[0].backward()
    assert p.grad[:2, :, 2:].abs().max() == 0 and p.grad[:2, :, :2].abs().min() > 0
    # masks of ones give the unmasked loss, also with Min-SNR row weights
    ones = torch.ones(2, 1, 4, 4)
    snr_w = torch.tensor([0.3, 2.0])
    for row_weights in (None, snr_w):
        torch.testing.assert_close(dreambooth_loss(pred, target, 2, 0.5, row_weights, ones)[0],
                                   dreambooth_loss(pred, target, 2, 0.5, row_weights)[0])


def masked_folder(folder, n=2):
    """draw_photos' photos, each with a mask of its left half."""
    draw_photos(folder, n=n)
    for i in range(n):
        m = np.zeros((40, 48), np.uint8)
        m[:, :24] = 255
        Image.fromarray(m, "L").save(folder / f"photo_{i}.mask.png")
    return folder


def test_masks_are_not_photos_and_are_found_beside_their_photo(tmp_path):
    folder = masked_folder(tmp_path / "p")
    Image.new("L", (8, 8), 255).save(folder / "lonely.mask.png")  # no lonely.png beside it: a photo like any other
    photos = list_images(folder, "--instance-data-dir")
    assert [p.name for p in photos] == ["lonely.mask.png", "photo_0.png", "photo_1.png"]
    assert mask_path(photos[1]) == folder / "photo_0.mask.png"
    masks = load_masks(photos[1:], [load_image(p) for p in photos[1:]])
    assert [m.mode for m in masks] == ["L", "L"] and masks[0].size == (48, 40)


def test_a_mask_is_cropped_and_flipped_with_its_photo(tmp_path):
    folder = masked_folder(tmp_path / "p", n=1)
    photos = list_images(folder, "x")
    images = [load_image(p) for p in photos]
    ds = DreamBoothDataset(images, ["a sks dog"], 32, center_crop=True, random_flip=True,
                           instance_masks=load_masks(photos, images))
    _, _, plain = ds.sample(("instance", 0, False))
    _, _, flipped = ds.sample(("instance", 0, True))
    assert plain.shape == (1, 32, 32) and 0.0 <= plain.min() and plain.max() <= 1.0
    # 48x40 -> 38x32, centre crop from x = 3: the photo's left half (24 of 48 px) covers 19 - 3 = 16 columns
    assert plain[0, :, :15].min() > 0.99 and plain[0, :, 17:].max() < 0.01
    torch.testing.assert_close(flipped, plain.flip(-1))
    # random crops: the mask gets the crop its pixels got
    ds.center_crop = False
    rng_a, rng_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    _, ids, mask = ds.sample(("instance", 0, True), rng_a)
    _, ids_again, _ = ds.sample(("instance", 0, True), rng_b)
    assert torch.equal(ids, ids_again)
    left = int(ids[3])  # the crop's left edge in the flipped, resized photo: the mask is 1 right of 38 - 19
    assert mask[0, :, 38 - 19 - left + 1:].min() > 0.99 and mask[0, :, :38 - 19 - left - 1].max() < 0.01


def test_the_latent_cache_serves_the_masks_the_batch_would_carry(tiny_model, tmp_path):
    from peftbooth.models.loading import load_components
    from peftbooth.training.cache import LatentCache

    folder = masked_folder(tmp_path / "p")
    photos = list_images(folder, "x")
    images = [load_image(p) for p in photos]
    masks = load_masks(photos, images)
    ds = DreamBoothDataset(images, ["a sks dog"] * 2, 32, random_flip=True, instance_masks=masks)
    vae = load_components(tiny_model).vae
    cache = LatentCache.build(ds, vae, torch.device("cpu"), torch.float32)
    batch = collate([ds[i] for i in range(2)])
    assert batch["loss_masks"].shape == (2, 1, 32, 32)
    torch.testing.assert_close(cache.loss_masks(batch["keys"]), batch["loss_masks"])


def test_a_masked_run_trains_and_its_masks_are_part_of_the_photos_fingerprint(tiny_model, tmp_path):
    from peftbooth.training.loop import train
    from peftbooth.training.preflight import check_inputs

    folder = masked_folder(tmp_path / "p")
    cfg = tiny_config(tiny_model, folder, tmp_path / "out", **{"data.masked_loss": True,
                                                              "data.unmasked_weight": 0.1})
    run = train(cfg)
    assert (run / "unet" / "adapter_model.safetensors").is_file()
    assert "masked_loss: true" in (run / "config.yaml").read_text()
    cfg.train.overwrite = True
    before = check_inputs(cfg.resolved())[2]
    Image.new("L", (48, 40), 255).save(folder / "photo_1.mask.png")
    assert check_inputs(cfg.resolved())[2] != before  # a resume would see that the masks changed


@pytest.mark.parametrize("unmasked", [0.0, 1.0])
def test_masks_change_what_a_step_learns_unless_the_background_weighs_as_much(tiny_model, tmp_path, unmasked):
    """The same two steps with and without --masked-loss: the adapters differ, except at --unmasked-weight 1
    (every pixel counts fully again), where they are equal."""
    from safetensors.torch import load_file

    from peftbooth.training.loop import train

    folder = masked_folder(tmp_path / "p")
    plain = train(tiny_config(tiny_model, folder, tmp_path / "plain"))
    masked = train(tiny_config(tiny_model, folder, tmp_path / "masked", **{"data.masked_loss": True,
                                                                          "data.unmasked_weight": unmasked}))
    a, b = (load_file(str(r / "unet" / "adapter_model.safetensors")) for r in (plain, masked))
    same = all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert same == (unmasked == 1.0)
