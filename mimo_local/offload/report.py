"""The plan as people read it: one table of bytes per component and device, and the verdict."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .plan import MemoryPlan

LABELS = {
    "embeddings": "embeddings",
    "attention": "attention",
    "norms": "norms",
    "dense_ffn": "dense FFN",
    "router": "router",
    "experts": "routed experts",
    "mtp": "MTP layers",
    "lm_head": "lm_head",
}


def _size(nbytes: int) -> str:
    if nbytes == 0:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{nbytes} B"


def render(plan: MemoryPlan, console: Console) -> None:
    request, inventory = plan.request, plan.inventory
    console.print(
        f"[bold]{plan.config.display_family}[/]: {inventory.total_params / 1e9:,.2f}B parameters, "
        f"{inventory.active_params_per_token / 1e9:,.2f}B active per token"
        + (f", {plan.mtp_layers} MTP layers ({inventory.mtp_params / 1e9:,.2f}B)" if plan.mtp_layers else "")
        + f" | weights {plan.weights_format} | context {request.ctx:,} tokens"
    )
    devices = plan.devices
    table = Table(title="memory plan", title_justify="left")
    table.add_column("component")
    for device in devices:
        table.add_column(device.upper(), justify="right")
    table.add_column("total", justify="right")
    for component, label in LABELS.items():
        row = [plan.weights[d][component] for d in devices]
        if sum(row):
            table.add_row(label, *map(_size, row), _size(sum(row)))
    kv_note = "KV cache (" + ("global layers int8, " if plan.request.cache_type == "int8" else "")
    kv_note += f"{plan.kv_bytes_per_token / 1024:,.1f} KiB/token"
    kv_note += f" + {_size(plan.kv_fixed_bytes)} sliding)" if plan.kv_fixed_bytes else ")"
    for label, values in ((kv_note, plan.kv), ("activations (estimate)", plan.workspace)):
        row = [values[d] for d in devices]
        table.add_row(label, *map(_size, row), _size(sum(row)))
    table.add_section()
    used = [plan.used(d) for d in devices]
    table.add_row("[bold]needed[/]", *map(_size, used), _size(sum(used)))
    table.add_row("budget", *(_size(plan.budgets[d]) for d in devices), "")
    table.add_row(
        "left",
        *(f"[green]{_size(-plan.over(d))}[/]" if plan.over(d) <= 0 else f"[red]-{_size(plan.over(d))}[/]" for d in devices),
        "",
    )
    console.print(table)
    if plan.experts_total:
        share = plan.experts_on_gpu / plan.experts_total
        console.print(f"routed experts on the GPU: {plan.experts_on_gpu:,} of {plan.experts_total:,} ({share:.0%})")
    style = "green" if plan.fits else "red"
    console.print(f"[{style}]{plan.verdict()}[/]")
