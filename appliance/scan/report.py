"""Rendering HostResults for people and programs: a table, JSON, or a self-contained HTML page.

``json`` is exactly a JSON array of ``HostResult.to_wire()`` (RUNTIME.md, ``vsa
scan``). The table and the HTML page show every host (status, reason) and,
under each scanned host, its open ports with what was learnt of them, then
its findings when there are any. Pure: text in, text out.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

from appliance.results import HostResult

FORMATS = ("table", "json", "html")


def render(results: Sequence[HostResult], fmt: str) -> str:
    """Render ``results`` as ``table``, ``json`` or ``html``."""
    if fmt == "json":
        return render_json(results)
    if fmt == "html":
        return render_html(results)
    if fmt == "table":
        return render_table(results)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def render_json(results: Sequence[HostResult]) -> str:
    """A JSON array with one HostResult object per target."""
    return json.dumps([r.to_wire() for r in results], indent=2) + "\n"


def _status(result: HostResult) -> str:
    return f"{result.status} ({result.reason})" if result.reason else result.status


def _service_text(port_service: str | None, product: str | None, version: str | None) -> str:
    return " ".join(x for x in (port_service, product, version) if x) or "-"


def summary_line(results: Sequence[HostResult]) -> str:
    """``9 hosts: 7 scanned, 2 down, 0 excluded; 42 open ports``."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    parts = [f"{counts.get(s, 0)} {s}" for s in ("scanned", "down", "excluded")]
    parts += [f"{n} {s}" for s, n in counts.items() if s not in ("scanned", "down", "excluded")]
    open_ports = sum(len(r.ports) for r in results)
    findings = sum(len(r.findings) for r in results)
    tail = f"; {open_ports} open ports" + (f", {findings} findings" if findings else "")
    return f"{len(results)} hosts: " + ", ".join(parts) + tail


def render_table(results: Sequence[HostResult]) -> str:
    """A plain-text table: one block per host, open ports indented beneath it."""
    lines: list[str] = []
    for r in results:
        lines.append(f"{r.host_key:<39} {_status(r)}")
        for p in r.ports:
            port = f"{p.port}/{p.proto}"
            lines.append(f"    {port:<11} {p.state:<13} {_service_text(p.service, p.product, p.version)}")
            if p.banner:
                lines.append(f"                {p.banner}")
        for f in r.findings:
            lines.append(f"    [{f.severity}] {f.id} {f.title}")
        for e in r.errors:
            lines.append(f"    note: {e}")
    lines.append(summary_line(results))
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}
.down{color:#888}.excluded{color:#a60}.note{color:#555;font-size:.9em}"""


def render_html(results: Sequence[HostResult]) -> str:
    """A self-contained HTML report (no scripts, no external resources)."""
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>vsa scan report</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>vsa scan report</h1>",
           f"<p>{esc(summary_line(results))}</p>"]
    for r in results:
        out.append(f"<h2 class=\"{esc(r.status)}\">{esc(r.host_key)} &mdash; {esc(_status(r))}</h2>")
        if r.ports:
            out.append("<table><tr><th>port</th><th>state</th><th>service</th><th>product</th>"
                       "<th>version</th><th>banner</th></tr>")
            for p in r.ports:
                out.append("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in (
                    f"{p.port}/{p.proto}", p.state, p.service or "", p.product or "", p.version or "",
                    p.banner or "")) + "</tr>")
            out.append("</table>")
        if r.findings:
            out.append("<table><tr><th>severity</th><th>id</th><th>title</th><th>package</th></tr>")
            for f in r.findings:
                out.append("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in (
                    f.severity, f.id, f.title, f.package or "")) + "</tr>")
            out.append("</table>")
        for e in r.errors:
            out.append(f"<p class=\"note\">{esc(e)}</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
