"""Output folders like a model repository: a README.md model card, a re-runnable config, the tokenizer.

:func:`finish_output` is called by the merge driver inside the temporary output folder (before it is
renamed into place), after the weights and the side files of the base model are written:

- ``README.md``: the model card (Hugging Face front matter, the method and its paper, the inputs and their
  parameters, the LiNeS table, the config that produced it, the layerwise version, references). A
  ``README.md`` copied from the base model folder is replaced (it describes the base, not the merge).
- ``layerwise_merge.yaml``: a layerwise config, with absolute paths, that re-runs the same merge
  (``layerwise merge layerwise_merge.yaml --out OTHER``).
- tokenizer files of ``tokenizer_source`` (the base model's folder by default) when it is a folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..errors import ConfigError

__all__ = ["TOKENIZER_FILES", "finish_output", "model_card", "rerun_config", "copy_tokenizer"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
LINES_REFERENCE = "https://arxiv.org/abs/2410.17146"
LORA_REFERENCE = "https://arxiv.org/abs/2106.09685"


def copy_tokenizer(src: str | Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of the model folder ``src`` into ``dst`` (replacing copies there)."""
    src = Path(src)
    if not src.is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        f = src / name
        if f.is_file():
            target = dst / name
            if target.exists():
                target.unlink()  # a copy made earlier inside the temporary folder
            shutil.copy2(f, target)
            copied.append(name)
    return copied


def rerun_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A layerwise config mapping with absolute paths (from :meth:`~.config.MergeConfig.to_dict`)."""
    data = dict(config)

    def absolute(p):
        return None if p is None else str(Path(p).resolve())

    data["base_model"] = absolute(data.get("base_model"))
    if "slices" in data:  # a slices merge: paths inside the slices, no models list
        data["slices"] = [
            {
                **sl,
                "sources": [{**src, "model": absolute(src["model"])} for src in sl["sources"]],
                **({"base_model": absolute(sl["base_model"])} if sl.get("base_model") else {}),
            }
            for sl in data["slices"]
        ]
        data.pop("models", None)
    else:
        data["models"] = [{**m, "model": absolute(m["model"])} for m in data.get("models", [])]
    return {k: v for k, v in data.items() if v is not None}


def _md_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def model_card(
    info: Mapping[str, Any],
    method: Any,
    config: Mapping[str, Any] | None = None,
    source_text: str | None = None,
) -> str:
    """The README.md text for a merge described by ``info`` (the record of the driver), ``method`` (the
    registered :class:`~.merge.registry.MergeMethod`), the config mapping and the original config file."""
    base = info.get("base_model")
    models = info.get("models", [])
    lora = info.get("lora_models") or []
    tags = ["merge", "layerwise", method.name] + (["lines"] if info.get("lines_table") else [])
    front = {"base_model": base, "tags": tags, "library_name": "transformers"}
    parts = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    parts.append(f"# Merged model ({method.name})\n")
    parts.append(
        f"Merged with layerwise {__version__} `layerwise merge` using "
        f"**{method.name}**: {method.description}."
        + (f" Paper: <{method.reference}>." if method.reference else "")
        + "\n"
    )
    parts.append("## Inputs\n")
    rows = [["base", f"`{base}`", "-"]]
    for i, (m, mp) in enumerate(zip(models, info.get("model_params", []), strict=False)):
        kind = "LoRA adapter" if m in lora else "model"
        rows.append([f"{kind} {i}", f"`{m}`", ", ".join(f"{k}={v}" for k, v in mp.items()) or "-"])
    parts.append(_md_table(rows, ["role", "path", "parameters"]) + "\n")
    parts.append("## Parameters\n")
    prow = [[k, v] for k, v in (info.get("params") or {}).items()]
    prow += [["scale", info.get("scale")], ["seed", info.get("seed")]]
    for k, v in (info.get("schedules") or {}).items():
        prow.append([f"{k} (per layer)", v])
    if info.get("tokenizer_source"):
        prow.append(["tokenizer_source", info["tokenizer_source"]])
    if info.get("aligned_vocabulary"):
        prow.append(["vocabulary rows aligned to the base", ", ".join(info["aligned_vocabulary"])])
    parts.append(_md_table(prow, ["parameter", "value"]) + "\n")
    table = info.get("lines_table")
    if table:
        parts.append("## LiNeS\n")
        parts.append(
            f"Layer-increasing network scaling: alpha = {info['lines_alpha']:.6g}, beta = "
            f"{info['lines_beta']:.6g}; block i of L scaled by alpha + beta i / (L - 1).\n"
        )
        trows = [
            [
                r["tower"],
                "-" if r["block"] is None else f"{r['block']}/{r['num_blocks'] - 1}",
                f"{r['scale']:.4f}",
                r["tensors"],
            ]
            for r in table
        ]
        parts.append(_md_table(trows, ["tower", "block", "scale", "tensors"]) + "\n")
    parts.append("## Configuration\n")
    if source_text is not None:
        parts.append("The config file as given:\n\n```yaml\n" + source_text.rstrip() + "\n```\n")
    if config is not None:
        parts.append(
            "Re-run with `layerwise merge layerwise_merge.yaml --out OTHER_FOLDER` "
            "(the file next to this card):\n\n```yaml\n"
            + yaml.safe_dump(rerun_config(config), sort_keys=False).rstrip()
            + "\n```\n"
        )
    parts.append("## References\n")
    refs = [f"- {method.name}: <{method.reference}>"] if method.reference else []
    if table:
        refs.append(f"- LiNeS (Wang et al., ICLR 2025): <{LINES_REFERENCE}>")
    if lora:
        refs.append(f"- LoRA (Hu et al., ICLR 2022): <{LORA_REFERENCE}>")
    refs.append(f"- layerwise {__version__}")
    parts.append("\n".join(refs) + "\n")
    return "\n".join(parts)


def finish_output(
    folder: Path,
    info: Mapping[str, Any],
    method: Any,
    config: Mapping[str, Any] | None = None,
    source_text: str | None = None,
    tokenizer_source: str | None = None,
) -> None:
    """Write README.md and ``layerwise_merge.yaml`` into ``folder``; copy the tokenizer of
    ``tokenizer_source`` (a model folder; None: the base model's, already copied with its side files)."""
    folder = Path(folder)
    if tokenizer_source is not None:
        if not Path(tokenizer_source).is_dir():
            raise ConfigError(f"tokenizer_source must be a model folder, got {tokenizer_source!r}")
        copy_tokenizer(tokenizer_source, folder)
    readme = folder / "README.md"
    if readme.exists():
        readme.unlink()  # the base model's card, copied with its side files into the temporary folder
    readme.write_text(model_card(info, method, config, source_text), encoding="utf-8")
    if config is not None:
        (folder / "layerwise_merge.yaml").write_text(
            yaml.safe_dump(rerun_config(config), sort_keys=False), encoding="utf-8"
        )
