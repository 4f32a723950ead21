#!/usr/bin/env bash
# Checks the Prometheus and Grafana files in metrics/:
#   - the alerting rules (promtool check rules) and their unit tests (promtool test rules),
#   - both Prometheus configs (promtool check config, which also checks the rule files
#     and file_sd target files they reference),
#   - the Grafana dashboard is valid JSON.
# Installs Debian's `prometheus` package (which ships promtool) when promtool is missing;
# that needs root, as on CI. Run from anywhere: bash .ci/check-metrics-files.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  echo "== installing promtool (Debian package prometheus)"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the package's maintainer scripts from starting the prometheus service:
  # invoke-rc.d asks policy-rc.d, and exit code 101 means "action forbidden".
  # Only our own policy-rc.d is added and removed; an existing one is left alone.
  policy=/usr/sbin/policy-rc.d
  added_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
  fi
  trap '[ -n "$added_policy" ] && rm -f "$policy"' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if [ -n "$added_policy" ]; then rm -f "$policy"; added_policy=; fi
  trap - EXIT
fi
promtool --version 2>&1 | head -n 1

echo "== promtool check rules metrics/vmm-fleet-rules.yml"
promtool check rules metrics/vmm-fleet-rules.yml

echo "== promtool test rules metrics/tests/rules-test.yml"
promtool test rules metrics/tests/rules-test.yml

for cfg in metrics/prometheus.yml metrics/prometheus-lab.yml; do
  echo "== promtool check config $cfg"
  promtool check config "$cfg"
done

echo "== python3 -m json.tool metrics/grafana-dashboard.json"
python3 -m json.tool metrics/grafana-dashboard.json >/dev/null
echo "metrics files OK"
