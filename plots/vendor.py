"""Write plots/offline.html: the page template `dvc plots show` and `dvc plots diff` fill (named in
.dvc/config as plots.html_template), with vega, vega-lite and vega-embed inlined so the page draws
with no network. DVC's own template loads them from a CDN, and an offline machine gets a blank page.

    python plots/vendor.py        # needs npm and its registry; run again to change the versions

The versions are the ones DVC's renderer (dvc-render) pins for its CDN links, so the specs DVC writes
are read by the library they were written for. Each package comes from `npm pack`, is checked
against the registry's sha512 integrity, and keeps its licence in the page.
"""
from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGES = [("vega", "5.20.2", "build/vega.min.js"), ("vega-lite", "5.2.0", "build/vega-lite.min.js"),
            ("vega-embed", "6.18.2", "build/vega-embed.min.js")]
OUT = Path(__file__).with_name("offline.html")
# dvc-render fills these; the template leaves out {scripts}, where the CDN links would go.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>vlmpipe plots</title>
    <!-- %(versions)s, inlined by plots/vendor.py: this page needs no network. Licences at the end. -->
%(scripts)s
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
<!--
%(licences)s
-->
"""


def fetch(name: str, version: str, member: str, work: Path) -> tuple[str, str]:
    """(the file's text, the package's licence) from the npm registry, integrity checked."""
    meta = json.loads(subprocess.run(["npm", "view", f"{name}@{version}", "dist", "--json"], check=True,
                                     capture_output=True, text=True).stdout)
    tgz = work / subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=work, check=True,
                                capture_output=True, text=True).stdout.strip().splitlines()[-1]
    algo, want = meta["integrity"].split("-", 1)
    got = base64.b64encode(hashlib.new(algo, tgz.read_bytes()).digest()).decode()
    if got != want:
        raise SystemExit(f"{tgz.name}: {algo} {got} does not match the registry's {want}")
    with tarfile.open(tgz) as tf:
        text = tf.extractfile(f"package/{member}").read().decode("utf-8")
        licence = tf.extractfile("package/LICENSE").read().decode("utf-8")
    for bad in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}", "-->"):
        if bad in text or (bad == "-->" and bad in licence):
            raise SystemExit(f"{name} {version}: contains {bad!r}, which would break the page")
    return text, licence


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        parts = [(name, version, *fetch(name, version, member, Path(tmp))) for name, version, member in PACKAGES]
    scripts = "\n".join(f"    <script>/* {n} {v} */\n{text}\n    </script>" for n, v, text, _ in parts)
    licences = "\n\n".join(f"{n} {v}:\n\n{lic.strip()}" for n, v, _, lic in parts)
    versions = ", ".join(f"{n} {v}" for n, v, _, _ in parts)
    OUT.write_text(PAGE % {"versions": versions, "scripts": scripts, "licences": licences}, encoding="utf-8")
    print(f"{OUT}: {OUT.stat().st_size / 1e6:.2f} MB ({versions})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
