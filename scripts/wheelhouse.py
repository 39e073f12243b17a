"""Build a folder of wheels to install fusetune on an air-gapped GPU host that has its own CUDA torch.

    python scripts/wheelhouse.py --out wheelhouse --python 3.12 --cuda 130 --peers liger,unsloth \
        --have scripts/hosts/cuda-image.txt

Then, on the host:  pip install --no-index --find-links wheelhouse fusetune
(or `--no-deps wheelhouse/*.whl` when --skip left a dependency out).

What it leaves out: torch, triton and the CUDA libraries (the host has its own), packages the
host already has (--have: one name per line, `name==version` also accepted), and the
bitsandbytes libraries for other CUDA versions. Pure-Python packages published only as
source (antlr4-python3-runtime) are built into wheels here.

Peers for scripts/bench.py: `liger` adds liger-kernel to the wheelhouse (no dependencies of its
own). `unsloth` is a separate install target, `<out>/unsloth/`: Unsloth pins trl<=1.15 while
fusetune needs trl 1.16, so Unsloth, Unsloth Zoo and what they need (resolved with
--unsloth-pin, by default trl<=1.15 and datasets<5, and --pin) go there, less what the host has,
what the main wheelhouse already holds in the same version, and --unsloth-skip (xformers, built
for one torch; diffusers and the Studio's web stack; wandb). The Unsloth wheel loses its
`studio/` web app. On the host:

    pip install --no-index --no-deps --target /tmp/unsloth-site wheelhouse/unsloth/*.whl

and put /tmp/unsloth-site first on PYTHONPATH for the Unsloth process only (scripts/gpu_bench.sh).

`--peers-only` writes just the peers (liger's wheel in <out>/, Unsloth's target in <out>/unsloth/), for a
folder carried beside an existing main wheelhouse; the main set is still resolved, so that what it holds
is not fetched twice:

    python scripts/wheelhouse.py --out .whl-peers --peers-only --peers liger,unsloth \
        --have scripts/hosts/cuda-image.txt
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
NEVER = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|pip|setuptools|wheel)$")  # the host's own
PEERS = {"liger": ["liger-kernel"]}  # added to the main wheelhouse, without dependencies
UNSLOTH = ["unsloth", "unsloth-zoo"]  # their own install target, resolved with their pins
UNSLOTH_PINS = ["trl<=1.15", "datasets<5"]
# Not needed to train: xformers (built for one torch; Unsloth falls back to SDPA without it), diffusers,
# and the Studio's web stack (Unsloth Zoo only silences a pydantic warning if pydantic is there)
UNSLOTH_SKIP = ["xformers", "diffusers", "pydantic", "structlog", "json5", "nest-asyncio", "wandb"]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str, quiet: bool = False) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, stderr=subprocess.DEVNULL if quiet else None)


def resolve(
    requirements: list[str], roots: dict[str, set[str]], leave_out: set[str], keep_roots: bool = False
) -> dict[str, str]:
    """name -> version of what ``roots`` (name -> extras) need, resolved by pip on this interpreter.

    Walks the dependency graph from the roots and stops at packages left out, so that their own
    dependencies are left out with them. ``keep_roots``: the roots are in the answer too.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip("install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), *requirements)
        items = {normalize(i["metadata"]["name"]): i["metadata"] for i in json.loads(report.read_text())["install"]}
    needed = {normalize(r): items[normalize(r)]["version"] for r in roots} if keep_roots else {}
    todo = [(normalize(name), extras) for name, extras in roots.items()]
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


def drop_from_wheel(wheel: Path, dropped) -> None:
    """Rewrite ``wheel`` without the files for which ``dropped(name)`` is true, and without their RECORD lines."""
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if dropped(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not dropped(line.split(",")[0])).encode()
            dst.writestr(item, data)
    slim.replace(wheel)


def slim_bitsandbytes(wheel: Path, cuda: str) -> None:
    """Keep the CPU library and the one for ``cuda``; drop the rest from the wheel and its RECORD."""
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda})\.so$")
    with zipfile.ZipFile(wheel) as src:
        if not any(keep.search(n) and "cuda" in n for n in src.namelist()):
            raise SystemExit(f"wheelhouse: {wheel.name} has no library for CUDA {cuda}")
    drop_from_wheel(wheel, lambda name: re.search(r"libbitsandbytes_\w+\.so$", name) and not keep.search(name))


def unsloth_target(out: Path, args, main: dict[str, str], leave_out: set[str], platforms: list[str]) -> Path:
    """``out``/unsloth: Unsloth and what it needs beyond the host and the main wheelhouse, with its own pins."""
    target = out / "unsloth"
    target.mkdir()
    version = f"=={args.unsloth_version}" if args.unsloth_version else ""
    pins = args.unsloth_pin if args.unsloth_pin is not None else UNSLOTH_PINS
    skip = leave_out | {normalize(s) for s in (args.unsloth_skip if args.unsloth_skip is not None else UNSLOTH_SKIP)}
    found = resolve([f"unsloth{version}", *UNSLOTH[1:], *pins, *args.pin], {n: set() for n in UNSLOTH}, skip, True)
    for name, found_version in sorted(found.items()):
        if main.get(name) == found_version:  # already in the main wheelhouse, which is on the path too
            continue
        fetch(name, found_version, target, args.python, platforms)
    for wheel in target.glob("unsloth-*.whl"):  # not unsloth_zoo: its wheel is named unsloth_zoo-*
        drop_from_wheel(wheel, lambda name: name.startswith("studio/"))
    for wheel in target.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel, args.cuda)
    return target


def report(folder: Path) -> int:
    wheels = sorted(folder.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    print(f"{total / 2**20:8.2f} MiB  total, {len(wheels)} wheels in {folder}")
    return total


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
    parser.add_argument("--peers", default="", help="benchmark peers to add: liger, unsloth (its own target)")
    parser.add_argument(
        "--peers-only", action="store_true", help="write only the peers (main set resolved, not fetched)"
    )
    parser.add_argument("--unsloth-version", default="", help="the Unsloth release (default: the newest)")
    parser.add_argument(
        "--unsloth-pin",
        action="append",
        default=None,
        help=f"constraint for the Unsloth target (repeatable; default: {' '.join(UNSLOTH_PINS)})",
    )
    parser.add_argument(
        "--unsloth-skip",
        type=lambda v: [x for x in v.split(",") if x],
        default=None,
        help=f"comma-separated packages the Unsloth target leaves out (default: {','.join(UNSLOTH_SKIP)})",
    )
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
    main_set = resolve([target, *args.pin], {"fusetune": extras}, leave_out)
    for name, version in sorted(main_set.items()):
        if not args.peers_only:
            fetch(name, version, out, args.python, platforms)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS) - {"unsloth"})
    if unknown:
        raise SystemExit(f"wheelhouse: unknown peer {unknown}; known: {', '.join([*PEERS, 'unsloth'])}")
    for peer in peers:
        for name in PEERS.get(peer, []):
            pip("download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out), name)
            main_set.update({normalize(w.name.split("-")[0]): w.name.split("-")[1] for w in out.glob("*.whl")})
    if not args.peers_only:
        pip("wheel", "-q", "--no-deps", "-w", str(out), str(ROOT))

    for wheel in out.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel, args.cuda)
    total = report(out)
    if "unsloth" in peers:
        total += report(unsloth_target(out, args, main_set, leave_out, platforms))
        print(f"{total / 2**20:8.2f} MiB  in all (the device carries at most 64 MiB with the working tree)")


if __name__ == "__main__":
    main()
