"""Presets of real models, built from small excerpts of their Hugging Face `config.json`.

Each preset is one file `ssm_split/specs/data/<name>.json`: the config fields its family needs
(see `_hf_config`), plus `_hf_id` (the Hugging Face repository), optional `_hf_aliases`
(other repositories with the same state, e.g. the -Base twin) and `_source` (where the
values come from, and whether they were read from the real file or reconstructed).
Nothing is fetched at run time: the files ship as package data.

`resolve_model` reads what a command line's MODEL argument may be: a preset name, a
preset's Hugging Face id, a config.json path or its directory.

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
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from ..errors import SpecError
from ._hf_config import ParsedConfig, parse_hf_config
from ._spec import Spec

__all__ = ["ModelInfo", "models", "model", "preset_info", "model_info_from_hf_config",
           "resolve_model", "FORMS_HINT"]

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


_API_HINT = ("A preset may also be named by its Hugging Face id (e.g. 'Qwen/Qwen3.5-27B'); "
             "for another model, pass its config.json to `ssm_split.from_hf_config`.")

FORMS_HINT = ("Name a preset (`ssm-split models` lists them) or its Hugging Face id (e.g. "
              "'Qwen/Qwen3.5-27B'), or give the path of a model's config.json or of the "
              "directory holding it.")
"""What a MODEL argument may be: the same wherever a command or `resolve_model` takes one."""


def _resolve(name: object, hint: str = _API_HINT) -> ModelInfo:
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
        raise SpecError(f"Unknown model {name!r}. Known presets: {', '.join(models())}. {hint}")
    return next(info for info in infos if info.name == lookup[key])


def resolve_model(text: str) -> ModelInfo:
    """The model a command-line MODEL argument names, in any of its four forms.

    Args:
        text: a preset name (`"qwen3.5-27b"`), a Hugging Face id of a preset
            (`"Qwen/Qwen3.5-27B"`, case-insensitive, -Instruct/-Base ignored), the path of
            a `config.json` (any file name ending in `.json`), or the path of a directory
            holding a `config.json`.

    Returns:
        The preset's `ModelInfo`, or one built from the config file with
        `model_info_from_hf_config` (its name is the path given).

    Raises:
        SpecError: an unknown name, a directory without `config.json`, a file that cannot
            be read or parsed, or a config of an unsupported architecture. Every message
            says which forms are accepted.

    This is the only function of the pure core that reads a file the caller names; it
    reads nothing else (no environment, no network).
    """
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"A model must be a non-empty str, got {text!r}. {FORMS_HINT}")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpecError(f"The directory {text!r} has no config.json. Pass the directory "
                            f"that holds the model's config.json, the file itself, or a preset "
                            f"name (`ssm-split models` lists them).")
        path = path / "config.json"
    elif not (path.is_file() or text.endswith(".json")):
        return _resolve(text, FORMS_HINT)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise SpecError(f"Cannot read the model config {str(path)!r}: {reason}. Pass a "
                        f"readable config.json (or its directory), or a preset name from "
                        f"`ssm-split models`.") from None
    if not isinstance(config, dict):
        raise SpecError(f"The model config {str(path)!r} holds a JSON {type(config).__name__}, "
                        f"not an object: pass a Hugging Face config.json.")
    return model_info_from_hf_config(config, name=str(path))


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
