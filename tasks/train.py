"""Training on Ray Train: DeepSpeed inside a TorchTrainer, checkpoints reported to Ray.

Each worker runs `orca_core.train.fit` in the gloo (CPU) or NCCL (GPU) process
group Ray Train sets up; DeepSpeed wraps it. Checkpoints go to the step's work
folder (it outlives a Prefect retry) and are reported to Ray, so a killed
worker restarts from the last one (FailureConfig) with its data position.

That folder is Ray's run folder (storage_path/name), so a checkpoint is reported
where it lies (CheckpointUploadMode.NO_UPLOAD: no copy per checkpoint), Ray
deletes all but the newest KEEP_CHECKPOINTS, and a restarted worker resumes
from the folder itself, not from a local copy of it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from orca_core.packed import row_count
from orca_core.recipe.models import Recipe
from orca_core.train import total_steps
from tasks.ray_runtime import ensure_ray

KEEP_CHECKPOINTS = 2  # the newest, and the one before should the newest not validate


def _train_loop(config: dict[str, Any]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads on 2 cores made steps 10x slower and erratic
    import pyarrow.fs
    import ray.train
    import torch
    from ray.train import Checkpoint, CheckpointUploadMode

    from orca_core.train import fit

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    resume = config["resume"]
    restored = ray.train.get_checkpoint()  # set when Ray restarted a failed worker group
    if restored is not None and isinstance(restored.filesystem, pyarrow.fs.LocalFileSystem):
        resume = Path(restored.path)  # the work folder (local or a shared mount): read in place
    elif restored is not None:
        resume = Path(restored.to_directory(tempfile.mkdtemp(prefix="orca-resume-")))

    progress = Path(config["progress_file"])

    def on_step(metrics: dict[str, Any]) -> None:  # rank 0 only: the driver tails this file for live progress
        with progress.open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")

    def report(folder: Path, metrics: dict[str, Any]) -> None:
        # Every worker reports (Ray expects it); rank 0 attaches the checkpoint folder all ranks wrote into.
        rank0 = ray.train.get_context().get_world_rank() == 0
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)) if rank0 else None,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)  # it is in Ray's run folder already

    fit(config["job"], on_checkpoint=report, resume_from=resume, on_step=on_step)


class RayTrainer:
    """`(TrainJob, resume) -> summary` on Ray Train workers, as the recipe's `train` section says."""

    def __init__(self, recipe: Recipe, sink=lambda done, total, line: print(line), every_s: float = 2.0):
        self.recipe, self.sink, self.every_s = recipe, sink, every_s  # sink(done, total, line): log lines + a bar

    def __call__(self, job, resume: Path | None) -> dict[str, Any]:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        ensure_ray(self.recipe)
        t = self.recipe.train
        checkpoints = Path(job.checkpoint_dir)
        progress = checkpoints.parent / "progress.jsonl"
        progress.parent.mkdir(parents=True, exist_ok=True)
        progress.unlink(missing_ok=True)
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"job": job, "resume": resume, "progress_file": str(progress)},
            scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                         resources_per_worker={"CPU": t.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            # Ray's run folder is the checkpoint folder itself: see the module docstring
            run_config=RunConfig(storage_path=str(checkpoints.parent), name=checkpoints.name,
                                 failure_config=FailureConfig(max_failures=2),
                                 checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)),
        )
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(trainer.fit)
            while not running.done():
                self._log_progress(progress, job)
                time.sleep(self.every_s)
            running.result()
        return summarize(Path(job.out_dir))

    def _log_progress(self, progress: Path, job) -> None:
        """loss, lr, tokens/s and ETA from the newest line of the workers' progress file."""
        if not progress.exists() or not (lines := progress.read_text().splitlines()):
            return
        latest = json.loads(lines[-1])
        total = total_steps(row_count(job.dataset), job, self.recipe.train.workers)
        per_step = latest["elapsed"] / max(len(lines), 1)
        self.sink(latest["step"], total, f"step {latest['step']}/{total} | loss {latest['loss']:.4f} | lr {latest['lr']:.2e} | "
                                         f"{latest['tokens_per_s']:.0f} tok/s | ETA {per_step * (total - latest['step']):.0f}s")


def summarize(out_dir: Path) -> dict[str, Any]:
    """Figures of an exported stage, from its metrics.parquet."""
    metrics = pq.read_table(out_dir / "metrics.parquet").to_pylist()
    if not metrics:
        return {"steps": 0}
    seconds = sum(m.get("seconds", 0.0) for m in metrics)
    tokens = sum(m["tokens"] for m in metrics)
    return {"steps": len(metrics), "final_loss": metrics[-1]["loss"], "first_loss": metrics[0]["loss"],
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1) if seconds else None}
