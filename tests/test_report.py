"""The reproduction report: claims stored by run_experiment, the scorecard, the page, `layerwise report`."""

from __future__ import annotations

import base64
import csv
import json
import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from layerwise._registry import Registry
from layerwise.cli import main
from layerwise.experiments import EXPERIMENTS, Experiment, run_experiment
from layerwise.experiments._results import split_summary
from layerwise.experiments.claims import SYSTEMS, Claim, Table, verdict_from, verdict_within
from layerwise.report import NOT_BUILT, NOT_RUN, build_report, load_results, run_times, scorecard


# ------------------------------------------------------------------------------------------- fixtures
def _png(path: Path, width: int = 3, height: int = 2) -> None:
    """A valid RGB PNG written by hand (no matplotlib needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes([200, 30, 30] * width) for _ in range(height))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _fake_run(target: float, system: str):
    """An experiment whose one claim is "2 + 2 equals `target`": the rule is fixed here, before the run."""

    def run(config, out: Path) -> dict:
        measured = 2.0 + 2.0
        _png(out / "curve.png")
        return {
            "value": measured,
            "greedy:chair_s": 0.5,  # a flat key of the old style: must never reach the page
            "claims": [Claim(system=system, paper="Doe et al., 2024", where="Fig. 1",
                             claim=f"two plus two is {target:g}", paper_value=f"{target:g}",
                             measured=f"{measured:g}", verdict=verdict_within(measured, target, 0.1),
                             rule="within +-0.1 of the paper's value")],
            "tables": [Table(name="sums", caption="sums by method", columns=("method", "sum"),
                             rows=({"method": "a", "sum": 4.0}, {"method": "b, c", "sum": "4 +- 0 (2)"}))],
            "figures": {"curve.png": "the curve should rise"},
            "text": "Adds two and two.\n\nSecond paragraph.",
        }

    return run


@pytest.fixture
def fake_experiments(monkeypatch):
    """Register two fake experiments in the real registry: one whose rule passes, one whose rule fails."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Config:
        n: int = 1

    added = {
        "zz-pass": Experiment(name="zz-pass", run=_fake_run(4.0, SYSTEMS[0]), scales={"quick": Config()},
                              description="a fake that reproduces", systems=(SYSTEMS[0],)),
        "aa-fail": Experiment(name="aa-fail", run=_fake_run(5.0, SYSTEMS[8]), scales={"quick": Config()},
                              description="a fake that does not", systems=(SYSTEMS[8],)),
    }
    for name, exp in added.items():
        monkeypatch.setitem(EXPERIMENTS._items, name, exp)
    return added


class _Checker(HTMLParser):
    """Collects tags (checking that they nest), ids, local links, images and visible text."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.rows: list[list[str]] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "a" and attrs.get("href", "").startswith("#"):
            self.links.append(attrs["href"][1:])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("style", "script"):
            self._skip += 1
        if tag == "tr":
            self.rows.append([])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if tag in ("style", "script"):
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)
            if self.rows and "tr" in self.stack:
                self.rows[-1].append(data)


def _parse(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    return checker


def _rows_with(checker: _Checker, needle: str) -> list[str]:
    return [text for text in ("".join(r) for r in checker.rows) if needle in text]


# ------------------------------------------------------------------------------------------- storage
def test_run_experiment_stores_claims_tables_figures_and_provenance(tmp_path, fake_experiments):
    summary = run_experiment("zz-pass", tmp_path)
    folder = tmp_path / "zz-pass"
    assert set(summary) == {"value", "greedy:chair_s", "runtime_s"}  # the reserved keys are taken out
    assert json.loads((folder / "summary.json").read_text()) == summary
    claims = json.loads((folder / "claims.json").read_text())
    assert claims["text"].startswith("Adds two")
    assert claims["figures"] == {"curve.png": "the curve should rise"}
    assert [c["verdict"] for c in claims["claims"]] == ["reproduced"]
    with open(folder / "tables" / "sums.csv", newline="") as fh:
        assert list(csv.reader(fh)) == [["method", "sum"], ["a", "4.0"], ["b, c", "4 +- 0 (2)"]]
    run = json.loads((folder / "run.json").read_text())
    assert run["scale"] == "quick" and run["runtime_s"] == summary["runtime_s"] >= 0
    assert run["layerwise_version"] and run["machine"]["cores"] >= 1 and "gpu" in run["machine"]
    (result,) = load_results(tmp_path)
    assert result.claims[0].claim == "two plus two is 4" and result.parts.tables[0].rows[0]["sum"] == 4.0


def test_split_summary_rejects_malformed_report_parts():
    claim = Claim(SYSTEMS[0], "p", "w", "c", "1", "1", verdict_from(True), "r")
    with pytest.raises(TypeError, match="claims"):
        split_summary({"claims": claim})  # not a list
    with pytest.raises(TypeError, match="must be a Claim"):
        split_summary({"claims": ["reproduced"]})
    with pytest.raises(TypeError, match="figures"):
        split_summary({"figures": {"a.png": 3}})
    with pytest.raises(ValueError, match="PNG file names"):
        split_summary({"figures": {"../a.png": "x"}})
    table = Table(name="t", caption="c", columns=("a",), rows=({"a": 1},))
    with pytest.raises(ValueError, match="duplicate"):
        split_summary({"tables": [table, table]})
    flat, parts = split_summary({"x": 1, "claims": [claim.to_dict()]})
    assert flat == {"x": 1} and parts.claims == (claim,)


def test_experiment_refuses_an_unknown_system():
    with pytest.raises(ValueError, match="not in"):
        Experiment(name="x", run=lambda c, o: {}, scales={}, description="", systems=("Astrology",))


# ------------------------------------------------------------------------------------------- scorecard
def test_scorecard_lists_every_claim_and_tells_not_run_from_not_built(tmp_path, fake_experiments):
    reg: Registry[Experiment] = Registry("experiment")
    for name, exp in fake_experiments.items():
        reg.register(name, exp)
    reg.register("registered-only", Experiment(name="registered-only", run=_fake_run(4.0, SYSTEMS[3]),
                                               scales={}, description="", systems=(SYSTEMS[3],)))
    run_experiment("zz-pass", tmp_path)
    run_experiment("aa-fail", tmp_path)
    rows = scorecard(load_results(tmp_path), reg)
    status = {}
    for row in rows:
        status.setdefault(row.system, []).append(row.status)
    assert list(status) == list(SYSTEMS)  # every system, in order
    assert status[SYSTEMS[0]] == ["reproduced"]
    assert status[SYSTEMS[8]] == ["not reproduced"]
    assert status[SYSTEMS[3]] == [NOT_RUN]
    assert all(status[s] == [NOT_BUILT] for s in SYSTEMS if s not in (SYSTEMS[0], SYSTEMS[3], SYSTEMS[8]))


def test_report_shows_each_registered_experiment_and_verdicts(tmp_path, fake_experiments):
    run_experiment("zz-pass", tmp_path)
    run_experiment("aa-fail", tmp_path)
    page = build_report(tmp_path).read_text()
    checker = _parse(page)
    # every claim in the folder is in the scorecard with its verdict, linking to its row in the section
    (passed,) = _rows_with(checker, "two plus two is 4")[:1]
    (failed,) = _rows_with(checker, "two plus two is 5")[:1]
    assert "reproduced" in passed and "not reproduced" not in passed
    assert "not reproduced" in failed
    assert "exp-zz-pass-c1" in checker.links and "exp-zz-pass-c1" in checker.ids
    # every registered experiment that did not run here: "not run" under each system it declares
    rows = {(r.system, r.status, r.experiment) for r in scorecard(load_results(tmp_path))}
    for name in EXPERIMENTS.names():
        if name not in fake_experiments and EXPERIMENTS.get(name).systems:  # (all do: see the next test)
            assert _rows_with(checker, f"{name} is registered but was not run"), name
            assert all((s, NOT_RUN, name) in rows for s in EXPERIMENTS.get(name).systems), name
    # a system is "not built" exactly when no registered experiment declares it
    declared = {s for n in EXPERIMENTS.names() for s in EXPERIMENTS.get(n).systems}
    for system in SYSTEMS:
        assert ((system, NOT_BUILT, None) in rows) == (system not in declared), system
    table = page[page.index('<table class="score"'):]
    table = table[: table.index("</table>")]
    assert table.count("\u00b7 not built</span>") == len(set(SYSTEMS) - declared)


def test_sections_name_the_device_that_computed_the_numbers(tmp_path, fake_experiments):
    run_experiment("zz-pass", tmp_path)
    page = build_report(tmp_path).read_text()
    assert "device: cpu" in page and "--device" not in page  # the default needs no flag in the command
    run_file = tmp_path / "zz-pass" / "run.json"
    run = json.loads(run_file.read_text())
    run_file.write_text(json.dumps({**run, "device": "cuda:1"}))
    page = build_report(tmp_path).read_text()
    assert "device: cuda:1" in page and "layerwise reproduce zz-pass --scale quick --device cuda:1" in page


def test_every_registered_experiment_declares_its_systems():
    """Without `systems`, an experiment that was not run would leave its system looking "not built"."""
    missing = [n for n in EXPERIMENTS.names() if not EXPERIMENTS.get(n).systems]
    assert not missing, f"register these with systems=(...): {missing}"


# ------------------------------------------------------------------------------------------- the page
def test_page_parses_links_resolve_images_inline_no_flat_keys(tmp_path, fake_experiments):
    run_experiment("zz-pass", tmp_path)
    run_experiment("aa-fail", tmp_path)
    page = build_report(tmp_path).read_text()
    checker = _parse(page)
    assert not checker.errors and not checker.stack
    assert len(checker.ids) == len(set(checker.ids))
    assert set(checker.links) <= set(checker.ids)
    assert len(checker.images) == 2
    for src in checker.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    text = " ".join(checker.text)
    assert "greedy:chair_s" not in page
    assert not re.search(r"[A-Za-z_][\w=.+-]*:[A-Za-z_]", text), re.findall(r"\S+:\S+", text)
    assert "the curve should rise" in text and "sums by method" in text and "Second paragraph." in text
    assert 'href="zz-pass/tables/sums.csv"' in page


def test_sections_are_ordered_by_system_and_hidden_folders_are_ignored(tmp_path, fake_experiments):
    run_experiment("aa-fail", tmp_path)  # M3ID, the last system
    run_experiment("zz-pass", tmp_path)  # Random Hierarchy Model, the first
    leftover = tmp_path / ".zz-pass.abc123.old"
    leftover.mkdir()
    (leftover / "summary.json").write_text("{}")
    page = build_report(tmp_path).read_text()
    assert page.index('id="exp-zz-pass"') < page.index('id="exp-aa-fail"')
    assert ".zz-pass.abc123.old" not in page
    assert [r.name for r in load_results(tmp_path)] == ["aa-fail", "zz-pass"]


def test_run_times_lists_each_experiment_and_the_total(tmp_path, fake_experiments):
    run_experiment("zz-pass", tmp_path)
    run_experiment("aa-fail", tmp_path)
    text = run_times(tmp_path, ["zz-pass", "aa-fail"])
    lines = text.splitlines()
    assert lines[1].startswith("zz-pass") and "1 reproduced" in lines[1]
    assert lines[2].startswith("aa-fail") and "1 not reproduced" in lines[2]
    assert lines[-1].startswith("total")


# ------------------------------------------------------------------------------------------- the command
def test_layerwise_report_rebuilds_the_page(tmp_path, fake_experiments, capsys):
    run_experiment("zz-pass", tmp_path)
    assert main(["report", str(tmp_path), "--title", "My check"]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (tmp_path / "report.html").read_text()
    assert "<title>My check</title>" in page and "two plus two is 4" in page


def test_layerwise_report_bad_folder_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and "Traceback" not in err
    assert main(["report", str(tmp_path)]) == 2  # a folder without results
    assert "no experiment results" in capsys.readouterr().err


def test_reproduce_prints_each_experiments_time_at_the_end(tmp_path, fake_experiments, capsys):
    assert main(["reproduce", "zz-pass", "aa-fail", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("experiment  "):]
    runtimes = {n: json.loads((tmp_path / n / "run.json").read_text())["runtime_s"] for n in fake_experiments}
    assert re.search(rf"zz-pass\s+quick\s+{runtimes['zz-pass']:.1f} s\s+1 reproduced", table)
    assert re.search(rf"aa-fail\s+quick\s+{runtimes['aa-fail']:.1f} s\s+1 not reproduced", table)
    assert "total" in table and "report.html" in out


def test_docstring_examples_of_the_report_modules_run():
    import doctest

    from layerwise import _provenance
    from layerwise.experiments import claims

    for module in (claims, _provenance):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_an_experiment_declaring_no_system_is_still_named(tmp_path, fake_experiments):
    reg: Registry[Experiment] = Registry("experiment")
    reg.register("zz-pass", fake_experiments["zz-pass"])
    reg.register("no-system", Experiment(name="no-system", run=_fake_run(4.0, SYSTEMS[0]), scales={},
                                         description=""))
    run_experiment("zz-pass", tmp_path)
    page = build_report(tmp_path, registry=reg).read_text()
    assert "declaring no system (so not placed above): <b>no-system</b>" in page
    run_experiment("aa-fail", tmp_path)  # not in `reg`: still shown, placed by the system of its claims
    page = build_report(tmp_path, registry=reg).read_text()
    assert page.index('id="exp-zz-pass"') < page.index('id="exp-aa-fail"')
