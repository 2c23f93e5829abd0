"""What a KB was built with: one frozen value, validated once when it is made.

A query must match these settings for the stored trajectories to apply. Reading
`kb.settings` on a hot path costs nothing: a KBSettings that exists is valid and cannot
change (dicts are read-only views, lists are tuples).
"""

from __future__ import annotations

import json
import math
import re
import types
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np

from ..core.errors import KBError
from ..core.records import Recipe
from .safe_json import MAX_DEPTH, depth

SEED_POLICIES = ("fixed", "per_entry")
#: Bounds that keep every size computed from the settings far from overflow and memory exhaustion.
MAX_LATENT_DIM = 65536
MAX_LATENT_VALUES = 2**28
MAX_STEPS = 10000
MAX_TEXT = 100_000
#: A sampler or scheduler name as ComfyUI spells them ("euler", "dpmpp_2m_sde", "karras"); whether the running
#: ComfyUI knows it is checked where samplers run (kb_tools/samplers/entry.py), the store never imports ComfyUI.
NAME_RE = re.compile(r"[a-z0-9_]{1,64}")
#: The manifest nests settings two levels down; leave room for that under the manifest's depth limit.
MAX_SETTINGS_DEPTH = MAX_DEPTH - 4


def is_int(x: Any) -> bool:
    """An integer, numpy's included, but not a bool (True is a flag, not the number 1)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def freeze(value: Any) -> Any:
    """A read-only copy of a JSON-like value: dicts become mapping proxies, lists tuples."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Plain JSON types again (dict, list) from a frozen value."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class KBSettings:
    """What a KB was built with; a query must match it for the stored trajectories to apply."""

    model_fingerprint: Mapping
    latent_shape: tuple[int, int, int]
    sampling_type: str
    sampler: str
    scheduler: str
    steps: int
    cfg: float
    denoise: float
    stored_steps: tuple[int, ...]
    sigmas: tuple[float, ...]
    key_model_fingerprint: Mapping | None = None  # the model that made the keys (T-Stitch)
    latent_space: str = "comfy_latent"
    seed_policy: str = "fixed"
    negative_prompt: str = ""
    extra: Mapping = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(what: str, fix: str) -> KBError:
            return KBError(f"Invalid KB settings: {what}. {fix}")

        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("model_fingerprint", "extra"):
            if not isinstance(getattr(self, name), Mapping):
                raise bad(f"{name} must be a dict, got {type(getattr(self, name)).__name__}", f"Pass {name} as a dict.")
        if self.key_model_fingerprint is not None and not isinstance(self.key_model_fingerprint, Mapping):
            raise bad("key_model_fingerprint must be a dict or None", "Pass a dict, or None if one model made the keys.")
        for name in ("sampling_type", "latent_space", "sampler", "scheduler", "negative_prompt"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > MAX_TEXT:
                raise bad(f"{name} must be a string of at most {MAX_TEXT} characters, got {_short(value)}",
                          f"Pass {name} as a string.")
        for name in ("sampler", "scheduler"):
            if not NAME_RE.fullmatch(getattr(self, name)):
                raise bad(f"{name} {_short(getattr(self, name))} is not a ComfyUI {name} name (1 to 64 characters "
                          "a-z, 0-9 and _)", f"Pass the {name} name ComfyUI lists, e.g. "
                          f"{'euler' if name == 'sampler' else 'normal'}.")
        shape = list(self.latent_shape) if isinstance(self.latent_shape, (list, tuple)) else None
        if shape is None or len(shape) != 3 or not all(is_int(s) and 0 < s <= MAX_LATENT_DIM for s in shape) \
                or math.prod(int(s) for s in shape) > MAX_LATENT_VALUES:
            raise bad(f"latent_shape must be 3 positive ints [C, H, W] of at most {MAX_LATENT_VALUES} values, got "
                      f"{_short(self.latent_shape)}", "Pass the latent's shape without the batch dimension.")
        store("latent_shape", tuple(int(s) for s in shape))
        if not is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise bad(f"steps must be an int in [1, {MAX_STEPS}], got {_short(self.steps)}", "Pass the sampler's step count.")
        store("steps", int(self.steps))
        for name in ("cfg", "denoise"):
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value):
                raise bad(f"{name} must be a finite number, got {_short(value)}", f"Pass {name} as a float.")
            store(name, float(value))
        if not 0.0 < self.denoise <= 1.0:
            raise bad(f"denoise must be in (0, 1], got {self.denoise}", "Pass the sampler's denoise value.")
        steps = list(self.stored_steps) if isinstance(self.stored_steps, (list, tuple)) else None
        if not steps or not all(is_int(s) for s in steps):
            raise bad(f"stored_steps must be a non-empty list of ints, got {_short(self.stored_steps)}",
                      "List the step indices whose latents the KB stores.")
        outside = [int(s) for s in steps if not 0 <= s < self.steps]
        if outside:
            raise bad(f"stored_steps {outside[:10]} are outside [0, {self.steps}) for steps={self.steps}",
                      f"Store steps between 0 (pure noise) and {self.steps - 1}.")
        store("stored_steps", tuple(sorted({int(s) for s in steps})))  # order and repeats carry no meaning
        sig = list(self.sigmas) if isinstance(self.sigmas, (list, tuple)) else None
        if sig is None or len(sig) != self.steps + 1:
            raise bad(f"sigmas must list steps + 1 = {self.steps + 1} values, got "
                      f"{'no list' if sig is None else len(sig)}", "Pass the full schedule, final 0 included.")
        if not all(is_number(s) and math.isfinite(s) and s >= 0 for s in sig):
            raise bad("sigmas must be finite non-negative numbers", "Pass the sampler's sigma schedule.")
        rising = next((i for i in range(len(sig) - 1) if sig[i + 1] > sig[i]), None)
        if rising is not None:
            raise bad(f"sigmas increase from {sig[rising]!r} (step {rising}) to {sig[rising + 1]!r}: a sampling "
                      "schedule only goes down", "Pass the sampler's sigma schedule, highest noise level first.")
        store("sigmas", tuple(float(s) for s in sig))
        if self.seed_policy not in SEED_POLICIES:
            raise bad(f"seed_policy {_short(self.seed_policy)} is unknown", f"Use one of {list(SEED_POLICIES)}.")
        plain = self.to_dict()
        try:
            text = json.dumps(plain, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise bad(f"settings are not JSON-serialisable ({e})",
                      "Use only str, int, float, bool, None, lists and dicts in fingerprints and extra.") from None
        if json.loads(text) != plain:
            raise bad("settings change when stored as JSON", "Use string keys in fingerprints and extra.")
        if depth(plain) > MAX_SETTINGS_DEPTH:
            raise bad(f"fingerprints or extra nest deeper than {MAX_SETTINGS_DEPTH} levels", "Flatten them.")
        for name in ("model_fingerprint", "key_model_fingerprint", "extra"):
            store(name, freeze(getattr(self, name)))
        # The recipe is validated here, once; `recipe` hands out this object.
        object.__setattr__(self, "_recipe", Recipe(self.sampler, self.scheduler, self.steps, self.cfg))

    @property
    def recipe(self) -> Recipe:
        """The sampling recipe a query must follow (sampler, scheduler, steps, cfg)."""
        return self._recipe  # type: ignore[attr-defined]

    def to_dict(self) -> dict:
        """Plain JSON types, as stored in manifest.json."""
        return {f.name: thaw(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Any) -> KBSettings:
        """Inverse of to_dict; refuses missing or unknown keys (a typo must not pass silently)."""
        if not isinstance(d, Mapping):
            raise KBError(f"KB settings must be a dict, got {type(d).__name__}. Pass KBSettings.to_dict() output.")
        unknown = sorted(str(k) for k in set(d) - set(SETTING_KEYS))
        if unknown:
            raise KBError(f"KB settings have unknown keys {unknown[:10]}; valid keys are {list(SETTING_KEYS)}. "
                          "Remove them, or upgrade the pack if a newer version wrote these settings.")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        absent = [k for k in required if k not in d]
        if absent:
            raise KBError(f"KB settings lack required keys {absent}. Provide them (see KBSettings).")
        return cls(**d)


SETTING_KEYS = tuple(f.name for f in fields(KBSettings))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
