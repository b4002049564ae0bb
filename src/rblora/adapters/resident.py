"""One base model that every client's LoRA is attached to in turn, without rebuilding PEFT.

:func:`~rblora.adapters.lora.attach_lora` builds PEFT's wrappers (``get_peft_model``: a scan of
every module, new ``LoraLayer`` modules, PEFT's own initialisation) and ``detach_lora`` unloads
them again (another scan): about 40 ms of CPU a client for DINOv2 ViT-S/14's 24 adapted modules,
more for SmolLM2's 60, about as much as a client of 6 images takes to train. A cross-device round
of 1,000 such clients paid it 1,000 times.

:class:`LoraHost` builds the wrappers of a LoRA shape (rank, alpha, rsLoRA, dropout, targets)
once, through ``attach_lora``, and keeps them: detaching puts each adapted module's original
``nn.Linear`` (the wrapper's ``base_layer``, the very same object) back in its parent, and
attaching again puts the kept wrapper back and writes the client's start into its weights in
place. A client gets the same model as from ``attach_lora``: the same modules, the same
initial factors (the same generator draws), the same frozen and trainable parameters, and the
base model is bitwise unchanged afterwards; tests compare the two paths bit for bit.

Kept wrappers hold their LoRA weights: at most ``max_bytes`` of them (least recently used shapes
dropped first; 1 GiB by default, a few distinct ranks of a Llama-8B-size model).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn

from rblora.adapters.lora import (
    _ADAPTER,
    _DENSE_ATTR,
    _FLAGS_ATTR,
    attach_lora,
    check_dense,
    init_factors,
    lora_layers,
    set_dense,
)
from rblora.adapters.spec import Factors, LoraSpec, check_factors, dense_parameters, resolve_targets

#: Bytes of LoRA weights a host keeps in built wrappers of shapes not attached now.
DEFAULT_MAX_BYTES = 1 << 30
_HOST_ATTR = "_rblora_lora_host"


@dataclass
class _Built:
    """PEFT's wrappers of one LoRA shape, built once on the host's base model."""

    peft: PeftModel
    slots: list[tuple[nn.Module, str, nn.Module]]  # (parent, attribute, wrapper), by name
    layers: dict[str, nn.Module]  # module name -> wrapper, sorted
    trainable: list[nn.Parameter]  # the LoRA weights
    nbytes: int


def _shape_key(spec: LoraSpec) -> tuple:
    return (
        spec.rank,
        float(spec.lora_alpha),
        tuple(spec.target_modules),
        float(spec.dropout),
        spec.use_rslora,
    )


class LoraHost:
    """Attach a client's LoRA to the one base model, and detach it, cheaply (module doc).

    ``attach(spec, init=, dense=, seed=)`` and ``detach()`` do what ``attach_lora`` and
    ``detach_lora`` do, one LoRA at a time; ``read_factors()`` and ``read_dense()`` read the
    attached one. Use :meth:`of` so that every holder of a model shares its host.
    """

    def __init__(self, model: nn.Module, max_bytes: int = DEFAULT_MAX_BYTES):
        self.model = model
        self.max_bytes = int(max_bytes)
        self._built: OrderedDict[tuple, _Built] = OrderedDict()
        self._attached: _Built | None = None
        self._spec: LoraSpec | None = None
        self._targets: dict[tuple[str, ...], dict[str, tuple[int, int]]] = {}
        self._extras: dict[tuple[str, ...], dict[str, nn.Parameter]] = {}

    @classmethod
    def of(cls, model: nn.Module) -> LoraHost:
        """The one host of ``model`` (kept on the model, as :class:`BaseWeights` is)."""
        host = getattr(model, _HOST_ATTR, None)
        if host is None:
            host = cls(model)
            setattr(model, _HOST_ATTR, host)
        return host

    # ------------------------------------------------------------------ attach / detach
    def attach(
        self,
        spec: LoraSpec,
        *,
        init: Factors | None = None,
        dense: dict[str, torch.Tensor] | None = None,
        seed: int,
        trains: tuple[str, ...] = ("A", "B"),
    ) -> PeftModel:
        """``attach_lora(self.model, spec, init=init, dense=dense, seed=seed)``, reusing the
        wrappers of an earlier attach of the same shape when they still fit the model.
        ``trains``: the LoRA factors that train (``"A"``, ``"B"``); the others are frozen at
        their start (a method's client protocol, e.g. FFA-LoRA's frozen A)."""
        if not set(trains) <= {"A", "B"}:
            raise ValueError(f"attach: trains {trains!r} must name LoRA factors A and/or B")
        if self._attached is not None:
            raise ValueError("a LoRA is attached to this model; detach it before attaching another")
        key = _shape_key(spec)
        built = self._built.get(key)
        if built is not None and not self._fits(built):
            del self._built[key]  # the model's modules were replaced since: build anew
            built = None
        if built is None:
            built = self._build(spec, init=init, dense=dense, seed=seed)
            self._built[key] = built
        else:
            self._reattach(built, spec, init=init, dense=dense, seed=seed)
        for layer in built.layers.values():
            layer.lora_A[_ADAPTER].weight.requires_grad_("A" in trains)
            layer.lora_B[_ADAPTER].weight.requires_grad_("B" in trains)
        self._built.move_to_end(key)
        self._attached, self._spec = built, spec
        self._evict()
        return built.peft

    def detach(self) -> nn.Module:
        """Take the attached LoRA off: the base model exactly as before :meth:`attach` (same
        weights bitwise, dense extras put back, same ``requires_grad``); returns it."""
        built = self._attached
        if built is None:
            raise ValueError("no LoRA is attached to this model")
        for parent, attr, wrapper in built.slots:
            setattr(parent, attr, wrapper.base_layer)
        if hasattr(self.model, "peft_config"):  # as PEFT's unload leaves it
            del self.model.peft_config
        set_dense(self.model, getattr(built.peft, _DENSE_ATTR, {}))
        flags = getattr(built.peft, _FLAGS_ATTR, None)
        if flags is not None:
            for n, p in self.model.named_parameters():
                if n in flags:
                    p.requires_grad_(flags[n])
        for p in built.trainable:
            p.grad = None
        self._attached, self._spec = None, None
        return self.model

    # ------------------------------------------------------------------ reading the attached LoRA
    def read_factors(self) -> Factors:
        """``read_factors`` of the attached LoRA: float32 CPU clones ``{name: (A, B)}``."""
        built = self._require()
        out: Factors = {}
        for name, layer in built.layers.items():
            a = layer.lora_A[_ADAPTER].weight.detach().to("cpu", torch.float32, copy=True)
            b = layer.lora_B[_ADAPTER].weight.detach().to("cpu", torch.float32, copy=True)
            out[name] = (a, b)
        return out

    def read_dense(self) -> dict[str, torch.Tensor]:
        """``read_dense`` of the attached LoRA's ``modules_to_save``: float32 CPU clones."""
        self._require()
        return {
            n: p.detach().to("cpu", torch.float32, copy=True)
            for n, p in self._extras_of(self._spec.modules_to_save).items()
        }

    # ------------------------------------------------------------------ internals
    def _require(self) -> _Built:
        if self._attached is None:
            raise ValueError("no LoRA is attached to this model")
        return self._attached

    def _targets_of(self, spec: LoraSpec) -> dict[str, tuple[int, int]]:
        key = tuple(spec.target_modules)
        if key not in self._targets:
            self._targets[key] = resolve_targets(self.model, LoraSpec(1, target_modules=list(key)))
        targets = self._targets[key]
        if any(spec.rank > min(shape) for shape in targets.values()):
            resolve_targets(self.model, spec)  # raises, naming the module and the valid ranks
        return targets

    def _extras_of(self, modules_to_save: list[str]) -> dict[str, nn.Parameter]:
        key = tuple(modules_to_save)
        if key not in self._extras:
            self._extras[key] = dense_parameters(self.model, list(key))
        return self._extras[key]

    def _build(self, spec: LoraSpec, *, init, dense, seed) -> _Built:
        peft = attach_lora(self.model, spec, init=init, dense=dense, seed=seed)
        layers = lora_layers(peft)
        slots = []
        for name, wrapper in layers.items():
            parent_name, _, attr = name.rpartition(".")
            slots.append((self.model.get_submodule(parent_name), attr, wrapper))
        trainable = [p for w in layers.values() for p in _lora_weights(w)]
        nbytes = sum(p.numel() * p.element_size() for p in trainable)
        return _Built(peft, slots, layers, trainable, nbytes)

    def _fits(self, built: _Built) -> bool:
        """The kept wrappers still wrap the modules the model now holds at their places."""
        return all(getattr(parent, attr, None) is w.base_layer for parent, attr, w in built.slots)

    def _reattach(self, built: _Built, spec: LoraSpec, *, init, dense, seed) -> None:
        """What ``attach_lora`` does, on wrappers that exist: checks, flags, swap in, start."""
        targets = self._targets_of(spec)
        if init is not None:
            check_factors(init, targets, spec.rank, "attach_lora init")
        extras = self._extras_of(spec.modules_to_save)
        if dense is not None:
            check_dense(dense, extras, "attach_lora dense")
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        saved = {n: p.detach().clone() for n, p in extras.items()}
        for parent, attr, wrapper in built.slots:
            setattr(parent, attr, wrapper)
        self.model.peft_config = built.peft.base_model.peft_config
        for p in self.model.parameters():  # as PEFT marks them: only the LoRA weights train
            p.requires_grad_(False)
        for p in built.trainable:
            p.requires_grad_(True)
        setattr(built.peft, _FLAGS_ATTR, flags)
        setattr(built.peft, _DENSE_ATTR, saved)
        with torch.no_grad():
            for n, p in extras.items():
                if dense is not None:
                    p.copy_(dense[n])
                p.requires_grad_(True)
        init_factors(built.layers, targets, init, seed)

    def _evict(self) -> None:
        """Drop the least recently used shapes (never the attached one) beyond ``max_bytes``."""
        while len(self._built) > 1:
            idle = sum(b.nbytes for b in self._built.values() if b is not self._attached)
            if idle <= self.max_bytes:
                return
            oldest = next(iter(self._built))
            if self._built[oldest] is self._attached:
                return
            del self._built[oldest]


def _lora_weights(wrapper: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA weights of one PEFT wrapper (its ``lora_A``/``lora_B`` weights)."""
    return [wrapper.lora_A[_ADAPTER].weight, wrapper.lora_B[_ADAPTER].weight]
