"""Validates OCSF records against the official JSON schema of their class.

Usage: python3 scripts/ocsf_validate.py PATH...   (files or directories of JSON lines, .gz too)

The schema is built per class, with the profiles each record declares in metadata.profiles, by
PyPI `ocsf-json-schema`, which ships the OCSF schema exports (schema.ocsf.io/<v>/export/schema)
inside the package: nothing is fetched. Prints `validated N` and one line per invalid record;
exits 1 when any record is invalid, 2 on bad input.
"""

import gzip
import json
import os
import sys

import jsonschema
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

VERSION = "1.1.0"


def lines(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def files(paths):
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                for name in sorted(names):
                    if not name.startswith("."):
                        yield os.path.join(root, name)
        else:
            yield p


def main(paths):
    schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=VERSION))
    validators = {}
    count = bad = 0
    for path in files(paths):
        for n, line in lines(path):
            try:
                rec = json.loads(line)
            except ValueError as e:
                print(f"{path}:{n}: not JSON: {e}")
                return 2
            count += 1
            version = rec.get("metadata", {}).get("version")
            if version != VERSION:
                print(f"{path}:{n}: metadata.version is {version!r}, not {VERSION}")
                bad += 1
                continue
            profiles = tuple(sorted(rec.get("metadata", {}).get("profiles", [])))
            key = (rec.get("class_uid"), profiles)
            if key not in validators:
                try:
                    name = schema.lookup_class_name_from_uid(key[0])
                except (ValueError, TypeError) as e:
                    print(f"{path}:{n}: {e}")
                    bad += 1
                    continue
                s = schema.get_class_schema(name, list(profiles))
                validators[key] = jsonschema.Draft202012Validator(s)
            errors = sorted(validators[key].iter_errors(rec), key=lambda e: list(e.path))
            for e in errors[:5]:
                where = "/".join(str(p) for p in e.path) or "(record)"
                print(f"{path}:{n}: class {key[0]}: {where}: {e.message[:300]}")
            bad += bool(errors)
    print(f"validated {count} records, {bad} invalid")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
