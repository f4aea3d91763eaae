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
            # What the schema's enums cannot say: the ids agree with each other.
            uid, act = rec.get("class_uid"), rec.get("activity_id")
            arithmetic = []
            if isinstance(uid, int) and isinstance(act, int):
                if rec.get("type_uid") != uid * 100 + act:
                    arithmetic.append(f"type_uid {rec.get('type_uid')} is not {uid * 100 + act}")
                if rec.get("category_uid") != uid // 1000:
                    arithmetic.append(f"category_uid {rec.get('category_uid')} is not {uid // 1000}")
            for a in arithmetic:
                print(f"{path}:{n}: class {key[0]}: {a}")
            bad += bool(errors or arithmetic)
    print(f"validated {count} records, {bad} invalid")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
