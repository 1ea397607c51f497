"""What ``quantize_model`` did to each layer, and the model's memory before and after."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def module_nbytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, each storage counted once (tied weights too)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "meta":
            total += t.numel() * t.element_size()
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


#: the skip reason of a layer whose class subclasses a supported one, overrides ``forward`` and has no layer adapter
#: ends with this
OVERRIDES_FORWARD = "but overrides forward"


@dataclass
class LayerEntry:
    name: str
    type: str
    status: str  # "quantized" | "skipped"
    reason: str
    spec: str = ""
    weight_numel: int = 0


@dataclass
class QuantReport:
    """Per-layer outcome of ``quantize_model``; ``str(report)`` is a readable table."""

    layers: list[LayerEntry] = field(default_factory=list)
    total_weight_numel: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def quantized(self) -> list[LayerEntry]:
        return [e for e in self.layers if e.status == "quantized"]

    @property
    def skipped(self) -> list[LayerEntry]:
        return [e for e in self.layers if e.status == "skipped"]

    @property
    def unadapted_classes(self) -> dict[str, list[LayerEntry]]:
        """Class name -> its skipped layers, for classes that override ``forward`` with no layer adapter."""
        out: dict[str, list[LayerEntry]] = {}
        for e in self.skipped:
            if e.reason.endswith(OVERRIDES_FORWARD):
                out.setdefault(e.type, []).append(e)
        return out

    @property
    def quantized_fraction(self) -> float:
        """Share of the model's matrix weights (parameters with >= 2 dims) that were quantized."""
        if self.total_weight_numel == 0:
            return 0.0
        return sum(e.weight_numel for e in self.quantized) / self.total_weight_numel

    @property
    def compression(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    def summary(self) -> str:
        text = (
            f"{len(self.quantized)} layers quantized, {len(self.skipped)} skipped; "
            f"{100 * self.quantized_fraction:.1f}% of matrix weights quantized; "
            f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB ({self.compression:.2f}x)"
        )
        unadapted = self.unadapted_classes
        if unadapted:
            text += "; own forward, no layer adapter: " + ", ".join(f"{c} ({len(v)})" for c, v in unadapted.items())
        return text

    def __str__(self) -> str:
        rows = [("layer", "type", "status", "spec / reason")]
        for e in self.layers:
            rows.append((e.name, e.type, e.status, e.spec if e.status == "quantized" else e.reason))
        widths = [min(60, max(len(r[i]) for r in rows)) for i in range(3)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        return "\n".join(lines + [self.summary()])

    def to_dict(self) -> dict:
        return {
            "layers": [e.__dict__ for e in self.layers],
            "quantized_fraction": self.quantized_fraction,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


def matrix_weight_numel(model: nn.Module) -> int:
    """Elements in all parameters with >= 2 dims (the weights a quantizer could act on)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if p.ndim >= 2 and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


#: reasons named in a "quantized NOTHING" warning
MAX_SKIP_REASONS = 3


def skip_reasons(report: QuantReport, limit: int = MAX_SKIP_REASONS) -> list[str]:
    """Why ``report``'s layers were skipped, most telling first: the reasons that defeated the recipe (a group size
    or rank the shapes do not allow, an unsupported layer) before the rule's and the user's own choices (kept in
    float, excluded), then by skipped weight; each with its layer count and one example layer."""
    by_reason: dict[str, list[LayerEntry]] = {}
    for e in report.skipped:
        by_reason.setdefault(e.reason, []).append(e)

    def key(item: tuple[str, list[LayerEntry]]) -> tuple[bool, int, str]:
        reason, entries = item
        chosen = reason.startswith(("kept in float by override", "excluded by pattern", "not matched by include"))
        return chosen, -sum(e.weight_numel for e in entries), reason

    out = []
    for reason, entries in sorted(by_reason.items(), key=key)[:limit]:
        n = len(entries)
        out.append(f"{reason} ({n} layer{'s' if n > 1 else ''}, e.g. {entries[0].name})")
    return out
