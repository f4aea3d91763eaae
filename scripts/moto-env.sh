# Sourced by scripts/test.sh and scripts/bench-service.sh: puts a pinned moto_server on PATH, and
# the readers the tests check our output with (DuckDB), and the OCSF schema validator
# (scripts/ocsf_validate.py: ocsf-json-schema ships the OCSF schema exports, jsonschema checks), in one venv.
# moto is pinned in its own venv: 5.2.1 (preinstalled on some images) answers
# CompleteMultipartUpload with the wrong XML root, which the Rust SDK rightly rejects.
MOTO_VERSION=5.2.5
DUCKDB_VERSION=2.0.1
OCSF_JSON_SCHEMA_VERSION=1.2.0
JSONSCHEMA_VERSION=4.26.0
VENV=target/test-venv
# A venv is not relocatable: a copied target/ keeps scripts whose #! names the old path, and
# PATH would then fall through to whatever moto_server the machine has. Check the entry point.
if ! "$VENV/bin/python" -c "import moto, flask, duckdb, jsonschema, ocsf_json_schema, sys; from importlib.metadata import version as v; sys.exit(moto.__version__ != '$MOTO_VERSION' or duckdb.__version__ != '$DUCKDB_VERSION' or v('ocsf-json-schema') != '$OCSF_JSON_SCHEMA_VERSION' or v('jsonschema') != '$JSONSCHEMA_VERSION')" 2>/dev/null \
  || ! "$VENV/bin/moto_server" --help >/dev/null 2>&1; then
  echo "installing moto[server]==$MOTO_VERSION duckdb==$DUCKDB_VERSION ocsf-json-schema==$OCSF_JSON_SCHEMA_VERSION jsonschema==$JSONSCHEMA_VERSION into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" "duckdb==$DUCKDB_VERSION" \
    "ocsf-json-schema==$OCSF_JSON_SCHEMA_VERSION" "jsonschema==$JSONSCHEMA_VERSION"
fi
export PATH="$PWD/$VENV/bin:$PATH"
