"""The ablation report: after a multirun, one table over every job's summary.json."""

import json
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

COLUMNS = ("final_loss", "train_loss", "exact_match", "tok/s", "tok/s ratio", "peak GiB", "runtime s")


def _row(job_dir: Path) -> dict | None:
    summary_file = job_dir / "summary.json"
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    return {
        "job": job_dir.name,
        "overrides": " ".join(o for o in overrides if not o.startswith("experiment=")),
        "kernels": summary["kernels"],
        "final_loss": summary.get("final_loss"),
        "train_loss": summary["train_loss"],
        "exact_match": summary["eval"].get("exact_match"),
        "tok/s": summary["train_tokens_per_second"],
        "peak GiB": summary["peak_memory_gib"],
        "runtime s": summary["runtime_s"],
    }


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def build_report(sweep_dir: Path) -> tuple[list[dict], str]:
    """Rows (one per finished job, in job order) and a markdown table; tok/s ratio is against the first job."""
    jobs = sorted((d for d in Path(sweep_dir).iterdir() if d.is_dir()), key=lambda d: int(d.name.split("_")[0]))
    rows = [r for r in map(_row, jobs) if r is not None]
    if rows and rows[0]["tok/s"]:
        for r in rows:
            r["tok/s ratio"] = r["tok/s"] / rows[0]["tok/s"]
    lines = ["| job | overrides | kernels | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (3 + len(COLUMNS))]
    for r in rows:
        cells = [r["job"].split("_")[0], r["overrides"], r["kernels"]] + [_cell(r.get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(lines) + "\n"


class AblationReport(Callback):
    """Writes report.md and report.json into the sweep folder when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows, table = build_report(sweep_dir)
        (sweep_dir / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
        (sweep_dir / "report.md").write_text(f"# Ablation: {sweep_dir.name}\n\n{table}")
        print(f"\nablation report ({len(rows)} runs): {sweep_dir / 'report.md'}\n{table}", flush=True)
