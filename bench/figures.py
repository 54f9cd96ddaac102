"""Whether the published figures describe today's code: every results file README.md and
BENCHMARKS.md cite, the benchmark and the commit that wrote it, and whether the code it
measures has changed since. It reads files and git's history; it runs no benchmark.

A results file is written by the command it records (`command`, `python -m bench.<name>`), and
by one line of the Makefile (`make bench` or `make bench-full`, `--out` naming the file); that
benchmark declares the paths it measures (`MEASURES` in its module). The commit that wrote the
file is the one it records (`versions.ptmoe_serve`, bench/provenance.py), or for a file written
before files recorded it, the commit that last changed the file. A file is stale when a commit
after that one changed a path its benchmark measures. A figure is a table or a section of the
documents; one that cites no results file is listed too, and so is a results file no document
cites (a figure no one reads, or one left behind when its text went).

    python -m bench.figures            # exit 1 where a cited file is missing, stale, records
                                       # no command or no Makefile line writes it, a table
                                       # cites no file, or a results file is cited nowhere
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "BENCHMARKS.md")
CITED = re.compile(r"bench/results/[\w.-]+\.(?:json|png)")
# Names a benchmark's MEASURES may use for the paths they stand for.
GROUPS = {
    # What a request goes through, and the vLLM it runs on (pinned in the constraints).
    "server": ("ptmoe_serve/api", "ptmoe_serve/engine", "ptmoe_serve/routing",
               "ptmoe_serve/adapters", "ptmoe_serve/config.py", "ptmoe_serve/cli.py",
               "ptmoe_serve/base_model.py", "ptmoe_serve/metrics.py", "ptmoe_serve/disk.py",
               "pyproject.toml", "constraints-cpu.txt"),
    "trainer": ("ptmoe_serve/train",),
}


@dataclass
class Citation:
    results: str  # the results file, relative to the repository
    places: list[str] = field(default_factory=list)  # document:line


@dataclass
class Verdict:
    results: str
    places: list[str]
    benchmark: str | None = None
    written_at: str | None = None
    problems: list[str] = field(default_factory=list)


def citations(root: Path = ROOT) -> dict[str, Citation]:
    """Each results file the documents cite, where; a plot stands for the file it plots."""
    cited: dict[str, Citation] = {}
    for document in DOCUMENTS:
        for number, line in enumerate((root / document).read_text().splitlines(), 1):
            for name in dict.fromkeys(CITED.findall(line)):
                name = name.removesuffix(".png") + ".json" if name.endswith(".png") else name
                places = cited.setdefault(name, Citation(name)).places
                if f"{document}:{number}" not in places:
                    places.append(f"{document}:{number}")
    return cited


def uncited_tables(root: Path = ROOT) -> list[str]:
    """The sections of BENCHMARKS.md that hold a table of figures but cite no results file."""
    found, section, lines, fenced = [], None, [], False

    def close():
        if section and any(re.match(r"\|\s*-{3}", line) for line in lines) \
                and not any(CITED.search(line) for line in lines):
            found.append(f"BENCHMARKS.md:{section[0]} {section[1]}")

    for number, line in enumerate((root / "BENCHMARKS.md").read_text().splitlines(), 1):
        fenced ^= line.startswith("```")
        if line.startswith("#") and not fenced:
            close()
            section, lines = (number, line.lstrip("# ").strip()), []
        else:
            lines.append(line)
    close()
    return found


def uncited_results(root: Path = ROOT) -> list[str]:
    """The results files in bench/results that no document cites."""
    cited = citations(root)
    return sorted(name for name in (str(p.relative_to(root))
                                    for p in (root / "bench" / "results").glob("*.json"))
                  if name not in cited)


def makefile_writers(root: Path = ROOT) -> dict[str, list[str]]:
    """Each results file a Makefile line writes (its `--out`), and the benchmarks that do."""
    writers: dict[str, list[str]] = {}
    for line in (root / "Makefile").read_text().splitlines():
        found = re.search(r"-m bench\.(\w+)\b.*--out (\S+)", line)
        if found:
            writers.setdefault(found[2], []).append(found[1])
    return writers


def measured_paths(benchmark: str, root: Path = ROOT) -> tuple[str, ...] | None:
    """The paths a benchmark module declares it measures (`MEASURES`), read without importing
    it; None where it declares none."""
    module = root / "bench" / f"{benchmark}.py"
    if not module.exists():
        return None
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "MEASURES" for t in node.targets):
            declared = ast.literal_eval(node.value)
            return tuple(p for name in declared for p in GROUPS.get(name, (name,)))
    return None


def judge(citation: Citation, root: Path = ROOT) -> Verdict:
    verdict = Verdict(citation.results, citation.places)
    path = root / citation.results
    if not path.exists():
        verdict.problems.append("missing")
        return verdict
    report = json.loads(path.read_text())
    parts = [report, *[v for v in report.values() if isinstance(v, dict)]] \
        if isinstance(report, dict) else []
    command = next((p["command"] for p in parts if isinstance(p.get("command"), str)), None)
    if command is None or not command.startswith("python -m bench."):
        verdict.problems.append("records no command")
        return verdict
    verdict.benchmark = command.split()[2].removeprefix("bench.")
    paths = measured_paths(verdict.benchmark, root)
    writers = makefile_writers(root).get(citation.results, [])
    if verdict.benchmark not in writers:
        verdict.problems.append(f"no Makefile line runs bench.{verdict.benchmark} "
                                f"--out {citation.results}")
    elif len(writers) > 1:
        verdict.problems.append(f"written by {len(writers)} Makefile lines")
    versions = next((p["versions"] for p in parts if isinstance(p.get("versions"), dict)), {})
    recorded = versions.get("ptmoe_serve")
    if recorded and recorded.endswith("-dirty"):
        # A file that lists its checkout's changes is dirty only where they touch what its
        # benchmark measures; one that does not list them is dirty throughout.
        changed = versions.get("uncommitted")
        if changed is None or any(PurePosixPath(path).is_relative_to(measured)
                                  for path in changed for measured in paths or ()):
            verdict.problems.append(f"written from uncommitted changes ({recorded})")
        recorded = recorded.removesuffix("-dirty")
    verdict.written_at = recorded or _git(root, "log", "-1", "--format=%h", "--",
                                          citation.results)
    if not verdict.written_at:
        verdict.problems.append("not committed")
        return verdict
    if not _git(root, "rev-parse", "--verify", "--quiet", f"{verdict.written_at}^{{commit}}"):
        # Without the commit there is nothing to compare with: a shallow clone, or a file
        # written from a commit that never reached this history.
        verdict.problems.append(f"written at {verdict.written_at}, a commit not in this history")
        return verdict
    if paths is None:
        verdict.problems.append(f"bench.{verdict.benchmark} declares no MEASURES")
        return verdict
    since = _git(root, "log", "--format=%h", f"{verdict.written_at}..HEAD", "--", *paths)
    if since:
        changes = since.split()
        verdict.problems.append(f"stale: what it measures changed in {len(changes)} "
                                f"commit{'s' * (len(changes) > 1)} since (newest {changes[0]})")
    return verdict


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()
    verdicts = [judge(c) for c in sorted(citations().values(), key=lambda c: c.results)]
    for v in verdicts:
        status = "; ".join(v.problems) or "current"
        print(f"{v.results}  (bench.{v.benchmark or '?'} at {v.written_at or '?'})  {status}\n"
              f"    cited at {', '.join(v.places)}")
    uncited = uncited_tables()
    for place in uncited:
        print(f"a table that cites no results file: {place}")
    unread = uncited_results()
    for name in unread:
        print(f"a results file no document cites: {name}")
    failing = [v for v in verdicts if v.problems]
    print(f"{len(verdicts)} results files cited, {len(failing)} failing; "
          f"{len(uncited)} tables citing none; {len(unread)} results files cited nowhere")
    sys.exit(1 if failing or uncited or unread else 0)


if __name__ == "__main__":
    main()
