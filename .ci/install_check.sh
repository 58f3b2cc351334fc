#!/usr/bin/env bash
# A user's install: a wheel built from the tree (not editable) holds every subpackage and the
# compiled extension; installed into a fresh virtual environment, it imports, runs one op
# against reference.py and answers `python -m attention_ext.demo --help`, all from outside
# the source tree. PY: the Python whose torch the wheel is built against (default .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PY" -m pip wheel --disable-pip-version-check -q --no-build-isolation --no-deps \
    -w "$work/dist" .
wheel=$(ls "$work"/dist/attention_ext-*.whl)
"$PY" - "$wheel" <<'PYEOF'
import pathlib, sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
missing = sorted(str(p) for p in pathlib.Path("attention_ext").rglob("*.py") if str(p) not in names)
extension = [n for n in names if n.startswith("attention_ext/_C") and n.endswith(".so")]
if missing or len(extension) != 1:
    sys.exit(f"the wheel lacks {missing or 'the compiled extension attention_ext/_C*.so'}")
print(f"wheel: {pathlib.Path(sys.argv[1]).name}, {len(names)} files, every module and {extension[0]}")
PYEOF

# The extension only loads into the torch it was compiled against: the same release and
# build (e.g. 2.13.0+cpu), checked after the install.
torch_version=$("$PY" -c "import torch; print(torch.__version__)")
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install --disable-pip-version-check -q "torch==${torch_version%%+*}" numpy
"$work/venv/bin/pip" install --disable-pip-version-check -q "$wheel"
fresh_version=$("$work/venv/bin/python" -c "import torch; print(torch.__version__)")
if [ "$fresh_version" != "$torch_version" ]; then
  echo "install_check: the fresh environment got torch $fresh_version, the wheel was built" \
       "against $torch_version" >&2
  exit 1
fi

cd "$work"
"$work/venv/bin/python" - <<'PYEOF'
import torch
import attention_ext
from attention_ext import functional, reference

assert "site-packages" in attention_ext.__file__, attention_ext.__file__
g = torch.Generator().manual_seed(0)
q, k = torch.randn(3, 8, generator=g), torch.randn(3, 5, 8, generator=g)
lengths = torch.tensor([5, 2, 4])
got = functional.dot_attention(q, k, lengths=lengths)
want = reference.dot_attention(q, k, lengths=lengths)
for a, b in zip(got, want):
    torch.testing.assert_close(a, b)
print(f"installed: {attention_ext.__file__}, build {attention_ext.build_info()}; one op call "
      f"matches reference.py")
PYEOF
"$work/venv/bin/python" -m attention_ext.demo --help > "$work/help.txt"
grep -q -- "--normalize" "$work/help.txt"
echo "python -m attention_ext.demo --help: ok"
