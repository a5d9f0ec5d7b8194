"""vsa scan's arguments, exit codes, reports, options and service parsers (no network)."""

from __future__ import annotations

import argparse
import json

import pytest

from appliance.results import HostResult, Port, Target
from appliance.scan import command, report
from appliance.scan.portscan import PortScanOptions, ScanOptionError
from appliance.scan.services import (
    identify,
    parse_http_response,
    parse_server_header,
    parse_ssh_banner,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vsa scan")
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    "line, expected",
    [
        ("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3", ("OpenSSH", "9.2p1")),
        ("SSH-2.0-OpenSSH_8.0", ("OpenSSH", "8.0")),
        ("SSH-2.0-dropbear_2022.83", ("dropbear", "2022.83")),
        ("SSH-1.99-Cisco-1.25", ("Cisco", "1.25")),
        ("SSH-2.0-libssh-0.9.6", ("libssh", "0.9.6")),
        ("SSH-2.0-Go", ("Go", None)),
        ("HTTP/1.1 400", (None, None)),
    ],
)
def test_ssh_banner(line, expected):
    assert parse_ssh_banner(line) == expected


def test_http_parsers():
    head = b"HTTP/1.1 200 OK\r\nDate: x\r\nserver: Apache/2.4.62 (Debian)\r\n\r\nbody"
    assert parse_http_response(head) == ("HTTP/1.1 200 OK", "Apache/2.4.62 (Debian)")
    assert parse_server_header("Apache/2.4.62 (Debian)") == ("Apache", "2.4.62")
    assert parse_server_header("Microsoft-IIS/10.0") == ("Microsoft-IIS", "10.0")
    assert parse_server_header("cloudflare") == ("cloudflare", None)
    assert parse_http_response(b"SSH-2.0-x\r\n") == (None, None)


def test_identify_combines_tls_and_http():
    port = identify(8443, http=b"HTTP/1.0 302 Found\r\nServer: nginx/1.22.1\r\n\r\n", tls_subject="CN=a.example")
    assert port.service == "https" and port.product == "nginx" and port.version == "1.22.1"
    assert port.banner.startswith("TLS subject: CN=a.example; HTTP/1.0 302 Found")
    ssh = identify(2222, first_bytes=b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")
    assert (ssh.service, ssh.product, ssh.version) == ("ssh", "OpenSSH", "9.2p1")
    quiet = identify(3306)
    assert quiet.service == "mysql" and quiet.banner is None


def test_options_from_job_validate_and_name_the_field():
    opts = PortScanOptions.from_job({"tcp_ports": "light", "udp_ports": "none", "host_discovery": "none",
                                     "service_detection": "nmap", "rate_pps": 5000, "max_parallel_hosts": 4,
                                     "host_timeout_s": 60})
    assert len(opts.tcp_ports) == 100 and not opts.host_discovery and opts.rate_pps == 5000
    for bad, words in [({"tcp_ports": "22,x"}, "options.tcp_ports"), ({"rate_pps": 0}, "options.rate_pps"),
                       ({"rate_pps": True}, "options.rate_pps"), ({"host_discovery": "arp"}, "options.host_discovery"),
                       ({"service_detection": "deep"}, "options.service_detection"),
                       ({"max_parallel_hosts": 10_000}, "options.max_parallel_hosts")]:
        with pytest.raises(ScanOptionError, match=words):
            PortScanOptions.from_job(bad)


def test_defaults():
    args = parse("10.0.0.1")
    assert args.ports == "standard" and args.format == "table" and not args.no_discovery


@pytest.mark.parametrize(
    "argv, words",
    [
        (["10.0.0.1", "--ports", "22,,80"], "empty item"),
        (["10.0.0.1", "--rate", "0"], "--rate"),
        (["10.0.0.1", "--ssh-key", "/nonexistent"], "need --ssh-user"),
        (["10.0.0.1", "--smb-user", "u"], "--smb-password-env"),
        (["10.0.0.1", "--fail-on-severity", "9"], "between 1 and 5"),
        (["10.0.0.300"], "not an IP address"),
        (["10.0.0.0/8"], "more than the 65,536 allowed per block"),
    ],
)
def test_bad_arguments_exit_2_with_words(argv, words, capsys, monkeypatch):
    monkeypatch.setenv("VSA_CONFIG", "")
    assert command.run(parse(*argv)) == command.EXIT_USAGE
    assert words in capsys.readouterr().err


def test_sudo_and_su_are_exclusive():
    with pytest.raises(SystemExit) as info:
        parse("10.0.0.1", "--ssh-user", "u", "--sudo", "--su")
    assert info.value.code == 2


def test_out_of_scope_only_runs_without_sending(capsys, tmp_path):
    """Targets that are all out of scope: exit 0, one excluded result each, JSON as the protocol says."""
    out = tmp_path / "r.json"
    rc = command.run(parse("127.0.0.5", "169.254.169.254", "--format", "json", "--output", str(out)))
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert [(r["host_key"], r["status"], r["reason"]) for r in data] == [
        ("127.0.0.5", "excluded", "out_of_scope"), ("169.254.169.254", "excluded", "out_of_scope")]


def sample_results():
    scanned = HostResult(target=Target(ip="10.0.0.2"), status="scanned", ports=[
        Port(proto="tcp", port=22, service="ssh", banner="SSH-2.0-OpenSSH_9.2p1", product="OpenSSH", version="9.2p1"),
        Port(proto="tcp", port=80, service="http", banner="<script>x</script>")])
    return [scanned, HostResult(target=Target(ip="10.0.0.3"), status="down"),
            HostResult(target=Target(ip="127.0.0.1"), status="excluded", reason="out_of_scope")]


def test_reports():
    results = sample_results()
    assert json.loads(report.render(results, "json")) == [r.to_wire() for r in results]
    table = report.render(results, "table")
    assert "22/tcp" in table and "ssh OpenSSH 9.2p1" in table and "excluded (out_of_scope)" in table
    assert table.strip().endswith("3 hosts: 1 scanned, 1 down, 1 excluded; 2 open ports")
    page = report.render(results, "html")
    assert page.startswith("<!DOCTYPE html>") and "&lt;script&gt;" in page and "<script>" not in page
    with pytest.raises(ValueError):
        report.render(results, "xml")


def test_progress_bar_only_on_a_terminal(tmp_path):
    with open(tmp_path / "f", "w") as stream:
        bar = command.ProgressBar(stream)
        bar("scanning", 5, 10)
        bar.clear()
    assert (tmp_path / "f").read_text() == ""


def test_internal_failure_exits_1(monkeypatch, capsys):
    async def broken(*_args, **_kwargs):
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(command, "scan_targets", broken)
    assert command.run(parse("10.0.0.1")) == command.EXIT_INTERNAL
    assert "internal failure: RuntimeError: the engine broke" in capsys.readouterr().err


def test_bad_configuration_exits_2(monkeypatch, tmp_path, capsys):
    bad = tmp_path / "appliance.toml"
    bad.write_text("[scan]\nallow_targets = ['not-a-cidr']\n")
    monkeypatch.setenv("VSA_CONFIG", str(bad))
    assert command.run(parse("10.0.0.1")) == command.EXIT_USAGE
    assert "scan.allow_targets" in capsys.readouterr().err
