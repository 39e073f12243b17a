"""The shared runner: every job (a variant's training, a model folder, the GPU's matmul peak) runs in a
subprocess of its own, one at a time, with a timeout each and an overall ``--budget``; memory peaks and
monkey-patches never leak between variants."""

import contextlib
import importlib.machinery
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench.py"  # what each job subprocess runs: python SCRIPT --worker


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def split_list(value: str) -> list[str]:
    return [v for v in re.split(r"[,\s]+", value.strip()) if v]


class Runner:
    """Starts the subprocesses (one at a time), with a timeout each and an overall budget."""

    def __init__(self, args):
        self.args = args
        self.scratch = Path(args.scratch)
        self.logs = self.scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.scratch / "run").mkdir(exist_ok=True)
        self.started = time.monotonic()

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.started) if self.args.budget else float("inf")

    def env(self, variant: str | None) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        if self.args.tiny:
            env["CUDA_VISIBLE_DEVICES"] = ""
        if variant == "unsloth":
            env["UNSLOTH_DISABLE_STATISTICS"] = "1"
            if self.args.unsloth_site:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.args.unsloth_site, env.get("PYTHONPATH")]))
        return env

    def call(self, mode: str, spec: dict, name: str, variant: str | None = None, timeout: float | None = None) -> dict:
        """Run ``bench.py --<mode> spec.json`` in a new session; its JSON result, or a failure row."""
        wanted = timeout or self.args.timeout
        timeout = min(wanted, self.left())
        if timeout <= 5:
            return {"status": "skipped", "reason": "out of --budget time"}
        with tempfile.TemporaryDirectory(dir=self.scratch) as tmp:
            spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
            spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
            log_path = self.logs / f"{name}.log"
            cmd = [sys.executable, str(SCRIPT), f"--{mode}", str(spec_path)]
            start = time.monotonic()
            with open(log_path, "w") as log_file:
                proc = subprocess.Popen(
                    cmd,
                    cwd=self.scratch / "run",  # Unsloth writes its compiled cache into the working directory
                    env=self.env(variant),
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    rc = None
                finally:
                    if proc.poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
            wall = time.monotonic() - start
            if result_path.exists():
                result = json.loads(result_path.read_text())
            elif rc is None:
                result = {"status": "failed", "reason": f"timeout after {timeout:.0f} s", "timeout": True}
                if timeout < wanted:  # cut short by --budget: says nothing about the job
                    result.update(status="skipped", reason=f"out of --budget time after {timeout:.0f} s")
            else:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                why = "killed (host out of memory?)" if rc == -9 else f"exit code {rc}"
                result = {"status": "failed", "reason": f"{why}: {' | '.join(tail)[-400:]}"}
        result["wall_s"] = wall
        result["log"] = str(log_path)
        return result


def availability(variant: str, sc: dict, gpu: dict, args) -> str | None:
    """Why ``variant`` cannot run here (a skip reason), or None."""
    search = [args.unsloth_site, *sys.path] if variant == "unsloth" and args.unsloth_site else sys.path
    package = {"liger": "liger_kernel", "unsloth": "unsloth"}.get(variant)
    if package and importlib.machinery.PathFinder.find_spec(package, search) is None:
        where = (
            f" (searched --unsloth-site {args.unsloth_site} first)"
            if variant == "unsloth" and args.unsloth_site
            else ""
        )
        return f"{package} is not installed{where}"
    if sc.get("quant") and importlib.machinery.PathFinder.find_spec("bitsandbytes", search) is None:
        return "bitsandbytes is not installed (4-bit)"
    if not gpu["cuda"] and variant in ("liger", "fusetune_triton"):
        return "needs CUDA (Triton kernels; --tiny runs on the CPU, where the interpreter is too slow for steps)"
    return None
