"""Claims: the unit of the reproduction report. Each experiment states the papers' findings it tests.

A :class:`Claim` pairs a paper's finding (and number) with what this run measured and a verdict decided
by a rule written in the experiment's code *before* the run (see the report format in ``ARCHITECTURE.md``).
A :class:`Table` is a compact result table (rows = settings or methods, columns = metrics, cells usually
"mean +- std (n)"), written as CSV next to the experiment's results and shown in the report.

An experiment's ``run(config, out)`` returns its summary dict with two reserved keys::

    {"claims": [Claim(...), ...], "tables": [Table(...), ...], <other key numbers>...}

>>> c = Claim(system=SYSTEMS[0], paper="Cagnetta et al., PRX 2024", where="Sec. II",
...           claim="all P_max data are distinct", paper_value="P_max distinct", measured="4096 of 4096",
...           verdict=verdict_from(True), rule="every enumerated datum distinct")
>>> c.verdict
'reproduced'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "SYSTEMS",
    "VERDICTS",
    "Claim",
    "Table",
    "verdict_from",
    "verdict_within",
    "verdict_exponent",
    "EXPONENT_RULE",
    "mean_std",
    "format_mean_std",
]

# The nine systems, in the order the report's scorecard lists them.
SYSTEMS: tuple[str, ...] = (
    "Random Hierarchy Model",
    "Diffusion on hierarchical data",
    "Convolutional kernels & locality",
    "Deep hierarchical CNN kernels",
    "Diffeomorphism stability",
    "Task arithmetic",
    "Tangent-space fine-tuning",
    "LiNeS",
    "M3ID",
)

VERDICTS: tuple[str, ...] = ("reproduced", "partly", "not reproduced", "not tested at this scale")


@dataclass(frozen=True)
class Claim:
    """One finding of a paper, tested by one experiment.

    Attributes
    ----------
    system : one of :data:`SYSTEMS`.
    paper : short citation, e.g. ``"Sclocchi, Favero, Wyart, PNAS 2025"``.
    where : figure, table or section of the paper, e.g. ``"Fig. 2"``.
    claim : the finding in one sentence.
    paper_value : the paper's (or the theory's) number, with unit.
    measured : this run's number with its uncertainty and sample size.
    verdict : one of :data:`VERDICTS`.
    rule : how the verdict was decided, fixed in code before the run.
    """

    system: str
    paper: str
    where: str
    claim: str
    paper_value: str
    measured: str
    verdict: str
    rule: str

    def __post_init__(self) -> None:
        if self.system not in SYSTEMS:
            raise ValueError(f"Claim.system must be one of {list(SYSTEMS)}, got {self.system!r}")
        if self.verdict not in VERDICTS:
            raise ValueError(f"Claim.verdict must be one of {list(VERDICTS)}, got {self.verdict!r}")

    def to_dict(self) -> dict[str, str]:
        """The fields as a dict of strings (what claims.json stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Claim:
        """Rebuild a Claim from :meth:`to_dict`'s output."""
        return cls(**{k: str(data[k]) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Table:
    """A compact result table: ``rows`` are dicts sharing the keys ``columns`` (cells are str or numbers).

    ``name`` is a file-safe identifier (the CSV is ``<name>.csv``); ``caption`` says what to look at.
    """

    name: str
    caption: str
    columns: tuple[str, ...]
    rows: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.name or not all(ch.isalnum() or ch in "-_" for ch in self.name):
            raise ValueError(f"Table.name must be a non-empty file-safe identifier, got {self.name!r}")
        for i, row in enumerate(self.rows):
            missing = [c for c in self.columns if c not in row]
            if missing:
                raise ValueError(f"Table {self.name!r} row {i} lacks column(s) {missing}")

    def to_dict(self) -> dict[str, Any]:
        """``{name, caption, columns, rows}`` (what tables.json stores)."""
        return {"name": self.name, "caption": self.caption, "columns": list(self.columns),
                "rows": [dict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Table:
        """Rebuild a Table from :meth:`to_dict`'s output."""
        return cls(name=data["name"], caption=data["caption"], columns=tuple(data["columns"]),
                   rows=tuple(dict(r) for r in data["rows"]))


def verdict_from(passed: bool, partly: bool = False) -> str:
    """``"reproduced"`` if ``passed``, else ``"partly"`` if ``partly``, else ``"not reproduced"``."""
    if passed:
        return "reproduced"
    return "partly" if partly else "not reproduced"


def verdict_within(measured: float, target: float, tol: float, partly_tol: float | None = None) -> str:
    """Verdict of ``|measured - target| <= tol`` (``"partly"`` within ``partly_tol`` when given).

    A non-finite ``measured`` is ``"not reproduced"``.
    """
    if not math.isfinite(measured):
        return "not reproduced"
    gap = abs(measured - target)
    return verdict_from(gap <= tol, partly_tol is not None and gap <= partly_tol)


# Relative tolerances of :func:`verdict_exponent` (fixed before any run; see its docstring).
EXPONENT_REL_TOL, EXPONENT_REL_PARTLY = 0.20, 0.40
EXPONENT_RULE = ("reproduced if the 95% interval covers the prediction or |beta - prediction| <= "
                 f"{EXPONENT_REL_TOL:.0%} of the prediction; partly within {EXPONENT_REL_PARTLY:.0%}; "
                 "else not reproduced")


def verdict_exponent(beta: float, predicted: float, low: float, high: float) -> str:
    """Verdict of a measured exponent ``beta`` (95% interval ``[low, high]``) against a prediction.

    A rule that scales with the prediction (an absolute tolerance would call 0.2 against 1/8 a success):

    - ``"reproduced"`` if ``low <= predicted <= high`` or ``|beta - predicted| <= 0.2 |predicted|``;
    - ``"partly"`` if ``|beta - predicted| <= 0.4 |predicted|``;
    - ``"not reproduced"`` otherwise, and for a non-finite ``beta``.

    ``predicted`` must be non-zero (a zero prediction, such as a plateau, needs an absolute rule).
    :data:`EXPONENT_RULE` states the rule in words for ``Claim.rule``.

    >>> verdict_exponent(0.200, 0.125, 0.187, 0.211), verdict_exponent(0.26, 0.25, 0.27, 0.30)
    ('not reproduced', 'reproduced')
    """
    if predicted == 0 or not math.isfinite(predicted):
        raise ValueError(f"predicted must be finite and non-zero, got {predicted}")
    if not math.isfinite(beta):
        return "not reproduced"
    gap = abs(beta - predicted)
    covered = math.isfinite(low) and math.isfinite(high) and low <= predicted <= high
    return verdict_from(covered or gap <= EXPONENT_REL_TOL * abs(predicted),
                        gap <= EXPONENT_REL_PARTLY * abs(predicted))


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """Format ``values`` as ``"mean +- std (n)"`` (sample std, ddof=1; std 0 for one value)."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return "n/a (0)"
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return format_mean_std(mean, std, n, digits)


def format_mean_std(mean: float, std: float, n: int, digits: int = 3) -> str:
    """``"mean +- std (n)"`` from precomputed numbers (same format as :func:`mean_std`).

    >>> format_mean_std(0.12345, 0.0321, 5)
    '0.123 +- 0.032 (5)'
    """
    return f"{mean:.{digits}g} +- {std:.2g} ({n})"
