"""An offline build as the command line describes it: a checkpoint file plus the build settings.

`python -m kb_tools build` runs one in this process; with `--ray` every worker receives the same
job, loads the checkpoint once (`load_checkpoint`) and builds its shard with `spec`, so a
single-process and a distributed build sample with exactly the same BuildSpec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from ..core.errors import KBError

if TYPE_CHECKING:
    from .builder import BuildSpec


@dataclass(frozen=True)
class BuildJob:
    """Everything but the prompts: which checkpoint, which recipe, which steps and latent size."""

    ckpt: str
    seeds: tuple[int, ...]
    sampler: str = "euler"
    scheduler: str = "normal"
    steps: int = 20
    cfg: float = 7.0
    store_steps: str = "auto"
    width: int = 512
    height: int = 512
    negative: str = ""
    batch_size: int = 4
    dtype: str = "float16"
    index: str = "auto"
    cpu: bool = False

    def spec(self, channels: int, prompts: Sequence[str], pairs: Sequence[tuple[str, int]] = (), commit_every: int = 64) -> BuildSpec:
        """The BuildSpec for these prompts (or these explicit pairs) on a model whose latent has `channels`."""
        from ..core.records import Recipe
        from ..core.schedule import parse_steps
        from .builder import BuildSpec  # imports ComfyUI: only where the model runs, not on a Ray driver

        return BuildSpec(prompts=list(prompts), seeds=list(self.seeds), recipe=Recipe(self.sampler, self.scheduler, self.steps, self.cfg),
                         store_steps=parse_steps(self.store_steps, self.steps),
                         latent_shape=(channels, self.height // 8, self.width // 8), negative_prompt=self.negative,
                         batch_size=self.batch_size, dtype=self.dtype, index_type=self.index, pairs=list(pairs),
                         commit_every=commit_every)


def load_checkpoint(ckpt: str) -> tuple[object, Callable[[str], list], int]:
    """(model, prompt -> CONDITIONING, latent channels) from a full checkpoint, through ComfyUI's loader."""
    import comfy.sd

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=True)
    if model is None or clip is None:
        raise KBError(f"{ckpt} has no diffusion model or text encoder ComfyUI recognises; give a full checkpoint (model + CLIP).")
    channels = model.get_model_object("latent_format").latent_channels
    encode = lambda prompt: clip.encode_from_tokens_scheduled(clip.tokenize(prompt))  # noqa: E731
    return model, encode, channels
