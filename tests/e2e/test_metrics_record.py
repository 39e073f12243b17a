"""metrics.jsonl as a resumed run reads it: the lines up to the checkpoint's step are kept, the later ones dropped,
and a last line cut short by the crash that stopped the run is no obstacle (one reader, fusetune.record_files')."""

import json
import random

from fusetune.app.run_record import MetricsRecorder
from fusetune.record_files import read_jsonl


def test_a_resume_after_a_line_cut_short_keeps_the_steps_up_to_its_checkpoint(tmp_path):
    rng = random.Random()
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": step, "split": "train", "loss": rng.uniform(0.5, 3.0)} for step in range(1, 7)]
    lines.insert(3, {"step": 3, "split": "eval", "eval_loss": rng.uniform(0.5, 3.0)})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    cut = json.dumps({"step": 7, "split": "train", "loss": 1.0})[: rng.randint(3, 20)]
    path.write_text(text + cut)  # the crash came mid-append
    assert read_jsonl(path) == lines

    recorder = MetricsRecorder(path, resume_step=4)
    kept = [line for line in lines if line["step"] <= 4]
    assert read_jsonl(path) == kept and path.read_text() == "".join(json.dumps(m) + "\n" for m in kept)
    assert recorder.final_loss == (4, lines[4]["loss"]) and recorder.last_train == lines[4]
