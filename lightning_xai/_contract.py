"""The contract between a user's LightningModule and lightning_xai, in one place (no Lightning import).

* **Batches.** :func:`parse_batch` is the only batch parser: ``XAIMixin.xai_batch`` defaults to it and every
  callback reads batches through :func:`batch_view`, so a module that overrides ``xai_batch`` is read the same
  way by all of them.
* **Outputs.** :func:`logits_of` is the one rule that turns a model output (a tensor, a dict, a Hugging Face
  ``ModelOutput``, a tuple) into logits; :func:`~lightning_xai.functional.as_probabilities` turns logits into
  probabilities.
* **Steps.** :class:`StepContext` is what one training step offers the loss terms; :func:`capture_output`
  and :class:`HookHandles` read module outputs with forward hooks and remove them again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils.hooks import RemovableHandle

from lightning_xai.errors import MissingBatchKeyError, XAIConfigurationError

INPUT_ALIASES = ("input", "inputs", "x", "input_ids", "image", "images", "pixel_values", "features")
TARGET_ALIASES = ("target", "targets", "y", "label", "labels")
LOGITS_KEY = "logits"

# ------------------------------------------------------------------------------------------------ batches


def parse_batch(batch: Any, input_key: str = "input", target_key: str = "target") -> dict[str, Any]:
    """The batch contract's mapping: ``input``, ``target`` and any extras of a batch.

    Understands ``(x, y)``, ``(x, y, extras_dict)``, a bare tensor and dict batches. In a dict, ``input`` is
    ``batch[input_key]`` or the first of the usual aliases present (``x``, ``input_ids``, ``pixel_values``,
    ...), ``target`` likewise (``y``, ``label``, ``labels``, ...); all entries are kept.

    Examples:
        >>> import torch
        >>> sorted(parse_batch({"input_ids": torch.zeros(2, 3), "labels": torch.zeros(2), "mask": None}))
        ['input', 'input_ids', 'labels', 'mask', 'target']
        >>> sorted(parse_batch((torch.zeros(2, 3), torch.zeros(2), {"mask": torch.ones(2, 3)})))
        ['input', 'mask', 'target']
    """
    if isinstance(batch, Mapping):
        data = dict(batch)
        for canonical, key, aliases in (("input", input_key, INPUT_ALIASES), ("target", target_key, TARGET_ALIASES)):
            found = next((k for k in (key, *aliases) if k in data), None)
            if found is not None:
                data.setdefault(canonical, data[found])
        return data
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[0], Tensor):
        data = {"input": batch[0], "target": batch[1]}
        if len(batch) >= 3:
            if not isinstance(batch[2], Mapping):
                raise XAIConfigurationError(
                    f"the third element of a tuple batch must be a dict of extras (e.g. {{'mask': m}}), got "
                    f"{type(batch[2]).__name__}; override xai_batch() for other layouts."
                )
            data.update(batch[2])
        return data
    if isinstance(batch, Tensor):
        return {"input": batch}
    raise XAIConfigurationError(
        f"lightning_xai does not understand a batch of type {type(batch).__name__}; override xai_batch(batch) on "
        "your LightningModule (subclass XAIMixin) to return a dict with 'input', 'target' and the keys your "
        "callbacks read."
    )


def batch_view(module: nn.Module, batch: Any) -> Mapping[str, Any]:
    """The mapping of ``batch``: the module's own ``xai_batch`` (an XAIMixin), else :func:`parse_batch`."""
    xai_batch = getattr(module, "xai_batch", None)
    return xai_batch(batch) if callable(xai_batch) else parse_batch(batch)


def batch_rows(data: Mapping[str, Any]) -> int | None:
    """The number of samples in a batch mapping: the leading size of its input, when it is a tensor."""
    inputs = data.get("input")
    return int(inputs.shape[0]) if isinstance(inputs, Tensor) and inputs.dim() > 0 else None


# ------------------------------------------------------------------------------------------------ outputs


def _is_tensor(value: Any) -> bool:
    # while torch.fx traces a forward (contextual decomposition), tensors are Proxies
    return isinstance(value, (Tensor, fx.Proxy))


def logits_of(output: Any, key: str = LOGITS_KEY) -> Tensor | None:
    """The logits in a model output, or ``None``.

    A tensor is the logits; a dict or a Hugging Face ``ModelOutput`` holds them under ``key`` (``"logits"``);
    a tuple or list holds them first.

    Examples:
        >>> import torch
        >>> logits_of({"logits": torch.ones(2), "loss": torch.zeros(())})
        tensor([1., 1.])
        >>> logits_of((torch.zeros(1), "cache")), logits_of("text")
        (tensor([0.]), None)
    """
    if _is_tensor(output):
        return output
    if isinstance(output, Mapping):  # Hugging Face ModelOutput is an OrderedDict
        value = output.get(key)
        return value if _is_tensor(value) else None
    if isinstance(output, (tuple, list)):
        return output[0] if output and _is_tensor(output[0]) else None
    value = getattr(output, key, None)
    return value if isinstance(value, Tensor) else None


def require_logits(output: Any, where: str, key: str = LOGITS_KEY) -> Tensor:
    """:func:`logits_of`, or an error that names the output type and the two fixes."""
    logits = logits_of(output, key)
    if logits is None:
        raise XAIConfigurationError(
            f"{where}: the model returned {type(output).__name__}, in which lightning_xai finds no logits (a tensor, "
            f"a dict or ModelOutput with {key!r}, or a tuple starting with a tensor). Set `xai_logits_key` on your "
            "LightningModule to the entry that holds them, or override xai_forward(inputs) to return them."
        )
    return logits


def forward_logits(model: nn.Module, inputs: Tensor, where: str) -> Tensor:
    """Logits of ``model`` on ``inputs`` without gradients: ``xai_forward`` when the model has it."""
    forward = getattr(model, "xai_forward", None)
    with torch.no_grad():
        output = forward(inputs) if callable(forward) else model(inputs)
    return require_logits(output, where, getattr(model, "xai_logits_key", LOGITS_KEY))


# ------------------------------------------------------------------------------------------------ names

# What every logger accepts in a key component and a file name: MLflow refuses "..", TensorBoard and W&B tags and
# the CSV/MLflow media folders are safe with these characters only.
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,100}")


def check_name(value: Any, what: str, where: str) -> str:
    """``value`` if it is a valid part of a log key, else an ``XAIConfigurationError`` naming it and the rule.

    Examples:
        >>> check_name("gender_adversary", "name", "ConceptHead")
        'gender_adversary'
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        raise XAIConfigurationError(
            f"{where}: {what} {value!r} becomes part of the log keys and file names, so it may use only letters, "
            "digits, '_', '-' and '.' (1 to 100 characters, not '.' or '..'). Choose another name."
        )
    return value


# ------------------------------------------------------------------------------------------------ modules


def named_submodule(module: nn.Module, name: str, where: str) -> nn.Module:
    """``module.get_submodule(name)``, or an error that lists the submodules there are."""
    try:
        return module.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in module.named_modules() if n]
        raise XAIConfigurationError(
            f"{where}: {type(module).__name__} has no submodule {name!r}; its submodules include "
            f"{names[:25]}{' ...' if len(names) > 25 else ''}."
        ) from None


def output_module(module: nn.Module, name: str | None, where: str) -> nn.Module:
    """The submodule ``name`` whose output are the logits, or ``module`` itself for ``None``."""
    return module if name is None else named_submodule(module, name, where)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule runs through ``torch.compile``.

    Lightning's ``Trainer.fit(torch.compile(model))`` sets ``_compiler_ctx``; ``model.compile()`` sets
    ``_compiled_call_impl``; ``self.net = torch.compile(net)`` leaves an ``OptimizedModule`` inside.
    """
    if getattr(module, "_compiler_ctx", None):
        return True
    optimized = getattr(getattr(getattr(torch, "_dynamo", None), "eval_frame", None), "OptimizedModule", ())
    return any(
        getattr(m, "_compiled_call_impl", None) is not None or isinstance(m, optimized) for m in module.modules()
    )


@contextmanager
def eval_mode(module: nn.Module | None) -> Iterator[None]:
    """``module`` in eval mode for the block, each submodule's own train/eval flag restored afterwards (also when the
    block raises); ``None`` switches nothing.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> net[0].eval()  # a user's frozen part stays in eval mode afterwards
        Linear(in_features=2, out_features=2, bias=True)
        >>> with eval_mode(net):
        ...     net[1].training
        False
        >>> net.training, net[0].training, net[1].training
        (True, False, True)
    """
    modes = {} if module is None else {submodule: submodule.training for submodule in module.modules()}
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        for submodule, mode in modes.items():
            submodule.training = mode


class HookHandles(list):
    """A list of hook handles (or removers) that :meth:`remove` takes off again, each once."""

    def remove(self) -> None:  # type: ignore[override]
        while self:
            handle = self.pop()
            if isinstance(handle, RemovableHandle):
                handle.remove()
            else:
                handle()


def capture_output(
    module: nn.Module,
    store: dict[Any, Any],
    key: Any,
    select: Callable[[Any], Any] | None = None,
    accept: Callable[[tuple[Any, ...], Any], bool] | None = None,
) -> RemovableHandle:
    """Keeps ``module``'s first output (after ``select``; accepted by ``accept(args, value)``) in ``store[key]``.

    Later calls leave the stored value alone until ``key`` is removed from ``store``, so one hook serves a whole
    step and :meth:`StepContext.consume_captures` opens it for the next forward.
    """

    def hook(_module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if key in store:
            return
        value = output if select is None else select(output)
        if value is not None and (accept is None or accept(args, value)):
            store[key] = value

    return module.register_forward_hook(hook)


def rows_of(rows: Callable[[], int | None]) -> Callable[[tuple[Any, ...], Any], bool]:
    """An ``accept`` for :func:`capture_output`: a tensor whose leading size is the batch's sample count."""

    def accept(_args: tuple[Any, ...], value: Any) -> bool:
        return isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == rows()

    return accept


# ------------------------------------------------------------------------------------------------ steps


#: cache key of the logits of the step's own forward on the batch input (see XAIMixin)
STEP_LOGITS = "xai/step_logits"


class StepContext:
    """What one training step offers the loss terms: the batch view and the outputs hooks captured.

    Attributes:
        module: the LightningModule.
        batch: the batch as ``training_step`` received it.
        cache: per-step values of the terms: hook captures, drawn masks, a shared decomposition.
        hooks: the hooks the terms installed for this step; removed when the step ends.
    """

    def __init__(self, module: nn.Module, batch: Any) -> None:
        self.module = module
        self.batch = batch
        self._data: Mapping[str, Any] | None = None
        self.cache: dict[Any, Any] = {}
        self.hooks = HookHandles()
        #: cache keys that hold outputs of the forward pass, cleared by :meth:`consume_captures`
        self.capture_keys: set[Any] = set()

    @property
    def data(self) -> Mapping[str, Any]:
        if self._data is None:
            self._data = batch_view(self.module, self.batch)
        return self._data

    @property
    def captured_output(self) -> Tensor | None:
        """Logits of the step's own forward on exactly ``data['input']``, when the module was called on it."""
        return self.cache.get(STEP_LOGITS)

    def get(self, key: str, requested_by: str) -> Any:
        """The batch entry ``key``; raises :class:`MissingBatchKeyError` naming the callback and the keys there are."""
        data = self.data
        if key not in data:
            raise MissingBatchKeyError(
                f"{requested_by} needs the batch key {key!r}, but the batch has the keys {sorted(data)}. "
                f"Add {key!r} to your batches (a dict, or a third tuple element {{'{key}': ...}}), set the "
                f"callback's key argument to one of these, or override xai_batch() on your LightningModule."
            )
        return data[key]

    def capture(
        self,
        module: nn.Module,
        key: Any,
        select: Callable[[Any], Any] | None = None,
        accept: Callable[[tuple[Any, ...], Any], bool] | None = None,
    ) -> None:
        """Hooks ``module`` for this step; its first (accepted) output lands in ``cache[key]``."""
        self.capture_keys.add(key)
        self.hooks.append(capture_output(module, self.cache, key, select, accept))

    def consume_captures(self) -> None:
        """Forgets what the forward pass produced, so that the next forward of the step is captured anew.

        Manual optimization may run several forward/backward rounds in one ``training_step``; the terms of
        each ``xai_loss`` call must read that round's outputs, not a graph an earlier backward freed.
        """
        for key in self.capture_keys:
            self.cache.pop(key, None)
