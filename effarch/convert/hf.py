"""Hugging Face checkpoint folders in and out: :func:`from_hf` and :func:`to_hf`.

    config, params = from_hf("mamba2-130m")          # config.json + *.safetensors (any layout)
    logits, aux, _ = LM(config).apply(params, tokens)
    to_hf(config, params, "mamba2-130m-tuned")        # Mamba2ForCausalLM.from_pretrained(...)

A folder holds ``config.json`` and either ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``. Tensors are read and written with
``safetensors.numpy``: no torch, no pickle. Every tensor is checked against
the layout's table (``effarch/convert/architectures.py``) before anything is
loaded or written: a missing, unexpected or wrongly shaped tensor, an unknown
architecture or an option effarch does not implement raises a ValueError
naming it and what was expected, and :func:`to_hf` writes into a temporary
folder beside ``path`` that is renamed only once it is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from effarch.convert.architectures import ARCHITECTURES, LAYOUTS, LM_HEAD, Architecture, Layout, mixer_names
from effarch.models.config import LMConfig
from effarch.models.lm import LM, stack_layer_params, unstack_layer_params

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers refuses safetensors files without this metadata.
SAFETENSORS_METADATA = {"format": "pt"}
# LMConfig fields from_hf accepts as overrides: how the model runs, not what it is.
RUNTIME_FIELDS = ("dtype", "param_dtype", "implementation", "max_len", "remat", "scan_layers", "residual_in_fp32")
# transformers >= 5 writes inf and nan in config.json as {"__float__": "Infinity"}.
TAGGED_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}
# Problems listed in one error message before the rest are counted.
MAX_LISTED = 8

PathLike = str | os.PathLike

class Entry(NamedTuple):
    """One row of a model's tensor table: HF tensors and the effarch parameters they hold.

    Attributes:
      hf: the safetensors names.
      paths: the effarch parameters' paths under ``params``.
      layout: how the two sides convert.
      shapes: the effarch shapes.
      hf_shapes: the HF shapes.
    """

    hf: tuple[str, ...]
    paths: tuple[tuple[str, ...], ...]
    layout: Layout
    shapes: tuple[tuple[int, ...], ...]
    hf_shapes: tuple[tuple[int, ...], ...]


class Stored(NamedTuple):
    """A tensor in a safetensors file: the file and the shape its header gives."""

    file: pathlib.Path
    shape: tuple[int, ...]


def _shape(shape) -> str:
    return f"[{', '.join(str(s) for s in shape)}]"


def _raise(where: str, problems: list[str]) -> None:
    if problems:
        listed = "; ".join(problems[:MAX_LISTED])
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise ValueError(f"{where}: {listed}{more}.")


def _architecture_of(hf: Mapping[str, Any], where: str) -> Architecture:
    """The layout ``config.json`` names in ``architectures`` (else by ``model_type``)."""
    supported = ", ".join(ARCHITECTURES)
    names = hf.get("architectures") or []
    if not names:
        by_type = [a for a in ARCHITECTURES.values() if a.model_type == hf.get("model_type")]
        if by_type:
            return by_type[0]
        raise ValueError(f"{where}: no 'architectures' and model_type={hf.get('model_type')!r}; "
                         f"supported: {supported}.")
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ValueError(f"{where}: architectures={names}; effarch converts exactly one of: {supported}.")
    return ARCHITECTURES[names[0]]


def _lm_config(arch: Architecture, hf: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> LMConfig:
    """The LMConfig of an HF config (its class defaults filled in) and the runtime overrides."""
    unknown = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if unknown:
        raise ValueError(f"from_hf: overrides {unknown} would change the architecture; only "
                         f"{', '.join(RUNTIME_FIELDS)} may be overridden.")
    hf = {**arch.defaults, **hf}
    try:
        for field, value in arch.fixed.items():
            if hf[field] != value:
                raise ValueError(f"{field}={hf[field]!r}; effarch implements {arch.name} with {field}={value!r} "
                                 "only")
        fields = {**arch.lm_fields(hf), **overrides}
        if arch.padding_idx:
            fields["pad_token_id"] = hf["pad_token_id"]
        return LMConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                        tie_embeddings=bool(hf["tie_word_embeddings"]), **fields)
    except KeyError as err:
        raise ValueError(f"{where} ({arch.name}): no field {err} (and no default for it)") from err
    except ValueError as err:
        raise ValueError(f"{where} ({arch.name}): {err}") from err


def _architecture_for(config: LMConfig) -> Architecture:
    """The layout of an effarch config, or a ValueError saying why there is none."""
    names = mixer_names(config)
    present = set(names)
    candidates = [a for a in ARCHITECTURES.values() if a.mixers[0] in present and present <= set(a.mixers)]
    if not candidates:
        used = sorted({type(spec.mixer).__name__ for spec in config.layer_specs})
        layouts = "; ".join(f"{' and '.join(a.mixers)} ({a.name})" for a in ARCHITECTURES.values())
        raise ValueError(f"to_hf: the layers use {used}; a transformers layout exists for models whose layers "
                         f"are: {layouts}.")
    by_mixer = {name: {spec.mixer for spec, n in zip(config.layer_specs, names) if n == name} for name in present}

    def selected(arch):
        return all(getattr(cfg, option) == value for mixer, options in arch.selects.items()
                   for cfg in by_mixer.get(mixer, ()) for option, value in options.items())

    arch = next((a for a in candidates if selected(a)), None)
    if arch is None:
        arch = candidates[0]
        wanted = ", ".join(f"{mixer} {option}={value!r}" for mixer, options in arch.selects.items()
                           for option, value in options.items())
        have = ", ".join(sorted({f"{mixer} {option}={getattr(cfg, option)!r}" for mixer, options in arch.selects.items()
                                 for cfg in by_mixer.get(mixer, ()) for option in options}))
        raise ValueError(f"to_hf: {arch.name} (the layout of {' and '.join(arch.mixers)} layers) needs {wanted}; "
                         f"the layers have {have}.")
    for name, configs in sorted(by_mixer.items()):
        if len(configs) != 1:
            raise ValueError(f"to_hf: the layers' {name} options differ ({len(configs)} distinct configs); "
                             f"{arch.name} has one set of options for every {name} layer.")
    problems = []
    if config.mod_capacity is not None:
        problems.append(f"mod_capacity={config.mod_capacity}, but {arch.name} has no Mixture-of-Depths routers")
    projections = sorted({spec.mixer.projection for spec in config.layer_specs} | {config.projection})
    if projections != ["dense"]:
        problems.append(f"projection={config.projection!r}; {arch.name} has dense projections")
    _raise("to_hf", problems)
    return arch


def _hf_config(arch: Architecture, config: LMConfig, base: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config.json`` for ``config``: ``base``'s fields, then the architecture's."""
    try:
        fields = arch.hf_fields(config)
    except ValueError as err:
        raise ValueError(f"to_hf ({arch.name}): {err}.") from err
    base = {k: v for k, v in (base or {}).items() if k not in ("dtype", "torch_dtype")}
    return {
        **base,
        **arch.fixed,
        "architectures": [arch.name],
        "model_type": arch.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "tie_word_embeddings": config.tie_embeddings,
        "dtype": jnp.dtype(config.param_dtype).name,
        **({"pad_token_id": config.pad_token_id} if arch.padding_idx else {}),
        **fields,
    }


def _effarch_shapes(config: LMConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter's path and shape in the unscanned layout (no arrays are made)."""
    unscanned = dataclasses.replace(config, scan_layers=False)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = nn.unbox(jax.eval_shape(LM(unscanned).init, jax.random.PRNGKey(0), tokens))
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(variables["params"]).items()}


def _tensor_table(arch: Architecture, config: LMConfig, variant: str) -> list[Entry]:
    """Every tensor group of ``config``'s model in the layout's ``variant`` (no LM head when tied)."""
    shapes = _effarch_shapes(config)
    tensors = arch.tensors(config, variant) + ([] if config.tie_embeddings else [LM_HEAD])
    table = []
    for t in tensors:
        layout = LAYOUTS[t.layout] if isinstance(t.layout, str) else t.layout
        ours = tuple(shapes.pop(p) for p in t.effarch)
        theirs = tuple(tuple(s) for s in layout.hf_shapes(ours))
        table.append(Entry(t.hf, t.effarch, layout, ours, theirs))
    if shapes:
        unmapped = ", ".join("/".join(p) for p in shapes)
        raise NotImplementedError(f"{arch.name}: effarch parameters {unmapped} have no HF tensor in the table "
                                  "(effarch/convert/architectures.py); the model has changed since.")
    return table


def _hf_names(table: list[Entry]) -> dict[str, tuple[int, ...]]:
    """HF name -> expected HF shape, over the whole table."""
    return {name: shape for entry in table for name, shape in zip(entry.hf, entry.hf_shapes)}


def _untag_floats(value: Any) -> Any:
    """``{"__float__": "Infinity"}`` -> ``inf``, recursively (older files write a bare ``Infinity``)."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in TAGGED_FLOATS:
            return TAGGED_FLOATS[value["__float__"]]
        return {k: _untag_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag_floats(v) for v in value]
    return value


def _read_json(path: pathlib.Path, where: str) -> dict[str, Any]:
    try:
        return _untag_floats(json.loads(path.read_text()))
    except FileNotFoundError as err:
        raise ValueError(f"{where}: no {path.name} in {path.parent}; a Hugging Face checkpoint folder "
                         f"holds {CONFIG_FILE} and {WEIGHTS_FILE} (or {INDEX_FILE} and its shards).") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: {path} is not valid JSON: {err}") from err


def _stored_tensors(folder: pathlib.Path) -> dict[str, Stored]:
    """Name -> (file, shape) of every tensor in the folder's safetensors files, from their headers."""
    index_path = folder / INDEX_FILE
    weight_map = None
    if index_path.exists():
        weight_map = _read_json(index_path, "from_hf").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"from_hf: {index_path} has no 'weight_map' of tensor name -> file.")
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS_FILE).exists():
        files = [WEIGHTS_FILE]
    else:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        found = f"; it has {', '.join(pickles)}, which effarch does not read (pickle): save the model with " \
                "safetensors (save_pretrained's default)" if pickles else ""
        raise ValueError(f"from_hf: {folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE}{found}.")
    stored = {}
    for name in files:
        file = folder / name
        if not file.exists():
            raise ValueError(f"from_hf: {index_path} lists the shard {name}, which is not in {folder}.")
        with safe_open(file, framework="np") as f:
            for key in f.keys():
                if key in stored:
                    raise ValueError(f"from_hf: tensor {key} is in both {stored[key].file.name} and {name}.")
                stored[key] = Stored(file, tuple(f.get_slice(key).get_shape()))
    for key, name in (weight_map or {}).items():
        if key not in stored or stored[key].file.name != name:
            raise ValueError(f"from_hf: {index_path} puts tensor {key} in {name}, which does not hold it.")
    return stored


def _check_stored(arch: Architecture, table: list[Entry], stored: Mapping[str, Stored],
                  optional: set[str], where: str) -> None:
    """Every table tensor present with its shape, nothing else (but ``optional``)."""
    problems = []
    expected = _hf_names(table)
    for name, shape in expected.items():
        if name not in stored:
            problems.append(f"missing tensor {name} (expected shape {_shape(shape)})")
        elif stored[name].shape != shape:
            problems.append(f"tensor {name} has shape {_shape(stored[name].shape)}; expected {_shape(shape)}")
    for name in sorted(set(stored) - set(expected) - optional):
        problems.append(f"unexpected tensor {name} {_shape(stored[name].shape)} ({arch.name} has no such tensor)")
    _raise(where, problems)


def _load(stored: Mapping[str, Stored], names) -> dict[str, np.ndarray]:
    """The named tensors, opening each file once."""
    by_file: dict[pathlib.Path, list[str]] = {}
    for name in names:
        by_file.setdefault(stored[name].file, []).append(name)
    arrays = {}
    for file, keys in by_file.items():
        with safe_open(file, framework="np") as f:
            arrays.update({key: f.get_tensor(key) for key in keys})
    return arrays


def from_hf(path: PathLike, **overrides) -> tuple[LMConfig, dict[str, Any]]:
    """Reads a Hugging Face checkpoint folder as an effarch model.

    Args:
      path: a folder with ``config.json`` and ``model.safetensors`` (or
        ``model.safetensors.index.json`` and its shards), as written by
        ``save_pretrained`` or ``huggingface-cli download``.
      **overrides: LMConfig fields that say how the model runs, not what it
        is: ``dtype``, ``param_dtype`` (the tensors are cast to it; default
        float32), ``implementation``, ``max_len``, ``remat``, ``scan_layers``
        (the parameters are then stacked for it), ``residual_in_fp32``.

    Returns:
      ``(config, variables)``: an LMConfig and ``{"params": ...}`` for
      ``LM(config).apply(variables, tokens)``.

    Raises:
      ValueError: an architecture effarch has no layout for, an option of the
        config it does not implement, or a missing, unexpected or wrongly
        shaped tensor (each named with the expected shape).
    """
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"from_hf: {folder} is not a folder.")
    where = f"from_hf: {folder / CONFIG_FILE}"
    hf = _read_json(folder / CONFIG_FILE, "from_hf")
    arch = _architecture_of(hf, where)
    config = _lm_config(arch, hf, overrides, where)
    stored = {name: t for name, t in _stored_tensors(folder).items() if not name.startswith(arch.ignored)}
    # The first spelling of the table whose names are all stored; the first one names what is missing.
    tables = [_tensor_table(arch, config, variant) for variant in arch.variants]
    table = next((t for t in tables if set(_hf_names(t)) <= set(stored)), tables[0])
    # A tied checkpoint may still carry the head; it must then be the embedding.
    head = LM_HEAD.hf[0]
    optional = {head} if config.tie_embeddings else set()
    _check_stored(arch, table, stored, optional, f"from_hf: {folder}")
    arrays = _load(stored, [*_hf_names(table), *(optional & set(stored))])
    if head in optional and head in arrays:
        if not np.array_equal(arrays.pop(head), arrays[arch.embedding]):
            raise ValueError(f"from_hf: {folder}: tie_word_embeddings is true but {head} differs from "
                             f"{arch.embedding}; set tie_word_embeddings=false in {CONFIG_FILE} to keep both.")
    flat = {}
    for entry in table:
        values = entry.layout.from_hf([arrays.pop(name) for name in entry.hf])
        flat.update({p: jnp.asarray(v, config.param_dtype) for p, v in zip(entry.paths, values)})
    variables = {"params": traverse_util.unflatten_dict(flat)}
    if config.scan_layers:
        variables = stack_layer_params(variables, config)
    return config, variables


def _check_params(table: list[Entry], flat: Mapping[tuple[str, ...], Any]) -> None:
    """The effarch parameters are exactly the table's, with its shapes."""
    problems = []
    expected = {p: shape for entry in table for p, shape in zip(entry.paths, entry.shapes)}
    for path, shape in expected.items():
        name = "/".join(path)
        if path not in flat:
            problems.append(f"params has no {name} (expected shape {_shape(shape)})")
        elif tuple(np.shape(flat[path])) != shape:
            problems.append(f"params {name} has shape {_shape(np.shape(flat[path]))}; expected {_shape(shape)}")
    for path in sorted(set(flat) - set(expected)):
        problems.append(f"unexpected params entry {'/'.join(path)} {_shape(np.shape(flat[path]))} "
                        "(no tensor of the layout holds it)")
    _raise("to_hf", problems)


def _write_folder(path: pathlib.Path, config_json: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """Writes ``config.json`` and ``model.safetensors`` into a temporary folder, then renames it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        # A bare Infinity (Python's json) reads in every transformers version.
        (tmp / CONFIG_FILE).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        save_file(dict(tensors), tmp / WEIGHTS_FILE, metadata=SAFETENSORS_METADATA)
        if path.exists():
            path.rmdir()  # empty, checked by to_hf
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def to_hf(config: LMConfig, params: Mapping[str, Any], path: PathLike, *,
          base_config: Mapping[str, Any] | None = None) -> None:
    """Writes an effarch model as a Hugging Face checkpoint folder.

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` reads it back.
    The tensors keep the parameters' dtype; with ``tie_embeddings`` there is
    no ``lm_head.weight`` (transformers ties it to the embedding).

    Args:
      config: the model's LMConfig, of mixers and options a layout in
        ``ARCHITECTURES`` holds (each mixer with one set of options for all
        its layers; docs/interop.md lists what each layout refuses).
      params: ``{"params": ...}`` as from ``LM.init`` or :func:`from_hf`
        (boxed or not; scanned when ``config.scan_layers``).
      path: a new folder, or an empty one; written only once complete.
      base_config: HF config fields to keep (e.g. the source checkpoint's
        ``config.json``, for its token ids); the architecture's fields are
        written over them.

    Raises:
      ValueError: no layout for ``config``, parameters missing, unexpected or
        of the wrong shape (each named with the expected shape), or ``path``
        holds files.
    """
    path = pathlib.Path(path)
    arch = _architecture_for(config)
    config_json = _hf_config(arch, config, base_config)
    table = _tensor_table(arch, config, arch.variants[0])
    if not isinstance(params, Mapping) or "params" not in params:
        raise ValueError("to_hf: params must be the variables {'params': ...} (as LM.init returns); got "
                         f"{type(params).__name__} with keys {sorted(params) if isinstance(params, Mapping) else []}.")
    variables = nn.unbox(dict(params))
    if config.scan_layers:
        variables = unstack_layer_params(variables, config)
    flat = traverse_util.flatten_dict(variables["params"])
    _check_params(table, flat)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"to_hf: {path} exists and is not an empty folder; choose a new path.")
    tensors = {}
    for entry in table:
        values = entry.layout.to_hf([np.asarray(flat[p]) for p in entry.paths])
        tensors.update({name: np.ascontiguousarray(v) for name, v in zip(entry.hf, values)})
    _write_folder(path, config_json, tensors)
