"""Inventory parsers on real captured output (tests/fixtures/inventory, provenance in each file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.scan import inventory as inv

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "inventory"


def fixture(relpath: str) -> str:
    """A fixture's text without its "#% " provenance header."""
    text = (FIXTURES / relpath).read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[0].startswith("#% source:"), f"{relpath} must start with its provenance"
    return "\n".join(line for line in lines if not line.startswith("#% "))


# ---- os-release -> OsInfo and OSV ecosystem -------------------------------------------------

@pytest.mark.parametrize(("relpath", "name", "version", "ecosystem"), [
    ("debian12/os-release", "Debian GNU/Linux", "12", "Debian:12"),
    ("os-release/debian10", "Debian GNU/Linux", "10", "Debian:10"),
    ("os-release/ubuntu16", "Ubuntu", "16.04", "Ubuntu:16.04:LTS"),
    ("os-release/ubuntu14", "Ubuntu", "14.04", "Ubuntu:14.04:LTS"),
    ("alpine3.23/os-release", "Alpine Linux", "3.23.6", "Alpine:v3.23"),
    ("os-release/rhel7", "Red Hat Enterprise Linux Server", "7.0", "Red Hat:7"),
    ("os-release/rocky", "Rocky Linux", "8.4", "Rocky Linux:8"),
    ("os-release/centos7", "CentOS Linux", "7", "CentOS:7"),
    ("os-release/amazon2016", "Amazon Linux AMI", "2016.03", "Amazon Linux:2016.03"),
    ("os-release/oracle7", None, None, "Oracle Linux:7"),
    ("os-release/opensuse15", "openSUSE Leap", "15.2", "openSUSE:Leap 15.2"),
    ("os-release/sles12", "SLES", "12.1", "SUSE:Linux Enterprise Server 12 SP1"),
])
def test_os_release_of_real_distributions(relpath: str, name: str | None, version: str | None,
                                          ecosystem: str) -> None:
    fields = inv.parse_os_release(fixture(relpath))
    info = inv.os_info(fields, inv.UnameInfo("6.1.0-27-amd64", "x86_64"))
    assert info.family == "linux" and info.source == "ssh"
    if name is not None:
        assert info.name == name
        assert info.version == version
    assert info.kernel == "6.1.0-27-amd64" and info.arch == "x86_64"
    assert inv.osv_ecosystem(fields) == ecosystem


def test_os_release_quoting_and_junk() -> None:
    fields = inv.parse_os_release(
        '# comment\nNAME="A \\"quoted\\" name"\nID=\'x\'\nnot a line\nlower=1\nVERSION_ID=3\n'
    )
    assert fields == {"NAME": 'A "quoted" name', "ID": "x", "VERSION_ID": "3"}


@pytest.mark.parametrize(("fields", "ecosystem"), [
    ({"ID": "ubuntu", "VERSION_ID": "23.10", "VERSION": "23.10 (Mantic Minotaur)"}, "Ubuntu:23.10"),
    ({"ID": "ubuntu", "VERSION_ID": "22.04", "VERSION": "22.04.4 LTS (Jammy Jellyfish)"}, "Ubuntu:22.04:LTS"),
    ({"ID": "almalinux", "VERSION_ID": "9.4"}, "AlmaLinux:9"),
    ({"ID": "amzn", "VERSION_ID": "2023"}, "Amazon Linux:2023"),
    ({"ID": "amzn", "VERSION_ID": "2"}, "Amazon Linux:2"),
    ({"ID": "alpine", "VERSION_ID": "3.20.3"}, "Alpine:v3.20"),
    ({"ID": "debian"}, "Debian"),
    ({"ID": "arch", "NAME": "Arch Linux"}, "Arch Linux"),
])
def test_ecosystem_rules(fields: dict[str, str], ecosystem: str) -> None:
    # Expected strings follow ossf/osv-schema ecosystems.json (Ubuntu ":LTS", Alpine "v").
    assert inv.osv_ecosystem(fields) == ecosystem


def test_uname() -> None:
    u = inv.parse_uname(fixture("debian12/uname.txt"))
    assert u.kernel and u.arch in ("x86_64", "aarch64")
    assert inv.parse_uname("") == inv.UnameInfo(None, None)
    assert inv.parse_uname("bad kernel;rm\nx86_64").kernel is None


# ---- packages --------------------------------------------------------------------------

def test_dpkg_debian12_real_output() -> None:
    items = inv.parse_dpkg(fixture("debian12/dpkg.txt"))
    assert len(items) > 300
    by_name = {p.name: p for p in items}
    # Source names differ from binary names (util-linux builds bsdutils, openssl libssl3).
    assert by_name["bsdutils"].source_name == "util-linux"
    assert by_name["libssl3"].source_name == "openssl"
    # binNMUs: the binary version carries +bN, the source version does not.
    binnmu = [p for p in items if "+b" in p.version and p.source_version != p.version]
    assert binnmu, "a Debian 12 install has binNMU packages"
    assert all(p.source_version and "+b" not in p.source_version.split("-")[-1] for p in binnmu[:20])
    # Epochs stay on the binary version and are absent from the source version when the source has none.
    assert by_name["bsdutils"].version.startswith("1:")
    assert all(p.arch in ("amd64", "all", "arm64", "i386") for p in items)


def test_dpkg_status_and_old_source_field() -> None:
    text = (
        "install ok installed\tfoo\t1.0-1+b1\tamd64\t\t\tfoosrc (1.0-1)\n"
        "deinstall ok config-files\tgone\t2.0\tamd64\tgone\t2.0\t\n"
        "install ok installed\tbar\t3.0\tall\t\t\t\n"
        "garbage line\n"
    )
    items = inv.parse_dpkg(text)
    assert [p.name for p in items] == ["foo", "bar"]
    assert items[0].source_name == "foosrc" and items[0].source_version == "1.0-1"
    assert items[1].source_name == "bar" and items[1].source_version == "3.0"


def test_rpm_centos7_real_output() -> None:
    items = inv.parse_rpm(fixture("centos7/rpm.txt"))
    by_name = {p.name: p for p in items}
    assert "gpg-pubkey" not in by_name
    assert len(items) > 100
    ssl = by_name["openssl-libs"]
    assert ssl.version == "1:1.0.2k-12.el7"  # epoch kept
    assert ssl.source_name == "openssl" and ssl.source_version == "1:1.0.2k-12.el7"
    tz = by_name["tzdata"]
    assert tz.version == "2018e-3.el7" and tz.arch == "noarch" and tz.source_name == "tzdata"


def test_rpm_centos8_real_output_epoch_zero_and_subpackages() -> None:
    items = inv.parse_rpm(fixture("centos8/rpm.txt"))
    by_name = {p.name: p for p in items}
    errno = by_name["perl-Errno"]
    # Epoch 0 is the same as no epoch for RPM; the source is perl, not perl-Errno.
    assert errno.version == "1.28-416.el8"
    assert errno.source_name == "perl" and errno.source_version == "5.26.3-416.el8"
    assert by_name["perl-Scalar-List-Utils"].version.startswith("3:")
    assert by_name["centos-gpg-keys"].source_name == "centos-release"


def test_split_source_rpm() -> None:
    assert inv.split_source_rpm("openssl-3.0.7-27.el9.src.rpm") == ("openssl", "3.0.7-27.el9")
    assert inv.split_source_rpm("python3-pip-21.3.1-1.amzn2023.0.5.src.rpm") == (
        "python3-pip", "21.3.1-1.amzn2023.0.5")
    assert inv.split_source_rpm("(none)") is None
    assert inv.split_source_rpm("nonsense.rpm") is None


def test_apk_alpine_real_database_full_and_filtered() -> None:
    full = inv.parse_apk_installed(fixture("alpine3.23/installed"))
    filtered = inv.parse_apk_installed(fixture("alpine3.23/apk.txt"))
    assert full == filtered
    assert len(full) == fixture("alpine3.23/installed").count("\nP:") + fixture("alpine3.23/installed").startswith("P:")
    by_name = {p.name: p for p in full}
    base = by_name["alpine-baselayout"]
    assert base.version == "3.7.2-r0" and base.arch == "x86_64" and base.source_name == "alpine-baselayout"
    # Subpackages carry their origin (aports) as the source package.
    origins = {p.source_name for p in full if p.source_name != p.name}
    assert origins, "an Alpine install has subpackages (e.g. libcrypto3 from openssl)"


def test_packages_from_combines_ecosystem() -> None:
    pk = inv.packages_from("apk", fixture("alpine3.23/apk.txt"),
                           inv.parse_os_release(fixture("alpine3.23/os-release")))
    assert pk.manager == "apk" and pk.ecosystem == "Alpine:v3.23" and pk.items


# ---- listening sockets -----------------------------------------------------------------

def test_ss_real_output_and_formats() -> None:
    socks = inv.parse_ss(fixture("debian12/ss.txt"))
    assert socks and all(0 < s.port <= 65535 for s in socks)
    sample = (
        "Netid State  Recv-Q Send-Q Local Address:Port Peer Address:Port Process\n"
        "tcp   LISTEN 0      128          0.0.0.0:22        0.0.0.0:*\n"
        "tcp   LISTEN 0      128             [::]:22           [::]:*\n"
        "udp   UNCONN 0      0      127.0.0.53%lo:53        0.0.0.0:*\n"
        "tcp   ESTAB  0      0          10.0.0.5:22       10.0.0.9:5555\n"
        "tcp   LISTEN 0      5                  *:8080            *:*\n"
    )
    got = {(s.proto, s.address, s.port) for s in inv.parse_ss(sample)}
    assert got == {("tcp", "0.0.0.0", 22), ("tcp", "::", 22), ("udp", "127.0.0.53", 53),
                   ("tcp", "0.0.0.0", 8080)}


def test_proc_net_real_tables_agree_with_ss() -> None:
    tcp = inv.parse_proc_net(fixture("debian12/proc-net-tcp.txt"), "tcp")
    tcp6 = inv.parse_proc_net(fixture("debian12/proc-net-tcp6.txt"), "tcp")
    ss_tcp = {(s.address, s.port) for s in inv.parse_ss(fixture("debian12/ss.txt")) if s.proto == "tcp"}
    proc_ports = {s.port for s in tcp + tcp6}
    # Captured seconds apart on a busy machine: most listeners appear in both.
    assert len(proc_ports & {p for _, p in ss_tcp}) >= max(1, len(ss_tcp) // 2)
    sample = ("  sl  local_address rem_address   st\n"
              "   0: 0100007F:0016 00000000:0000 0A 00000000:00000000\n"
              "   1: 00000000:1F90 00000000:0000 01 00000000:00000000\n")
    assert inv.parse_proc_net(sample, "tcp") == (inv.ListeningSocket("tcp", "127.0.0.1", 22),)
    six = ("  sl  local_address                         remote_address st\n"
           "   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A\n")
    assert inv.parse_proc_net(six, "tcp") == (inv.ListeningSocket("tcp", "::1", 22),)


# ---- the collector's sections ----------------------------------------------------------

def test_split_sections_and_inventory() -> None:
    nonce = "00112233445566778899aabbccddeeff"
    m = f"@@vsa-{nonce}"
    out = (
        f"\n{m} begin id\n0\n\n{m} end id 0\n"
        f"\n{m} begin os-release\n{fixture('debian12/os-release')}\n{m} end os-release 0\n"
        f"\n{m} begin uname\n6.1.0-27-amd64\nx86_64\n\n{m} end uname 0\n"
        f"\n{m} begin dpkg\n{fixture('debian12/dpkg.txt')}\n{m} end dpkg 0\n"
        f"\n{m} begin ss\n{fixture('debian12/ss.txt')}\n{m} end ss 0\n"
        "\n@@vsa-0000000000000000 begin id\n1000\n"  # another nonce: content, not a marker
    )
    sections = inv.split_sections(out, nonce)
    assert set(sections) == {"id", "os-release", "uname", "dpkg", "ss"}
    assert all(s.ok for s in sections.values())
    result = inv.inventory_from(sections)
    assert result.uid == 0
    assert result.os is not None and result.os.version == "12"
    assert result.packages is not None and result.packages.ecosystem == "Debian:12"
    assert result.errors == ()


def test_cut_short_section_is_an_error_not_a_crash() -> None:
    nonce = "0123456789abcdef"
    sections = inv.split_sections(f"\n@@vsa-{nonce} begin dpkg\ninstall ok installed\ta\t1\tall\n", nonce)
    assert sections["dpkg"].exit_status is None and not sections["dpkg"].ok
    result = inv.inventory_from(sections)
    assert result.packages is None
    assert any("dpkg" in e for e in result.errors)


def test_collector_script_shape() -> None:
    script = inv.collector_script("0123456789abcdef")
    assert script.startswith("exec </dev/null")
    assert inv.DPKG_COMMAND in script and inv.RPM_COMMAND in script and inv.APK_COMMAND in script
    with pytest.raises(ValueError):
        inv.collector_script("not-hex; rm -rf /")


# ---- instance metadata -----------------------------------------------------------------

def test_parse_imds() -> None:
    def sec(name: str, body: str, rc: int = 0) -> inv.CommandResult:
        return inv.CommandResult(name=name, stdout=body, exit_status=rc)

    doc = '{"accountId": "111122223333", "instanceId": "i-0abc1234def567890", "region": "us-east-1", "nested": {"x": 1}}'
    sections = {
        "client": sec("client", "curl v2"),
        "imds:meta-data/ami-id": sec("", "ami-0123456789abcdef0"),
        "imds:meta-data/instance-id": sec("", "i-0abc1234def567890"),
        "imds:meta-data/instance-type": sec("", "t3.large"),
        "imds:meta-data/local-ipv4": sec("", "10.77.0.10"),
        "imds:meta-data/mac": sec("", "0e:11:22:33:44:55"),
        "imds:meta-data/public-ipv4": sec("", "", 22),
        "imds:meta-data/security-groups": sec("", "web\nssh-from-bastion"),
        "imds:dynamic/instance-identity/document": sec("", doc),
    }
    md = inv.parse_imds(sections)
    assert md is not None
    assert md["instance-id"] == "i-0abc1234def567890" and md["imds_version"] == "v2"
    assert md["security-groups"] == ["web", "ssh-from-bastion"]
    assert "public-ipv4" not in md
    assert md["identity-document"]["region"] == "us-east-1"
    assert "nested" not in md["identity-document"]
    assert inv.parse_imds({"client": sec("client", "none v1")}) is None


def test_imds_script_never_reads_credentials() -> None:
    script = inv.imds_script("0123456789abcdef")
    assert "security-credentials" not in script
    assert "latest/api/token" in script and "X-aws-ec2-metadata-token" in script
