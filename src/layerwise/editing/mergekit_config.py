"""mergekit YAML configs, read unchanged and translated into ``layerwise merge``'s config.

A file with ``merge_method`` is a mergekit config (https://github.com/arcee-ai/mergekit, 0.1.5). Supported
keys: ``merge_method``, ``base_model``, ``models`` (``model`` and ``parameters`` per entry), ``slices``
(``sources`` with ``model``, ``layer_range`` and ``parameters``; slice ``parameters`` and ``base_model``:
layer stacking and per-slice merges, :mod:`.merge.slices`), top-level ``parameters``, ``dtype`` /
``out_dtype`` (the output dtype; layerwise always computes in float32, float64 for float64 models),
``tokenizer_source`` (``base``, ``union`` or omitted) and ``name``; layerwise keys may be added:
``lines``, ``seed``, ``shard_size``, ``chunk_elements``. Anything else raises
:class:`~layerwise.errors.ConfigError` naming the key.

Methods and parameters:

==================  ===========================================  =========================================
mergekit            layerwise                                    parameters
==================  ===========================================  =========================================
linear              average (all listed models, base included)   weight; normalize must stay true
task_arithmetic     task_arithmetic                              weight, lambda
ties                ties                                         weight, density (default 1), normalize,
                                                                 lambda
dare_ties           dare, combine: ties, normalize: false        weight, density -> drop_rate = 1 - density,
                                                                 rescale, lambda
dare_linear         dare, combine: sum                           as dare_ties
breadcrumbs(_ties)  breadcrumbs, combine: sum (ties)             weight, density (default 1), gamma, lambda
della(_linear)      della, combine: ties (sum)                   weight, density, epsilon, rescale, lambda
slerp               slerp                                        t
model_stock         model_stock                                  filter_wise: false only
sce                 sce                                          select_topk
multislerp          multislerp                                   weight, normalize_weights, eps
karcher             karcher                                      max_iter, tol
nearswap            nearswap                                     t
passthrough         passthrough                                  scale (per model)
==================  ===========================================  =========================================

For every method but ``linear``, an entry of ``models`` (or a slice source) naming the base model is the
base (mergekit lists it with no parameters); mergekit's ``BASE+ADAPTER`` model syntax is accepted in
``models`` when ``BASE`` is the base model (the adapter folder is read as a LoRA task vector,
:mod:`..lora`). List values (gradients) and ``{filter, value}`` lists stay as they are
(:mod:`.merge.gradients`); an entry keyed ``pattern`` instead of ``filter`` (as in mergekit's
``gradient-slerp.yml`` example) has no filter in mergekit, which ignores the unknown key, so it applies to
every tensor here too, with a warning. ``int8_mask`` only saves memory in mergekit and is accepted and
ignored. ``lambda`` is a global parameter in mergekit 0.1.5; a ``lambda`` given with the same value for
every model (as older DELLA configs do) becomes the global one (mergekit 0.1.5 ignores it there).

Example
-------
>>> cfg = translate_mergekit({"merge_method": "ties", "base_model": "base",
...     "models": [{"model": "base"}, {"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}],
...     "parameters": {"normalize": True}, "dtype": "bfloat16"})
>>> cfg["method"], cfg["models"], cfg["parameters"]
('ties', [{'model': 'a', 'parameters': {'weight': 1.0, 'density': 0.5}}], {'density': 1.0, 'normalize': True})
"""

from __future__ import annotations

import re
import warnings
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
    "sce": ("sce", {}, {}),
    "multislerp": ("multislerp", {}, {}),
    "karcher": ("karcher", {}, {}),
    "nearswap": ("nearswap", {}, {}),
    "passthrough": ("passthrough", {}, {}),
}
# mergekit's generalized task arithmetic: these take lambda (a global parameter in mergekit 0.1.5)
_LAMBDA_METHODS = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)
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
_GLOBAL_ONLY = {
    "normalize",
    "rescale",
    "int8_mask",
    "t",
    "filter_wise",
    "select_topk",
    "normalize_weights",
    "eps",
    "max_iter",
    "tol",
}
_RESCALING = ("dare_ties", "dare_linear", "della", "della_linear")


def is_mergekit_config(data: Any) -> bool:
    """True for a mapping with ``merge_method`` and no ``method`` (layerwise's own configs use ``method``)."""
    return isinstance(data, Mapping) and "merge_method" in data and "method" not in data


def _translate_slices(slices: Any, mk_method: str, base: str | None, keep_base: bool) -> list[dict[str, Any]]:
    """mergekit ``slices`` -> layerwise ``slices`` (same structure, parameters translated)."""
    if not isinstance(slices, list) or not slices:
        raise ConfigError(f"slices must be a non-empty list of {{sources: [...]}}, got {slices!r}")
    out = []
    for s, sl in enumerate(slices):
        where = f"slices[{s}]"
        if not isinstance(sl, Mapping) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise ConfigError(f"{where} must be a mapping with a non-empty 'sources' list, got {sl!r}")
        extra = sorted(str(k) for k in sl if k not in ("sources", "parameters", "base_model"))
        if extra:
            raise ConfigError(
                f"{where}: unsupported key(s) {extra}; supported: sources, parameters, base_model"
            )
        slice_base = sl.get("base_model")
        slice_base = base if slice_base is None else _ref(f"{where}.base_model", slice_base)
        sources = []
        for k, src in enumerate(sl["sources"]):
            w = f"{where}.sources[{k}]"
            if not isinstance(src, Mapping) or "model" not in src:
                raise ConfigError(f"{w} must be a mapping with 'model' and 'layer_range', got {src!r}")
            bad = sorted(str(x) for x in src if x not in ("model", "layer_range", "parameters"))
            if bad:
                raise ConfigError(f"{w}: unsupported key(s) {bad}; supported: model, layer_range, parameters")
            ref = _ref(f"{w}.model", src["model"])
            if "+" in ref:
                raise ConfigError(
                    f"{w}.model {ref!r}: LoRA adapters (MODEL+ADAPTER) are not supported in slices"
                )
            if "layer_range" not in src:
                raise ConfigError(f"{w}: layer_range is required in a slice source")
            is_base = ref == slice_base and keep_base
            params = {} if is_base else _map_params(f"{w}.parameters", mk_method, src.get("parameters"), True)
            sources.append({"model": ref, "layer_range": src["layer_range"], "parameters": params})
        params = _map_params(f"{where}.parameters", mk_method, sl.get("parameters"), False)
        raw = [{"model": x["model"], "parameters": x.get("parameters")} for x in sl["sources"]]
        _hoist_lambda(raw, slice_base, mk_method, params, where)
        entry: dict[str, Any] = {"sources": sources, "parameters": params}
        if sl.get("base_model") is not None and keep_base:
            entry["base_model"] = slice_base
        out.append(entry)
    return out


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
        if name == "lambda" and method not in _LAMBDA_METHODS:
            raise ConfigError(f"{where}.lambda: only {list(_LAMBDA_METHODS)} take lambda, not {method}")
        if name == "density" and method in ("dare_ties", "dare_linear"):
            out["drop_rate"] = _one_minus(f"{where}.density", _numbers(value))
            continue
        out[name] = _numbers(_drop_pattern(f"{where}.{name}", value))
    return out


_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _numbers(value: Any) -> Any:
    """Numeric strings -> floats, inside gradients and filter lists too: YAML 1.1 (PyYAML) reads ``1e-5``
    as a string, and mergekit converts such strings for its numeric parameters."""
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, Mapping) and "value" in value:
        return {**value, "value": _numbers(value["value"])}
    return value


def _drop_pattern(where: str, value: Any) -> Any:
    """``{pattern: X, value: V}`` entries -> ``{value: V}`` with a warning: mergekit's conditional parameters
    know only ``filter``; it ignores ``pattern``, so such an entry matches every tensor."""
    if not isinstance(value, list) or not any(isinstance(e, Mapping) and "pattern" in e for e in value):
        return value
    out = []
    for i, e in enumerate(value):
        if isinstance(e, Mapping) and "pattern" in e:
            if "filter" not in e:
                warnings.warn(
                    f"{where}[{i}]: 'pattern: {e['pattern']}' is not a mergekit key (mergekit ignores it, so "
                    "this entry applies to every tensor; layerwise does the same); write 'filter' to select "
                    "tensors by name",
                    stacklevel=3,
                )
            e = {k: v for k, v in e.items() if k != "pattern"}
        out.append(e)
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


def _hoist_lambda(
    raw_models: list, base: str | None, method: str, params: dict[str, Any], where: str = "models"
) -> None:
    """A ``lambda`` in the models' parameters (older mergekit read DELLA's from there) becomes the global
    ``lambda`` when every model gives the same value; mergekit 0.1.5 reads only the global one."""
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
    if method not in _LAMBDA_METHODS:
        raise ConfigError(
            f"{where}[{min(given)}].parameters.lambda: only {list(_LAMBDA_METHODS)} take lambda"
        )
    values = set(map(repr, given.values()))
    if len(values) > 1 or len(given) < sum(1 for e in raw_models if not _is_base(e, base)):
        raise ConfigError(
            f"{where}[*].parameters.lambda: lambda scales the merged vector once; give the same value for "
            f"every model (or once under parameters), got {dict(given)}"
        )
    if "lambda" in params and repr(params["lambda"]) not in values:
        raise ConfigError(f"{where}[*].parameters.lambda {dict(given)} contradicts parameters.lambda")
    params["lambda"] = next(iter(given.values()))
    warnings.warn(
        f"{where}[*].parameters.lambda = {params['lambda']!r}: applied as the global lambda (as mergekit "
        "releases before 0.1.5 did); mergekit 0.1.5 reads lambda only from the global or slice parameters "
        "and ignores it here",
        stacklevel=3,
    )


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
    base = data.get("base_model")
    base = None if base is None else _ref("base_model", base)
    if "slices" in data:
        keep_base = mk_method != "linear"  # linear averages every source, the base included
        out: dict[str, Any] = {
            "method": method,
            "slices": _translate_slices(data["slices"], mk_method, base, keep_base),
            "parameters": {**defaults, **_map_params("parameters", mk_method, data.get("parameters"), False)},
        }
        out["parameters"].update(fixed)
        _density_to_drop_rate(mk_method, defaults, out["parameters"])
        if base is not None and keep_base:
            out["base_model"] = base
        return _finish(data, out)
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(
            f"models must be a non-empty list of {{model: PATH, parameters: {{...}}}}, got {raw_models!r}"
        )
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
    _density_to_drop_rate(mk_method, defaults, params)
    out = {"method": method, "models": models, "parameters": params}
    if base is not None:
        out["base_model"] = base
    return _finish(data, out)


def _density_to_drop_rate(mk_method: str, defaults: Mapping[str, Any], params: dict[str, Any]) -> None:
    if "density" in defaults and mk_method in ("dare_ties", "dare_linear"):
        params.setdefault("drop_rate", 1.0 - params.pop("density"))
        params.pop("density", None)


def _finish(data: Mapping[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """The keys every translated config shares: dtype, tokenizer_source, layerwise's own keys."""
    dtype = data.get("out_dtype", data.get("dtype"))
    if dtype is not None:
        key = "out_dtype" if "out_dtype" in data else "dtype"
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ConfigError(f"{key} must be one of {sorted(_DTYPES)}, got {dtype!r}")
        out["dtype"] = _DTYPES[dtype]
    tok = data.get("tokenizer_source")
    if tok is not None:
        if tok not in ("base", "union"):
            raise ConfigError(
                f"tokenizer_source {tok!r} is not supported; use 'base' (the merged model keeps the base's "
                "tokenizer and vocabulary), 'union' (the union of the models' tokenizers) or omit it"
            )
        out["tokenizer_source"] = tok
    for k in _LAYERWISE_KEYS:
        if k in data:
            out[k] = data[k]
    return out
