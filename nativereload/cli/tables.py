"""Human-readable tables: one process's status reply, and columns for ``ps``.

Pure formatting of the replies the control protocol returns: no I/O besides
asking whether stdout takes non-ASCII (``output.dash``).
"""

from __future__ import annotations

import sys

from ..output import dash


def format_status(reply: dict, socket_path: str) -> str:
    """A readable table of one process's status reply."""
    name = f" [{reply['name']}]" if reply.get("name") else ""
    lines = [f"pid {reply.get('pid')}{name}  ({socket_path})"]
    modules = reply.get("modules") or []
    if not modules:
        lines.append("  no modules loaded")
        return "\n".join(lines)
    rows = [("MODULE", "GEN", "CALLS", "IMAGE", "STATE", "IN FLIGHT", "PATH")]
    for m in modules:
        images = m.get("images") or [{}]
        for i, image in enumerate(images):
            first = i == 0
            rows.append((m["name"] if first else "", str(m.get("generation")) if first else "",
                         _calls(m) if first else "", str(image.get("generation", "-")), image.get("state", "-"),
                         str(image.get("in_flight", "-")), (m.get("path") or "") if first else ""))
    lines += columns(rows)
    for m in modules:
        note = _old_images_note(m)
        if note:
            lines.append(f"  {m['name']}: {note}")
    return "\n".join(lines)


def columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows aligned in columns (the last one left ragged), indented by two spaces."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    return ["  " + "  ".join([row[c].ljust(widths[c]) for c in range(len(widths))] + [row[-1]]).rstrip()
            for row in rows]


def _calls(module: dict) -> str:
    """How the module's calls are made: "compiled", "compiling", "gate" or "python" (older servers: "-")."""
    return module.get("calls") or "-"


def _old_images_note(module: dict) -> str | None:
    """What became of a module's earlier generations, e.g. "old images drained (generation 1)".

    The reply lists only images not yet closed, and generations count
    successful loads: an earlier generation that is not listed has drained
    and closed.
    """
    images = module.get("images") or []
    generation = module.get("generation")
    if not isinstance(generation, int):
        return None
    listed = {i.get("generation") for i in images}
    active = [i.get("generation") for i in images if i.get("state") == "active"]
    newest = active[0] if active else generation + 1  # unloaded: every listed image is old
    closed = [g for g in range(1, newest) if g not in listed]
    draining = [i for i in images if i.get("state") == "retired"]
    parts = []
    for image in draining:
        # e.g. "generation 1: retired — 0 calls, 2 handles (sqlite3 *), 1 pin"
        held_by = image.get("held_by") or f"{image.get('in_flight') or 0} call(s)"
        parts.append(f"generation {image.get('generation')}: retired {dash(sys.stdout)} {held_by}")
    if len(closed) == 1:
        parts.append(f"old image drained (generation {closed[0]})")
    elif closed:
        contiguous = closed == list(range(closed[0], closed[-1] + 1))
        span = f"{closed[0]}-{closed[-1]}" if contiguous else ", ".join(map(str, closed))
        parts.append(f"old images drained (generations {span})")
    return "; ".join(parts) or None
