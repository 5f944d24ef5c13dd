#!/usr/bin/env bash
# Builds fastkl's release artefacts for this machine into dist/ (or $1):
#
#   fastkl-X.tar.gz                              the sdist
#   fastkl-X-cpXY-cpXY-manylinux_2_NN_x86_64.whl  the wheel, repaired by auditwheel: libgomp
#                                                (OpenMP) bundled, the lowest manylinux tag
#                                                the compiled code allows on this machine
#
# Steps: a throwaway venv with the pinned tools (tools/dist-requirements.txt); `python -m build`
# (sdist, then the wheel from the sdist) with the build requirements pinned by
# tools/build-constraints.txt and SOURCE_DATE_EPOCH set to the last commit's time, so a rebuild
# of one commit gives the same files; `auditwheel repair`, `auditwheel show`, `twine check`.
# Prints each artefact's name, size and sha256 at the end.
#
# Environment: PYTHON (default python3) selects the CPython the wheel is built for.
# A build on Debian 12 (glibc 2.36) gives manylinux_2_34, set by the bundled libgomp's glibc
# symbols; older tags (manylinux2014) come from the cibuildwheel workflow's images
# (.github/workflows/wheels.yml).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$REPO/dist}" && cd "${1:-$REPO/dist}" && pwd)"
PYTHON="${PYTHON:-python3}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/fastkl-dist.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export PIP_CONSTRAINT="$REPO/tools/build-constraints.txt"
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH="$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || echo 315532800)"
fi
export SOURCE_DATE_EPOCH
# no build paths in the compiled code (the wheel is built from an unpacked sdist in a temp dir):
# no debug info, prefix maps. Recent setuptools lets $CFLAGS replace Python's own CFLAGS
# (-DNDEBUG -fwrapv ...), so they are restated first.
PYCFLAGS="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("CFLAGS") or "")')"
export CFLAGS="$PYCFLAGS ${CFLAGS:-} -ffile-prefix-map=$TMP=. -g0"

echo "== tools venv"
"$PYTHON" -m venv "$TMP/tools"
"$TMP/tools/bin/pip" install -q -r "$REPO/tools/dist-requirements.txt"
export PATH="$TMP/tools/bin:$PATH"

echo "== python -m build (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
rm -rf "$REPO/build"
TMPDIR="$TMP" python -m build --outdir "$TMP/raw" "$REPO"

echo "== auditwheel repair"
auditwheel repair -w "$TMP/repaired" "$TMP/raw"/*.whl
WHEEL="$(ls "$TMP/repaired"/*.whl)"
case "$WHEEL" in
    *manylinux*) ;;
    *) echo "error: auditwheel gave no manylinux tag: $WHEEL" >&2; exit 1 ;;
esac
auditwheel show "$WHEEL"
python "$REPO/tools/normalize_sdist.py" "$TMP/raw"/*.tar.gz
twine check --strict "$WHEEL" "$TMP/raw"/*.tar.gz

rm -f "$OUT"/fastkl-*.whl "$OUT"/fastkl-*.tar.gz
cp "$WHEEL" "$TMP/raw"/*.tar.gz "$OUT/"
echo "== artefacts in $OUT"
for f in "$OUT"/fastkl-*; do
    printf '%s  %s bytes  sha256 %s\n' "$(basename "$f")" "$(stat -c %s "$f")" \
        "$(sha256sum "$f" | cut -d' ' -f1)"
done
