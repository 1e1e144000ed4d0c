"""Checks of the alerts and the dashboard that promtool cannot make, and the rule file it tests.

Usage: python deploy/check_alerts.py OUT_DIR (run by deploy/validate.sh, which then runs
`promtool check rules` and `promtool test rules` in OUT_DIR).

Writes the PrometheusRule's groups to OUT_DIR/playing-with-neon.rules.yaml, as a plain rule file,
beside a copy of deploy/alerts-test.yaml. Checks that every alert has a summary, a description
and a runbook_url whose anchor is a section of docs/runbook.md; that deploy/alerts-test.yaml
has, for every alert, a case where it fires and one where it must not; and that every dashboard
panel queries this service's job through the dashboard's data source variable.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "k8s/monitoring/prometheusrule.yaml"
DASHBOARD = ROOT / "k8s/monitoring/dashboard.json"
UNIT_TESTS = ROOT / "deploy/alerts-test.yaml"
RUNBOOK = ROOT / "docs/runbook.md"
RULE_FILE = "playing-with-neon.rules.yaml"
JOB_SELECTOR = 'job="playing-with-neon-service"'
ANNOTATIONS = ("summary", "description", "runbook_url")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation gone, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_anchors(markdown: str) -> set[str]:
    """The anchors of the runbook's headings."""
    return {github_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", markdown, re.MULTILINE)}


def alerts(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every alerting rule of the groups."""
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def check_alerts(groups: list[dict[str, Any]], anchors: set[str]) -> list[str]:
    """Each alert: its annotations, a runbook section, this service's job in its expression."""
    problems = []
    for rule in alerts(groups):
        name = rule["alert"]
        annotations = rule.get("annotations", {})
        problems += [f"{name}: no {key}" for key in ANNOTATIONS if not annotations.get(key)]
        anchor = annotations.get("runbook_url", "").partition("#")[2]
        if anchor not in anchors:
            problems.append(f"{name}: runbook_url's #{anchor} is no section of docs/runbook.md")
        if anchor != name.lower():
            problems.append(f"{name}: its runbook section should be #{name.lower()}")
        if JOB_SELECTOR not in rule["expr"]:
            problems.append(f"{name}: its expression does not select {JOB_SELECTOR}")
        if "severity" not in rule.get("labels", {}):
            problems.append(f"{name}: no severity label")
    return problems


def check_unit_tests(groups: list[dict[str, Any]], tests: dict[str, Any]) -> list[str]:
    """Every alert fires in some test case, and is expected silent in another."""
    fires: set[str] = set()
    silent: set[str] = set()
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    problems = []
    for rule in alerts(groups):
        name = rule["alert"]
        if name not in fires:
            problems.append(f"{name}: no unit test in which it fires")
        if name not in silent:
            problems.append(f"{name}: no unit test in which it must not fire")
    if tests.get("rule_files") != [RULE_FILE]:
        problems.append(f"deploy/alerts-test.yaml: rule_files must be [{RULE_FILE}]")
    return problems


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expression) for every query of every panel, rows' panels included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target.get("expr", "")))
    return found


def check_dashboard(dashboard: dict[str, Any]) -> list[str]:
    """Each panel queries the dashboard's data source, for this service's job and namespace."""
    problems = []
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    if not {"datasource", "namespace"} <= variables:
        problems.append("dashboard: needs the variables datasource and namespace")
    ids = [panel["id"] for panel in dashboard["panels"]]
    if len(ids) != len(set(ids)):
        problems.append("dashboard: panel ids repeat")
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        title = panel["title"]
        if not panel.get("targets"):
            problems.append(f"dashboard panel {title!r}: no query")
        sources = [panel.get("datasource"), *(t.get("datasource") for t in panel["targets"])]
        if any(source != {"type": "prometheus", "uid": "${datasource}"} for source in sources):
            problems.append(f"dashboard panel {title!r}: not on the ${{datasource}} variable")
        if not panel.get("description"):
            problems.append(f"dashboard panel {title!r}: no description")
    for title, expr in panel_queries(dashboard):
        if JOB_SELECTOR not in expr or 'namespace="$namespace"' not in expr:
            problems.append(f"dashboard panel {title!r}: {expr!r} misses the job or namespace")
    return problems


def main(out_dir: Path) -> int:
    spec = yaml.safe_load(RULES.read_text())["spec"]
    groups = spec["groups"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RULE_FILE).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    shutil.copy(UNIT_TESTS, out_dir / UNIT_TESTS.name)
    problems = check_alerts(groups, runbook_anchors(RUNBOOK.read_text()))
    problems += check_unit_tests(groups, yaml.safe_load(UNIT_TESTS.read_text()))
    problems += check_dashboard(json.loads(DASHBOARD.read_text()))
    for problem in problems:
        print(problem)
    if problems:
        return 1
    queries = len(panel_queries(json.loads(DASHBOARD.read_text())))
    print(
        f"{len(alerts(groups))} alerts, each with its annotations, its runbook section and unit "
        f"tests firing and silent; {queries} dashboard queries on the job and namespace"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
