"""A CPU model actor for NDIF 0.1.2, so a real NDIF stack can serve a tiny model without a GPU.

NDIF's stock actor (`BaseModelDeployment`) is CUDA-only: it pins a GPU, caps the
process's CUDA memory and synchronizes the device. This subclass overrides only
the four methods that touch CUDA and keeps NDIF's own request handling (run,
execute, statuses, result upload) unchanged. It lives in the tests tree, on the
server processes' `PYTHONPATH`, and is selected with
`NDIF_DEFAULT_MODEL_ACTOR_CLASS=ndif_cpu_actor.CPUModelActor`.

The server processes import only this file and what `.venv-remote` installs: the
package under test is *not* importable there, so a request that ships a `LORA`
works only if the package ships itself with the request.
"""

from __future__ import annotations

import gc
from typing import Dict

import ray
from ndif.services.ray.deployments.modeling.base import KILL_REASON_PREEMPTED, BaseModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel


class CPUModelDeployment(BaseModelDeployment):
    """`BaseModelDeployment` with its model on the CPU."""

    def load_from_disk(self) -> HuggingFaceModel:
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True, dtype=self.dtype_name, **self.kwargs)
        model._module.requires_grad_(False)  # inference-only, as the stock actor makes it
        return model

    async def to_cache(self) -> None:
        # The weights already live in CPU memory: parking only stops the running request.
        await self.cancel(KILL_REASON_PREEMPTED)
        self.cached = True

    def from_cache(self, gpu_mem_bytes_by_id: Dict[int, int]) -> None:
        self.gpu_mem_bytes_by_id = gpu_mem_bytes_by_id
        self.cached = False

    def cleanup(self) -> None:
        # The stock cleanup minus its CUDA calls: reset the kill switch and drop
        # the finished run's workers from the interleaver every user shares.
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


# NDIF's controller creates actors from this name; the options match the stock `ModelActor`.
CPUModelActor = ray.remote(num_cpus=1, max_restarts=-1)(CPUModelDeployment)
