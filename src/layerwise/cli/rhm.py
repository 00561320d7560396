"""``layerwise rhm``: generate Random Hierarchy Model data sets (and denoise them, see ``rhm denoise``)."""

from __future__ import annotations

import argparse

from .._device import add_device_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rhm", help="Random Hierarchy Model data: sample, denoise")
    rsub = p.add_subparsers(dest="rhm_command", metavar="ACTION", title="actions")

    s = rsub.add_parser(
        "sample",
        help="sample an RHM data set to .pt or .npz",
        description="Draw rules and data of an RHM and save them (with the rules, to rebuild the tree).",
    )
    s.add_argument("--v", type=int, required=True, help="vocabulary size")
    s.add_argument("--n-c", type=int, default=None, help="number of classes (default: v)")
    s.add_argument("--m", type=int, required=True, help="synonyms (rules) per symbol")
    s.add_argument("--s", type=int, default=2, help="tuple size (default 2)")
    s.add_argument("--L", type=int, required=True, help="depth; inputs have s**L tokens")
    s.add_argument("--n", type=int, required=True, help="number of data")
    s.add_argument(
        "--mode",
        choices=("iid", "distinct"),
        default="distinct",
        help="i.i.d. draws, or distinct data by enumeration index (default)",
    )
    s.add_argument("--rules-seed", type=int, default=0, help="seed of the grammar")
    s.add_argument("--seed", type=int, default=1, help="seed of the data")
    s.add_argument("--out", required=True, help="output file, .pt or .npz")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")
    s.set_defaults(func=_sample)

    _add_denoise_parser(rsub)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _sample(args: argparse.Namespace) -> int:
    from .._io import check_output_file
    from ..hierarchy import RHM
    from ..hierarchy.datafile import check_data_path, save_dataset

    check_data_path(args.out, "--out")
    check_output_file(args.out, overwrite=args.overwrite)
    rhm = RHM(
        args.v, args.n_c if args.n_c is not None else args.v, args.m, args.s, args.L, seed=args.rules_seed
    )
    data = (
        rhm.sample(args.n, seed=args.seed)
        if args.mode == "iid"
        else rhm.sample_distinct(args.n, seed=args.seed)
    )
    path = save_dataset(args.out, rhm, data)
    print(f"wrote {len(data)} data of {rhm} (P_max={rhm.P_max_text}) to {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# `layerwise rhm denoise` (exact BP posterior on a saved data file)
def _add_denoise_parser(rsub: argparse._SubParsersAction) -> None:
    d = rsub.add_parser(
        "denoise",
        help="noise a saved data set and draw exact BP posterior samples and marginals",
        description=(
            "Corrupt the data of DATA with a noise process at LEVEL, then compute the exact posterior of the "
            "RHM given the noisy data (belief propagation): one joint posterior sample per datum and the "
            "marginals at every level, written to OUT (.pt or .npz; readable by `load_dataset` as the "
            "posterior samples, and by layerwise.hierarchy.load_denoised in full)."
        ),
    )
    d.add_argument("data", metavar="DATA", help="data file written by `layerwise rhm sample` (.pt or .npz)")
    # Not argparse choices: the library's registry checks the name (and lists valid ones), so processes
    # registered by users work here too, and --help does not import torch.
    d.add_argument(
        "--process",
        required=True,
        help="registered noise process: eps (theory process, evidence from the clean token), "
        "uniform (resampling) or mask (absorbing)",
    )
    d.add_argument("--level", type=float, required=True, help="noise level in [0, 1]")
    d.add_argument("--seed", type=int, default=0, help="seed of the noise and of the posterior draws")
    d.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="BP precision")
    d.add_argument("--batch-size", type=int, default=4096, help="data per BP call (memory of temporaries)")
    add_device_argument(d, help="where the leaf evidence is built and BP runs (results are saved from CPU)")
    d.add_argument("--out", required=True, help="output file, .pt or .npz")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")
    d.set_defaults(func=_denoise)


def _denoise(args: argparse.Namespace) -> int:
    import torch

    from .._device import resolve_device
    from .._io import check_output_file
    from ..hierarchy.datafile import check_data_path, load_dataset
    from ..hierarchy.denoising import denoise, save_denoised

    device = resolve_device(args.device, name="--device")  # a bad device: one line, before any work
    check_data_path(args.out, "--out")
    check_output_file(args.out, overwrite=args.overwrite, inputs=[args.data])
    rhm, data = load_dataset(args.data)
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    result = denoise(
        rhm, data, args.process, args.level, seed=args.seed, dtype=dtype, batch_size=args.batch_size,
        device=device,
    )
    path = save_denoised(args.out, rhm, result)
    stats = result.summary()
    print(
        f"denoised {stats['n']} data of {rhm} ({args.process}, level {args.level}): class kept "
        f"{stats['class_kept']:.4f}, tokens changed {stats['tokens_changed']:.4f}, "
        f"mean log-likelihood {stats['mean_log_partition']:.4f}; wrote {path}"
    )
    return 0
