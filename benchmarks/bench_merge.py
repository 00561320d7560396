"""Benchmark ``layerwise`` merging against a naive load-everything merge and mergekit, on large checkpoints.

Builds a base and 4 fine-tuned checkpoints shaped like a Llama transformer (float32, >= 500 MB each;
default: d=1024, 8 layers, vocab 32000 -> 673 MB, largest tensor 131 MB) in a temporary folder, then runs
each job in its own child process and reports wall time and peak RSS (``ru_maxrss`` of that child from
``os.wait4``, plus the child's own RSS right after its imports):

- task_arithmetic: layerwise (streaming) / naive (load all, dense) / mergekit-yaml
- ties (density 0.2, per tensor): layerwise / mergekit-yaml
- ties + LiNeS (alpha automatic, beta 0.5): layerwise / naive

and compares the outputs (max |difference|). mergekit is installed on first use into a separate venv
(default ``~/.cache/layerwise/venv-mergekit``; torch pinned from constraints.txt so that no CUDA build is
pulled); if that fails the mergekit rows are skipped with a message.

Targets (issue 4): peak RSS <= RSS after imports + 3 x the largest tensor; wall time <= mergekit's; outputs
equal to mergekit's task_arithmetic to 1e-6.

Command line against command line (issue 15): the same mergekit YAML file is given to ``layerwise merge``
and to ``mergekit-yaml`` (0.1.5, pinned), each timed as a whole process (start-up, imports and merge)
with its peak RSS, ``--repeats`` times (default 3) in alternating order, reporting min and median, for
task_arithmetic, ties (density 0.2), slerp (t 0.5, base + ft0) and a LoRA merge (a rank-16 adapter on the
attention projections, ``base+adapter`` task arithmetic); the outputs are compared entry by entry.

Where the time goes (issue 22): ``--profile`` (on by default with the command-line comparison) runs each
``layerwise merge`` once more in a child process that times its imports and profiles the merge
(cProfile, main thread): reading (``readinto``), waiting for the threads that write and hash the output,
output files read back to hash them for the folder marker (none since the digests are computed while
writing), compute (the rest); and compares each whole-process time with the disk-read bound, the bytes the
merge must read divided by the sequential read speed measured on the checkpoint files just before (page
cache as it is). Every timed run starts after ``os.sync()`` (no dirty pages left by the earlier runs).

Usage: ``python benchmarks/bench_merge.py [--layers 8] [--no-mergekit] [--workdir DIR] [--keep]
[--repeats 3] [--cli-methods ta,ties,slerp,lora] [--no-inprocess] [--no-cli] [--no-profile]`` (about 30
minutes on a shared 2-core machine at the default size; needs ~8 GB of disk and ~5 GB of RAM for the naive
baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = 4


# -- jobs run in a child process -----------------------------------------------------------------------------
def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(job: str, work: Path) -> None:
    import torch

    import layerwise.editing  # noqa: F401  (part of the import baseline)

    after_imports = _rss_mb()
    start = time.perf_counter()
    base = work / "base"
    fts = [work / f"ft{i}" for i in range(MODELS)]
    out = work / f"out_{job}"
    if job.startswith("layerwise"):
        from layerwise.editing import LinesSpec, merge_models

        method = "task_arithmetic" if job == "layerwise_ta" else "ties"
        lines = LinesSpec(beta=0.5) if job == "layerwise_ties_lines" else None
        params = {} if method == "task_arithmetic" else {"density": 0.2}
        merge_models(
            method, fts, base, params=params, lines=lines, out=out, max_shard_bytes="2GB", overwrite=True
        )
    elif job.startswith("naive"):
        _naive(job, base, fts, out, torch)
    else:
        raise ValueError(job)
    print(json.dumps({"wall_s": time.perf_counter() - start, "rss_after_imports_mb": after_imports}))


def _naive(job: str, base_dir: Path, ft_dirs: list[Path], out: Path, torch) -> None:
    """Load every checkpoint fully into memory and merge with dense formulas (what a short script does)."""
    from safetensors.torch import load_file, save_file

    base = load_file(str(base_dir / "model.safetensors"))
    fts = [load_file(str(d / "model.safetensors")) for d in ft_dirs]
    if job == "naive_ta":
        merged = {k: base[k] + sum(ft[k] - base[k] for ft in fts) for k in base}
    else:  # ties (per tensor, density 0.2) + LiNeS with automatic alpha
        from layerwise.editing.lines import lines_scales

        mt, sum_l1 = {}, 0.0
        for k in base:
            taus = [ft[k] - base[k] for ft in fts]
            sum_l1 += float(sum(taus).abs().sum())
            trimmed = []
            for t in taus:
                flat = t.reshape(-1)
                kk = max(1, int(0.2 * flat.numel()))
                thr = flat.abs().kthvalue(flat.numel() - kk + 1).values
                trimmed.append(torch.where(t.abs() >= thr, t, 0))
            st = torch.stack(trimmed)
            elected = torch.sign(st.sum(0))
            agree = (torch.sign(st) == elected) & (st != 0)
            mt[k] = (st * agree).sum(0) / agree.sum(0).clamp(min=1)
        alpha = sum_l1 / (sum(float(v.abs().sum()) for v in mt.values()) * len(fts))
        scales = lines_scales(list(base), alpha, 0.5)
        merged = {k: base[k] + scales[k] * mt[k] for k in base}
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})


# -- orchestration ------------------------------------------------------------------------------------
def _measured(cmd: list[str]) -> dict:
    """Run ``cmd`` under a tiny wrapper that reports the child's peak RSS (ru_maxrss of that child alone)."""
    wrapper = (
        "import json,os,resource,subprocess,sys,time\n"
        "t=time.perf_counter();p=subprocess.Popen(sys.argv[1:]);_,s,ru=os.wait4(p.pid,0)\n"
        "print(json.dumps({'peak_rss_mb':ru.ru_maxrss/1024,'wall_s_outer':time.perf_counter()-t,"
        "'rc':os.waitstatus_to_exitcode(s)}),file=sys.stderr)"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    meas = json.loads(proc.stderr.strip().splitlines()[-1])
    if meas["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}… failed ({meas['rc']}):\n{proc.stderr[-3000:]}")
    info = {"peak_rss_mb": meas["peak_rss_mb"], "wall_s": time.perf_counter() - start}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            info.update(json.loads(line))
            break
    return info


def build_checkpoints(work: Path, layers: int, hidden: int, inter: int, vocab: int) -> tuple[int, int]:
    """Write base + MODELS fine-tuned Llama-shaped float32 checkpoints; return (bytes each, largest)."""
    import torch

    from layerwise.editing.checkpoints import ShardedSafetensorsWriter

    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
        )
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (hidden, hidden)
        shapes.update(
            {
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            }
        )
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    for m, name in enumerate(["base"] + [f"ft{i}" for i in range(MODELS)]):
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        writer = ShardedSafetensorsWriter(folder, [(k, s, torch.float32) for k, s in shapes.items()], 10**12)
        for j, (k, s) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(j)  # same base tensor in every model
            t = torch.randn(s, generator=g) * 0.02
            if m > 0:
                g2 = torch.Generator().manual_seed(1000 * m + j)
                t += torch.randn(s, generator=g2) * 0.002
            writer.write(k, t)
            del t
        writer.close()
    numels = [torch.Size(s).numel() for s in shapes.values()]
    return 4 * sum(numels), 4 * max(numels)


def _sizes(work: Path) -> tuple[int, int]:
    from layerwise.editing import open_checkpoint

    with open_checkpoint(work / "base") as ck:
        sizes = [ck.nbytes(k) for k in ck.keys()]
    return sum(sizes), max(sizes)


def ensure_mergekit(venv: Path) -> Path | None:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"[bench] installing mergekit into {venv} (torch pinned by constraints.txt)…", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch==2.13.0"], check=True, timeout=1800)
        subprocess.run(
            [*pip, "-c", str(REPO / "constraints.txt"), "mergekit==0.1.5"], check=True, timeout=1800
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
        print(f"[bench] mergekit unavailable, skipping its rows ({err})")
        return None
    return exe if exe.exists() else None


def run_mergekit(exe: Path, work: Path, method: str) -> dict:
    import yaml

    models = [
        {
            "model": str(work / f"ft{i}"),
            "parameters": {"weight": 1.0, **({"density": 0.2} if method == "ties" else {})},
        }
        for i in range(MODELS)
    ]
    cfg = {
        "merge_method": method,
        "base_model": str(work / "base"),
        "models": models,
        "dtype": "float32",
        "out_dtype": "float32",
    }
    path = work / f"mergekit_{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = work / f"out_mergekit_{method}"
    info = _measured(
        [
            str(exe),
            str(path),
            str(out),
            "--no-copy-tokenizer",
            "--out-shard-size",
            "2B",
            "--lazy-unpickle",
            "--quiet",
        ]
    )
    probe = _measured(
        [
            str(exe.parent / "python"),
            "-c",
            "import json,torch,mergekit.merge;"
            "print(json.dumps({'rss':[int(l.split()[1]) for l in open('/proc/self/status') "
            "if l.startswith('VmRSS')][0]/1024}))",
        ]
    )
    info["rss_after_imports_mb"] = probe.get("rss")
    return info


LORA_RANK = 16
CLI_METHODS = ("ta", "ties", "slerp", "lora")
EXTRA_CLI_METHODS = ("breadcrumbs", "breadcrumbs_ties", "model_stock")  # output comparisons (not default)


def build_lora(work: Path, rank: int = LORA_RANK) -> Path:
    """A PEFT-layout LoRA adapter (q/k/v/o projections of every layer) for the base in ``work``."""
    import torch

    from layerwise.editing import open_checkpoint
    from layerwise.editing.checkpoints import save_checkpoint

    folder = work / "lora"
    if (folder / "adapter_model.safetensors").exists():
        return folder
    tensors = {}
    with open_checkpoint(work / "base") as ck:
        targets = [k for k in ck.keys() if ".self_attn." in k and k.endswith("_proj.weight")]
        g = torch.Generator().manual_seed(0)
        for k in targets:
            out_f, in_f = ck.shape(k)
            m = "base_model.model." + k[: -len(".weight")]
            tensors[m + ".lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
            tensors[m + ".lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.002
    tmp = work / "lora_weights"
    save_checkpoint(tensors, tmp)
    folder.mkdir(exist_ok=True)
    (tmp / "model.safetensors").rename(folder / "adapter_model.safetensors")
    shutil.rmtree(tmp)
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": False,
                "base_model_name_or_path": str(work / "base"),
            }
        )
    )
    return folder


def mergekit_yaml(work: Path, method: str) -> Path:
    """The mergekit config of one CLI job (read unchanged by both tools)."""
    import yaml

    base = str(work / "base")
    if method == "ta":
        models = [{"model": str(work / f"ft{i}"), "parameters": {"weight": 1.0}} for i in range(MODELS)]
        cfg = {"merge_method": "task_arithmetic", "models": models}
    elif method == "ties":
        models = [
            {"model": str(work / f"ft{i}"), "parameters": {"weight": 1.0, "density": 0.2}}
            for i in range(MODELS)
        ]
        cfg = {"merge_method": "ties", "models": models}
    elif method == "slerp":
        cfg = {
            "merge_method": "slerp",
            "models": [{"model": base}, {"model": str(work / "ft0")}],
            "parameters": {"t": 0.5},
        }
    elif method in ("breadcrumbs", "breadcrumbs_ties"):
        models = [
            {"model": str(work / f"ft{i}"), "parameters": {"weight": 1.0, "density": 0.3, "gamma": 0.01}}
            for i in range(MODELS)
        ]
        cfg = {"merge_method": method, "models": models}
    elif method == "model_stock":
        cfg = {
            "merge_method": "model_stock",
            "models": [{"model": str(work / f"ft{i}")} for i in range(MODELS)],
        }
    elif method == "lora":
        adapter = build_lora(work)
        cfg = {
            "merge_method": "task_arithmetic",
            "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}],
        }
    else:
        raise ValueError(method)
    cfg.update({"base_model": base, "dtype": "float32", "out_dtype": "float32"})
    path = work / f"cli_{method}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(tool: str, exe: Path, cfg: Path, out: Path) -> dict:
    """One whole-process run of ``layerwise merge`` or ``mergekit-yaml`` on ``cfg`` into a fresh ``out``."""
    if out.exists():
        shutil.rmtree(out)  # written by an earlier repeat of this benchmark
    # start every run with no dirty pages: the earlier runs' outputs (GBs) would otherwise still be flushed
    # to disk during this one, and writes slow down to the disk's speed once enough are pending
    os.sync()
    if tool == "layerwise":
        cmd = [str(exe), "merge", str(cfg), "--out", str(out), "--no-progress"]
    else:
        cache = out.parent / "mergekit_lora_cache"
        if cache.exists():
            shutil.rmtree(cache)  # every repeat merges the adapter again (no warm cache)
        cmd = [str(exe), str(cfg), str(out), "--no-copy-tokenizer", "--out-shard-size", "2B"]
        cmd += ["--lazy-unpickle", "--quiet", "--lora-merge-cache", str(cache)]
    return _measured(cmd)


def cli_benchmark(work: Path, mk_exe: Path | None, methods: list[str], repeats: int) -> dict:
    """Alternating whole-process runs; returns ``{method: {tool: [runs]}}`` and prints each run."""
    import statistics

    lw_exe = Path(sys.executable).parent / "layerwise"
    results: dict[str, dict[str, list[dict]]] = {}
    for method in methods:
        cfg = mergekit_yaml(work, method)
        tools = [("layerwise", lw_exe)] + ([("mergekit", mk_exe)] if mk_exe is not None else [])
        runs: dict[str, list[dict]] = {t: [] for t, _ in tools}
        for r in range(repeats):
            for tool, exe in tools if r % 2 == 0 else tools[::-1]:
                try:
                    info = run_cli(tool, exe, cfg, work / f"cli_out_{tool}_{method}")
                except RuntimeError as err:
                    print(f"[bench] {tool} {method} failed: {str(err)[-2000:]}", flush=True)
                    continue
                runs[tool].append(info)
                print(
                    f"[bench] cli {method} {tool} #{r + 1}: {info['wall_s']:.1f} s, "
                    f"peak RSS {info['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
        results[method] = runs
    print(f"\n== command line against command line ({repeats} alternating repeats; min / median)")
    print(f"{'method':<18}{'tool':<11}{'wall s min':>11}{'median':>9}{'peak RSS MB min':>17}{'median':>9}")
    for method, runs in results.items():
        for tool, rs in runs.items():
            if not rs:
                continue
            w = [x["wall_s"] for x in rs]
            m = [x["peak_rss_mb"] for x in rs]
            print(
                f"{method:<18}{tool:<11}{min(w):>11.1f}{statistics.median(w):>9.1f}"
                f"{min(m):>17.0f}{statistics.median(m):>9.0f}"
            )
        lw, mk = runs.get("layerwise"), runs.get("mergekit")
        if lw and mk:
            wl = statistics.median(x["wall_s"] for x in lw)
            wm = statistics.median(x["wall_s"] for x in mk)
            rl = statistics.median(x["peak_rss_mb"] for x in lw)
            rm = statistics.median(x["peak_rss_mb"] for x in mk)
            a, b = work / f"cli_out_layerwise_{method}", work / f"cli_out_mergekit_{method}"
            worst, differing, total = max_abs_diff(a, b)
            print(
                f"  {method}: mergekit / layerwise time x{wm / wl:.2f} (median), x"
                f"{min(x['wall_s'] for x in mk) / min(x['wall_s'] for x in lw):.2f} (min); "
                f"peak RSS x{rm / rl:.1f}; max |difference| {worst:.3g} "
                f"({differing} of {total} entries differ)"
            )
    return results


# -- where the time goes ------------------------------------------------------------------------------
_READ_FUNCS = ("readinto", "pread", "preadv", "'read' of '_io")
_CATEGORIES = ("import", "read", "compute", "write wait", "hash read-back", "total")


def _child_profile(cfg: Path, work: Path) -> None:
    """One ``layerwise merge`` in this process: import time, then the merge under cProfile, by category."""
    import contextlib
    import cProfile
    import io
    import pstats

    start = time.perf_counter()
    import torch  # noqa: F401

    from layerwise.cli import main

    t_import = time.perf_counter() - start
    out = work / f"prof_out_{cfg.stem}"
    if out.exists():  # as before the timed runs: --overwrite would first hash the old output to verify it
        shutil.rmtree(out)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["merge", str(cfg), "--out", str(out), "--no-progress"])
    prof.disable()
    t_merge = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(rc)
    cats = {"read": 0.0, "write wait": 0.0, "hash read-back": 0.0}
    for (_, _, name), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():
        if any(r in name for r in _READ_FUNCS):
            cats["read"] += tottime
        elif "acquire" in name or "'put' of" in name or "join" in name:
            cats["write wait"] += tottime  # a queue full / the final join: a background thread is behind
        elif "_hashlib" in name:  # in the main thread: output files read back to hash them for the marker
            cats["hash read-back"] += tottime
    cats["compute"] = max(t_merge - sum(cats.values()), 0.0)
    print(json.dumps({"import": t_import, **cats, "merge": t_merge, "total": t_import + t_merge}))


def read_speed(files: list[Path], block: int = 64 << 20) -> float:
    """Sequential read speed (bytes/s) over ``files`` (large reads into one buffer; page cache as it is)."""
    buf = bytearray(block)
    view = memoryview(buf)
    total, start = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total / max(time.perf_counter() - start, 1e-9)


def _bytes_read(work: Path, method: str) -> int:
    """Bytes of checkpoint data a merge must read: every input model's weight files."""
    names = {"slerp": ["base", "ft0"], "lora": ["base", "lora"]}.get(
        method, ["base"] + [f"ft{i}" for i in range(MODELS)]
    )
    return sum(f.stat().st_size for n in names for f in (work / n).glob("*.safetensors"))


def profile_report(work: Path, methods: list[str], cli_results: dict) -> None:
    """Print the time breakdown of each ``layerwise merge`` and its distance from the disk-read bound."""
    import statistics

    speed = read_speed(sorted((work / "ft1").glob("*.safetensors")))
    me = [sys.executable, str(Path(__file__).resolve()), "--workdir", str(work), "--child-profile"]
    print(
        f"\n== where the time goes (layerwise merge, one profiled run each; read speed "
        f"{speed / 1e9:.2f} GB/s)"
    )
    print(
        f"{'method':<10}" + "".join(f"{c:>15}" for c in _CATEGORIES) + f"{'read bound s':>14}{'x bound':>9}"
        + f"{'5x goal s':>11}{'import+read bound s':>21}"
    )
    for method in methods:
        os.sync()  # as before every timed run
        proc = subprocess.run([*me, str(work / f"cli_{method}.yaml")], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{method:<10} profile failed: {proc.stderr[-500:]}")
            continue
        prof = json.loads(proc.stdout.strip().splitlines()[-1])
        bound = _bytes_read(work, method) / speed
        runs = cli_results.get(method, {}).get("layerwise") or []
        wall = statistics.median(r["wall_s"] for r in runs) if runs else prof["total"]
        mk = cli_results.get(method, {}).get("mergekit") or []
        goal = f"{statistics.median(r['wall_s'] for r in mk) / 5:>11.2f}" if mk else f"{'-':>11}"
        print(
            f"{method:<10}"
            + "".join(f"{prof[c]:>15.2f}" for c in _CATEGORIES)
            + f"{bound:>14.2f}{wall / bound:>9.1f}{goal}{prof['import'] + bound:>21.2f}"
        )
    print(
        "(seconds; 'write wait' = main thread blocked on the queues of the threads that write and hash the "
        "output; 'hash read-back' = output files read back to hash them for the folder marker (0 when the "
        "digests computed while writing are used); 'x bound' = median whole-process time of the runs above "
        "/ (bytes read / read speed); '5x goal s' = mergekit's median / 5 (issue 22); "
        "'import+read bound s' = the imports plus the read bound, a floor for any process that imports "
        "torch and reads its inputs once (writing the output and interpreter start/exit come on top))"
    )


def max_abs_diff(a: Path, b: Path) -> tuple[float, int, int]:
    """(max |difference|, number of differing entries, number of entries) between two checkpoints."""
    from layerwise.editing import open_checkpoint

    worst, differing, total = 0.0, 0, 0
    with open_checkpoint(a) as x, open_checkpoint(b) as y:
        if set(x.keys()) != set(y.keys()):
            raise ValueError(f"{a} and {b} hold different tensors")
        for k in x.keys():
            d = (x.get(k).double() - y.get(k).double()).abs()
            worst = max(worst, float(d.max())) if d.numel() else worst
            differing += int((d > 0).sum())
            total += d.numel()
    return worst, differing, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where checkpoints go (default: a temp folder)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse checkpoints already in --workdir")
    ap.add_argument("--jobs", default=None, help="comma-separated subset of the jobs (default: all)")
    ap.add_argument("--mergekit-venv", type=Path, default=Path.home() / ".cache/layerwise/venv-mergekit")
    ap.add_argument("--repeats", type=int, default=3, help="whole-process runs per tool and method")
    ap.add_argument(
        "--cli-methods",
        default=",".join(CLI_METHODS),
        help="comma-separated: ta,ties,slerp,lora (default), breadcrumbs,breadcrumbs_ties,model_stock",
    )
    ap.add_argument("--no-inprocess", action="store_true", help="skip the in-process/naive jobs")
    ap.add_argument("--no-cli", action="store_true", help="skip the command-line comparison")
    ap.add_argument("--no-profile", action="store_true", help="skip the time breakdown of layerwise merge")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-profile", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.workdir)
        return 0
    if args.child_profile:
        _child_profile(Path(args.child_profile), args.workdir)
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_merge_")) if args.workdir is None else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if args.reuse and (work / f"ft{MODELS - 1}" / "model.safetensors").exists():
            size, largest = _sizes(work)
        else:
            size, largest = build_checkpoints(work, args.layers, args.hidden, args.intermediate, args.vocab)
        print(
            f"[bench] {MODELS + 1} checkpoints of {size / 1e6:.0f} MB "
            f"(largest tensor {largest / 1e6:.0f} MB) ready in {time.perf_counter() - t0:.0f} s in {work}",
            flush=True,
        )
        me = [sys.executable, str(Path(__file__).resolve()), "--workdir", str(work), "--child"]
        results: dict[str, dict] = {}
        jobs = ["layerwise_ta", "naive_ta", "layerwise_ties", "layerwise_ties_lines", "naive_ties_lines"]
        wanted = None if args.jobs is None else set(args.jobs.split(","))
        if args.no_inprocess:
            jobs = []
        for job in jobs:
            if wanted is not None and job not in wanted:
                continue
            results[job] = _measured([*me, job])
            print(
                f"[bench] {job}: {results[job]['wall_s']:.1f} s, "
                f"peak RSS {results[job]['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        exe = None if args.no_mergekit else ensure_mergekit(args.mergekit_venv)
        if not args.no_cli:
            methods = [m for m in args.cli_methods.split(",") if m]
            bad = sorted(set(methods) - set(CLI_METHODS) - set(EXTRA_CLI_METHODS))
            if bad:
                raise SystemExit(
                    f"--cli-methods: unknown {bad}; choose from {list(CLI_METHODS + EXTRA_CLI_METHODS)}"
                )
            cli_results = cli_benchmark(work, exe, methods, args.repeats)
            if not args.no_profile:
                profile_report(work, methods, cli_results)
        if exe is not None and not args.no_inprocess:
            for method in ("task_arithmetic", "ties"):
                if wanted is not None and f"mergekit_{method}" not in wanted:
                    continue
                try:
                    results[f"mergekit_{method}"] = run_mergekit(exe, work, method)
                    r = results[f"mergekit_{method}"]
                    print(
                        f"[bench] mergekit {method}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
                        flush=True,
                    )
                except RuntimeError as err:
                    print(f"[bench] mergekit {method} failed: {err}")
        diffs = {
            "layerwise_ta vs naive_ta": (work / "out_layerwise_ta", work / "out_naive_ta"),
            "layerwise_ties_lines vs naive_ties_lines": (
                work / "out_layerwise_ties_lines",
                work / "out_naive_ties_lines",
            ),
        }
        if "mergekit_task_arithmetic" in results:
            diffs["layerwise_ta vs mergekit"] = (
                work / "out_layerwise_ta",
                work / "out_mergekit_task_arithmetic",
            )
        if "mergekit_ties" in results:
            diffs["layerwise_ties vs mergekit"] = (work / "out_layerwise_ties", work / "out_mergekit_ties")
        found = {n: (a, b) for n, (a, b) in diffs.items() if a.exists() and b.exists()}
        report(results, {name: max_abs_diff(a, b) for name, (a, b) in found.items()}, size, largest)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict, diffs: dict, size: int, largest: int) -> None:
    print(
        f"\n== merge benchmark: {MODELS} fine-tuned + base, {size / 1e6:.0f} MB each, largest tensor "
        f"{largest / 1e6:.0f} MB (3x = {3 * largest / 1e6:.0f} MB)"
    )
    print(f"{'job':<26}{'wall s':>9}{'peak RSS MB':>13}{'after imports':>15}{'peak - imports':>16}")
    for job, r in results.items():
        base = r.get("rss_after_imports_mb")
        extra = "" if base is None else f"{r['peak_rss_mb'] - base:>16.0f}"
        base_s = "n/a" if base is None else f"{base:.0f}"
        print(f"{job:<26}{r['wall_s']:>9.1f}{r['peak_rss_mb']:>13.0f}{base_s:>15}{extra}")
    print()
    for ours, other in [
        ("layerwise_ta", "naive_ta"),
        ("layerwise_ties_lines", "naive_ties_lines"),
        ("layerwise_ta", "mergekit_task_arithmetic"),
        ("layerwise_ties", "mergekit_ties"),
    ]:
        if ours in results and other in results:
            a, b = results[ours], results[other]
            print(
                f"{ours} / {other}: time x{a['wall_s'] / b['wall_s']:.2f}, "
                f"peak RSS x{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}"
            )
    for job in ("layerwise_ta", "layerwise_ties", "layerwise_ties_lines"):
        if job not in results:
            continue
        r = results[job]
        ok = r["peak_rss_mb"] - r["rss_after_imports_mb"] <= 3 * largest / 2**20
        print(f"target peak RSS <= imports + 3 x largest tensor, {job}: {'met' if ok else 'NOT met'}")
    for name, (worst, differing, total) in diffs.items():
        print(f"max |difference| {name}: {worst:.3g} ({differing} of {total} entries differ)")


if __name__ == "__main__":
    sys.exit(main())
