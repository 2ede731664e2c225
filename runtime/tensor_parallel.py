"""The model runner of a tensor-parallel server's rank 0: ModelRunner's interface, so the engine
schedules N ranks as it schedules one.

Rank 0 runs its own shard through a ModelRunner and hands every plan to the other ranks first
(runtime/worker_group.py), so that all ranks run each step, in the same order: the programs'
collectives pair the ranks' steps up, and the gathered logits are whole on every rank. Workers
drop theirs. Any error while the ranks step together fails the whole group (RankFailure): a rank
that died, or rank 0 failing alone, which leaves the others waiting in a collective of a step
rank 0 never finished.
"""
from __future__ import annotations

import torch

from llama_aot.artifacts.config import ModelConfig
from llama_aot.runtime.artifact import Artifact
from llama_aot.runtime.config import ResolvedRuntime
from llama_aot.runtime.model_runner import ModelRunner, StepPlan, Warmup
from llama_aot.runtime.worker_group import WorkerGroup


class TensorParallelRunner:
    def __init__(self, artifact: Artifact, runtime: ResolvedRuntime, workers: WorkerGroup):
        """`artifact` is rank 0's, loaded while the workers loaded theirs; `runtime` (resolved on
        rank 0) goes to every worker, so every rank's KV cache has the same blocks."""
        workers.join()
        workers.configure(runtime)
        self.workers = workers
        self.local = ModelRunner(artifact, runtime)
        self.artifact, self.runtime, self.device = artifact, runtime, self.local.device
        self.handover_s: dict[str, float] = {}
        self.num_speculative_steps = 0  # a --tp artifact has no draft program (refused at build)

    @property
    def model_config(self) -> ModelConfig:
        return self.local.model_config

    def warmup(self) -> Warmup:
        """Rank 0's warm-up, run alongside every worker's (their first steps and graph captures
        meet in collectives) once every rank has loaded and allocated its cache, so that a rank
        that cannot is reported before any collective waits for it; then the hand-over of a plan
        is timed (`handover_s`)."""
        self.workers.wait_all("prepared")
        warmup = self._together(self.local.warmup)
        self.workers.wait_all("ready")
        self.handover_s = self.workers.time_handover(self.runtime)
        return warmup

    def execute(self, plan: StepPlan) -> torch.Tensor:
        self.workers.send(plan)
        return self._together(self.local.execute, plan)

    def _together(self, run, *args):
        try:
            return run(*args)
        except Exception as e:
            raise self.workers.failure_after(e) from e
