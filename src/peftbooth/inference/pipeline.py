"""Generation: the base pipeline is loaded once; adapters are loaded, switched, mixed and unloaded on it."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..adapters import factored
from ..adapters.strength import set_strength
from ..adapters.token_embedding import IdentifierRows
from ..config.sections import UsageError
from ..models.pipeline import call_kwargs, denoiser, guidance_cutoff_kwargs
from ..runs.rundir import RunDir, adapter_parts


def mismatch(error: Exception) -> str:
    """The first 'module: shapes' of a state-dict size mismatch (an adapter trained on another base model)."""
    import re

    m = re.search(r"size mismatch for (\S+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) from "
                  r"checkpoint, the shape in current model is (torch.Size\(\[[^\]]*\]\))", str(error))
    if m:
        module = m.group(1).removeprefix("base_model.model.")
        return f"{module}: the adapter has shape {m.group(2)[11:-1]}, this model needs {m.group(3)[11:-1]}"
    return str(error).strip().splitlines()[0][:300]


def load_for_inference(model: str, device: str | torch.device | None = None, revision: str | None = None,
                       variant: str | None = None, vae: str | None = None, dtype: torch.dtype | None = None,
                       t5: bool = True, max_sequence_length: int = 77):
    """(pipeline, precision.Precision): `model` (with `vae` replacing its own VAE) on the device and in the dtypes
    of the precision policy for generation; `dtype` overrides the UNet's and text encoders' dtype. `t5` and
    `max_sequence_length`: SD3's T5, as the run was trained (--no-t5, --max-sequence-length)."""
    from ..models.loading import family_of, load_pipeline, read_model_index, resolve_model, vae_config_force_upcast
    from ..precision import default_device, for_inference

    path = resolve_model(model)
    family = family_of(read_model_index(path, revision))
    policy = for_inference(default_device(device), family, vae_config_force_upcast(path, revision, vae),
                           compute=dtype)
    pipe = load_pipeline(path, revision=revision, variant=variant, torch_dtype=policy.compute, vae=vae,
                         vae_dtype=policy.vae, t5=t5, max_sequence_length=max_sequence_length)
    return pipe.to(policy.device), policy


class AdapterPipeline:
    """A StableDiffusion(XL|3)Pipeline plus named PEFT adapters on its UNet (SD3: transformer) and CLIP text
    encoder(s).

    PEFT injects adapter layers into the pipeline's own modules, so `self.pipe` runs with whatever adapters are
    active; the PeftMixedModel handles (`self._peft`) only manage them.
    """

    def __init__(self, model: str, revision: str | None = None, variant: str | None = None,
                 device: str | None = None, dtype: torch.dtype | None = None, vae: str | None = None,
                 t5: bool = True, max_sequence_length: int = 77):
        self.pipe, self.precision = load_for_inference(model, device, revision, variant, vae, dtype, t5,
                                                       max_sequence_length)
        self.device = self.precision.device
        self.pipe.set_progress_bar_config(disable=True)
        self._peft: dict[str, object] = {}  # 'unet' / 'text_encoder' -> PeftMixedModel
        self.adapters: dict[str, set[str]] = {}  # adapter name -> parts it has
        self.active: dict[str, float] = {}  # adapter name -> strength, as last set
        # identifier embeddings trained with --train-token-embedding (token_embeddings.safetensors)
        self.rows = IdentifierRows.of_pipeline(self.pipe)

    @property
    def model(self) -> dict[str, torch.nn.Module]:
        second = getattr(self.pipe, "text_encoder_2", None)
        sd3 = hasattr(self.pipe, "transformer")
        return adapter_parts([denoiser(self.pipe), self.pipe.text_encoder] + ([second] if second is not None else []),
                             "transformer" if sd3 else "unet")

    def load_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Load a run folder's adapters under `name` (default: the folder name) and make it the active one."""
        from peft import PeftMixedModel
        from peft.utils import set_peft_model_state_dict

        from ..runs.formats.common import read_adapter

        folders = RunDir(path).adapter_folders("--adapter")
        name = name or Path(path).resolve().name
        if name in self.adapters:
            raise UsageError(f"--adapter {name}={path}: an adapter named {name!r} is already loaded")
        extra = [part for part in folders if part not in self.model]
        if extra:  # checked before anything is loaded: no half-loaded adapter
            raise UsageError(f"--adapter {path}: has {extra[0]}/, which this base model does not have "
                             "(an adapter of another model family: SDXL's, SD3's or SD 1.x/2.x's?)")
        rows_file = RunDir(path).token_embeddings_file
        rows = self.rows.check(rows_file) if rows_file.is_file() else None
        for part, folder in folders.items():
            adapter = read_adapter(folder, part)
            config, state = adapter.peft_config(), adapter.state_dict_for(self.model[part])
            try:
                if part not in self._peft:
                    # the mixed model holds adapters of different types (a LoRA beside a LoKr) on one base
                    self._peft[part] = PeftMixedModel(self.model[part], config, adapter_name=name)
                else:
                    self._peft[part].add_adapter(name, config)
                result = set_peft_model_state_dict(self._peft[part], state, adapter_name=name)
            except (RuntimeError, ValueError, KeyError) as e:
                raise UsageError(f"--adapter {path}: does not fit this base model ({mismatch(e)})") from e
            # loud, not silent: weights that land nowhere mean the adapter would not be applied as trained
            stray = list(result.unexpected_keys) + [
                k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}")  # this adapter's own
            ]
            if stray:
                raise UsageError(f"--adapter {folder}: {len(stray)} adapter weights do not match this base model, "
                                 f"e.g. {stray[0]}")
            self._peft[part].to(self.device, dtype=self.precision.compute)
            factored.install(self._peft[part])  # LoHa/LoKr through their factors where that is cheaper
        self.adapters[name] = set(folders)
        if rows is not None:
            self.rows.add(name, *rows)
        self.set_adapters({name: 1.0})
        return name

    def set_adapters(self, weights: dict[str, float]) -> None:
        """Activate exactly these adapters with these strengths: one name switches, several mix.

        Each adapter layer computes base(x) + sum_i weight_i * scale_i * delta_i(x), where scale_i is the
        adapter's own alpha / rank; a weight of 1.0 is the adapter as trained.
        """
        unknown = [n for n in weights if n not in self.adapters]
        if unknown:
            raise UsageError(f"--mix: unknown adapter {unknown[0]!r}; loaded: {', '.join(self.adapters) or 'none'}")
        # first: it refuses two adapters that trained the same word before anything changes
        self.rows.apply(weights)  # the active adapters' identifier embeddings, the pretrained rows elsewhere
        for part, peft_model in self._peft.items():
            active = [n for n in weights if part in self.adapters[n]]
            # an empty list leaves only the base weights active in this part
            peft_model.set_adapter(active, inference_mode=True)
            set_strength(peft_model, {n: weights[n] for n in active})
        self.active = dict(weights)

    def disable_adapters(self) -> None:
        """Run the base model alone (adapters stay loaded)."""
        self.set_adapters({})

    def unload(self, name: str) -> None:
        """Remove one adapter's weights from the model."""
        if name not in self.adapters:
            raise UsageError(f"no adapter named {name!r} is loaded")
        for part in self.adapters.pop(name):
            peft_model = self._peft[part]
            if list(peft_model.peft_config) == [name]:
                peft_model.unload()  # the last one: put the original layers back
                del self._peft[part]
            else:
                peft_model.delete_adapter(name)
        self.rows.remove(name)
        self.active.pop(name, None)
        # what stays active is what was, less this one (PEFT alone would switch another adapter on)
        self.set_adapters(self.active)

    @torch.inference_mode()
    def generate(self, prompt: str, num_images: int = 1, seed: int = 0, steps: int = 25,
                 guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                 negative_prompt: str | None = None, guidance_cutoff: float = 1.0) -> list[Image.Image]:
        from ..models.vae import vae_calls

        generator = torch.Generator(self.device).manual_seed(seed)
        with vae_calls(self.pipe.vae):  # an fp32 VAE beside half-precision weights; bounded decode batches
            return self.pipe(
            prompt, num_images_per_prompt=num_images, generator=generator, num_inference_steps=steps,
                guidance_scale=guidance_scale, height=height, width=width, negative_prompt=negative_prompt,
                **call_kwargs(self.pipe), **guidance_cutoff_kwargs(self.pipe, guidance_cutoff),
            ).images


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or min(len(images), 4)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def save_images(images: list[Image.Image], output_dir: str | Path, stem: str) -> list[Path]:
    """Write STEM_00.png, STEM_01.png, ... and STEM_grid.png into output_dir."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(out / f"{stem}_{i:02d}.png")
        img.save(paths[-1])
    image_grid(images).save(out / f"{stem}_grid.png")
    return paths
