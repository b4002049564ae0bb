"""What a client's LoRA looks like (`LoraSpec`) and how it maps onto a base model's modules.

Module names are the base model's canonical names, e.g. ``model.layers.0.self_attn.q_proj``.
A target entry matches a module whose name equals it or ends with ``"." + entry`` (PEFT's rule
for a list of target modules). Only ``torch.nn.Linear`` modules can be targeted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from rblora.aggregation.types import Factors, lora_scale

__all__ = [
    "Factors",
    "LoraSpec",
    "check_factors",
    "dense_parameters",
    "matches",
    "resolve_targets",
]


@dataclass
class LoraSpec:
    """A LoRA configuration for one client (validated on construction)."""

    rank: int
    """LoRA rank r (>= 1 and at most min(d_in, d_out) of every target module)."""
    lora_alpha: float = 16.0
    """PEFT's lora_alpha: update (lora_alpha / r) * B @ A (lora_alpha / sqrt(r) with rsLoRA)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names or name suffixes to adapt (PEFT matching rule)."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training, in [0, 1)."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r) instead of lora_alpha / r."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the LoRA (PEFT's modules_to_save, e.g. ["classifier"]);
    matched by PEFT's rule, like target_modules."""

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraSpec.rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0):
            raise ValueError(
                f"LoraSpec.lora_alpha must be a positive number, got {self.lora_alpha!r}"
            )
        if isinstance(self.target_modules, str):
            raise ValueError(
                f"LoraSpec.target_modules must be a list of names, got the string "
                f"{self.target_modules!r}; write [{self.target_modules!r}]"
            )
        mods = list(self.target_modules)
        if not mods or not all(isinstance(m, str) and m for m in mods):
            raise ValueError(
                "LoraSpec.target_modules must be a non-empty list of names, "
                f"got {self.target_modules!r}"
            )
        self.target_modules = mods
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraSpec.use_rslora must be True or False, got {self.use_rslora!r}")
        if isinstance(self.modules_to_save, str) or not all(
            isinstance(m, str) and m for m in self.modules_to_save
        ):
            raise ValueError(
                f"LoraSpec.modules_to_save must be a list of names, got {self.modules_to_save!r}"
            )
        self.modules_to_save = list(self.modules_to_save)

    @property
    def scaling(self) -> float:
        """The factor PEFT multiplies B @ A by."""
        return lora_scale(self.lora_alpha, self.rank, self.use_rslora)


def dense_parameters(model: nn.Module, modules_to_save: list[str]) -> dict[str, nn.Parameter]:
    """Parameters of the modules matched by ``modules_to_save``, by name, sorted.

    Raises ValueError if an entry matches no module (the model's top-level modules are listed).
    """
    if not modules_to_save:
        return {}
    out: dict[str, nn.Parameter] = {}
    for target in modules_to_save:
        hits = [n for n, _ in model.named_modules() if n and matches(n, [target])]
        if not hits:
            top = sorted(n for n, _ in model.named_children())
            raise ValueError(
                f"module to save {target!r} matches no module of {type(model).__name__}; "
                f"its top-level modules are: {', '.join(top)}"
            )
        for hit in hits:
            for pname, p in model.get_submodule(hit).named_parameters():
                out[f"{hit}.{pname}"] = p
    return dict(sorted(out.items()))


def in_modules(param_name: str, modules: list[str]) -> bool:
    """True if the parameter ``param_name`` belongs to a module matched by ``modules``."""
    parts = param_name.split(".")
    return any(matches(".".join(parts[:i]), modules) for i in range(1, len(parts)))


def matches(name: str, targets: list[str]) -> bool:
    """PEFT's list rule: ``name == t`` or ``name.endswith("." + t)`` for some target t."""
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by canonical name (LoRA-wrapped layers are not plain)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def resolve_targets(model: nn.Module, spec: LoraSpec) -> dict[str, tuple[int, int]]:
    """Map each targeted module name to ``(d_in, d_out)``, checking names and rank.

    Raises ValueError if a target entry matches nothing (listing the model's linear module
    names), a match is not an ``nn.Linear``, or ``spec.rank`` exceeds ``min(d_in, d_out)``.
    """
    if any(_is_lora_layer(m) for m in model.modules()):
        raise ValueError("the model already carries a LoRA; detach it before attaching another")
    all_modules = dict(model.named_modules())
    linears = linear_modules(model)
    out: dict[str, tuple[int, int]] = {}
    for target in spec.target_modules:
        hits = [n for n in all_modules if n and matches(n, [target])]
        if not hits:
            leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(
                f"target module {target!r} matches no module of {type(model).__name__}; "
                f"its linear modules are named: {', '.join(leaf_names)}"
            )
        for n in hits:
            if n not in linears:
                raise ValueError(
                    f"target module {n!r} is a {type(all_modules[n]).__name__}; "
                    "only torch.nn.Linear modules can carry a LoRA here"
                )
            out[n] = (linears[n].in_features, linears[n].out_features)
    for n, (d_in, d_out) in out.items():
        if spec.rank > min(d_in, d_out):
            raise ValueError(
                f"rank {spec.rank} is above min(d_in, d_out) = {min(d_in, d_out)} of {n!r} "
                f"(d_in={d_in}, d_out={d_out}); use a rank <= {min(d_in, d_out)}"
            )
    return dict(sorted(out.items()))


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def check_factors(
    factors: Factors, expected: dict[str, tuple[int, int]], rank: int | None, what: str
) -> None:
    """Raise ValueError unless ``factors`` has exactly the ``expected`` modules with shapes
    ``A: (rank, d_in)``, ``B: (d_out, rank)`` (any common rank if ``rank`` is None)."""
    missing = sorted(set(expected) - set(factors))
    unexpected = sorted(set(factors) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing modules {missing}")
    if unexpected:
        problems.append(f"unexpected modules {unexpected}")
    for name in sorted(set(expected) & set(factors)):
        d_in, d_out = expected[name]
        try:
            a, b = factors[name]
        except (TypeError, ValueError):
            problems.append(f"{name}: expected a pair (A, B)")
            continue
        r = rank if rank is not None else a.shape[0]
        if tuple(a.shape) != (r, d_in) or tuple(b.shape) != (d_out, r):
            problems.append(
                f"{name}: A {tuple(a.shape)} / B {tuple(b.shape)}, expected "
                f"A ({r}, {d_in}) / B ({d_out}, {r})"
            )
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
