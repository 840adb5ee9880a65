"""Presets of real models, built from small excerpts of their Hugging Face `config.json`.

Each preset is one file `ssm_split/specs/data/<name>.json`: the config fields its family needs
(see `_hf_config`), plus `_hf_id` (the Hugging Face repository), optional `_hf_aliases`
(other repositories with the same state, e.g. the -Base twin) and `_source` (where the
values come from, and whether they were read from the real file or reconstructed).
Nothing is fetched at run time: the files ship as package data.

Names are the lowercase model name without organisation and without -Instruct/-Base
(`qwen3.5-27b`, `nemotron-h-8b`, `granite-4.0-h-tiny`, ...).

    >>> ssm_split.model("nemotron-h-8b")                  # or "nvidia/Nemotron-H-8B-Base-8K"
    Mamba2Spec(num_heads=128, head_dim=64, num_groups=8, state_size=128, ...)
    >>> ssm_split.specs.preset_info("jamba-v0.1").num_state_layers
    28
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Mapping

from ..errors import SpecError
from ._hf_config import ParsedConfig, parse_hf_config
from ._spec import Spec

__all__ = ["ModelInfo", "models", "model", "preset_info", "model_info_from_hf_config"]

_SUFFIXES = ("-instruct", "-base", "-hf")


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model's recurrent state, as its config describes it.

    Attributes:
        name: preset name (or, for a config read from a file, the name it was given).
        hf_id: Hugging Face repository id, or "" when unknown.
        spec: per-layer state spec (every state layer has the same one).
        model_type: the family key the config was read as (`"nemotron_h"`, ...).
        layer_kind: the recurrent mixer in words (`"Mamba2"`, `"Gated DeltaNet"`, `"KDA"`, ...).
        num_state_layers: layers carrying this state; a request holds one page per layer.
        num_layers: all decoder layers of the model.
        source: where the config values come from (real config, or reconstructed).
    """

    name: str
    hf_id: str
    spec: Spec
    model_type: str
    layer_kind: str
    num_state_layers: int
    num_layers: int
    source: str = ""

    @property
    def family(self) -> str:
        """The spec family: "mamba2", "gdn", "mamba1", "short_conv" or "linear_attention"."""
        return self.spec.family


def _info(name: str, hf_id: str, parsed: ParsedConfig, source: str) -> ModelInfo:
    return ModelInfo(name, hf_id, parsed.spec, parsed.model_type, parsed.layer_kind,
                     parsed.num_state_layers, parsed.num_layers, source)


def model_info_from_hf_config(config: Mapping, name: str = "", hf_id: str = "") -> ModelInfo:
    """A `ModelInfo` for any supported config mapping (keys starting with `_` are ignored).

    Raises:
        SpecError: unsupported architecture or missing fields (see `from_hf_config`).
    """
    parsed = parse_hf_config(config)
    hf_id = hf_id or str(config.get("_hf_id") or config.get("_name_or_path") or "")
    return _info(name or hf_id or parsed.model_type, hf_id, parsed, str(config.get("_source", "")))


@lru_cache(maxsize=1)
def _registry() -> tuple[tuple[ModelInfo, ...], Mapping[str, str]]:
    """All presets sorted by name, and a lookup of lowercase names / ids -> preset name."""
    infos, lookup = [], {}
    for entry in sorted(resources.files(__package__).joinpath("data").iterdir(),
                        key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        name = entry.name.removesuffix(".json")
        config = json.loads(entry.read_text(encoding="utf-8"))
        info = model_info_from_hf_config(config, name=name, hf_id=config["_hf_id"])
        infos.append(info)
        for key in (name, info.hf_id, *config.get("_hf_aliases", ())):
            lookup[key.lower()] = name
    return tuple(infos), MappingProxyType(lookup)


def models() -> tuple[str, ...]:
    """The names of every preset, sorted."""
    return tuple(info.name for info in _registry()[0])


def _resolve(name: object) -> ModelInfo:
    infos, lookup = _registry()
    if not isinstance(name, str):
        raise SpecError(f"A model name must be a str, got {type(name).__name__} {name!r}.")
    key = name.strip().lower()
    if key not in lookup:  # "Org/Model-Name-Instruct" -> "model-name"
        short = key.rsplit("/", 1)[-1]
        while short.endswith(_SUFFIXES):
            short = short[: short.rindex("-")]
        key = short
    if key not in lookup:
        raise SpecError(
            f"Unknown model {name!r}. Known presets: {', '.join(models())}. A preset may also "
            f"be named by its Hugging Face id (e.g. 'Qwen/Qwen3.5-27B'); for another model, "
            f"pass its config.json to `ssm_split.from_hf_config`."
        )
    return next(info for info in infos if info.name == lookup[key])


def model(name: str) -> Spec:
    """The per-layer state spec of a preset, by preset name or Hugging Face id
    (case-insensitive).

    Raises:
        SpecError: unknown name; the message lists the presets.
    """
    return _resolve(name).spec


def preset_info(name: str) -> ModelInfo:
    """Everything known about a preset: its ids, spec, layer counts and source.

    Raises:
        SpecError: unknown name; the message lists the presets.
    """
    return _resolve(name)
