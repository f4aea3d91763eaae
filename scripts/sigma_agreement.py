#!/usr/bin/env python3
"""Optional check: every Sigma rule of ../shared/sigma/ over ../shared/real-cloudtrail/, with
trailhose (`detect test`) and with an independent engine (PyPI pySigma + pysigma-backend-duckdb,
rules turned into SQL over a DuckDB table of the flattened events). Prints, per rule, the events
each matched and where they disagree. Skips (exit 0) when /work/shared is absent.

    python3 scripts/sigma_agreement.py [--trailhose target/debug/trailhose] [--shared /work/shared]

Known differences of the DuckDB backend (../shared/TOOLING.md): exact values compare
case-sensitively, `not` over a missing field never matches (SQL NULL), and a literal `_` or `%`
acts as a wildcard. Disagreements are listed so that they can be read, not failed on.
"""
import argparse
import glob
import gzip
import json
import os
import subprocess
import sys
import tempfile

VENV = "target/sigma-venv"
PINS = ["pysigma==1.5.1", "pysigma-backend-duckdb==0.1.4", "duckdb==2.0.1"]


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    probe = "import sigma, duckdb, sigma_backend_duckdb"
    if not (os.path.exists(py) and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0):
        print(f"installing {' '.join(PINS)} into {VENV}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PINS], check=True)
    return py


def flatten(v, prefix, out):
    if isinstance(v, dict):
        for k, x in v.items():
            flatten(x, f"{prefix}{k}.", out)
    elif isinstance(v, list):
        out[prefix[:-1]] = json.dumps(v)
    elif v is None:
        out[prefix[:-1]] = None
    elif isinstance(v, bool):
        out[prefix[:-1]] = "true" if v else "false"
    else:
        out[prefix[:-1]] = str(v)


def pysigma_side(files, rule_files, workdir):
    """Runs inside the venv: rule path -> (title, id, [(file, index)]) as JSON on stdout."""
    import duckdb
    from sigma_backend_duckdb import DuckDBBackend
    from sigma.collection import SigmaCollection

    rows, columns, canonical = [], set(), {}
    for f in files:
        for i, ev in enumerate(json.load(gzip.open(f))["Records"]):
            flat = {}
            if isinstance(ev, dict):
                flatten(ev, "", flat)
            flat["_file"], flat["_index"] = f, str(i)
            # DuckDB's column names are case-insensitive: `eventId` joins `eventID`.
            named = {}
            for k, x in flat.items():
                k = canonical.setdefault(k.lower(), k)
                if named.get(k) is None:
                    named[k] = x
            columns.update(named)
            rows.append(named)
    path = os.path.join(workdir, "flat.jsonl")
    with open(path, "w") as out:
        for r in rows:
            out.write(json.dumps(r) + "\n")
    con = duckdb.connect()
    cols = ", ".join(f"'{c}': 'VARCHAR'" for c in sorted(columns))
    con.execute(f"CREATE TABLE logs AS SELECT * FROM read_json('{path}', format='newline_delimited', columns={{{cols}}})")
    backend = DuckDBBackend()
    result = {}
    for rf in rule_files:
        try:
            coll = SigmaCollection.from_yaml(open(rf).read())
            rule = coll.rules[0]
            queries = backend.convert(coll)
            hits = set()
            for q in queries:
                for f, i in con.execute(f"SELECT _file, _index FROM ({q})").fetchall():
                    hits.add((f, int(i)))
            result[rf] = {"title": rule.title, "id": str(rule.id) if rule.id else rule.title, "hits": sorted(hits)}
        except Exception as e:  # a rule the backend cannot convert is reported, not fatal
            result[rf] = {"error": f"{type(e).__name__}: {e}"[:200]}
    print(json.dumps(result))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="/work/shared")
    ap.add_argument("--trailhose", default="target/debug/trailhose")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rules_root = os.path.join(args.shared, "sigma", "rules")
    events_root = os.path.join(args.shared, "real-cloudtrail", "s3")
    if not (os.path.isdir(rules_root) and os.path.isdir(events_root)):
        print(f"sigma_agreement: {args.shared} is absent; skipped")
        return 0
    files = sorted(glob.glob(os.path.join(events_root, "**", "*.json.gz"), recursive=True))
    rule_files = sorted(glob.glob(os.path.join(rules_root, "**", "*.yml"), recursive=True))
    if args.inner:
        with tempfile.TemporaryDirectory() as d:
            pysigma_side(files, rule_files, d)
        return 0

    # trailhose: every rule, every file, in one `detect test` run per rule file (so that a
    # rule's matches are attributed to its file).
    ours, refused = {}, {}
    for rf in rule_files:
        p = subprocess.run([args.trailhose, "detect", "test", "--rules", rf, *files], capture_output=True, text=True)
        if p.returncode != 0:
            refused[rf] = p.stderr.strip().splitlines()[-1:] or ["failed"]
            continue
        if "0 rules loaded" in p.stderr:
            refused[rf] = [l for l in p.stderr.splitlines() if l.startswith("invalid:")][:1] or ["not loaded"]
            continue
        hits = set()
        for line in p.stdout.splitlines():
            m = json.loads(line)
            hits.add((m["file"], m["index"]))
        ours[rf] = hits

    py = ensure_venv()
    p = subprocess.run([py, __file__, "--inner", "--shared", args.shared], capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr, file=sys.stderr)
        return 1
    theirs = json.loads(p.stdout)

    agree = 0
    print(f"{'trailhose':>9} {'pysigma':>8} {'both':>5}  rule")
    for rf in rule_files:
        name = os.path.basename(rf)
        t = theirs.get(rf, {})
        if rf in refused or "error" in t:
            print(f"{'-':>9} {'-':>8} {'-':>5}  {name}: trailhose {refused.get(rf, ['ok'])[0]}; pysigma {t.get('error', 'ok')}")
            continue
        a, b = ours[rf], {(f, i) for f, i in t["hits"]}
        same = a == b
        agree += same
        mark = "" if same else "  DIFFERS"
        print(f"{len(a):>9} {len(b):>8} {len(a & b):>5}  {name}{mark}")
        for f, i in sorted(a - b)[:3]:
            print(f"            only trailhose: {os.path.relpath(f, events_root)}#{i}")
        for f, i in sorted(b - a)[:3]:
            print(f"            only pysigma:   {os.path.relpath(f, events_root)}#{i}")
    compared = len(rule_files) - len(refused) - sum(1 for t in theirs.values() if "error" in t)
    print(f"agreement: {agree} of {compared} rules compared ({len(rule_files)} rule files, {len(files)} event files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
