"""Fuzz ``layerwise merge`` (issue 9): generated configs either merge into finite tensors or raise a
``LayerwiseError`` — never another exception, never a successful run that wrote inf/NaN.

The configs are drawn from the real keys and parameter names mixed with junk values (inf, NaN, 1e39,
huge ints, booleans where numbers belong, lists, mappings, unknown keys, missing files) and point at tiny
checkpoints built here, some of them broken (overlapping offsets, truncated data, a truncated torch file,
an index without ``weight_map``, a mismatched shape). ``--out`` is a new folder, or (with and without
``--overwrite``) an existing file, a folder holding a user's file, the base model's folder or an earlier
layerwise output: whatever is there must be unchanged unless the merge was allowed to replace it. Each
config goes through the ``merge`` command's handler in-process, without the CLI's error mapping, so any
stray exception type fails the test.
"""

from __future__ import annotations

import itertools
import json
import math
import struct

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from layerwise.cli import build_parser
from layerwise.editing.checkpoints import load_state_dict, save_checkpoint
from layerwise.editing.merge import MERGE_METHODS
from layerwise.errors import LayerwiseError

GOOD = ("base", "m0", "m1", "m2")
BROKEN = ("overlap", "truncated", "torch_truncated", "no_weight_map", "other_shape", "missing")
PARAM_NAMES = sorted({p.name for m in MERGE_METHODS.names() for p in MERGE_METHODS.get(m).params})


def _tensors(seed: int, head_shape=(2,)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.w": torch.randn(3, 4, generator=g),
        "blocks.1.w": torch.randn(4, generator=g),
        "blocks.2.w": torch.randn(2, 2, generator=g),
        "head.b": torch.randn(*head_shape, generator=g),
        "blocks.2.f8": (4 * torch.randn(3, generator=g)).to(torch.float8_e4m3fn),
        "step": torch.tensor([7, 8], dtype=torch.int64),
    }


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Checkpoint folders/files by name (good ones and broken ones)."""
    root = tmp_path_factory.mktemp("fuzz_ckpts")
    paths = {}
    for i, name in enumerate(GOOD):
        paths[name] = save_checkpoint(_tensors(i), root / name)
    paths["other_shape"] = save_checkpoint(_tensors(9, head_shape=(3,)), root / "other_shape")
    data = (paths["m0"] / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["head.b"]["data_offsets"] = header["blocks.1.w"]["data_offsets"][:1] + [
        header["blocks.1.w"]["data_offsets"][0] + 8
    ]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (root / "overlap.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    paths["overlap"] = root / "overlap.safetensors"
    (root / "truncated.safetensors").write_bytes(data[:-5])
    paths["truncated"] = root / "truncated.safetensors"
    torch.save(_tensors(1), root / "full.pt")
    raw = (root / "full.pt").read_bytes()
    (root / "torch_truncated.pt").write_bytes(raw[: len(raw) // 2])
    paths["torch_truncated"] = root / "torch_truncated.pt"
    (root / "no_weight_map").mkdir()
    (root / "no_weight_map" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    paths["no_weight_map"] = root / "no_weight_map"
    paths["missing"] = root / "does_not_exist"
    return root, {k: str(v) for k, v in paths.items()}


EXTREME = [1e39, -1e39, 1e308, 1e30, 7e4, 1e-46, math.inf, -math.inf, math.nan, 10**400, -(10**400)]
numbers = st.one_of(st.floats(-3, 3), st.integers(-3, 3), st.sampled_from(EXTREME))
junk = st.one_of(
    numbers,
    st.booleans(),
    st.none(),
    st.sampled_from(["tensor", "global", "sum", "ties", "auto", "", "x", "1.0"]),
    st.lists(st.integers(0, 2), max_size=2),
    st.dictionaries(st.sampled_from(["a", "weight"]), st.integers(0, 1), max_size=1),
)


def _valid_value(draw, p, n_models):
    if p.choices is not None:
        return draw(st.sampled_from(p.choices))
    if p.name == "target":
        return draw(st.integers(0, n_models - 1))
    lo = -2.0 if p.low is None else p.low
    hi = 2.0 if p.high is None else min(p.high, lo + 4.0)
    return draw(st.one_of(st.floats(lo, hi), st.integers(math.ceil(lo), math.floor(hi))))


@st.composite
def configs(draw):
    """A valid config of a random method, then 0-3 random mutations (junk, extremes, broken inputs)."""
    method = draw(st.sampled_from(sorted(MERGE_METHODS.names())))
    spec = MERGE_METHODS.get(method)
    n = draw(st.integers(1, 3))
    models: list = [f"m{i}" for i in range(n)]
    glob: dict = {}
    for p in spec.params:
        if p.per_model:
            for i in range(n):
                if draw(st.booleans()):
                    if isinstance(models[i], str):
                        models[i] = {"model": models[i], "parameters": {}}
                    models[i]["parameters"][p.name] = _valid_value(draw, p, n)
        elif draw(st.booleans()) or p.name == "target":
            glob[p.name] = _valid_value(draw, p, n)
    if method == "average":  # the weights must not sum to 0 for a valid config
        for m in models:
            if isinstance(m, dict) and "weight" in m["parameters"]:
                m["parameters"]["weight"] = abs(m["parameters"]["weight"]) + 0.5
    cfg: dict = {"method": method, "base_model": "base", "models": models, "parameters": glob}
    if draw(st.booleans()):
        cfg["lines"] = draw(
            st.one_of(
                st.fixed_dictionaries({"alpha": st.floats(0, 1), "beta": st.floats(0, 1)}),
                st.fixed_dictionaries({"alpha": st.just("auto"), "beta": st.floats(0.1, 1)}),
            )
        )
    if draw(st.booleans()):
        cfg["dtype"] = draw(st.sampled_from(["float32", "float16", "bfloat16", "float64"]))
    if draw(st.booleans()):
        cfg["chunk_elements"] = draw(st.sampled_from([1, 3, 5, 1 << 20]))
    if draw(st.booleans()):
        cfg["shard_size"] = draw(st.sampled_from([64, "100B", "2KB"]))
    for _ in range(draw(st.integers(0, 3))):
        _mutate(draw, cfg, spec)
    return cfg


def _mutate(draw, cfg, spec):
    kind = draw(
        st.sampled_from(
            [
                "param",
                "param",
                "overflow",
                "scale",
                "lines",
                "dtype",
                "ckpt",
                "ckpt",
                "top",
                "numbers",
                "method",
            ]
        )
    )
    models = cfg.get("models")
    if kind == "param":  # a declared (or misspelled) parameter gets an extreme or junk value
        declared = [p.name for p in spec.params] or PARAM_NAMES  # (model_stock declares none)
        name = draw(st.one_of(st.sampled_from(declared), st.sampled_from(PARAM_NAMES)))
        value = draw(st.one_of(st.sampled_from(EXTREME), junk))
        if isinstance(models, list) and models and draw(st.booleans()):
            i = draw(st.integers(0, len(models) - 1))
            if isinstance(models[i], str):
                models[i] = {"model": models[i], "parameters": {}}
            if isinstance(models[i], dict) and isinstance(models[i].get("parameters"), dict):
                models[i]["parameters"][name] = value
        elif isinstance(cfg.get("parameters"), dict):
            cfg["parameters"][name] = value
    elif kind == "overflow":  # finite parameters whose product overflows the compute or output dtype
        cfg["dtype"] = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
        big = draw(st.sampled_from([7e4, 1e30, 3e38, -3e38]))
        if draw(st.booleans()) or not isinstance(models, list):  # an earlier step may have broken `models`
            cfg["scale"] = big
        else:
            cfg["models"] = [
                {"model": m, "parameters": {"weight": big}} if isinstance(m, str) else m for m in models
            ]

        cfg["scale"] = draw(st.one_of(st.sampled_from(EXTREME), junk))
    elif kind == "lines":
        cfg["lines"] = draw(
            st.one_of(
                junk,
                st.fixed_dictionaries(
                    {},
                    optional={
                        "alpha": st.one_of(st.sampled_from(EXTREME), st.just("auto"), junk),
                        "beta": st.one_of(st.sampled_from(EXTREME), junk),
                        "pattern": st.sampled_from([r"blocks\.(\d+)\.", "(", "nogroup", r"zzz\.(\d+)"]),
                        "extra": junk,
                    },
                ),
            )
        )
    elif kind == "dtype":
        cfg["dtype"] = draw(st.one_of(st.sampled_from(["float16", "bfloat16", "float8", "int8"]), junk))
    elif kind == "ckpt":  # a broken or missing checkpoint as base or as a model, or no base at all
        name = draw(st.sampled_from([*BROKEN, None]))
        if isinstance(models, list) and models and draw(st.booleans()):
            i = draw(st.integers(0, len(models) - 1))
            models[i] = name if name is not None else draw(junk)
        elif name is None:
            cfg.pop("base_model", None)
        else:
            cfg["base_model"] = name
    elif kind == "top":  # any top-level key (or an unknown one) set to junk
        key = draw(
            st.sampled_from(
                ["method", "models", "parameters", "shard_size", "seed", "chunk_elements", "check_dtypes"]
                + ["x"]
            )
        )
        cfg[key] = draw(junk)
    elif kind == "numbers":
        cfg["seed"] = draw(st.one_of(st.integers(-5, 2**64 + 5), junk))
        cfg["chunk_elements"] = draw(st.sampled_from([0, -1, 2.5, True, 2**70]))
        cfg["shard_size"] = draw(st.sampled_from(["1e999GB", "nanGB", "lots", 0, -1, True, "8B"]))
    else:
        cfg["method"] = draw(st.one_of(st.sampled_from(["tiez", "TIES"]), junk))


def _paths(value, mapping):
    if isinstance(value, str) and value in mapping:
        return mapping[value]
    return value


@pytest.mark.filterwarnings("ignore")
@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    cfg=configs(),
    out_kind=st.sampled_from(["new"] * 6 + ["file", "foreign", "input", "earlier"]),
    overwrite=st.booleans(),
)
def test_generated_merge_configs_succeed_finite_or_raise_layerwise_error(
    pool, one_torch_thread, cfg, out_kind, overwrite
):
    root, mapping = pool
    cfg = dict(cfg)
    if "base_model" in cfg:
        cfg["base_model"] = _paths(cfg["base_model"], mapping)
    if isinstance(cfg.get("models"), list):
        cfg["models"] = [
            {**m, "model": _paths(m.get("model"), mapping)} if isinstance(m, dict) else _paths(m, mapping)
            for m in cfg["models"]
        ]
    n = next(_counter)
    config = root / f"cfg{n}.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    out = _make_out(root, mapping, out_kind, n)
    before = _snapshot(out)
    argv = ["merge", str(config), "--out", str(out), "--no-progress"] + (["--overwrite"] if overwrite else [])
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)  # the handler itself: no CLI error mapping in between
    except LayerwiseError as err:
        event(f"refused: {type(err).__name__}")
        assert _snapshot(out) == before  # a refused merge changes nothing at --out
        return
    assert code == 0
    # only a new folder, or an unchanged earlier layerwise output with --overwrite, may be written
    assert out_kind == "new" or (out_kind == "earlier" and overwrite), out_kind
    event("merged")
    merged = load_state_dict(out)
    for key, tensor in merged.items():
        if tensor.dtype.is_floating_point:
            assert bool(torch.isfinite(tensor.double()).all()), (key, cfg)


def _make_out(root, mapping, kind, n):
    if kind == "file":
        (root / f"file{n}.bin").write_bytes(b"user data")
        return root / f"file{n}.bin"
    if kind == "foreign":
        (root / f"foreign{n}").mkdir()
        (root / f"foreign{n}" / "notes.txt").write_text("mine")
        return root / f"foreign{n}"
    if kind == "input":
        return root / "base"
    if kind == "earlier":
        return save_checkpoint(_tensors(5), root / f"earlier{n}")
    return root / f"out{n}"


def _snapshot(path):
    if path.is_file():
        return path.read_bytes()
    if not path.exists():
        return None
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


_counter = itertools.count()
