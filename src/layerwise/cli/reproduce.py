"""``layerwise reproduce``: run registered experiments and build the HTML report."""

from __future__ import annotations

import argparse

# The experiments and scales for --help, written out so that building the parser imports neither torch nor
# the experiment modules (``layerwise --help`` stays fast). tests/test_cli_safety.py checks that this list
# equals the registry (names, order and descriptions): add a line here when registering an experiment.
SCALES = ("quick", "full")
EXPERIMENT_INDEX: tuple[tuple[str, str], ...] = (
    ("rhm-stats", "RHM enumeration checks and class-tuple correlations vs sqrt(v/m^L)"),
    ("phase-transition",
     "RHM forward-backward with exact BP: class kept vs noise, sharp at eps* (PNAS 2025)"),
    ("chunks", "RHM forward-backward: correlated chunks of changes; chi peaks at the transition (ICLR 2025)"),
    ("rhm-learning",
     "deep CNNs learn the RHM from P* ~ n_c m^L data; synonymic sensitivity; shallow baseline"),
    ("locality", "local/conv kernel teacher-student exponents beta = 1/s (Favero et al., NeurIPS 2021)"),
    ("deep-kernels",
     "hierarchical CNN kernels: spectra, teacher-student rates (Cagnetta et al., ICML 2023)"),
    ("diffeo-stability",
     "relative stability R_f to diffeomorphisms vs noise, at init and after training, against test error"),
    ("task-arithmetic",
     "task addition/negation, weight disentanglement: non-linear vs tangent-space fine-tuning"),
    ("lines", "LiNeS: single-task forgetting vs uniform scaling; multi-task merging with/without LiNeS"),
    ("m3id", "M3ID vs greedy vs M3ID+DPO on a toy Llava: CHAIR, Cover, POPE over seeds"),
    ("m3id-long", "M3ID where reliance on the image fades: diagnostic, greedy vs M3ID over 5 seeds"),
)


# --flag (argparse dest) -> SweepOptions field; a flag left out keeps the SweepOptions default.
_SLURM_OPTIONS = (("partition", "partition"), ("account", "slurm_account"), ("qos", "slurm_qos"),
                  ("time_min", "slurm_timeout_min"), ("cpus_per_job", "slurm_cpus_per_task"),
                  ("mem_gb", "slurm_mem_gb"), ("gpus_per_job", "slurm_gpus_per_job"),
                  ("array_parallelism", "slurm_array_parallelism"),
                  ("points_per_job", "slurm_points_per_job"), ("requeue", "slurm_requeue"),
                  ("slurm_cluster", "slurm_cluster"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    names = "\n".join(f"  {n:<18} {description}" for n, description in EXPERIMENT_INDEX)
    p = sub.add_parser(
        "reproduce",
        help="run the papers' experiments, write results, figures and report.html",
        description="Run experiments from the registry into OUT/<name>/ and build OUT/report.html.",
        epilog=f"experiments:\n{names}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("names", nargs="*", default=["all"], metavar="NAME", help="experiment names, or 'all'")
    p.add_argument("--scale", choices=SCALES, default="quick", help="quick (CPU minutes) or full")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    from .._device import add_device_argument

    add_device_argument(p, help="where the experiments' training, BP and Gram matrices run (every sweep "
                                "point gets it; rhm-stats always runs on the CPU)")
    g = p.add_argument_group("sweeps (each experiment's grid of settings and seeds runs on the sweep runner)")
    g.add_argument("--executor", choices=("inprocess", "process", "dask", "slurm"), default="inprocess",
                   help="where sweep points run: this process (default), a local spawn process pool, Dask "
                        "distributed (extra 'dask') or SLURM via submitit (extra 'slurm')")
    g.add_argument("--workers", type=int, default=None,
                   help="worker processes of the process pool / LocalCluster (default: min(4, CPUs))")
    g.add_argument("--resume", action="store_true",
                   help="reuse the finished sweep points kept in OUT/.sweeps/ by an earlier (interrupted) "
                        "run")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="--executor dask: scheduler address tcp://HOST:PORT of an existing Dask cluster "
                        "(default: start a LocalCluster)")
    s = p.add_argument_group("SLURM jobs (--executor slurm)")
    s.add_argument("--partition", help="SLURM partition")
    s.add_argument("--account", help="SLURM account charged for the jobs")
    s.add_argument("--qos", help="SLURM quality of service")
    s.add_argument("--time-min", type=int, metavar="MINUTES", help="time limit of each job (default: 60)")
    s.add_argument("--cpus-per-job", type=int, metavar="N", help="CPUs per job (default: 1)")
    s.add_argument("--mem-gb", type=float, metavar="GB", help="memory per job (default: the cluster's)")
    s.add_argument("--gpus-per-job", type=int, metavar="N", help="GPUs per job (default: 0)")
    s.add_argument("--array-parallelism", type=int, metavar="N",
                   help="run at most N jobs of the job array at once (default: submitit's, 256)")
    s.add_argument("--points-per-job", type=int, metavar="N",
                   help="sweep points run one after the other by each job (default: 1); results are still "
                        "one file per point")
    s.add_argument("--requeue", action="store_true", default=None,
                   help="requeue jobs that are preempted or time out; they skip the points they had finished")
    s.add_argument("--slurm-cluster", choices=("local", "debug"),
                   help="run the jobs on this machine with submitit's local (subprocesses) or debug (this "
                        "process) stand-in; without it, --executor slurm refuses where no SLURM cluster is "
                        "reachable (no sbatch)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .._io import check_output_dir
    from ..experiments import EXPERIMENTS, run_experiment
    from ..report import build_report, check_report_target, run_times

    if args.list:
        for name in EXPERIMENTS.names():
            print(f"{name:<18} {EXPERIMENTS.get(name).description}")
        return 0
    names = EXPERIMENTS.names() if args.names in (["all"], []) else list(args.names)
    # Fail before running anything: unknown names, missing extras, an output folder that is a file or
    # holds an experiment folder that layerwise did not write.
    for name in names:
        EXPERIMENTS.get(name).check_extras()
    # Sweep settings (rhm-learning...): validated here too, before anything is written.
    from pathlib import Path

    from ..sweep import SweepOptions, check_slurm_cluster, sweep_options

    if args.executor in ("dask", "slurm"):
        from .._extras import require_extras

        require_extras(["dask" if args.executor == "dask" else "slurm"], f"--executor {args.executor}")
    sweep = dict(executor=args.executor, scheduler=args.scheduler, max_workers=args.workers,
                 resume=args.resume, store=str(Path(args.out) / ".sweeps"))
    slurm = {field: getattr(args, dest) for dest, field in _SLURM_OPTIONS if getattr(args, dest) is not None}
    if slurm and args.executor != "slurm":
        from ..errors import ParameterError

        flags = ", ".join("--" + dest.replace("_", "-") for dest, field in _SLURM_OPTIONS if field in slurm)
        raise ParameterError(f"{flags} only apply to --executor slurm, got --executor {args.executor}")
    sweep.update(slurm)
    if SweepOptions(**sweep).executor == "slurm":
        check_slurm_cluster(SweepOptions(**sweep))  # no SLURM here: one line now, not a silent local run
    from ..experiments._base import check_device

    with sweep_options(**sweep):  # points on a SLURM or remote Dask cluster: their nodes must have it
        device = check_device(args.device, name="--device")  # one line and exit 2, before any work
    out = check_output_dir(args.out, overwrite=True, collection=True)
    for name in names:
        check_output_dir(out / name, overwrite=True)
    check_report_target(out)  # never run for hours and then refuse to write the report
    with sweep_options(**sweep):
        for name in tqdm(names, desc="experiments", unit="exp"):
            where = device if EXPERIMENTS.get(name).uses_device else "cpu"
            tqdm.write(f"[layerwise] running {name} ({args.scale}, on {where}) -> {args.out}/{name}/")
            summary = run_experiment(name, args.out, scale=args.scale, device=device)
            tqdm.write(f"[layerwise] {name}: done in {summary.get('runtime_s')} s -> {args.out}/{name}/")
    report = build_report(args.out)
    print(run_times(args.out, names))  # per-experiment run times and verdicts
    print(f"report: {report}")
    return 0
