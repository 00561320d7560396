"""mergekit YAML configs, read unchanged and translated into ``layerwise merge``'s config.

A file with ``merge_method`` is a mergekit config (https://github.com/arcee-ai/mergekit, 0.1.5). Supported
keys: ``merge_method``, ``base_model``, ``models`` (``model`` and ``parameters`` per entry), ``slices`` (one
slice whose sources each cover every layer, as in mergekit's SLERP example), top-level ``parameters``,
``dtype`` / ``out_dtype`` (the output dtype; layerwise always computes in float32, float64 for float64
models), ``tokenizer_source`` (``base`` or omitted) and ``name``; layerwise keys may be added: ``lines``,
``seed``, ``shard_size``, ``chunk_elements``. Anything else raises
:class:`~layerwise.errors.ConfigError` naming the key.

Methods and parameters:

==================  ===========================================  =========================================
mergekit            layerwise                                    parameters
==================  ===========================================  =========================================
linear              average (all listed models, base included)   weight; normalize must stay true
task_arithmetic     task_arithmetic                              weight
ties                ties                                         weight, density (default 1), normalize
dare_ties           dare, combine: ties, normalize: false        weight, density -> drop_rate = 1 - density
dare_linear         dare, combine: sum                           as dare_ties; rescale
breadcrumbs(_ties)  breadcrumbs, combine: sum (ties)             weight, density (default 1), gamma
della(_linear)      della, combine: ties (sum)                   weight, density, epsilon, lambda
slerp               slerp                                        t
model_stock         model_stock                                  filter_wise: false only
==================  ===========================================  =========================================

For every method but ``linear``, an entry of ``models`` naming the base model is the base (mergekit lists it
with no parameters); mergekit's ``BASE+ADAPTER`` model syntax is accepted when ``BASE`` is the base model
(the adapter folder is read as a LoRA task vector, :mod:`..lora`). List values (gradients) and
``{filter, value}`` lists stay as they are (:mod:`.merge.gradients`). ``int8_mask`` only saves memory in
mergekit and is accepted and ignored.

Example
-------
>>> cfg = translate_mergekit({"merge_method": "ties", "base_model": "base",
...     "models": [{"model": "base"}, {"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}],
...     "parameters": {"normalize": True}, "dtype": "bfloat16"})
>>> cfg["method"], cfg["models"], cfg["parameters"]
('ties', [{'model': 'a', 'parameters': {'weight': 1.0, 'density': 0.5}}], {'density': 1.0, 'normalize': True})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

__all__ = ["MERGEKIT_METHODS", "is_mergekit_config", "translate_mergekit"]

# mergekit method -> (layerwise method, fixed layerwise parameters, mergekit defaults filled in)
MERGEKIT_METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "linear": ("average", {}, {}),
    "task_arithmetic": ("task_arithmetic", {}, {}),
    "ties": ("ties", {}, {"density": 1.0}),
    "dare_ties": ("dare", {"combine": "ties"}, {"density": 1.0, "normalize": False}),
    "dare_linear": ("dare", {"combine": "sum"}, {"density": 1.0, "normalize": False}),
    "breadcrumbs": ("breadcrumbs", {"combine": "sum"}, {"density": 1.0}),
    "breadcrumbs_ties": ("breadcrumbs", {"combine": "ties"}, {"density": 1.0}),
    "della": ("della", {"combine": "ties"}, {"density": 1.0, "normalize": True}),
    "della_linear": ("della", {"combine": "sum"}, {"density": 1.0, "normalize": False}),
    "slerp": ("slerp", {}, {}),
    "model_stock": ("model_stock", {}, {}),
}
_TOP_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "name",
)
_LAYERWISE_KEYS = ("lines", "seed", "shard_size", "chunk_elements")
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
}
_GLOBAL_ONLY = {"normalize", "rescale", "int8_mask", "t", "filter_wise"}
_RESCALING = ("dare_ties", "dare_linear", "della", "della_linear")


def is_mergekit_config(data: Any) -> bool:
    """True for a mapping with ``merge_method`` and no ``method`` (layerwise's own configs use ``method``)."""
    return isinstance(data, Mapping) and "merge_method" in data and "method" not in data


def _models_from_slices(slices: Any) -> list[Any]:
    """One slice whose sources each cover the same full layer range -> its sources as a models list."""
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], Mapping):
        raise ConfigError(
            "slices: only one slice is supported (layer stacking/frankenmerges are not); list the models "
            "under 'models' instead"
        )
    sl = slices[0]
    extra = sorted(str(k) for k in sl if k != "sources")
    if extra or not isinstance(sl.get("sources"), list) or not sl["sources"]:
        raise ConfigError(
            f"slices[0]: expected only 'sources' (a non-empty list), got keys {sorted(map(str, sl))}"
        )
    ranges = set()
    models = []
    for i, src in enumerate(sl["sources"]):
        if not isinstance(src, Mapping) or "model" not in src:
            raise ConfigError(f"slices[0].sources[{i}] must be a mapping with 'model', got {src!r}")
        bad = sorted(str(k) for k in src if k not in ("model", "layer_range", "parameters"))
        if bad:
            raise ConfigError(f"slices[0].sources[{i}]: unsupported key(s) {bad}")
        lr = src.get("layer_range")
        if lr is not None:
            if not isinstance(lr, list) or len(lr) != 2 or not all(type(x) is int for x in lr) or lr[0] != 0:
                raise ConfigError(
                    f"slices[0].sources[{i}].layer_range must be [0, NUM_LAYERS] (whole model), got {lr!r}"
                )
            ranges.add(tuple(lr))
        models.append({k: v for k, v in src.items() if k != "layer_range"})
    if len(ranges) > 1:
        raise ConfigError(f"slices[0]: the sources' layer_range values differ ({sorted(ranges)})")
    return models


def _ref(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a model path, got {value!r}")
    return value


def _map_params(where: str, method: str, params: Any, per_model: bool) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {params!r}")
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name == "int8_mask":
            continue
        if per_model and name in _GLOBAL_ONLY:
            raise ConfigError(f"{where}.{name}: only supported in the top-level parameters")
        if name == "filter_wise":
            if value is not False:
                raise ConfigError(f"{where}.filter_wise: only false (per-tensor Model Stock) is supported")
            continue
        if name == "normalize" and method == "linear":
            if value is not True:
                raise ConfigError(
                    f"{where}.normalize: linear with normalize: false (an unnormalised weighted sum of "
                    "models) is not supported"
                )
            continue
        if name == "normalize" and method == "task_arithmetic":
            if value is not False:
                raise ConfigError(f"{where}.normalize: task_arithmetic with normalize: true is not supported")
            continue
        if name == "rescale" and method not in _RESCALING:
            if value is not False:
                raise ConfigError(f"{where}.rescale: only false is supported for {method}")
            continue
        if name == "lambda" and per_model:
            continue  # hoisted into the global parameters by translate_mergekit
        if name == "density" and method in ("dare_ties", "dare_linear"):
            out["drop_rate"] = _one_minus(f"{where}.density", value)
            continue
        out[name] = value
    return out


def _one_minus(where: str, value: Any) -> Any:
    """``1 - density`` for DARE's drop rate, through gradients and filter lists."""

    def flip(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where} must be a number or a list of numbers, got {v!r}")
        return 1.0 - v

    if isinstance(value, list):
        out = []
        for e in value:
            if isinstance(e, Mapping):
                v = e.get("value")
                out.append({**e, "value": [flip(x) for x in v] if isinstance(v, list) else flip(v)})
            else:
                out.append(flip(e))
        return out
    return flip(value)


def _hoist_lambda(raw_models: list, base: str | None, method: str, params: dict[str, Any]) -> None:
    """mergekit's DELLA reads ``lambda`` from the models' parameters but uses one value for the merge: it
    becomes the global ``lambda`` (all models must agree)."""
    given = {}
    for i, e in enumerate(raw_models):
        if (
            isinstance(e, Mapping)
            and isinstance(e.get("parameters"), Mapping)
            and "lambda" in e["parameters"]
        ):
            if e.get("model") != base or method == "linear":
                given[i] = e["parameters"]["lambda"]
    if not given:
        return
    if not method.startswith("della"):
        raise ConfigError(f"models[{min(given)}].parameters.lambda: only della/della_linear take lambda")
    values = set(map(repr, given.values()))
    if len(values) > 1 or len(given) < sum(1 for e in raw_models if not _is_base(e, base)):
        raise ConfigError(
            f"models[*].parameters.lambda: DELLA scales the merged vector by one lambda; give the same value "
            f"for every model (or once under parameters), got {dict(given)}"
        )
    params["lambda"] = next(iter(given.values()))


def _is_base(entry: Any, base: str | None) -> bool:
    ref = entry if isinstance(entry, str) else entry.get("model") if isinstance(entry, Mapping) else None
    return ref is not None and ref == base


def translate_mergekit(data: Mapping[str, Any]) -> dict[str, Any]:
    """A layerwise config mapping (the format of :mod:`.config`) from a mergekit config mapping.

    Paths are left as written (resolved later relative to the config file). Raises
    :class:`~layerwise.errors.ConfigError` naming the first unsupported key or value.
    """
    if not is_mergekit_config(data):
        raise ConfigError("not a mergekit config: 'merge_method' is missing")
    unknown = sorted(str(k) for k in data if k not in _TOP_KEYS and k not in _LAYERWISE_KEYS)
    if unknown:
        raise ConfigError(
            f"unsupported mergekit key(s) {unknown}; supported: {list(_TOP_KEYS)} (+ layerwise's "
            f"{list(_LAYERWISE_KEYS)})"
        )
    mk_method = data["merge_method"]
    if not isinstance(mk_method, str) or mk_method not in MERGEKIT_METHODS:
        raise ConfigError(
            f"merge_method {mk_method!r} is not supported; supported: {sorted(MERGEKIT_METHODS)}"
        )
    method, fixed, defaults = MERGEKIT_METHODS[mk_method]
    if "models" in data and "slices" in data:
        raise ConfigError("give either 'models' or 'slices', not both")
    raw_models = _models_from_slices(data["slices"]) if "slices" in data else data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(
            f"models must be a non-empty list of {{model: PATH, parameters: {{...}}}}, got {raw_models!r}"
        )
    base = data.get("base_model")
    base = None if base is None else _ref("base_model", base)
    models = []
    for i, entry in enumerate(raw_models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise ConfigError(f"models[{i}] must be a mapping with 'model', got {entry!r}")
        bad = sorted(str(k) for k in entry if k not in ("model", "parameters"))
        if bad:
            raise ConfigError(f"models[{i}]: unsupported key(s) {bad}; supported: ['model', 'parameters']")
        ref = _ref(f"models[{i}].model", entry["model"])
        if "+" in ref:
            model_part, adapter = ref.rsplit("+", 1)
            if model_part != base:
                raise ConfigError(
                    f"models[{i}].model {ref!r}: a LoRA adapter (MODEL+ADAPTER) is supported only on the "
                    f"base model ({base!r})"
                )
            ref = adapter
        if ref == base and mk_method != "linear":
            continue  # mergekit lists the base among the models
        params = _map_params(f"models[{i}].parameters", mk_method, entry.get("parameters"), True)
        models.append({"model": ref, "parameters": params})
    if not models:
        raise ConfigError("models lists only the base model; nothing to merge")
    params = {**defaults, **_map_params("parameters", mk_method, data.get("parameters"), False), **fixed}
    _hoist_lambda(raw_models, base, mk_method, params)
    if "density" in defaults and mk_method in ("dare_ties", "dare_linear"):
        params.setdefault("drop_rate", 1.0 - params.pop("density"))
        params.pop("density", None)
    out: dict[str, Any] = {"method": method, "models": models, "parameters": params}
    if base is not None:
        out["base_model"] = base
    dtype = data.get("out_dtype", data.get("dtype"))
    if dtype is not None:
        key = "out_dtype" if "out_dtype" in data else "dtype"
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ConfigError(f"{key} must be one of {sorted(_DTYPES)}, got {dtype!r}")
        out["dtype"] = _DTYPES[dtype]
    tok = data.get("tokenizer_source")
    if tok is not None:
        if tok != "base":
            raise ConfigError(
                f"tokenizer_source {tok!r} is not supported; use 'base' (the merged model keeps the base's "
                "tokenizer and vocabulary) or omit it"
            )
        out["tokenizer_source"] = "base"
    for k in _LAYERWISE_KEYS:
        if k in data:
            out[k] = data[k]
    return out
