"""Rendering HostResults for people and programs: a table, JSON, or a self-contained HTML page.

``json`` is exactly a JSON array of ``HostResult.to_wire()`` (RUNTIME.md, ``vsa
scan``). The table and the HTML page show every host (status, reason) and,
under each scanned host: its OS, each authentication entry with its status,
the package count, the findings counted by severity, its open ports with what
was learnt of them, then its findings (most severe first). Pure: text in, text out.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

from appliance.results import AuthOutcome, Finding, HostResult, OsInfo

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


def os_text(os_info: OsInfo | None) -> str | None:
    """``Debian GNU/Linux 12 (linux, kernel 6.1.0-27-amd64, x86_64; via ssh)``, or None."""
    if os_info is None:
        return None
    head = " ".join(x for x in (os_info.name, os_info.version) if x) or "unknown"
    details = [x for x in (os_info.family, f"kernel {os_info.kernel}" if os_info.kernel else None,
                           os_info.arch) if x]
    tail = ", ".join(details)
    if os_info.source:
        tail = f"{tail}; via {os_info.source}" if tail else f"via {os_info.source}"
    return f"{head} ({tail})" if tail else head


def auth_text(entry: AuthOutcome) -> str:
    """``unix cli: success (root) - words``: one authentication entry."""
    name = f"{entry.type} {entry.record_id}" if entry.record_id else f"{entry.type} (no record)"
    text = f"{name}: {entry.status}"
    if entry.status == "success":
        text += " (root)" if entry.type == "unix" and entry.privileged else \
            " (administrator)" if entry.privileged else " (unprivileged)"
    if entry.message and entry.status != "not_applicable":
        text += f" - {entry.message}"
    return text


def severity_counts(findings: Sequence[Finding]) -> str:
    """``3 findings: 1 of severity 5, 2 of severity 4`` (or ``no findings``)."""
    if not findings:
        return "no findings"
    counts: dict[int, int] = {}
    for f in findings:
        counts[f.severity] = counts.get(f.severity, 0) + 1
    parts = [f"{counts[s]} of severity {s}" for s in sorted(counts, reverse=True)]
    return f"{len(findings)} finding{'s' if len(findings) != 1 else ''}: " + ", ".join(parts)


def packages_text(result: HostResult) -> str | None:
    """``812 dpkg packages (Debian:12)``, or None when no packages were collected."""
    if result.packages is None:
        return None
    p = result.packages
    return f"{len(p.items)} {p.manager} packages ({p.ecosystem})"


def _ordered(findings: Sequence[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (-f.severity, f.id, f.package or ""))


def _finding_text(f: Finding) -> str:
    text = f"[{f.severity}] {f.id} {f.title}"
    if f.package:
        text += f" - {f.package} {f.installed or '?'}"
        if f.source_package:
            text += f" (source {f.source_package})"
        text += f", fixed in {f.fixed}" if f.fixed else ", no fix yet"
    return text


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
    """A plain-text table: one block per host, its facts and open ports indented beneath it."""
    lines: list[str] = []
    for r in results:
        lines.append(f"{r.host_key:<39} {_status(r)}")
        if r.os is not None:
            lines.append(f"    os: {os_text(r.os)}")
        for a in r.auth:
            lines.append(f"    auth: {auth_text(a)}")
        packages = packages_text(r)
        if packages:
            lines.append(f"    packages: {packages}")
        if r.findings or r.packages is not None:
            lines.append(f"    findings: {severity_counts(r.findings)}")
        for p in r.ports:
            port = f"{p.port}/{p.proto}"
            lines.append(f"    {port:<11} {p.state:<13} {_service_text(p.service, p.product, p.version)}")
            if p.banner:
                lines.append(f"                {p.banner}")
        for f in _ordered(r.findings):
            lines.append(f"    {_finding_text(f)}")
        for e in r.errors:
            lines.append(f"    note: {e}")
    lines.append(summary_line(results))
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}
.down{color:#888}.excluded{color:#a60}.note{color:#555;font-size:.9em}
.sev5 td:first-child{background:#f4b6b6}.sev4 td:first-child{background:#f8d3b0}.sev3 td:first-child{background:#f6eab0}"""


def render_html(results: Sequence[HostResult]) -> str:
    """A self-contained HTML report (no scripts, no external resources)."""
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>vsa scan report</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>vsa scan report</h1>",
           f"<p>{esc(summary_line(results))}</p>"]
    for r in results:
        out.append(f"<h2 class=\"{esc(r.status)}\">{esc(r.host_key)} &mdash; {esc(_status(r))}</h2>")
        facts = [("os", os_text(r.os))] + [("auth", auth_text(a)) for a in r.auth]
        facts.append(("packages", packages_text(r)))
        if r.findings or r.packages is not None:
            facts.append(("findings", severity_counts(r.findings)))
        shown = [(k, v) for k, v in facts if v]
        if shown:
            out.append("<table class=\"facts\">" + "".join(
                f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in shown) + "</table>")
        if r.ports:
            out.append("<table><tr><th>port</th><th>state</th><th>service</th><th>product</th>"
                       "<th>version</th><th>banner</th></tr>")
            for p in r.ports:
                out.append("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in (
                    f"{p.port}/{p.proto}", p.state, p.service or "", p.product or "", p.version or "",
                    p.banner or "")) + "</tr>")
            out.append("</table>")
        if r.findings:
            out.append("<table><tr><th>severity</th><th>id</th><th>title</th><th>package</th>"
                       "<th>source package</th><th>installed</th><th>fixed</th></tr>")
            for f in _ordered(r.findings):
                out.append(f"<tr class=\"sev{f.severity}\">" + "".join(f"<td>{esc(str(v))}</td>" for v in (
                    f.severity, f.id, f.title, f.package or "", f.source_package or "",
                    f.installed or "", f.fixed or ("no fix yet" if f.package else ""))) + "</tr>")
            out.append("</table>")
        for e in r.errors:
            out.append(f"<p class=\"note\">{esc(e)}</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
