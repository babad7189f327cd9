#!/usr/bin/env bash
# Each package's tests against its own built wheel, in a fresh venv that holds only
# that wheel, the ds-* wheels it declares, their locked third-party dependencies and
# the test tools; then its smoke script (tests/smoke/smoke_<module>.py), if any.
# The ds-* packages a package requires directly are installed at the lowest versions
# its ranges allow (tools/lowest_siblings.py: from dist/ when that is the current
# version, else built from the release tag), so ds-model and ds-serve are tested
# against their oldest allowed siblings; the workspace run tests the newest.
# Usage: bash .ci/isolated.sh [ds-x ...]   (default: every package; needs dist/)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d dist ] || { echo "dist/ is missing: run 'uv build --all-packages --out-dir dist' first" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python=$(uv run --frozen python -c 'import sys; print(sys.executable)')

packages=("$@")
if [ ${#packages[@]} -eq 0 ]; then
    packages=($(cd packages && ls -d ds-*))
fi

for pkg in "${packages[@]}"; do
    mod=${pkg//-/_}
    echo "--- $pkg"
    venv="$work/$pkg"
    uv venv --quiet --python "$python" "$venv"
    # Locked third-party dependencies of the package alone (workspace members are
    # listed as '-e ./packages/...' lines; those we take from dist/ as wheels).
    uv export --frozen --package "$pkg" --no-dev --no-hashes --no-header --no-annotate \
        >"$work/$pkg.all.txt"
    grep -v '^-e ' "$work/$pkg.all.txt" >"$work/$pkg.txt" || true
    groups=(--only-group test)
    # ds-batching must prove it runs without torch, so it gets no interop peers.
    if [ "$pkg" != ds-batching ]; then
        groups+=(--only-group interop)
    fi
    uv export --frozen "${groups[@]}" --no-hashes --no-header --no-annotate \
        --no-emit-workspace >"$work/$pkg.test.txt"
    wheel_list=$("$python" tools/lowest_siblings.py "$pkg" --dist dist --build-dir "$work/tags")
    mapfile -t wheels <<<"$wheel_list"
    uv pip install --quiet --python "$venv/bin/python" -r "$work/$pkg.txt" -r "$work/$pkg.test.txt"
    uv pip install --quiet --python "$venv/bin/python" --no-deps "${wheels[@]}"
    # Every installed requirement satisfied: the chosen ds-* versions fit each other's ranges.
    uv pip check --quiet --python "$venv/bin/python"
    # Prove the wheel, not the source tree, is what the tests import.
    "$venv/bin/python" - "$mod" <<'PY'
import importlib, sys
m = importlib.import_module(sys.argv[1])
assert "site-packages" in m.__file__, f"{sys.argv[1]} imported from {m.__file__}, not the wheel"
PY
    set +e
    # The tests marked slow (multi-process jobs, torch.compile builds; left out by the
    # pytest configuration) run in the workspace only: they exercise process orchestration
    # and compilation, which building a wheel does not change, and CI stays under 30 minutes.
    "$venv/bin/python" -m pytest "packages/$pkg" -q -p no:cacheprovider
    rc=$?
    set -e
    if [ $rc -ne 0 ]; then
        echo "isolated tests of $pkg failed (exit $rc)" >&2
        exit $rc
    fi
    if [ -f "tests/smoke/smoke_$mod.py" ]; then
        (cd "$work" && "$venv/bin/python" "$OLDPWD/tests/smoke/smoke_$mod.py")
    fi
done
