"""Turns the runs of scripts/bench-peers.sh into bench/results/<date>.json and a markdown table
with ratios against Plaza.

    python3 bench/report.py RUNS.jsonl OUT.json OUT.md ELAPSED_SECS [SKIPPED...]

RUNS.jsonl holds one plaza-bench JSON line per run, with the script's `label` added (or an
`error` line for a run that could not happen). The table goes to OUT.md and stdout.
"""

import json
import os
import platform
import subprocess
import sys
import time

PEER_NAMES = {
    "plaza-native": "Plaza",
    "plaza": "Plaza",
    "nats-ws": "NATS (WebSocket)",
    "nats": "NATS (WebSocket)",
    "socketio": "Socket.IO 4",
    "snorky": "Snorky",
    "hightemplar": "High-templar",
}


def sh(cmd):
    try:
        out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or out.stderr.strip()
    except Exception as e:  # noqa: BLE001 - best effort
        return "unknown ({})".format(e)


def machine():
    info = {"cpus": os.cpu_count(), "kernel": platform.release()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_kib"] = int(f.readline().split()[1])
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    info["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return info


def versions(root):
    venv = os.path.join(root, "bench", ".venv")
    return {
        "plaza": sh(os.path.join(root, "target", "release", "plaza") + " --version"),
        "nats-server": sh("nats-server --version"),
        "node": sh("node --version"),
        "socket.io": sh("node -p \"require('{}/bench/peers/node_modules/socket.io/package.json')"
                        ".version\"".format(root)),
        "snorky": sh(venv + "/snorky/bin/pip show snorky 2>/dev/null | grep ^Version"),
        "tornado": sh(venv + "/snorky/bin/pip show tornado 2>/dev/null | grep ^Version"),
        "high-templar": sh(venv + "/hightemplar/bin/pip show high-templar 2>/dev/null"
                           " | grep ^Version"),
        "rabbitmq-server": sh("dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null"),
        "python": sh(venv + "/snorky/bin/python --version"),
    }


def fmt_rate(x):
    if x >= 1e6:
        return "{:.2f}M".format(x / 1e6)
    if x >= 1e3:
        return "{:.1f}k".format(x / 1e3)
    return "{:.0f}".format(x)


def fmt_ms(us):
    return "{:.1f}".format(us / 1e3)


def fmt_ratio(x):
    if x is None:
        return "—"
    if x >= 10:
        return "{:.0f}×".format(x)
    return "{:.2f}×".format(x)


def ratio(a, b):
    try:
        return a / b if a and b else None
    except (TypeError, ZeroDivisionError):
        return None


def name(run):
    return PEER_NAMES.get(run.get("peer", ""), run.get("peer", "?"))


def fanout_table(label, runs):
    plaza = next((r for r in runs if r.get("peer") == "plaza-native" and "error" not in r), None)
    lines = [
        "### {} subscribers, one channel (windowed, 16 publications in flight, 100-byte payloads)"
        .format(label.split()[1]),
        "",
        "| server | publications | deliveries/s | Plaza ÷ peer | p50 ms | p99 ms | max ms "
        "| peer p99 ÷ Plaza p99 | loss | server µs/delivery | server cores | RSS/conn | "
        "generator cores | problems |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append("| {} | — | — | — | — | — | — | — | — | — | — | — | — | {} |".format(
                name(r), r["error"]))
            continue
        s = r.get("server") or {}
        lat = r["latency"]
        lines.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                name(r),
                r["publish"]["ok"],
                fmt_rate(r["deliveries_per_sec"]),
                fmt_ratio(ratio(plaza and plaza["deliveries_per_sec"], r["deliveries_per_sec"])),
                fmt_ms(lat["p50_us"]),
                fmt_ms(lat["p99_us"]),
                fmt_ms(lat["max_us"]),
                fmt_ratio(ratio(lat["p99_us"], plaza and plaza["latency"]["p99_us"])),
                r["lost"],
                "{:.2f}".format(s.get("cpu_us_per_delivery", 0)) if s else "—",
                "{:.2f}".format(s.get("cores_publish", 0)) if s else "—",
                "{:.1f} KB".format(s["rss_bytes_per_connection"] / 1000) if s else "—",
                "{:.2f}".format(r["bench"]["cores_publish"]),
                "; ".join(r.get("problems", [])) or "—",
            ))
    return lines


def conns_table(label, runs):
    plaza = next((r for r in runs if r.get("peer") == "plaza-native" and "error" not in r), None)
    pb = (plaza or {}).get("server") or {}
    lines = [
        "### {} idle connections, a channel each".format(label.split()[1]),
        "",
        "| server | connected | connects/s | RSS/conn | peer ÷ Plaza (RSS) | server µs/connect "
        "| idle cores | dropped | problems |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append("| {} | — | — | — | — | — | — | — | {} |".format(name(r), r["error"]))
            continue
        s = r.get("server") or {}
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            name(r),
            r["connected"],
            fmt_rate(r["connect_rate"]),
            "{:.1f} KB".format(s["rss_bytes_per_connection"] / 1000) if s else "—",
            fmt_ratio(ratio(s.get("rss_bytes_per_connection"), pb.get("rss_bytes_per_connection"))),
            "{:.0f}".format(s.get("cpu_us_per_connect", 0)) if s else "—",
            "{:.3f}".format(s.get("cores_idle", 0)) if s else "—",
            r["dropped"],
            "; ".join(r.get("problems", [])) or "—",
        ))
    return lines


def chat_table(label, runs):
    plaza = next((r for r in runs if r.get("peer") == "plaza-native" and "error" not in r), None)
    lines = [
        "### chat {} (rooms × members, each member sending at a fixed rate)".format(
            label.split()[1]),
        "",
        "| server | sent | deliveries/s | p50 ms | p99 ms | max ms | peer p99 ÷ Plaza p99 "
        "| loss | server cores | problems |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append("| {} | — | — | — | — | — | — | — | — | {} |".format(name(r), r["error"]))
            continue
        s = r.get("server") or {}
        lat = r["latency"]
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            name(r),
            r["sent"],
            fmt_rate(r["deliveries_per_sec"]),
            fmt_ms(lat["p50_us"]),
            fmt_ms(lat["p99_us"]),
            fmt_ms(lat["max_us"]),
            fmt_ratio(ratio(lat["p99_us"], plaza and plaza["latency"]["p99_us"])),
            r["lost"],
            "{:.2f}".format(s.get("cores", 0)) if s else "—",
            "; ".join(r.get("problems", [])) or "—",
        ))
    return lines


def main():
    runs_path, out_json, out_md, elapsed = sys.argv[1:5]
    skipped = sys.argv[5:]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = []
    with open(runs_path) as f:
        for line in f:
            line = line.strip()
            if line:
                runs.append(json.loads(line))
    doc = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_secs": int(elapsed),
        "machine": machine(),
        "pinning": os.environ.get("BENCH_PINNING", "unknown"),
        "versions": versions(root),
        "skipped": skipped,
        "runs": runs,
    }
    with open(out_json, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")

    m = doc["machine"]
    md = [
        "## Peer benchmark, {} ({} CPUs, {:.0f} GiB, {}, {} s)".format(
            doc["date"], m.get("cpus"), m.get("mem_kib", 0) / 2**20, m.get("os", "?"),
            doc["elapsed_secs"]),
        "",
        "Cores: {}.".format(doc["pinning"]),
        "",
    ]
    labels = []
    for r in runs:
        if r["label"] not in labels:
            labels.append(r["label"])
    for label in labels:
        group = [r for r in runs if r["label"] == label]
        kind = label.split()[0]
        if kind == "fanout":
            md += fanout_table(label, group)
        elif kind == "conns":
            md += conns_table(label, group)
        elif kind == "chat":
            md += chat_table(label, group)
        md.append("")
    if skipped:
        md.append("Skipped: " + "; ".join(skipped))
        md.append("")
    md.append("Versions: " + ", ".join("{} {}".format(k, v) for k, v in doc["versions"].items()))
    text = "\n".join(md) + "\n"
    with open(out_md, "w") as f:
        f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
