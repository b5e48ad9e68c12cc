#!/usr/bin/env bash
# Install kubellm with the given extras into PYTHON's environment. One script for `make setup` (and so CI)
# and for both Dockerfiles, so CI proves what the images run.
#   scripts/install.sh PYTHON EXTRAS [editable]    the package and its extras' dependencies
#   scripts/install.sh PYTHON EXTRAS deps [FILE]   only the dependencies of EXTRAS (or those listed in FILE, made by
#                                                  --requirements): an image's dependency layer, which a code
#                                                  change leaves alone
#   scripts/install.sh PYTHON EXTRAS nodeps        only the package (the image's code layer, over `deps`)
#   scripts/install.sh --requirements EXTRAS       print the dependencies of EXTRAS, self-references resolved
# --compile-bytecode: write the .pyc files now. Nothing writes them later where it matters: the runtime pod's
# root filesystem is read-only, and PYTHONDONTWRITEBYTECODE is often set (it is on our build machine); without them every
# process compiles torch and transformers from source at start (~2–5 s each on 2 cores).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
host=${HOST_PYTHON:-python3}

requirements() {  # $1 = comma-separated extras -> one requirement per line (pyproject.toml's, sorted, unique)
  "$host" - "$1" "$here/pyproject.toml" <<'PY'
import re, sys, tomllib
extras, path = sys.argv[1], sys.argv[2]
project = tomllib.load(open(path, "rb"))["project"]
name, optional = project["name"], project.get("optional-dependencies", {})
out, seen = set(project.get("dependencies", [])), set()
todo = [e for e in extras.split(",") if e]
while todo:
    extra = todo.pop()
    if extra in seen:
        continue
    if extra not in optional:
        sys.exit(f"install.sh: no extra {extra!r} in {path}")
    seen.add(extra)
    for req in optional[extra]:
        m = re.fullmatch(rf"{name}\[([^\]]+)\]", req.strip())
        if m:
            todo += [e.strip() for e in m.group(1).split(",")]
        else:
            out.add(req)
print("\n".join(sorted(out)))
PY
}

if [[ "${1:-}" == --requirements ]]; then
  requirements "${2:?usage: install.sh --requirements EXTRAS}"
  exit 0
fi
python=${1:?usage: install.sh PYTHON EXTRAS [editable|deps|nodeps]}
extras=${2:?usage: install.sh PYTHON EXTRAS [editable|deps|nodeps]}
if "$host" -m uv --version >/dev/null 2>&1; then
  uv=("$host" -m uv)
else  # (an image build) uv for this run only, kept out of the image's layers
  tmpuv="$(mktemp -d)"; trap 'rm -rf "$tmpuv"' EXIT
  "$host" -m pip install -q --no-cache-dir --target "$tmpuv" uv
  uv=("$tmpuv/bin/uv")
fi
uv+=(pip install -q --compile-bytecode --python "$python")
case "${3:-}" in
  editable) "${uv[@]}" -e "$here[${extras}]" ;;
  deps)
    if [[ -n "${4:-}" ]]; then reqs="$4"; else reqs="$(mktemp)"; requirements "$extras" > "$reqs"; fi
    # an image build mounts a build cache at UV_CACHE_DIR (Dockerfile.runtime: not in the layer), so a rebuild
    # reuses the downloaded wheels (torch and the CUDA libraries are ~3 GB); without one, nothing is cached
    if [[ -n "${UV_CACHE_DIR:-}" ]]; then "${uv[@]}" -r "$reqs"; else "${uv[@]}" --no-cache -r "$reqs"; fi ;;
  nodeps) "${uv[@]}" --no-cache --no-deps "$here" ;;
  "") "${uv[@]}" --no-cache "$here[${extras}]" ;;
  *) echo "install.sh: unknown mode ${3}" >&2; exit 2 ;;
esac
