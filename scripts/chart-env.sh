# Sourced by scripts/test.sh and scripts/check-chart.sh. Installs the chart tools under target/
# once and exports their paths:
#   CHART_VENV  a Python venv with the Helm v4 Go SDK and the Kubernetes schemas
#   PROMTOOL    promtool from Debian's prometheus package (extracted, never started as a service)
#   TRAILHOSE_TEST_PROMETHEUS  the real Prometheus server from the same package, and
#   TRAILHOSE_TEST_ALERTS      the chart's alert rules as Helm renders them: both for
#                              tests/prometheus.rs, which evaluates the dashboard and the alerts
#                              on a live Prometheus (`source scripts/chart-env.sh` before
#                              `cargo test --test prometheus`).

CHART_VENV=$PWD/target/chart-venv
_reqs=scripts/chart-requirements.txt
if ! cmp -s "$_reqs" "$CHART_VENV/.requirements" 2>/dev/null; then
  echo "installing chart check tools into $CHART_VENV"
  python3 -m venv "$CHART_VENV"
  "$CHART_VENV/bin/pip" install --quiet --disable-pip-version-check -r "$_reqs"
  cp "$_reqs" "$CHART_VENV/.requirements"
fi

# Whatever revision of Debian's `prometheus` the archive offers now. An exact revision pin
# breaks every fresh machine once the archive moves on (2.42.0+ds-5+b6 became +deb12u1), so
# take the candidate, refresh the package lists once when it cannot be downloaded, and print it.
_prom_dir=target/promtool
_prom_log=$PWD/target/promtool-download.log
_prom_candidate() { LC_ALL=C apt-cache policy prometheus | awk '/Candidate:/ {print $2}'; }
_prom_fetch() {
  local version
  version=$(_prom_candidate)
  [ -n "$version" ] && [ "$version" != "(none)" ] && apt-get download -q "prometheus=$version" >/dev/null 2>"$_prom_log" \
    && echo "$version"
}
if ! { "$_prom_dir/usr/bin/promtool" --version && "$_prom_dir/usr/bin/prometheus" --version; } >/dev/null 2>&1; then
  rm -rf "$_prom_dir" "$_prom_dir.tmp" && mkdir -p "$_prom_dir.tmp"
  if ! _prom_version=$(cd "$_prom_dir.tmp" && _prom_fetch); then
    echo "prometheus ${_prom_version:-$(_prom_candidate)} is not downloadable: refreshing the package lists"
    apt-get update -q >/dev/null || echo "warning: apt-get update failed (run as root, or install Debian's prometheus package)" >&2
    rm -f "$_prom_dir.tmp"/*.deb
    _prom_version=$(cd "$_prom_dir.tmp" && _prom_fetch) \
      || { echo "error: cannot download Debian's prometheus package (candidate: $(_prom_candidate)): $(cat "$_prom_log")" >&2; exit 1; }
  fi
  echo "installing promtool and prometheus from Debian's prometheus $_prom_version into $_prom_dir"
  dpkg-deb -x "$_prom_dir.tmp"/prometheus_*.deb "$_prom_dir.tmp/root"
  echo "$_prom_version" > "$_prom_dir.tmp/root/.version"
  mv "$_prom_dir.tmp/root" "$_prom_dir" && rm -rf "$_prom_dir.tmp"
fi
echo "prometheus, promtool: Debian prometheus $(cat "$_prom_dir/.version" 2>/dev/null || echo unknown)"
PROMTOOL=$PWD/$_prom_dir/usr/bin/promtool
export TRAILHOSE_TEST_PROMETHEUS=$PWD/$_prom_dir/usr/bin/prometheus

# Rendered on every run: the rules follow the chart's templates and values.
mkdir -p target/chart-check
"$CHART_VENV/bin/python" scripts/render_alerts.py target/chart-check/alerts.json
export TRAILHOSE_TEST_ALERTS=$PWD/target/chart-check/alerts.json
