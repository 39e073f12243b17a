"""Build a folder of wheels to install fusetune on an air-gapped GPU host that has its own CUDA torch.

    python scripts/wheelhouse.py --out wheelhouse --python 3.12 --cuda 130 --peers liger,unsloth \
        --have scripts/hosts/cuda-image.txt

Then, on the host:  pip install --no-index --find-links wheelhouse fusetune
(or `--no-deps wheelhouse/*.whl` when --skip left a dependency out).

What it leaves out: torch, triton and the CUDA libraries (the host has its own), packages the
host already has (--have: one name per line, `name==version` also accepted), and the
bitsandbytes libraries for other CUDA versions. Pure-Python packages published only as
source (antlr4-python3-runtime) are built into wheels here.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
NEVER = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|pip|setuptools|wheel)$")
PEERS = {"liger": ["liger-kernel"], "unsloth": ["unsloth", "unsloth-zoo"]}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str, quiet: bool = False) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, stderr=subprocess.DEVNULL if quiet else None)


def resolve(requirements: list[str], extras: set[str], leave_out: set[str]) -> dict[str, str]:
    """name -> version of what fusetune needs, resolved by pip on this interpreter.

    Walks the dependency graph from fusetune and stops at packages left out, so that their own
    dependencies are left out with them.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip("install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), *requirements)
        items = {normalize(i["metadata"]["name"]): i["metadata"] for i in json.loads(report.read_text())["install"]}
    needed, todo = {}, [("fusetune", extras)]
    while todo:
        name, wanted_extras = todo.pop()
        for line in items[name].get("requires_dist", []):
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted_extras or {""}]
            dep = normalize(req.name)
            if not any(req.marker is None or req.marker.evaluate(env) for env in envs):
                continue
            if dep in needed or dep in leave_out or NEVER.match(dep) or dep not in items:
                continue
            needed[dep] = items[dep]["version"]
            todo.append((dep, set(req.extras)))
    return needed


def fetch(name: str, version: str, out: Path, python: str, platforms: list[str]) -> None:
    """A wheel for the target platform, or one built here from source for pure-Python packages."""
    platform_args = [a for p in platforms for a in ("--platform", p)]
    try:
        pip(
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python,
            "--implementation",
            "cp",
            *platform_args,
            "-d",
            str(out),
            f"{name}=={version}",
            quiet=True,
        )
    except subprocess.CalledProcessError:
        pip("wheel", "-q", "--no-deps", "-w", str(out), f"{name}=={version}")


def slim_bitsandbytes(wheel: Path, cuda: str) -> None:
    """Keep the CPU library and the one for ``cuda``; drop the rest from the wheel and its RECORD."""
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda})\.so$")
    dropped = lambda name: re.search(r"libbitsandbytes_\w+\.so$", name) and not keep.search(name)
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        if not any(keep.search(n) and "cuda" in n for n in src.namelist()):
            raise SystemExit(f"wheelhouse: {wheel.name} has no library for CUDA {cuda}")
        for item in src.infolist():
            if dropped(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not dropped(line.split(",")[0])).encode()
            dst.writestr(item, data)
    slim.replace(wheel)


def read_have(path: str | None) -> set[str]:
    if not path:
        return set()
    names = (line.split("==")[0].strip() for line in Path(path).read_text().splitlines())
    return {normalize(n) for n in names if n and not n.startswith("#")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="wheelhouse")
    parser.add_argument("--python", default="3.12")
    parser.add_argument(
        "--platform",
        action="append",
        default=None,
        help="pip platform tags (default: manylinux x86_64 from 2014 to 2_28)",
    )
    parser.add_argument("--cuda", default="130", help="the bitsandbytes CUDA library to keep, e.g. 130 or 128")
    parser.add_argument("--peers", default="", help="benchmark peers to add: liger,unsloth (installed --no-deps)")
    parser.add_argument("--have", default=None, help="file of packages the host already has: left out")
    parser.add_argument("--skip", default="", help="comma-separated packages to leave out as well")
    parser.add_argument("--extras", default="", help="fusetune extras to include, e.g. bench")
    parser.add_argument(
        "--pin",
        action="append",
        default=[],
        help="extra requirement to resolve with, e.g. datasets==4.8.5 (repeatable)",
    )
    args = parser.parse_args()
    platforms = args.platform or [
        "manylinux_2_28_x86_64",
        "manylinux_2_24_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux1_x86_64",
    ]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    leave_out = read_have(args.have) | {normalize(s) for s in args.skip.split(",") if s}
    extras = {e for e in args.extras.split(",") if e}
    target = f"{ROOT}[{','.join(sorted(extras))}]" if extras else str(ROOT)
    for name, version in sorted(resolve([target, *args.pin], extras, leave_out).items()):
        fetch(name, version, out, args.python, platforms)
    for peer in filter(None, args.peers.split(",")):
        if peer not in PEERS:
            raise SystemExit(f"wheelhouse: unknown peer '{peer}'; known: {', '.join(PEERS)}")
        for name in PEERS[peer]:
            pip("download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out), name)
    pip("wheel", "-q", "--no-deps", "-w", str(out), str(ROOT))

    for wheel in out.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel, args.cuda)
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    print(f"{total / 2**20:8.2f} MiB  total, {len(wheels)} wheels in {out}")


if __name__ == "__main__":
    main()
