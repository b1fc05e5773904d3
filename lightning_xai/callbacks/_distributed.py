"""Process-group housekeeping shared by the callbacks."""

from __future__ import annotations

import atexit

import torch.distributed as dist

_registered = False


def destroy_gloo_group_at_exit() -> None:
    """Destroy a gloo default process group at interpreter exit, while Python is still fully alive.

    Lightning registers this clean-up for NCCL only. Without it, a gloo worker thread can drop the last
    reference to a finished collective (whose tensors own Python objects) while the interpreter is
    finalizing; taking the GIL then kills that thread inside a ``noexcept`` destructor and the process
    aborts ("terminate called without an active exception", SIGABRT). Under ``ddp_spawn`` that failed the
    whole ``fit`` after training had finished; destroying the group first joins those threads. Idempotent.
    """
    global _registered
    if _registered or not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return
    atexit.register(_destroy_default_group)
    _registered = True


def _destroy_default_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
