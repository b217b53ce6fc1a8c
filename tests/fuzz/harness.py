"""The parent side of the fuzz suite: a worker process kept warm, restarted after a crash or
hang, and a tally of the cases run."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
WORKER = Path(__file__).resolve().parent / "worker.py"
MEMORY_LIMIT_MB = 1536  # address space a case may add to the warm worker's
TALLY: Counter[str] = Counter()  # "target:status" -> cases


class Worker:
    """One `worker.py` process; `run(case)` returns its answer, or "hang"/"crash" when the case
    outlived its time (plus a margin) or killed the process (which is then restarted)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
               "LLAMARUN_COMPILE": "0"}
        env.pop("LLAMARUN_MODEL", None)
        proc = subprocess.Popen([sys.executable, str(WORKER), str(MEMORY_LIMIT_MB)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env)
        assert proc.stdout is not None
        ready = self._read(proc, 120)
        assert ready == {"status": "ready"}, ready
        return proc

    @staticmethod
    def _read(proc: subprocess.Popen[str], timeout: float) -> dict | None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = proc.stdout.readline()
        return json.loads(line) if line else {"status": "crash"}

    def run(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        out = self._read(self.proc, float(case.get("timeout", 10)) + 20)
        if out is None or out["status"] in ("crash", "hang"):
            self.close()
            out = out or {"status": "hang"}
        TALLY[f"{case['target']}:{out['status']}"] += 1
        return out

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def check(out: dict, case: dict) -> None:
    """A case must end in a correct result or a LlamarunError."""
    assert out["status"] in ("ok", "error"), (
        f"{out['status']} on {case['target']} case: {out.get('traceback', '')}\n"
        f"case: {json.dumps(case)[:1000]}")
