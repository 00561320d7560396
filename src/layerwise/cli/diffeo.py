"""``layerwise diffeo``: draw maximum-entropy diffeomorphisms of an image; measure R_f of your own model; run
the diffeo-stability experiment on your own labelled images.

``layerwise diffeo stability --model MODULE:FACTORY`` imports MODULE and calls FACTORY() to build the model:
this runs your own Python code (as ``python -c "import MODULE"`` would), so point it only at code you trust.
Weights are read without unpickling arbitrary objects (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import argparse

from .._device import add_device_argument

MAX_T_STEPS = 50  # columns of the sample grid: a wider picture is unreadable


def _count(text: str) -> int:
    """An integer option that also accepts integral scientific notation (``1e6``); the size checks that
    follow refuse what is too large with an estimate."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if not value.is_integer() or abs(value) >= 2**63:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}")
    return int(value)

def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diffeo", allow_abbrev=False,
                       help="max-entropy diffeomorphisms: sample grids, R_f of a model, the experiment")
    dsub = p.add_subparsers(dest="diffeo_command", metavar="ACTION", title="actions")

    s = dsub.add_parser(
        "sample", allow_abbrev=False,
        help="picture of an image under diffeos of increasing temperature, next to noise of the same norm",
        description="Deform IMAGE with max-entropy diffeomorphisms at T log-spaced from T_min to T_max "
        "(Petrini et al. 2021, Fig. 1) and draw each next to the image plus Gaussian noise of the same norm.",
    )
    s.add_argument("image", metavar="IMAGE",
                   help="image file (PNG, JPEG, ...; needs Pillow: layerwise[data])")
    s.add_argument("--c", type=_count, default=5, help="high-frequency cutoff (default 5)")
    s.add_argument("--T-steps", type=_count, default=5,
                   help=f"number of temperatures, 1 to {MAX_T_STEPS} (default 5; one column each)")
    s.add_argument("--size", type=_count, default=None,
                   help="resize the image to SIZE x SIZE first (default: keep its size; T_min/T_max use the "
                   "smaller side)")
    s.add_argument("--mode", choices=("bilinear", "nearest"), default="bilinear", help="interpolation")
    s.add_argument("--seed", type=int, default=0, help="seed of the fields and the noise")
    s.add_argument("--out", required=True, help="output PNG")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.set_defaults(func=_sample)

    st = dsub.add_parser(
        "stability", allow_abbrev=False,
        help="D_f, G_f and R_f of your model on your images",
        description="Measure the stability of a model to diffeomorphisms (D_f), to noise of the same norm "
        "(G_f) and their ratio R_f, at the output and at any named module. MODULE:FACTORY is imported and "
        "called: it runs your own code, so use only code you trust. MODULE is a dotted module name or a "
        "path to a .py file.",
    )
    st.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                    help="e.g. mypkg.nets:resnet18 or path/to/nets.py:build (called with no arguments)")
    st.add_argument("--weights", default=None, metavar="CKPT",
                    help="state dict: .safetensors, or a torch file read with weights_only=True")
    st.add_argument("--images", required=True, metavar="DIR_OR_NPY",
                    help="a .npy array (N, C, H, W) or (N, H, W), or a folder of PNG/JPEG images (scaled to "
                    "[0, 1]; all of one size unless --size)")
    st.add_argument("--out", required=True, metavar="DIR",
                    help="output folder (stability.json, stability.csv); must be new or empty")
    st.add_argument("--overwrite", action="store_true",
                    help="replace an --out folder written by an earlier layerwise run")
    st.add_argument("--layers", nargs="+", default=None,
                    help="module names (model.named_modules()); '' or 'output' is the model output (default)")
    st.add_argument("--c", type=_count, default=3, help="cutoff (default 3)")
    st.add_argument("--T", type=float, default=None,
                    help="temperature > 0 (default: typical displacement of 1 pixel); below T_min = "
                    "1/(pi n^2 ln c) only with --allow-below-T-min")
    st.add_argument("--allow-below-T-min", action="store_true",
                    help="accept T < T_min (sub-pixel diffeos); T whose diffeos are round-off is refused")
    st.add_argument("--noise-norm", choices=("mean", "per_image"), default="mean",
                    help="norm of the noise: the mean ||tau x - x|| over images and draws (default, the "
                    "paper's) or each image's own ||tau x - x||")
    st.add_argument("--max-hours", type=float, default=24.0,
                    help="refuse when the time measured on the first batch extrapolates beyond this "
                    "(default 24)")
    st.add_argument("--n-repeats", type=_count, default=1, help="diffeo/noise draws per image (default 1)")
    st.add_argument("--estimator", choices=("mean", "median"), default="mean", help="average or median")
    st.add_argument("--batch-size", type=_count, default=128, help="images per forward pass")
    st.add_argument("--size", type=_count, default=None, help="resize folder images to SIZE x SIZE")
    st.add_argument("--grayscale", action="store_true", help="read folder images as one channel")
    st.add_argument("--max-images", type=_count, default=None, help="use the first N images only")
    add_device_argument(st, help="where the model and the deformations run")
    st.add_argument("--seed", type=int, default=0, help="seed of the diffeos and the noise")
    st.set_defaults(func=_stability)

    ex = dsub.add_parser(
        "experiment", allow_abbrev=False,
        help="the diffeo-stability experiment on your own labelled images (e.g. CIFAR-10 as PNGs)",
        description="Train the four small nets of the diffeo-stability experiment on your images (one "
        "subfolder per class: DIR/<class>/*.png) and judge the paper's claims on them with the experiment's "
        "rules, including the in-support noise control. Writes OUT/diffeo-stability/ (claims, tables, "
        "figures), readable by `layerwise report OUT`.",
    )
    ex.add_argument("--images", required=True, metavar="DIR", help="DIR/<class>/*.png|jpg (>= 2 classes)")
    ex.add_argument("--out", required=True, metavar="OUT", help="output folder")
    ex.add_argument("--scale", choices=("quick", "full"), default="quick",
                    help="quick: 3 training-set sizes x 180 steps, 1 seed; full: 6 sizes x 2000 steps, "
                    "3 seeds")
    ex.add_argument("--size", type=_count, default=32, help="resize every image to SIZE x SIZE (default 32)")
    ex.add_argument("--grayscale", action="store_true", help="read one channel")
    ex.add_argument("--max-per-class", type=_count, default=None, help="use at most N images per class")
    ex.add_argument("--train-sizes", type=_count, nargs="+", default=None,
                    help="training-set sizes P (default: the scale's)")
    add_device_argument(ex, help="where the nets train and R_f is measured")
    ex.set_defaults(func=_experiment)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .._io import check_output_file, save_figure
    from .._validation import check_int
    from ..diffeo import log_temperatures, plot_sample_grid, sample_grid
    from ..diffeo.io import read_image

    check_int("--T-steps", args.T_steps, low=1, high=MAX_T_STEPS)
    check_int("--c", args.c, low=2)
    if args.size is not None:
        check_int("--size", args.size, low=2)
    out = check_output_file(args.out, overwrite=args.overwrite, inputs=[args.image])
    image = read_image(args.image, size=args.size)
    side = min(image.shape[-2:])
    temps = log_temperatures(side, args.c, args.T_steps)
    grid = sample_grid(image, args.c, temps, seed=args.seed, mode=args.mode)
    fig = plot_sample_grid(image, grid, title=f"{Path(args.image).name}: c = {args.c}, T from T_min to T_max")
    save_figure(fig, out)
    shown = ", ".join(f"{t:.2e} ({d:.2g} px)" for t, d in zip(temps, grid["displacement_px"], strict=True))
    print(f"wrote {args.out}: T (typical displacement at the centre) = {shown}")
    return 0


def _stability(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .._device import resolve_device
    from .._io import atomic_directory, check_output_dir, write_csv, write_json
    from .._validation import check_float
    from ..diffeo import relative_stability
    from ..diffeo.io import check_model_accepts, load_model, read_images

    device = resolve_device(args.device, name="--device")  # a bad --device: one line, before any work
    max_hours = check_float("--max-hours", args.max_hours, low=0.0, low_open=True)
    inputs = [args.images] + ([args.weights] if args.weights else [])
    out = check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)
    model = load_model(args.model, args.weights).to(device).eval()
    images = read_images(args.images, size=args.size, grayscale=args.grayscale, max_images=args.max_images)
    images = images.to(device)
    check_model_accepts(model, images, args.model)
    layers = None if args.layers is None else ["" if name == "output" else name for name in args.layers]
    results = relative_stability(model, images, layers=layers, c=args.c, T=args.T, n_repeats=args.n_repeats,
                                 estimator=args.estimator, batch_size=args.batch_size,
                                 noise_norm=args.noise_norm, allow_below_T_min=args.allow_below_T_min,
                                 max_seconds=3600.0 * max_hours, seed=args.seed, progress=True)
    rows = [{**r.to_dict(), "layer": r.layer or "output"} for r in results.values()]
    settings = {k: getattr(args, k) for k in ("model", "weights", "images", "c", "T", "n_repeats",
                                               "estimator", "noise_norm", "batch_size", "size", "seed")}
    settings["images_shape"] = list(images.shape)
    with atomic_directory(out) as tmp:
        write_json(tmp / "stability.json", {"settings": settings, "layers": rows})
        write_csv(tmp / "stability.csv", rows)
    for r in rows:
        print(f"{r['layer']}: D_f = {r['D']:.4g}, G_f = {r['G']:.4g}, R_f = {r['R']:.4g}")
    print(f"wrote {Path(args.out) / 'stability.json'} and stability.csv")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .._validation import check_int
    from ..errors import InputDataError, ParameterError
    from ..experiments import run_experiment
    from ..experiments._base import check_device

    device = check_device(args.device, name="--device")  # a bad --device: one line, before any work
    check_int("--size", args.size, low=8)
    if args.size % 4:
        raise ParameterError(f"--size must be divisible by 4 (the nets pool by 4), got {args.size}")
    if not Path(args.images).is_dir():
        raise InputDataError(f"--images {args.images} is not a folder")
    overrides = {"image_folder": str(args.images), "folder_size": args.size,
                 "folder_grayscale": args.grayscale, "folder_max_per_class": args.max_per_class}
    if args.train_sizes is not None:
        for P in args.train_sizes:
            check_int("--train-sizes", P, low=2)
        overrides["train_sizes"] = tuple(args.train_sizes)
    summary = run_experiment("diffeo-stability", args.out, scale=args.scale, device=device, **overrides)
    print(f"wrote {Path(args.out) / 'diffeo-stability'} ({summary.get('runtime_s', 0):.0f} s); "
          f"`layerwise report {args.out}` renders it")
    return 0
