"""Renders the chart's alert rules for tests/prometheus.rs (run by scripts/chart-env.sh).

Renders every helm/trailhose/ci/*.yaml that enables the PrometheusRule with the Helm v4 Go SDK,
as scripts/check_chart.py does, and writes one JSON file:
  {"namespace": ..., "jobs": {mode: job}, "alerts": [{"case", "mode", "alert", "expr"}, ...]}
Each mode is its own release (`trailhose` for sqs, `trailhose-<mode>` otherwise), as a
deployment runs them, so each mode's alerts select only that mode's workers. `jobs` holds the
job label the Prometheus Operator gives each release's series (the Service name, or the
Service label named by the ServiceMonitor's `jobLabel`): the live test scrapes each worker
under its mode's labels.
"""

import copy
import json
import sys

import helm_python as helm
import yaml

from check_chart import CHART, NAMESPACE, RELEASE, by_kind, render


def job_label(docs):
    svc = by_kind(docs, "Service")[0]
    monitors = by_kind(docs, "ServiceMonitor")
    label = monitors[0]["spec"].get("jobLabel") if monitors else None
    return svc["metadata"]["labels"][label] if label else svc["metadata"]["name"]


def main():
    out = sys.argv[1]
    jobs, alerts = {}, []
    for path in sorted((CHART / "ci").glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        mode = helm.Chart.load(str(CHART)).merge_values(copy.deepcopy(values))["mode"]
        docs = render(values, name=RELEASE if mode == "sqs" else f"{RELEASE}-{mode}")
        rules = by_kind(docs, "PrometheusRule")
        if not rules:
            continue
        job = jobs.setdefault(mode, job_label(docs))
        if job != job_label(docs):
            sys.exit(f"render_alerts: {path.name} gives {mode} mode the job {job_label(docs)}, another file {job}")
        for pr in rules:
            for group in pr["spec"]["groups"]:
                for rule in group["rules"]:
                    alerts.append({"case": path.stem, "mode": mode, "alert": rule["alert"], "expr": rule["expr"].strip()})
    with open(out, "w") as f:
        json.dump({"namespace": NAMESPACE, "jobs": jobs, "alerts": alerts}, f, indent=1)
    print(f"render_alerts: {len(alerts)} alert rules from {len({a['case'] for a in alerts})} value sets into {out}")


if __name__ == "__main__":
    main()
