"""bench/portscan: our SYN and connect engines against nmap, side by side, on one namespace lab.

The lab (appliance.lab.portlab): 7 hosts that answer, with 6 open TCP ports
each spread over the whole port range, one host that drops everything, and
one address with no host. The scanner and nmap both run in the lab's hub
namespace, one after the other, in the same run (the machine is shared: only
ratios taken side by side mean anything).

Scenarios, each timed end to end as a process (start-up included for both):
  syn_all        vsa scan --ports full  (SYN engine)    vs nmap -n -sS -T4 -p-   whole lab
  syn_answering  the same on the 7 answering hosts only
  connect_all    vsa scan --ports standard --engine connect vs nmap -n -sT -T4   whole lab

Accuracy: every reported open port checked against the ground truth (restricted
to the ports the scenario covers); a scenario is 1.00 when nothing is missed
and nothing extra is reported, for both tools.

The last line prints the headline figures as name=value pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.lab.netns import NetnsLab, lab_available  # noqa: E402
from appliance.lab.portlab import build_port_lab  # noqa: E402
from appliance.scan.portlists import tcp_ports  # noqa: E402

NMAP_TIMEOUT_S = 600


def run_ours(lab: NetnsLab, ips: list[str], ports: str, engine: str, rate: int) -> tuple[float, dict[str, set[int]]]:
    argv = [sys.executable, "-m", "appliance.scan.command", *ips, "--ports", ports, "--engine", engine,
            "--rate", str(rate), "--service-detection", "none", "--format", "json"]
    started = time.monotonic()
    done = subprocess.run(lab.hub_argv(argv), capture_output=True, text=True, timeout=NMAP_TIMEOUT_S, cwd=ROOT)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"vsa scan failed ({done.returncode}): {done.stderr}")
    found = {r["host_key"]: {p["port"] for p in r["ports"] if p["proto"] == "tcp"} for r in json.loads(done.stdout)}
    return elapsed, found


def run_nmap(lab: NetnsLab, ips: list[str], args: list[str]) -> tuple[float, dict[str, set[int]]]:
    argv = ["nmap", *args, "-oX", "-", *ips]
    started = time.monotonic()
    done = subprocess.run(lab.hub_argv(argv), capture_output=True, text=True, timeout=NMAP_TIMEOUT_S)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"nmap failed ({done.returncode}): {done.stderr}")
    found: dict[str, set[int]] = {}
    for host in ET.fromstring(done.stdout).iter("host"):
        addr = next((a.get("addr") for a in host.iter("address") if a.get("addrtype") == "ipv4"), None)
        if addr is None:
            continue
        found[addr] = {int(p.get("portid")) for p in host.iter("port")
                       if p.find("state") is not None and p.find("state").get("state") == "open"}
    return elapsed, found


def accuracy(found: dict[str, set[int]], truth: dict[str, set[int]], ips: list[str]) -> float:
    """1 - (missed + extra) / true open ports, over every lab address of the scenario."""
    expected = sum(len(truth.get(ip, set())) for ip in ips)
    wrong = 0
    for ip in ips:
        want, got = truth.get(ip, set()), found.get(ip, set())
        wrong += len(want - got) + len(got - want)
    return max(0.0, 1.0 - wrong / expected) if expected else (1.0 if wrong == 0 else 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=200_000, help="our SYN engine rate_pps (default 200000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per tool of the shorter scenarios (default 3; syn_all runs once); medians")
    parser.add_argument("--skip-nmap-all", action="store_true",
                        help="skip nmap's ~50 s whole-lab SYN scan (then no syn_speedup_vs_nmap)")
    args = parser.parse_args()
    reason = lab_available()
    if reason:
        raise SystemExit(f"bench/portscan: {reason}")

    with NetnsLab() as lab:
        portlab = build_port_lab(lab, answering=7, ports_per_host=6)
        truth_full = {ip: set(p) for ip, p in portlab.open_ports.items()}
        standard = set(tcp_ports("standard"))
        truth_std = {ip: p & standard for ip, p in truth_full.items()}
        all_ips, answering = portlab.all_ips, portlab.answering_ips
        print(f"lab: {len(answering)} answering hosts x {len(next(iter(truth_full.values())))} open ports, "
              f"dropping host {portlab.dropping_ip}, empty address {portlab.empty_ip}; scanner {lab.scanner_ip}")

        scenarios = [
            ("syn_all", all_ips, truth_full, lambda ips: run_ours(lab, ips, "full", "syn", args.rate),
             None if args.skip_nmap_all else (lambda ips: run_nmap(lab, ips, ["-n", "-sS", "-T4", "-p-"]))),
            ("syn_answering", answering, truth_full, lambda ips: run_ours(lab, ips, "full", "syn", args.rate),
             lambda ips: run_nmap(lab, ips, ["-n", "-sS", "-T4", "-p-"])),
            ("connect_all", all_ips, truth_std, lambda ips: run_ours(lab, ips, "standard", "connect", args.rate),
             lambda ips: run_nmap(lab, ips, ["-n", "-sT", "-T4"])),
        ]
        figures: dict[str, float] = {}
        accuracies: list[float] = []
        for name, ips, truth, ours, theirs in scenarios:
            our_times, their_times = [], []
            # nmap's whole-lab SYN scan takes ~50 s: once is enough to see a 3x difference.
            repeats = 1 if name == "syn_all" else args.repeat
            for run in range(repeats):
                # Alternate who goes first, so a burst of load elsewhere hurts both alike.
                order = [("vsa", ours), ("nmap", theirs)]
                if run % 2:
                    order.reverse()
                for tool, fn in order:
                    if fn is None:
                        continue
                    elapsed, found = fn(ips)
                    (our_times if tool == "vsa" else their_times).append(elapsed)
                    acc = accuracy(found, truth, ips)
                    accuracies.append(acc)
                    print(f"{name:<14} {tool:<5} {elapsed:7.2f} s  accuracy {acc:.2f}", flush=True)
            ours_s = statistics.median(our_times)
            figures[f"{name}_vsa_s"] = ours_s
            if their_times:
                nmap_s = statistics.median(their_times)
                figures[f"{name}_nmap_s"] = nmap_s
                figures[f"{name}_speedup"] = nmap_s / ours_s
                print(f"{name:<14} ratio nmap/vsa = {nmap_s / ours_s:.2f}x", flush=True)

    headline = []
    if "syn_all_speedup" in figures:
        headline.append(f"syn_speedup_vs_nmap={figures['syn_all_speedup']:.2f}")
    headline.append(f"syn_answering_speedup_vs_nmap={figures['syn_answering_speedup']:.2f}")
    headline.append(f"connect_speedup_vs_nmap={figures['connect_all_speedup']:.2f}")
    headline += [f"{k}={v:.2f}" for k, v in figures.items() if k.endswith("_s")]
    headline.append(f"accuracy={min(accuracies):.2f}")
    print(" ".join(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
