"""``layerwise kernels``: Gram matrices of local/conv/hierarchical kernels; teacher-student curves."""

from __future__ import annotations

import argparse

from .._device import add_device_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="local, convolutional and hierarchical kernels; learning curves",
                       allow_abbrev=False)
    ksub = p.add_subparsers(dest="kernels_command", metavar="ACTION", title="actions")

    g = ksub.add_parser(
        "gram", allow_abbrev=False, help="Gram matrix of a kernel on a .npy data set",
        description="Compute K(X, X) (or K(X, Y) with --data2) in float64, in row blocks; save it as .npy.",
    )
    g.add_argument("--kind", required=True, choices=("full", "local", "conv", "hierarchical"),
                   help="kernel family")
    g.add_argument("--data", required=True, metavar="X.npy", help="inputs (n, d), or (n, h, w) with --dims 2")
    g.add_argument("--data2", default=None, metavar="Y.npy", help="second inputs for a rectangular K(X, Y)")
    g.add_argument("--out", required=True, metavar="K.npy", help="output .npy file (must not exist)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    g.add_argument("--s", type=int, default=None, help="patch size (local, conv)")
    g.add_argument("--dims", type=int, default=1, help="1: rings (n, d); 2: tori (n, h, w) (local, conv)")
    g.add_argument("--base", default="laplace",
                   help="base kernel of full/local/conv: laplace (default), ntk_relu, nngp_relu, gaussian")
    g.add_argument("--sigma", type=float, default=None, help="width of the laplace/gaussian base (default 1)")
    g.add_argument("--filters", default=None, help="hierarchical filter sizes, comma-separated, e.g. 4,4")
    g.add_argument("--network-kernel", choices=("ntk", "nngp"), default="ntk",
                   help="hierarchical: tangent kernel or Gaussian-process kernel (default ntk)")
    g.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="precision")
    add_device_argument(g, help="where the Gram matrix is computed")
    g.add_argument("--block-size", type=int, default=None, help="rows per block (default: memory budget)")
    g.set_defaults(func=_gram)

    c = ksub.add_parser(
        "curve", allow_abbrev=False, help="teacher-student learning curves from a YAML config",
        description="Run kernel regression of Gaussian-random-field teachers by student kernels for every "
        "training size and seed of CONFIG (see layerwise.kernels.config for the keys); write curves.csv, "
        "exponents.csv (fitted beta with 95%% bootstrap intervals), learning_curves.png and config.json.",
    )
    c.add_argument("config", metavar="CONFIG.yaml", help="learning-curve configuration (YAML)")
    c.add_argument("--out", required=True, metavar="DIR", help="output folder (new, or --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace an earlier layerwise output folder")
    add_device_argument(c, default=None, help="where Gram matrices and solves run; default: the config's "
                        "device key, else cpu")
    c.set_defaults(func=_curve)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _gram(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .._device import resolve_device
    from .._io import atomic_path, check_output_file
    from ..errors import ParameterError
    from ..kernels import make_kernel

    device = resolve_device(args.device, name="--device")  # before any work
    out = check_output_file(args.out, overwrite=args.overwrite, inputs=[args.data, args.data2])
    spec: dict = {"type": args.kind}
    if args.kind == "hierarchical":
        if args.filters is None:
            raise ParameterError("--filters is required with --kind hierarchical (e.g. --filters 4,4)")
        try:
            spec["filters"] = [int(v) for v in args.filters.split(",")]
        except ValueError:
            raise ParameterError(f"--filters must be comma-separated integers, got {args.filters!r}") \
                from None
        spec["kind"] = args.network_kernel
    else:
        spec["base"] = args.base
        if args.sigma is not None:
            spec["sigma"] = args.sigma
        if args.kind != "full":
            if args.s is None:
                raise ParameterError(f"--s is required with --kind {args.kind}")
            spec.update(s=args.s, dims=args.dims)
    kernel = make_kernel(spec)

    from .._io import read_npy

    X = torch.from_numpy(read_npy(args.data, what="data")).to(device)
    Y = None if args.data2 is None else torch.from_numpy(read_npy(args.data2, what="--data2")).to(device)
    K = kernel(X, Y, dtype=getattr(torch, args.dtype), block_size=args.block_size)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, K.cpu().numpy())
    print(f"wrote {tuple(K.shape)} {args.kind} Gram matrix ({args.dtype}) to {out}")
    return 0


def _curve(args: argparse.Namespace) -> int:
    from .._device import resolve_device
    from .._io import atomic_directory, check_output_dir, read_yaml, write_json
    from ..kernels import learning_curve
    from ..kernels.config import parse_curve_config, save_curves

    cfg = read_yaml(args.config, what="curve config")
    if args.device is not None:  # the flag wins: a config written for a GPU machine runs here on cpu
        device = resolve_device(args.device, name="--device")
        kwargs = parse_curve_config({k: v for k, v in cfg.items() if k != "device"}
                                    if isinstance(cfg, dict) else cfg)
        kwargs["device"] = device
    else:
        kwargs = parse_curve_config(cfg)
    out = check_output_dir(args.out, overwrite=args.overwrite, inputs=[args.config])
    curves = learning_curve(**kwargs, progress=True)
    with atomic_directory(out) as tmp:
        write_json(tmp / "config.json", cfg)
        fits = save_curves(curves, tmp)
    for f in fits:
        interval = f"[{f['ci_low']:.3f}, {f['ci_high']:.3f}]"
        print(f"{f['teacher']} -> {f['student']}: beta = {f['beta']:.3f} {interval}")
    print(f"wrote {out}")
    return 0
